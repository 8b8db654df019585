/* iothub.curl: blocking (easy) and concurrent (multi) HTTP over libcurl.
 *
 * No Lua code ever runs while libcurl is inside a call: callbacks only append
 * to C buffers, results are pushed after the transfer. Request tables are read
 * with raw access so no metamethod can run (and yield) either. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <curl/curl.h>
#include "common.h"
#include "buffer.h"

#define EASY_MT  "iothub.curl.easy"
#define MULTI_MT "iothub.curl.multi"

#define DEFAULT_MAX_BODY   ((size_t)64 * 1024 * 1024)
#define MAX_HEADER_BYTES   ((size_t)1024 * 1024)
#define KEEP_BUFFER_BYTES  ((size_t)1024 * 1024) /* larger buffers are freed after use */
#define MULTI_POOL_MAX     64


static const char *curle_name(CURLcode rc) {
  switch (rc) {
#define N(x) case x: return #x;
    N(CURLE_OK) N(CURLE_UNSUPPORTED_PROTOCOL) N(CURLE_FAILED_INIT) N(CURLE_URL_MALFORMAT)
    N(CURLE_NOT_BUILT_IN) N(CURLE_COULDNT_RESOLVE_PROXY) N(CURLE_COULDNT_RESOLVE_HOST)
    N(CURLE_COULDNT_CONNECT) N(CURLE_WEIRD_SERVER_REPLY) N(CURLE_REMOTE_ACCESS_DENIED)
    N(CURLE_HTTP2) N(CURLE_PARTIAL_FILE) N(CURLE_QUOTE_ERROR) N(CURLE_HTTP_RETURNED_ERROR)
    N(CURLE_WRITE_ERROR) N(CURLE_UPLOAD_FAILED) N(CURLE_READ_ERROR) N(CURLE_OUT_OF_MEMORY)
    N(CURLE_OPERATION_TIMEDOUT) N(CURLE_RANGE_ERROR) N(CURLE_HTTP_POST_ERROR)
    N(CURLE_SSL_CONNECT_ERROR) N(CURLE_BAD_DOWNLOAD_RESUME) N(CURLE_FILE_COULDNT_READ_FILE)
    N(CURLE_FUNCTION_NOT_FOUND) N(CURLE_ABORTED_BY_CALLBACK) N(CURLE_BAD_FUNCTION_ARGUMENT)
    N(CURLE_INTERFACE_FAILED) N(CURLE_TOO_MANY_REDIRECTS) N(CURLE_UNKNOWN_OPTION)
    N(CURLE_GOT_NOTHING) N(CURLE_SSL_ENGINE_NOTFOUND) N(CURLE_SSL_ENGINE_SETFAILED)
    N(CURLE_SEND_ERROR) N(CURLE_RECV_ERROR) N(CURLE_SSL_CERTPROBLEM) N(CURLE_SSL_CIPHER)
    N(CURLE_PEER_FAILED_VERIFICATION) N(CURLE_BAD_CONTENT_ENCODING) N(CURLE_FILESIZE_EXCEEDED)
    N(CURLE_USE_SSL_FAILED) N(CURLE_SEND_FAIL_REWIND) N(CURLE_SSL_ENGINE_INITFAILED)
    N(CURLE_LOGIN_DENIED) N(CURLE_REMOTE_DISK_FULL) N(CURLE_REMOTE_FILE_EXISTS)
    N(CURLE_SSL_CACERT_BADFILE) N(CURLE_REMOTE_FILE_NOT_FOUND) N(CURLE_SSH)
    N(CURLE_SSL_SHUTDOWN_FAILED) N(CURLE_AGAIN) N(CURLE_SSL_CRL_BADFILE) N(CURLE_SSL_ISSUER_ERROR)
    N(CURLE_CHUNK_FAILED) N(CURLE_NO_CONNECTION_AVAILABLE) N(CURLE_SSL_PINNEDPUBKEYNOTMATCH)
    N(CURLE_SSL_INVALIDCERTSTATUS) N(CURLE_HTTP2_STREAM) N(CURLE_RECURSIVE_API_CALL)
    N(CURLE_AUTH_ERROR)
#if LIBCURL_VERSION_NUM >= 0x074400
    N(CURLE_HTTP3)
#endif
#if LIBCURL_VERSION_NUM >= 0x074500
    N(CURLE_QUIC_CONNECT_ERROR)
#endif
#if LIBCURL_VERSION_NUM >= 0x074900
    N(CURLE_PROXY)
#endif
#if LIBCURL_VERSION_NUM >= 0x074d00
    N(CURLE_SSL_CLIENTCERT)
#endif
#if LIBCURL_VERSION_NUM >= 0x075400
    N(CURLE_UNRECOVERABLE_POLL)
#endif
#undef N
    default: return "CURLE_UNKNOWN";
  }
}

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

