/* Request building: URLs with strictly encoded path segments and query, and header lines.
 * The jobs/v2 request body is built by csrc/job_request.c. */
#include <string.h>
#include "common.h"
#include "buffer.h"
#include "codec.h"

/* Appends the path: a string is taken as already encoded (must start with '/'); an array of
 * segments has each segment percent-encoded, so ids such as "a/b#c" cannot escape their slot. */
static int append_path(lua_State *L, int t, iothub_buffer *b, char *err, size_t errlen) {
  size_t n, i, len;
  const char *s;
  lua_getfield(L, t, "path");
  if (lua_type(L, -1) == LUA_TSTRING) {
    s = lua_tolstring(L, -1, &len);
    if (len == 0 || s[0] != '/' || iothub_has_crlf(s, len)) {
      snprintf(err, errlen, "path must start with '/' and contain no line breaks");
      lua_pop(L, 1);
      return -1;
    }
    buffer_append(b, s, len);
  } else if (lua_type(L, -1) == LUA_TTABLE) {
    n = lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, (int)i);
      s = lua_tolstring(L, -1, &len);
      if (!s || len == 0) {
        snprintf(err, errlen, "path segment %d is empty or not a string", (int)i);
        lua_pop(L, 2);
        return -1;
      }
      buffer_addc(b, '/');
      url_encode_append(b, s, len);
      lua_pop(L, 1);
    }
  } else {
    snprintf(err, errlen, "path must be a string or an array of segments");
    lua_pop(L, 1);
    return -1;
  }
  lua_pop(L, 1);
  return 0;
}

/* Raises on malformed {name, value} pair lists; called before any allocation so a misuse
 * error cannot leak the URL buffer. */
static void check_pairs(lua_State *L, int t, const char *field) {
  size_t n, i;
  int vt;
  lua_getfield(L, t, field);
  if (lua_isnil(L, -1)) { lua_pop(L, 1); return; }
  if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "field '%s' must be an array of {name, value} pairs", field);
  n = lua_rawlen(L, -1);
  for (i = 1; i <= n; i++) {
    lua_rawgeti(L, -1, (int)i);
    if (lua_type(L, -1) != LUA_TTABLE) luaL_error(L, "%s entry %d must be a {name, value} pair", field, (int)i);
    lua_rawgeti(L, -1, 1);
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s entry %d has no name", field, (int)i);
    lua_rawgeti(L, -2, 2);
    vt = lua_type(L, -1);
    if (vt != LUA_TNIL && vt != LUA_TSTRING && vt != LUA_TNUMBER)
      luaL_error(L, "%s entry %d has a value that is not a string or number", field, (int)i);
    lua_pop(L, 3);
  }
  lua_pop(L, 1);
}

static void append_query(lua_State *L, int t, iothub_buffer *b) {
  size_t n, i, len;
  const char *s;
  int first = 1;
  lua_getfield(L, t, "query");
  if (lua_type(L, -1) == LUA_TTABLE) {
    n = lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, (int)i);
      lua_rawgeti(L, -1, 2);
      if (!lua_isnil(L, -1)) {
        lua_rawgeti(L, -2, 1);
        s = lua_tolstring(L, -1, &len);
        buffer_addc(b, first ? '?' : '&');
        first = 0;
        url_encode_append(b, s, len);
        buffer_addc(b, '=');
        lua_pop(L, 1);
        s = lua_tolstring(L, -1, &len);
        url_encode_append(b, s, len);
      }
      lua_pop(L, 2);
    }
  }
  lua_pop(L, 1);
}

/* core.build_request{ endpoint=, path=, query={{k,v},...}, headers={{k,v},...} }
 * -> url, header_lines  |  nil, message, code */
static int l_build_request(lua_State *L) {
  iothub_buffer b;
  char err[160];
  size_t len, n, i, nlen, vlen;
  const char *s, *name, *value;
  int lines;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_getfield(L, 1, "endpoint"); /* left on the stack: the one sure reference to s */
  s = lua_tolstring(L, -1, &len);
  if (!s) return luaL_error(L, "field 'endpoint' must be a string");
  while (len > 0 && s[len - 1] == '/') len--; /* "https://h/" and "https://h" mean the same */

  check_pairs(L, 1, "query");
  check_pairs(L, 1, "headers");

  buffer_init(&b);
  buffer_append(&b, s, len);
  if (append_path(L, 1, &b, err, sizeof err) != 0) {
    buffer_free(&b);
    return iothub_fail(L, "InvalidRequest", "%s", err);
  }
  append_query(L, 1, &b);
  if (b.failed) {
    buffer_free(&b);
    return iothub_fail(L, "OutOfMemory", "out of memory building the request URL");
  }
  lua_pushlstring(L, b.data, b.len);
  buffer_free(&b);

  lua_newtable(L);
  lines = lua_gettop(L);
  lua_getfield(L, 1, "headers");
  if (lua_type(L, -1) == LUA_TTABLE) {
    n = lua_rawlen(L, -1);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, -1, (int)i);
      lua_rawgeti(L, -1, 1);
      lua_rawgeti(L, -2, 2);
      name = lua_tolstring(L, -2, &nlen);
      value = lua_tolstring(L, -1, &vlen);
      if (value) {
        if (iothub_has_crlf(name, nlen) || iothub_has_crlf(value, vlen) || memchr(name, ':', nlen))
          return iothub_fail(L, "InvalidHeader",
                             "header '%s' contains a line break or a bad name; refusing to send it",
                             iothub_has_crlf(name, nlen) ? "?" : name);
        lua_pushfstring(L, "%s: %s", name, value);
        lua_rawseti(L, lines, (int)lua_rawlen(L, lines) + 1);
      }
      lua_pop(L, 3);
    }
  }
  lua_pop(L, 1);
  return 2;
}

int request_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"build_request", l_build_request},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
