/* iothub.curl's easy handle: one blocking transfer at a time on one libcurl handle, which
 * keeps its options and connections from one request to the next. */
#include "curl_transfer.h"

#define EASY_MT "iothub.curl.easy"

typedef struct {
  xfer x;
  defaults d;
  int closed;
} easy_ud;

static easy_ud *check_easy(lua_State *L) {
  easy_ud *e = (easy_ud *)luaL_checkudata(L, 1, EASY_MT);
  if (e->closed) luaL_error(L, "attempt to use a closed " EASY_MT);
  return e;
}

/* curl.easy([options]) -> handle; options are defaults for every request (see read_defaults). */
static int l_easy(lua_State *L) {
  easy_ud *e;
  lua_settop(L, 1); /* the options (or nil) stay at 1, the handle goes to 2 */
  e = (easy_ud *)lua_newuserdatauv(L, sizeof(easy_ud), 0);
  memset(e, 0, sizeof *e);
  e->closed = 1;
  luaL_setmetatable(L, EASY_MT); /* from here on __gc frees whatever was allocated */
  if (!read_defaults(L, 1, &e->d)) return iothub_fail(L, "CURLE_OUT_OF_MEMORY", "curl.easy: out of memory");
  if (!xfer_init(&e->x)) return iothub_fail(L, "CURLE_FAILED_INIT", "curl_easy_init failed");
  e->closed = 0;
  return 1;
}

/* Runs s on the handle; on success leaves the response in e->x and returns CURLE_OK, else
 * pushes nil, message, code. */
static CURLcode easy_run(lua_State *L, easy_ud *e, const reqspec *s) {
  CURLcode rc = xfer_setup(L, &e->x, s, 0);
  if (rc == CURLE_OK) rc = curl_easy_perform(e->x.curl);
  if (rc != CURLE_OK) {
    lua_pushnil(L);
    push_error(L, &e->x, rc, s->url);
    xfer_clear(&e->x);
  }
  return rc;
}

/* e:perform{ method=, url=, headers=, body=, timeout=, ... } -> status, headers, body */
static int easy_perform(lua_State *L) {
  easy_ud *e = check_easy(L);
  reqspec s;
  read_req_table(L, 2, &s, &e->d);
  if (easy_run(L, e, &s) != CURLE_OK) return 3;
  lua_pushinteger(L, response_status(&e->x));
  push_headers(L, &e->x);
  lua_pushlstring(L, e->x.body.data ? e->x.body.data : "", e->x.body.len);
  xfer_clear(&e->x);
  return 3;
}

/* e:request(method, url [, headers [, body [, timeout [, connectTimeout [, maxBody]]]]])
 * -> { status =, headers =, body = }: the per-call fast path (no request table to read). */
static int easy_request(lua_State *L) {
  easy_ud *e = check_easy(L);
  reqspec s;
  read_req_args(L, 2, &s, &e->d);
  if (easy_run(L, e, &s) != CURLE_OK) return 3;
  push_response(L, &e->x);
  xfer_clear(&e->x);
  return 1;
}

static int easy_stats(lua_State *L) {
  easy_ud *e = check_easy(L);
  long connects = 0, port = 0;
  char *ip = NULL;
  curl_off_t total = 0;
  curl_easy_getinfo(e->x.curl, CURLINFO_NUM_CONNECTS, &connects);
  curl_easy_getinfo(e->x.curl, CURLINFO_LOCAL_PORT, &port);
  curl_easy_getinfo(e->x.curl, CURLINFO_PRIMARY_IP, &ip);
  curl_easy_getinfo(e->x.curl, CURLINFO_TOTAL_TIME_T, &total);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)connects);
  lua_setfield(L, -2, "connects");
  lua_pushinteger(L, (lua_Integer)port);
  lua_setfield(L, -2, "localPort");
  lua_pushstring(L, ip ? ip : "");
  lua_setfield(L, -2, "primaryIp");
  lua_pushnumber(L, (lua_Number)total / 1e6);
  lua_setfield(L, -2, "totalTime");
  return 1;
}

static int easy_close(lua_State *L) {
  easy_ud *e = (easy_ud *)luaL_checkudata(L, 1, EASY_MT);
  if (!e->closed) {
    xfer_cleanup(&e->x);
    e->closed = 1;
  }
  defaults_free(&e->d);
  return 0;
}

static int easy_tostring(lua_State *L) {
  easy_ud *e = (easy_ud *)luaL_checkudata(L, 1, EASY_MT);
  if (e->closed) lua_pushliteral(L, EASY_MT " (closed)");
  else lua_pushfstring(L, EASY_MT " (%p)", (void *)e);
  return 1;
}

int easy_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "request", easy_request }, { "perform", easy_perform }, { "stats", easy_stats },
    { "close", easy_close },     { NULL, NULL }
  };
  static const luaL_Reg funcs[] = { { "easy", l_easy }, { NULL, NULL } };
  new_class(L, EASY_MT, methods, easy_close, easy_tostring);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
