/* iothub.curl's multi handle: concurrent transfers on one libcurl multi handle, the easy
 * handles (and their connections) pooled for reuse. */
#include "curl_transfer.h"

#define MULTI_MT "iothub.curl.multi"
#define MULTI_POOL_MAX 64

static const char *curlm_name(CURLMcode rc) {
  switch (rc) {
#define N(x) case x: return #x;
    N(CURLM_CALL_MULTI_PERFORM) N(CURLM_OK) N(CURLM_BAD_HANDLE) N(CURLM_BAD_EASY_HANDLE)
    N(CURLM_OUT_OF_MEMORY) N(CURLM_INTERNAL_ERROR) N(CURLM_BAD_SOCKET) N(CURLM_UNKNOWN_OPTION)
    N(CURLM_ADDED_ALREADY) N(CURLM_RECURSIVE_API_CALL) N(CURLM_WAKEUP_FAILURE)
    N(CURLM_BAD_FUNCTION_ARGUMENT)
#if LIBCURL_VERSION_NUM >= 0x075400
    N(CURLM_ABORTED_BY_CALLBACK) N(CURLM_UNRECOVERABLE_POLL)
#endif
#undef N
    default: return "CURLM_UNKNOWN";
  }
}

typedef struct {
  CURLM *m;
  xfer *active;              /* in flight */
  xfer *doneHead, *doneTail; /* finished, waiting for completed() (in finishing order) */
  xfer *pool;                /* idle handles for reuse */
  int nactive, ndone, npool;
  lua_Integer nextId;
  defaults d;
  int closed;
} multi_ud;

static multi_ud *check_multi(lua_State *L) {
  multi_ud *mu = (multi_ud *)luaL_checkudata(L, 1, MULTI_MT);
  if (mu->closed) luaL_error(L, "attempt to use a closed " MULTI_MT);
  return mu;
}

static int multi_fail(lua_State *L, const char *what, CURLMcode mc) {
  return iothub_fail(L, curlm_name(mc), "%s: %s (%s)", what, curl_multi_strerror(mc), curlm_name(mc));
}

static void xfer_destroy(xfer *x) {
  xfer_cleanup(x);
  free(x);
}

/* Back to the pool; the handle keeps its options (and libcurl its connections) for reuse. */
static void multi_release(multi_ud *mu, xfer *x) {
  if (mu->npool >= MULTI_POOL_MAX) { xfer_destroy(x); return; }
  xfer_clear(x);
  x->next = mu->pool;
  mu->pool = x;
  mu->npool++;
}

static void unlink_active(multi_ud *mu, xfer *x) {
  xfer **pp;
  for (pp = &mu->active; *pp; pp = &(*pp)->next) {
    if (*pp == x) {
      *pp = x->next;
      mu->nactive--;
      return;
    }
  }
}

/* Moves finished transfers from libcurl's message queue to our done list. */
static void multi_collect(multi_ud *mu) {
  CURLMsg *msg;
  int left;
  while ((msg = curl_multi_info_read(mu->m, &left)) != NULL) {
    char *priv = NULL;
    xfer *x;
    CURL *h = msg->easy_handle;
    CURLcode result = msg->data.result; /* msg is invalid after remove_handle */
    if (msg->msg != CURLMSG_DONE) continue;
    curl_easy_getinfo(h, CURLINFO_PRIVATE, &priv);
    x = (xfer *)priv;
    curl_multi_remove_handle(mu->m, h);
    if (!x) continue;
    x->result = result;
    unlink_active(mu, x);
    x->next = NULL;
    if (mu->doneTail) mu->doneTail->next = x; else mu->doneHead = x;
    mu->doneTail = x;
    mu->ndone++;
  }
}

/* curl.multi([options]) -> handle; options: maxHostConnections, maxTotalConnections, and the
 * request defaults curl.easy takes. */
