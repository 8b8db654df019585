/* iothub.core: everything OpenResty may load (no libcurl here; see curl.c). */
#include <stdarg.h>
#include <stdio.h>
#include "common.h"

#define IOTHUB_CORE_VERSION "0.1.0"

int iothub_fail(lua_State *L, const char *code, const char *fmt, ...) {
  va_list ap;
  lua_pushnil(L);
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_pushstring(L, code);
  return 3;
}

int luaopen_iothub_core(lua_State *L) {
  lua_newtable(L);
  sas_open(L);
  codec_open(L);
  json_open(L);
  clock_open(L);
  validate_open(L);
  request_open(L);
  policy_open(L);
  lua_pushliteral(L, IOTHUB_CORE_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