/* ---------------------------------------------------------------- requests */

typedef struct {
  const char *method;
  const char *url;
  const char *body;
  size_t bodylen;
  const char *caFile;
  const char *proxy;
  const char *noProxy;
  double timeout, connectTimeout;
  size_t maxBody;
  int hasBody, verify, verbose;
  int headers;   /* absolute stack index of the headers array, 0 if none */
  int userCtype; /* caller set Content-Type / Expect itself */
  int userExpect;
} reqspec;

/* Pushes t[k] (raw, no metamethods) and returns its type; the value stays on the
 * stack so pointers taken from it remain valid for the whole call. */
static int rawfield(lua_State *L, int t, const char *k) {
  lua_pushstring(L, k);
  lua_rawget(L, t);
  return lua_type(L, -1);
}

static int bad_field(lua_State *L, const char *k, const char *expected) {
  return luaL_error(L, "bad request field '%s' (%s expected, got %s)", k, expected,
                    luaL_typename(L, -1));
}

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  int ty = rawfield(L, t, k);
  if (ty == LUA_TNIL) return NULL;
  if (ty != LUA_TSTRING) bad_field(L, k, "string");
  return lua_tolstring(L, -1, len);
}

static double opt_seconds(lua_State *L, int t, const char *k) {
  double v;
  int ty = rawfield(L, t, k);
  if (ty == LUA_TNIL) return 0;
  if (ty != LUA_TNUMBER) bad_field(L, k, "number");
  v = lua_tonumber(L, -1);
  if (!(v >= 0)) luaL_error(L, "bad request field '%s' (non-negative number expected)", k);
  return v;
}

static int opt_bool(lua_State *L, int t, const char *k, int dflt) {
  int ty = rawfield(L, t, k);
  if (ty == LUA_TNIL) return dflt;
  if (ty != LUA_TBOOLEAN) bad_field(L, k, "boolean");
  return lua_toboolean(L, -1);
}

