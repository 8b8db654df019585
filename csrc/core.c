/* iothub.core: everything OpenResty may load (no libcurl here; see curl.c). */
#include "common.h"

#define IOTHUB_CORE_VERSION "0.1.0"

int luaopen_iothub_core(lua_State *L) {
  lua_newtable(L);
  sas_open(L);
  codec_open(L);
  json_open(L);
  clock_open(L);
  validate_open(L);
  request_open(L);
  job_request_open(L);
  policy_open(L);
  query_open(L);
  sandbox_open(L);
  lua_pushliteral(L, IOTHUB_CORE_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}