static int l_multi(lua_State *L) {
  multi_ud *mu;
  lua_Integer maxHost = 0, maxTotal = 0;
  lua_settop(L, 1); /* the options (or nil) stay at 1, the handle goes to 2 */
  if (!lua_isnil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (rawfield(L, 1, "maxHostConnections") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER) bad_value(L, -1, "option", "maxHostConnections", "number");
      maxHost = (lua_Integer)iothub_clamp_int64(lua_tonumber(L, -1), -1, 0x7fffffff);
    }
    if (rawfield(L, 1, "maxTotalConnections") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER) bad_value(L, -1, "option", "maxTotalConnections", "number");
      maxTotal = (lua_Integer)iothub_clamp_int64(lua_tonumber(L, -1), -1, 0x7fffffff);
    }
    lua_pop(L, 2);
    luaL_argcheck(L, maxHost >= 0 && maxTotal >= 0, 1, "connection limits must be >= 0");
  }
  mu = (multi_ud *)lua_newuserdatauv(L, sizeof(multi_ud), 0);
  memset(mu, 0, sizeof *mu);
  mu->closed = 1;
  luaL_setmetatable(L, MULTI_MT); /* from here on __gc frees whatever was allocated */
  if (!read_defaults(L, 1, &mu->d)) return iothub_fail(L, "CURLM_OUT_OF_MEMORY", "curl.multi: out of memory");
  mu->m = curl_multi_init();
  if (!mu->m) return iothub_fail(L, "CURLM_OUT_OF_MEMORY", "curl_multi_init failed");
  mu->closed = 0;
  if (maxHost) curl_multi_setopt(mu->m, CURLMOPT_MAX_HOST_CONNECTIONS, (long)maxHost);
  if (maxTotal) curl_multi_setopt(mu->m, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)maxTotal);
  return 1;
}

/* Starts s on a pooled (or new) handle; pushes its id, or nil, message, code. */
static int multi_start(lua_State *L, multi_ud *mu, const reqspec *s) {
  xfer *x;
  CURLcode rc;
  CURLMcode mc;
  if (mu->pool) {
    x = mu->pool;
    mu->pool = x->next;
    mu->npool--;
  } else {
    x = (xfer *)malloc(sizeof *x);
    if (!x) return iothub_fail(L, "CURLE_OUT_OF_MEMORY", "%s: out of memory", s->method);
    if (!xfer_init(x)) {
      free(x);
      return iothub_fail(L, "CURLE_FAILED_INIT", "%s: curl_easy_init failed", s->method);
    }
  }
  rc = xfer_setup(L, x, s, 1);
  if (rc != CURLE_OK) {
    lua_pushnil(L);
    push_error(L, x, rc, s->url);
    multi_release(mu, x);
    return 3;
  }
  mc = curl_multi_add_handle(mu->m, x->curl);
  if (mc != CURLM_OK) {
    char where[384];
    format_where(where, sizeof where, s->method, s->url);
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s (%s)", where, curl_multi_strerror(mc), curlm_name(mc));
    lua_pushstring(L, curlm_name(mc));
    multi_release(mu, x);
    return 3;
  }
  x->id = ++mu->nextId;
  x->next = mu->active;
  mu->active = x;
  mu->nactive++;
  lua_pushinteger(L, x->id);
  return 1;
}

/* m:add{ method=, url=, ... } -> id */
static int multi_add(lua_State *L) {
  multi_ud *mu = check_multi(L);
  reqspec s;
  read_req_table(L, 2, &s, &mu->d);
  return multi_start(L, mu, &s);
}

/* m:submit(method, url [, headers [, body [, timeout [, connectTimeout [, maxBody]]]]]) -> id */
static int multi_submit(lua_State *L) {
  multi_ud *mu = check_multi(L);
  reqspec s;
  read_req_args(L, 2, &s, &mu->d);
  return multi_start(L, mu, &s);
}

static int multi_perform(lua_State *L) {
  multi_ud *mu = check_multi(L);
  int running = 0;
  CURLMcode mc = curl_multi_perform(mu->m, &running);
  if (mc != CURLM_OK) return multi_fail(L, "curl_multi_perform", mc);
  multi_collect(mu);
  lua_pushinteger(L, running);
  return 1;
}

static int multi_wait(lua_State *L) {
  multi_ud *mu = check_multi(L);
  double secs = luaL_optnumber(L, 2, 0);
  int numfds = 0;
  CURLMcode mc;
  luaL_argcheck(L, secs >= 0, 2, "non-negative number of seconds expected");
  mc = curl_multi_poll(mu->m, NULL, 0, (int)(secs > 86400 ? 86400000 : secs * 1000.0), &numfds);
  if (mc != CURLM_OK) return multi_fail(L, "curl_multi_poll", mc);
  lua_pushinteger(L, numfds);
  return 1;
}