static int header_is(const char *line, size_t len, const char *name) {
  size_t n = strlen(name), i;
  if (len <= n || line[n] != ':') return 0;
  for (i = 0; i < n; i++) {
    char c = line[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (c != name[i]) return 0;
  }
  return 1;
}

/* Validation pass: raises on misuse and allocates nothing, so no cleanup is needed. */
static void read_req(lua_State *L, int t, reqspec *s) {
  static const char *const methods[] = { "GET", "PUT", "POST", "PATCH", "DELETE", NULL };
  size_t len, i, n;
  int ty, k;
  double mb;

  t = lua_absindex(L, t);
  luaL_checktype(L, t, LUA_TTABLE);
  luaL_checkstack(L, 24, "request fields");
  memset(s, 0, sizeof *s);

  if (rawfield(L, t, "method") != LUA_TSTRING) bad_field(L, "method", "string");
  s->method = lua_tostring(L, -1);
  for (k = 0; methods[k] && strcmp(methods[k], s->method) != 0; k++) {}
  if (!methods[k])
    luaL_error(L, "bad request field 'method' (GET, PUT, POST, PATCH or DELETE expected, got '%s')",
               s->method);

  if (rawfield(L, t, "url") != LUA_TSTRING) bad_field(L, "url", "string");
  s->url = lua_tolstring(L, -1, &len);
  if (len == 0 || strlen(s->url) != len)
    luaL_error(L, "bad request field 'url' (non-empty string without NUL expected)");

  s->body = opt_string(L, t, "body", &s->bodylen);
  s->hasBody = s->body != NULL;

  ty = rawfield(L, t, "headers");
  if (ty == LUA_TTABLE) {
    s->headers = lua_gettop(L);
    n = (size_t)lua_rawlen(L, s->headers);
    for (i = 1; i <= n; i++) {
      const char *h;
      lua_rawgeti(L, s->headers, (int)i);
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad request field 'headers' (string expected at index %d, got %s)", (int)i,
                   luaL_typename(L, -1));
      h = lua_tolstring(L, -1, &len);
      if (strlen(h) != len || strpbrk(h, "\r\n"))
        luaL_error(L, "bad request field 'headers' (line %d contains CR, LF or NUL)", (int)i);
      if (header_is(h, len, "content-type")) s->userCtype = 1;
      if (header_is(h, len, "expect")) s->userExpect = 1;
      lua_pop(L, 1); /* still referenced by the headers table on the stack */
    }
  } else if (ty != LUA_TNIL) {
    bad_field(L, "headers", "table");
  }

  s->timeout = opt_seconds(L, t, "timeout");
  s->connectTimeout = opt_seconds(L, t, "connectTimeout");
  s->caFile = opt_string(L, t, "caFile", NULL);
  s->verify = opt_bool(L, t, "verify", 1);
  s->proxy = opt_string(L, t, "proxy", NULL);
  s->noProxy = opt_string(L, t, "noProxy", NULL);
  s->verbose = opt_bool(L, t, "verbose", 0);

  ty = rawfield(L, t, "maxBody");
  if (ty == LUA_TNIL) {
    s->maxBody = DEFAULT_MAX_BODY;
  } else {
    if (ty != LUA_TNUMBER) bad_field(L, "maxBody", "number");
    mb = lua_tonumber(L, -1);
    if (!(mb >= 0)) luaL_error(L, "bad request field 'maxBody' (non-negative number expected)");
    s->maxBody = mb >= (double)((size_t)-1 / 2) ? (size_t)-1 / 2 : (size_t)mb;
  }
}

/* ---------------------------------------------------------------- transfers */

typedef struct xfer {
  CURL *curl;
  struct curl_slist *slist;
  iothub_buffer body;
  iothub_buffer hdrs;
  size_t maxBody;
  int tooLarge; /* 1: body over maxBody, 2: headers over MAX_HEADER_BYTES */
  CURLcode result;
  lua_Integer id;
  struct xfer *next;
  char where[384]; /* "METHOD scheme://host:port" for messages; never the query */
  char errbuf[CURL_ERROR_SIZE];
} xfer;

static size_t on_body(char *p, size_t size, size_t nmemb, void *ud) {
  xfer *x = (xfer *)ud;
  size_t len = size * nmemb;
  if (len > x->maxBody - x->body.len) { x->tooLarge = 1; return 0; }
  buffer_append(&x->body, p, len);
  return x->body.failed ? 0 : len;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *ud) {
  xfer *x = (xfer *)ud;
  size_t len = size * nmemb;
  /* A new status line starts a new response (after 100 Continue, 401, ...): keep only the last. */
  if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) buffer_reset(&x->hdrs);
  if (len > MAX_HEADER_BYTES - x->hdrs.len) { x->tooLarge = 2; return 0; }
  buffer_append(&x->hdrs, p, len);
  return x->hdrs.failed ? 0 : len;
}

static int xfer_init(xfer *x) {
  memset(x, 0, sizeof *x);
  buffer_init(&x->body);
  buffer_init(&x->hdrs);
  x->curl = curl_easy_init();
  return x->curl != NULL;
}

static void xfer_cleanup(xfer *x) {
  if (x->curl) curl_easy_cleanup(x->curl);
  x->curl = NULL;
  curl_slist_free_all(x->slist);
  x->slist = NULL;
  buffer_free(&x->body);
  buffer_free(&x->hdrs);
}

/* Forget the last response; big buffers are released rather than kept for reuse. */
static void xfer_clear(xfer *x) {
  if (x->body.cap > KEEP_BUFFER_BYTES) buffer_free(&x->body); else buffer_reset(&x->body);
  if (x->hdrs.cap > KEEP_BUFFER_BYTES) buffer_free(&x->hdrs); else buffer_reset(&x->hdrs);
  curl_slist_free_all(x->slist);
  x->slist = NULL;
}

/* "METHOD scheme://host:port" by plain string work: it runs on every request, and the URLs are
 * ours (built by the client), so a full URL parse would only cost time. Never the path or query. */
static void set_where(xfer *x, const char *method, const char *url) {
  const char *sep = strstr(url, "://");
  const char *host, *end, *colon;
  const char *dflt = "";
  if (!sep) {
    snprintf(x->where, sizeof x->where, "%s <invalid URL>", method);
    return;
  }
  host = sep + 3;
  end = host + strcspn(host, "/?#");
  colon = memchr(host, ']', (size_t)(end - host)); /* skip an IPv6 literal's colons */
  colon = memchr(colon ? colon : host, ':', (size_t)(end - (colon ? colon : host)));
  if (!colon) {
    if ((size_t)(sep - url) == 5 && strncmp(url, "https", 5) == 0) dflt = ":443";
    else if ((size_t)(sep - url) == 4 && strncmp(url, "http", 4) == 0) dflt = ":80";
  }
  snprintf(x->where, sizeof x->where, "%s %.*s%s", method, (int)(end - url), url, dflt);
}

static long to_ms(double seconds) {
  if (seconds <= 0) return 0;
  if (seconds > 1e9) return 1000000000L * 1000L;
  return (long)(seconds * 1000.0 + 0.999); /* round up: a tiny timeout must not become "none" */
}

#define SET(opt, val) do { if (rc == CURLE_OK) rc = curl_easy_setopt(c, opt, val); } while (0)

/* Apply pass: never raises; returns the first setopt failure. */
static CURLcode xfer_setup(lua_State *L, xfer *x, const reqspec *s) {
  CURL *c = x->curl;
  CURLcode rc = CURLE_OK;
  struct curl_slist *sl;
  int custom = strcmp(s->method, "GET") != 0 && strcmp(s->method, "POST") != 0;
  int sendBody = s->hasBody || strcmp(s->method, "POST") == 0 || strcmp(s->method, "PUT") == 0 ||
                 strcmp(s->method, "PATCH") == 0;

  curl_easy_reset(c); /* keeps the connection cache: keep-alive survives */
  xfer_clear(x);
  x->maxBody = s->maxBody;
  x->tooLarge = 0;
  x->result = CURLE_OK;
  x->errbuf[0] = '\0';
  set_where(x, s->method, s->url);

  if (s->headers) {
    size_t i, n = (size_t)lua_rawlen(L, s->headers);
    for (i = 1; i <= n; i++) {
      lua_rawgeti(L, s->headers, (int)i);
      sl = curl_slist_append(x->slist, lua_tostring(L, -1));
      lua_pop(L, 1);
      if (!sl) return CURLE_OUT_OF_MEMORY;
      x->slist = sl;
    }
  }
  if (!s->userExpect) {
    if (!(sl = curl_slist_append(x->slist, "Expect:"))) return CURLE_OUT_OF_MEMORY;
    x->slist = sl;
  }
  if (sendBody && !s->userCtype) { /* drop libcurl's form-urlencoded default */
    if (!(sl = curl_slist_append(x->slist, "Content-Type:"))) return CURLE_OUT_OF_MEMORY;
    x->slist = sl;
  }

  SET(CURLOPT_URL, s->url);
#if LIBCURL_VERSION_NUM >= 0x075500
  SET(CURLOPT_PROTOCOLS_STR, "http,https");
#else
  SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
  SET(CURLOPT_NOSIGNAL, 1L);
  SET(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
  SET(CURLOPT_FOLLOWLOCATION, 0L);
  SET(CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
  SET(CURLOPT_ERRORBUFFER, x->errbuf);
  SET(CURLOPT_WRITEFUNCTION, on_body);
  SET(CURLOPT_WRITEDATA, (void *)x);
  SET(CURLOPT_HEADERFUNCTION, on_header);
  SET(CURLOPT_HEADERDATA, (void *)x);
  SET(CURLOPT_PRIVATE, (void *)x);
  SET(CURLOPT_HTTPHEADER, x->slist);
  if (s->maxBody > 0) /* lets libcurl refuse early when Content-Length is already too big */
    SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)s->maxBody);

  if (sendBody) {
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->bodylen);
    /* copied: a multi transfer outlives the Lua string's stack slot */
    SET(CURLOPT_COPYPOSTFIELDS, s->hasBody ? s->body : "");
  } else {
    SET(CURLOPT_HTTPGET, 1L);
  }
  if (custom || (sendBody && strcmp(s->method, "GET") == 0)) SET(CURLOPT_CUSTOMREQUEST, s->method);

  SET(CURLOPT_TIMEOUT_MS, to_ms(s->timeout));
  SET(CURLOPT_CONNECTTIMEOUT_MS, to_ms(s->connectTimeout));

  SET(CURLOPT_SSL_VERIFYPEER, s->verify ? 1L : 0L);
  SET(CURLOPT_SSL_VERIFYHOST, s->verify ? 2L : 0L);
  SET(CURLOPT_PROXY_SSL_VERIFYPEER, s->verify ? 1L : 0L);
  SET(CURLOPT_PROXY_SSL_VERIFYHOST, s->verify ? 2L : 0L);
  if (s->caFile) {
    SET(CURLOPT_CAINFO, s->caFile);
    SET(CURLOPT_PROXY_CAINFO, s->caFile);
  }
  /* nil leaves libcurl's environment handling (http_proxy, no_proxy, ...) alone */
  if (s->proxy) SET(CURLOPT_PROXY, s->proxy);
  if (s->noProxy) SET(CURLOPT_NOPROXY, s->noProxy);
  SET(CURLOPT_VERBOSE, s->verbose ? 1L : 0L);
  return rc;
}