static int multi_timeout(lua_State *L) {
  multi_ud *mu = check_multi(L);
  long ms = -1;
  CURLMcode mc = curl_multi_timeout(mu->m, &ms);
  if (mc != CURLM_OK) return multi_fail(L, "curl_multi_timeout", mc);
  lua_pushnumber(L, ms < 0 ? -1 : (lua_Number)ms / 1000.0);
  return 1;
}

static int multi_completed(lua_State *L) {
  multi_ud *mu = check_multi(L);
  int i = 0;
  multi_collect(mu);
  lua_createtable(L, mu->ndone, 0);
  while (mu->doneHead) {
    xfer *x = mu->doneHead;
    mu->doneHead = x->next;
    if (!mu->doneHead) mu->doneTail = NULL;
    mu->ndone--;
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, x->id);
    lua_setfield(L, -2, "id");
    if (x->result == CURLE_OK) {
      set_response_fields(L, x);
    } else {
      push_error(L, x, x->result, NULL);
      lua_setfield(L, -3, "code");
      lua_setfield(L, -2, "error");
    }
    lua_rawseti(L, -2, ++i);
    multi_release(mu, x);
  }
  return 1;
}

static int multi_cancel(lua_State *L) {
  multi_ud *mu = check_multi(L);
  lua_Integer id = luaL_checkinteger(L, 2);
  xfer *x, *prev;
  for (x = mu->active; x; x = x->next) {
    if (x->id == id) {
      curl_multi_remove_handle(mu->m, x->curl);
      unlink_active(mu, x);
      multi_release(mu, x);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  /* finished but not yet collected: drop the result */
  for (prev = NULL, x = mu->doneHead; x; prev = x, x = x->next) {
    if (x->id == id) {
      if (prev) prev->next = x->next; else mu->doneHead = x->next;
      if (mu->doneTail == x) mu->doneTail = prev;
      mu->ndone--;
      multi_release(mu, x);
      lua_pushboolean(L, 1);
      return 1;
    }
  }
  lua_pushboolean(L, 0);
  return 1;
}

static int multi_pending(lua_State *L) {
  multi_ud *mu = check_multi(L);
  lua_pushinteger(L, mu->nactive + mu->ndone);
  return 1;
}

static void free_list(xfer *x) {
  while (x) {
    xfer *next = x->next;
    xfer_destroy(x);
    x = next;
  }
}

static int multi_close(lua_State *L) {
  multi_ud *mu = (multi_ud *)luaL_checkudata(L, 1, MULTI_MT);
  xfer *x;
  defaults_free(&mu->d);
  if (mu->closed) return 0;
  for (x = mu->active; x; x = x->next) curl_multi_remove_handle(mu->m, x->curl);
  free_list(mu->active);
  free_list(mu->doneHead);
  free_list(mu->pool);
  mu->active = mu->doneHead = mu->doneTail = mu->pool = NULL;
  mu->nactive = mu->ndone = mu->npool = 0;
  curl_multi_cleanup(mu->m);
  mu->m = NULL;
  mu->closed = 1;
  return 0;
}

static int multi_tostring(lua_State *L) {
  multi_ud *mu = (multi_ud *)luaL_checkudata(L, 1, MULTI_MT);
  if (mu->closed) lua_pushliteral(L, MULTI_MT " (closed)");
  else lua_pushfstring(L, MULTI_MT " (%p, %d pending)", (void *)mu, mu->nactive + mu->ndone);
  return 1;
}

int multi_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    { "submit", multi_submit },     { "add", multi_add },
    { "perform", multi_perform },   { "wait", multi_wait },
    { "timeout", multi_timeout },   { "completed", multi_completed },
    { "cancel", multi_cancel },     { "pending", multi_pending },  { "close", multi_close },
    { NULL, NULL }
  };
  static const luaL_Reg funcs[] = { { "multi", l_multi }, { NULL, NULL } };
  new_class(L, MULTI_MT, methods, multi_close, multi_tostring);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