#undef SET

/* Describes a failed transfer as (message, code) on the stack. */
static void push_error(lua_State *L, xfer *x, CURLcode rc) {
  if (x->tooLarge == 1 || rc == CURLE_FILESIZE_EXCEEDED) {
    char n[32];
    snprintf(n, sizeof n, "%zu", x->maxBody); /* lua_pushfstring has no size_t format */
    lua_pushfstring(L, "%s: response body exceeds maxBody (%s bytes)", x->where, n);
    lua_pushliteral(L, "ResponseTooLarge");
  } else if (x->tooLarge == 2) {
    lua_pushfstring(L, "%s: response headers exceed %d bytes", x->where, (int)MAX_HEADER_BYTES);
    lua_pushliteral(L, "ResponseTooLarge");
  } else if (rc == CURLE_WRITE_ERROR && (x->body.failed || x->hdrs.failed)) {
    lua_pushfstring(L, "%s: out of memory buffering the response", x->where);
    lua_pushliteral(L, "CURLE_OUT_OF_MEMORY");
  } else {
    lua_pushfstring(L, "%s: %s (%s)", x->where, x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc),
                    curle_name(rc));
    lua_pushstring(L, curle_name(rc));
  }
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* Pushes a table of lower-cased header name -> value; repeats are joined with ", ". */
static void push_headers(lua_State *L, xfer *x) {
  char *p = x->hdrs.data, *end = p + x->hdrs.len;
  const char *last = NULL;
  size_t lastlen = 0;
  lua_newtable(L);
  while (p && p < end) {
    char *eol = memchr(p, '\n', (size_t)(end - p));
    char *line = p, *lend = eol ? eol : end, *colon, *name, *v, *vend, *q;
    int cont;
    p = eol ? eol + 1 : end;
    while (lend > line && is_ws(lend[-1])) lend--;
    if (lend == line) continue;
    if ((size_t)(lend - line) >= 5 && memcmp(line, "HTTP/", 5) == 0) continue;
    cont = line[0] == ' ' || line[0] == '\t'; /* obsolete line folding */
    if (cont) {
      if (!last) continue;
      v = line;
      name = NULL;
      colon = NULL;
    } else {
      colon = memchr(line, ':', (size_t)(lend - line));
      if (!colon) continue;
      name = line;
      for (q = name; q < colon; q++)
        if (*q >= 'A' && *q <= 'Z') *q = (char)(*q - 'A' + 'a');
      vend = colon;
      while (vend > name && is_ws(vend[-1])) vend--;
      last = name;
      lastlen = (size_t)(vend - name);
      v = colon + 1;
    }
    while (v < lend && is_ws(*v)) v++;
    vend = lend;
    lua_pushlstring(L, last, lastlen);
    lua_pushvalue(L, -1);
    lua_rawget(L, -3);
    if (lua_type(L, -1) == LUA_TSTRING) {
      lua_pushstring(L, cont ? " " : ", ");
      lua_pushlstring(L, v, (size_t)(vend - v));
      lua_concat(L, 3);
    } else {
      lua_pop(L, 1);
      lua_pushlstring(L, v, (size_t)(vend - v));
    }
    lua_rawset(L, -3);
  }
}

static int response_status(xfer *x) {
  long code = 0;
  curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &code);
  return (int)code;
}

/* ---------------------------------------------------------------- easy */

typedef struct {
  xfer x;
  int closed;
} easy_ud;

static easy_ud *check_easy(lua_State *L) {
  easy_ud *e = (easy_ud *)luaL_checkudata(L, 1, EASY_MT);
  if (e->closed) luaL_error(L, "attempt to use a closed " EASY_MT);
  return e;
}

static int l_easy(lua_State *L) {
  easy_ud *e = (easy_ud *)lua_newuserdatauv(L, sizeof(easy_ud), 0);
  e->closed = 1;
  memset(&e->x, 0, sizeof e->x);
  luaL_setmetatable(L, EASY_MT);
  if (!xfer_init(&e->x)) return iothub_fail(L, "CURLE_FAILED_INIT", "curl_easy_init failed");
  e->closed = 0;
  return 1;
}

static int easy_perform(lua_State *L) {
  easy_ud *e = check_easy(L);
  reqspec s;
  CURLcode rc;
  read_req(L, 2, &s);
  rc = xfer_setup(L, &e->x, &s);
  if (rc == CURLE_OK) rc = curl_easy_perform(e->x.curl);
  if (rc != CURLE_OK) {
    lua_pushnil(L);
    push_error(L, &e->x, rc);
    xfer_clear(&e->x);
    return 3;
  }
  lua_pushinteger(L, response_status(&e->x));
  push_headers(L, &e->x);
  lua_pushlstring(L, e->x.body.data ? e->x.body.data : "", e->x.body.len);
  xfer_clear(&e->x);
  return 3;
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
  return 0;
}

static int easy_tostring(lua_State *L) {
  easy_ud *e = (easy_ud *)luaL_checkudata(L, 1, EASY_MT);
  if (e->closed) lua_pushliteral(L, EASY_MT " (closed)");
  else lua_pushfstring(L, EASY_MT " (%p)", (void *)e);
  return 1;
}

/* ---------------------------------------------------------------- multi */

typedef struct {
  CURLM *m;
  xfer *active;              /* in flight */
  xfer *doneHead, *doneTail; /* finished, waiting for completed() (in finishing order) */
  xfer *pool;                /* idle handles for reuse */
  int nactive, ndone, npool;
  lua_Integer nextId;
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

static void multi_release(multi_ud *mu, xfer *x) {
  if (mu->npool >= MULTI_POOL_MAX) { xfer_destroy(x); return; }
  xfer_clear(x);
  curl_easy_reset(x->curl); /* frees the copied request body now rather than at reuse */
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

static int l_multi(lua_State *L) {
  multi_ud *mu;
  lua_Integer maxHost = 0, maxTotal = 0;
  if (!lua_isnoneornil(L, 1)) {
    luaL_checktype(L, 1, LUA_TTABLE);
    if (rawfield(L, 1, "maxHostConnections") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER) bad_field(L, "maxHostConnections", "number");
      maxHost = lua_tointeger(L, -1);
    }
    if (rawfield(L, 1, "maxTotalConnections") != LUA_TNIL) {
      if (lua_type(L, -1) != LUA_TNUMBER) bad_field(L, "maxTotalConnections", "number");
      maxTotal = lua_tointeger(L, -1);
    }
    lua_pop(L, 2);
    luaL_argcheck(L, maxHost >= 0 && maxTotal >= 0, 1, "connection limits must be >= 0");
  }
  mu = (multi_ud *)lua_newuserdatauv(L, sizeof(multi_ud), 0);
  memset(mu, 0, sizeof *mu);
  mu->closed = 1;
  luaL_setmetatable(L, MULTI_MT);
  mu->m = curl_multi_init();
  if (!mu->m) return iothub_fail(L, "CURLM_OUT_OF_MEMORY", "curl_multi_init failed");
  mu->closed = 0;
  if (maxHost) curl_multi_setopt(mu->m, CURLMOPT_MAX_HOST_CONNECTIONS, (long)maxHost);
  if (maxTotal) curl_multi_setopt(mu->m, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)maxTotal);
  return 1;
}

static int multi_add(lua_State *L) {
  multi_ud *mu = check_multi(L);
  reqspec s;
  xfer *x;
  CURLcode rc;
  CURLMcode mc;
  read_req(L, 2, &s);
  if (mu->pool) {
    x = mu->pool;
    mu->pool = x->next;
    mu->npool--;
  } else {
    x = (xfer *)malloc(sizeof *x);
    if (!x) return iothub_fail(L, "CURLE_OUT_OF_MEMORY", "%s: out of memory", s.method);
    if (!xfer_init(x)) {
      free(x);
      return iothub_fail(L, "CURLE_FAILED_INIT", "%s: curl_easy_init failed", s.method);
    }
  }
  rc = xfer_setup(L, x, &s);
  if (rc != CURLE_OK) {
    lua_pushnil(L);
    push_error(L, x, rc);
    multi_release(mu, x);
    return 3;
  }
  mc = curl_multi_add_handle(mu->m, x->curl);
  if (mc != CURLM_OK) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s (%s)", x->where, curl_multi_strerror(mc), curlm_name(mc));
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
      lua_pushinteger(L, response_status(x));
      lua_setfield(L, -2, "status");
      push_headers(L, x);
      lua_setfield(L, -2, "headers");
      lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
      lua_setfield(L, -2, "body");
    } else {
      push_error(L, x, x->result);
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

/* ---------------------------------------------------------------- module */

static int l_version(lua_State *L) {
  curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);
  lua_pushstring(L, curl_version());
  lua_pushstring(L, info && info->version ? info->version : "");
  return 2;
}

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction close,
                      lua_CFunction tostring) {
  luaL_newmetatable(L, name);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, close);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, close);
  lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}

int luaopen_iothub_curl(lua_State *L) {
  static int initialized = 0;
  static const luaL_Reg easy_methods[] = {
    { "perform", easy_perform }, { "stats", easy_stats }, { "close", easy_close }, { NULL, NULL }
  };
  static const luaL_Reg multi_methods[] = {
    { "add", multi_add },           { "perform", multi_perform }, { "wait", multi_wait },
    { "timeout", multi_timeout },   { "completed", multi_completed },
    { "cancel", multi_cancel },     { "pending", multi_pending },  { "close", multi_close },
    { NULL, NULL }
  };
  static const luaL_Reg funcs[] = {
    { "version", l_version }, { "easy", l_easy }, { "multi", l_multi }, { NULL, NULL }
  };
  if (!initialized) {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) return luaL_error(L, "curl_global_init failed: %s", curl_easy_strerror(rc));
    initialized = 1;
  }
  new_class(L, EASY_MT, easy_methods, easy_close, easy_tostring);
  new_class(L, MULTI_MT, multi_methods, multi_close, multi_tostring);
  lua_newtable(L);
  luaL_setfuncs(L, funcs, 0);
  return 1;
}
