/* What the easy and multi handles of iothub.curl share: reading a request (a table or positional
 * arguments, with the handle's defaults), setting it on a libcurl handle, collecting the response
 * and turning the finished transfer into Lua values.
 *
 * Every request costs little: a handle gets its constant options and connection settings
 * once (again only when they change, which keeps its connections), then per request only
 * the URL, method, body and a header list whose nodes are reused. No Lua code ever runs while
 * libcurl is inside a call: callbacks only append to C buffers, results are pushed after the
 * transfer. Request tables are read with raw access so no metamethod can run (and yield)
 * either. */
#include <stdio.h>
#include "curl_transfer.h"

#define DEFAULT_MAX_BODY   ((size_t)64 * 1024 * 1024)
#define MAX_HEADER_BYTES   ((size_t)1024 * 1024)
#define KEEP_BUFFER_BYTES  ((size_t)1024 * 1024) /* larger buffers are freed after use */

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

/* ---------------------------------------------------------------- requests */

static const char *const METHOD_NAMES[] = { "GET", "PUT", "POST", "PATCH", "DELETE", NULL };

/* Pushes t[k] (raw, no metamethods) and returns its type; the value stays on the
 * stack so pointers taken from it remain valid for the whole call. */
int rawfield(lua_State *L, int t, const char *k) {
  lua_pushstring(L, k);
  lua_rawget(L, t);
  return lua_type(L, -1);
}

int bad_value(lua_State *L, int idx, const char *what, const char *k, const char *expected) {
  return luaL_error(L, "bad %s '%s' (%s expected, got %s)", what, k, expected, luaL_typename(L, idx));
}

static long to_ms(double seconds) {
  if (seconds <= 0) return 0;
  if (seconds > 1e9) return 1000000000L * 1000L;
  return (long)(seconds * 1000.0 + 0.999); /* round up: a tiny timeout must not become "none" */
}

/* The value at idx (nil: dflt) as a string / non-negative number of seconds / boolean / size. */
static const char *opt_string_at(lua_State *L, int idx, const char *what, const char *k,
                                 const char *dflt, size_t *len) {
  int ty = lua_type(L, idx);
  if (ty == LUA_TNIL || ty == LUA_TNONE) {
    if (len) *len = dflt ? strlen(dflt) : 0;
    return dflt;
  }
  if (ty != LUA_TSTRING) bad_value(L, idx, what, k, "string");
  return lua_tolstring(L, idx, len);
}

/* Stores the non-negative number at idx in *v and returns 1, or returns 0 for nil. */
static int opt_nonnegative_at(lua_State *L, int idx, const char *what, const char *k, double *v) {
  int ty = lua_type(L, idx);
  if (ty == LUA_TNIL || ty == LUA_TNONE) return 0;
  if (ty != LUA_TNUMBER) bad_value(L, idx, what, k, "number");
  *v = lua_tonumber(L, idx);
  if (!(*v >= 0)) luaL_error(L, "bad %s '%s' (non-negative number expected)", what, k);
  return 1;
}

static long opt_ms_at(lua_State *L, int idx, const char *what, const char *k, long dflt) {
  double v;
  return opt_nonnegative_at(L, idx, what, k, &v) ? to_ms(v) : dflt;
}

static int opt_bool_at(lua_State *L, int idx, const char *what, const char *k, int dflt) {
  int ty = lua_type(L, idx);
  if (ty == LUA_TNIL || ty == LUA_TNONE) return dflt;
  if (ty != LUA_TBOOLEAN) bad_value(L, idx, what, k, "boolean");
  return lua_toboolean(L, idx);
}

static size_t opt_size_at(lua_State *L, int idx, const char *what, const char *k, size_t dflt) {
  double v;
  if (!opt_nonnegative_at(L, idx, what, k, &v)) return dflt;
  return v >= (double)((size_t)-1 / 2) ? (size_t)-1 / 2 : (size_t)v;
}

static int header_is(const char *line, size_t len, const char *name, size_t n) {
  size_t i;
  if (len <= n || line[n] != ':') return 0;
  for (i = 0; i < n; i++) {
    char c = line[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (c != name[i]) return 0;
  }
  return 1;
}

static const char *check_method(lua_State *L, int idx, const char *what) {
  const char *m;
  int k;
  if (lua_type(L, idx) != LUA_TSTRING) bad_value(L, idx, what, "method", "string");
  m = lua_tostring(L, idx);
  for (k = 0; METHOD_NAMES[k]; k++)
    if (strcmp(METHOD_NAMES[k], m) == 0) return METHOD_NAMES[k];
  luaL_error(L, "bad %s 'method' (GET, PUT, POST, PATCH or DELETE expected, got '%s')", what, m);
  return NULL;
}

static const char *check_url(lua_State *L, int idx, const char *what) {
  size_t len;
  const char *u;
  if (lua_type(L, idx) != LUA_TSTRING) bad_value(L, idx, what, "url", "string");
  u = lua_tolstring(L, idx, &len);
  if (len == 0 || strlen(u) != len)
    luaL_error(L, "bad %s 'url' (non-empty string without NUL expected)", what);
  return u;
}

/* Checks the headers array at idx (nil allowed) and notes Content-Type / Expect. */
static void check_headers(lua_State *L, int idx, const char *what, reqspec *s) {
  int ty = lua_type(L, idx), i, n;
  s->headers = 0;
  s->nheaders = 0;
  if (ty == LUA_TNIL || ty == LUA_TNONE) return;
  if (ty != LUA_TTABLE) bad_value(L, idx, what, "headers", "table");
  s->headers = lua_absindex(L, idx);
  n = (int)lua_rawlen(L, s->headers);
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *h;
    lua_rawgeti(L, s->headers, i);
    if (lua_type(L, -1) != LUA_TSTRING)
      luaL_error(L, "bad %s 'headers' (string expected at index %d, got %s)", what, i,
                 luaL_typename(L, -1));
    h = lua_tolstring(L, -1, &len);
    if (strlen(h) != len || iothub_has_crlf(h, len))
      luaL_error(L, "bad %s 'headers' (line %d contains CR, LF or NUL)", what, i);
    if ((h[0] | 0x20) == 'c' && header_is(h, len, "content-type", 12)) s->userCtype = 1;
    if ((h[0] | 0x20) == 'e' && header_is(h, len, "expect", 6)) s->userExpect = 1;
    lua_pop(L, 1); /* still referenced by the headers table on the stack */
  }
  s->nheaders = n;
}

/* Reads a request table: raises on misuse and allocates nothing, so no cleanup is needed.
 * Fields it lacks come from the handle's defaults. */
void read_req_table(lua_State *L, int t, reqspec *s, const defaults *d) {
  static const char what[] = "request field";
  int top;
  t = lua_absindex(L, t);
  luaL_checktype(L, t, LUA_TTABLE);
  luaL_checkstack(L, 24, "request fields");
  memset(s, 0, sizeof *s);
  top = lua_gettop(L);
  rawfield(L, t, "method");
  s->method = check_method(L, top + 1, what);
  rawfield(L, t, "url");
  s->url = check_url(L, top + 2, what);
  rawfield(L, t, "body");
  s->body = opt_string_at(L, top + 3, what, "body", NULL, &s->bodylen);
  rawfield(L, t, "headers");
  check_headers(L, top + 4, what, s);
  rawfield(L, t, "timeout");
  s->timeoutMs = opt_ms_at(L, top + 5, what, "timeout", d->timeoutMs);
  rawfield(L, t, "connectTimeout");
  s->connectMs = opt_ms_at(L, top + 6, what, "connectTimeout", d->connectMs);
  rawfield(L, t, "caFile");
  s->conn.caFile = opt_string_at(L, top + 7, what, "caFile", d->conn.caFile, NULL);
  rawfield(L, t, "verify");
  s->conn.verify = opt_bool_at(L, top + 8, what, "verify", d->conn.verify);
  rawfield(L, t, "proxy");
  s->conn.proxy = opt_string_at(L, top + 9, what, "proxy", d->conn.proxy, NULL);
  rawfield(L, t, "noProxy");
  s->conn.noProxy = opt_string_at(L, top + 10, what, "noProxy", d->conn.noProxy, NULL);
  rawfield(L, t, "verbose");
  s->conn.verbose = opt_bool_at(L, top + 11, what, "verbose", d->conn.verbose);
  rawfield(L, t, "maxBody");
  s->maxBody = opt_size_at(L, top + 12, what, "maxBody", d->maxBody);
}

/* Reads positional arguments (method, url, headers, body, timeout, connectTimeout, maxBody)
 * starting at `first`; the connection settings are the handle's. Raises on misuse. */
void read_req_args(lua_State *L, int first, reqspec *s, const defaults *d) {
  static const char what[] = "argument";
  memset(s, 0, sizeof *s);
  s->method = check_method(L, first, what);
  s->url = check_url(L, first + 1, what);
  check_headers(L, first + 2, what, s);
  s->body = opt_string_at(L, first + 3, what, "body", NULL, &s->bodylen);
  s->timeoutMs = opt_ms_at(L, first + 4, what, "timeout", d->timeoutMs);
  s->connectMs = opt_ms_at(L, first + 5, what, "connectTimeout", d->connectMs);
  s->maxBody = opt_size_at(L, first + 6, what, "maxBody", d->maxBody);
  s->conn = d->conn;
}

void defaults_free(defaults *d) {
  free((char *)d->conn.caFile);
  free((char *)d->conn.proxy);
  free((char *)d->conn.noProxy);
  memset(&d->conn, 0, sizeof d->conn);
}

static char *dup_or_null(const char *s, int *oom) {
  char *p;
  if (!s) return NULL;
  p = (char *)malloc(strlen(s) + 1);
  if (!p) { *oom = 1; return NULL; }
  return strcpy(p, s);
}

/* Reads handle options { caFile, verify, proxy, noProxy, verbose, timeout, connectTimeout,
 * maxBody } from the table at idx (nil: none). Raises on misuse; returns 0 when out of memory. */
int read_defaults(lua_State *L, int idx, defaults *d) {
  static const char what[] = "option";
  const char *ca, *proxy, *noProxy;
  int top, oom = 0;
  memset(d, 0, sizeof *d);
  d->conn.verify = 1;
  d->maxBody = DEFAULT_MAX_BODY;
  if (lua_isnoneornil(L, idx)) return 1;
  idx = lua_absindex(L, idx);
  luaL_checktype(L, idx, LUA_TTABLE);
  luaL_checkstack(L, 16, "handle options");
  top = lua_gettop(L);
  rawfield(L, idx, "caFile");
  rawfield(L, idx, "proxy");
  rawfield(L, idx, "noProxy");
  rawfield(L, idx, "verify");
  rawfield(L, idx, "verbose");
  rawfield(L, idx, "timeout");
  rawfield(L, idx, "connectTimeout");
  rawfield(L, idx, "maxBody");
  ca = opt_string_at(L, top + 1, what, "caFile", NULL, NULL);
  proxy = opt_string_at(L, top + 2, what, "proxy", NULL, NULL);
  noProxy = opt_string_at(L, top + 3, what, "noProxy", NULL, NULL);
  d->conn.verify = opt_bool_at(L, top + 4, what, "verify", 1);
  d->conn.verbose = opt_bool_at(L, top + 5, what, "verbose", 0);
  d->timeoutMs = opt_ms_at(L, top + 6, what, "timeout", 0);
  d->connectMs = opt_ms_at(L, top + 7, what, "connectTimeout", 0);
  d->maxBody = opt_size_at(L, top + 8, what, "maxBody", DEFAULT_MAX_BODY);
  lua_settop(L, top);
  d->conn.caFile = dup_or_null(ca, &oom);
  d->conn.proxy = dup_or_null(proxy, &oom);
  d->conn.noProxy = dup_or_null(noProxy, &oom);
  if (oom) defaults_free(d);
  return !oom;
}

/* ---------------------------------------------------------------- transfers */

/* libcurl's list type carries non-const data; these are never written. */
static char EXPECT_OFF[] = "Expect:";      /* no 100-continue round trip before a body */
static char CTYPE_OFF[] = "Content-Type:"; /* drops libcurl's form-urlencoded default */

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

static void forget_applied(xfer *x) {
  free(x->caFile);
  free(x->proxy);
  free(x->noProxy);
  x->caFile = x->proxy = x->noProxy = NULL;
  x->ready = 0;
}

int xfer_init(xfer *x) {
  memset(x, 0, sizeof *x);
  buffer_init(&x->hcopy);
  buffer_init(&x->reqbody);
  buffer_init(&x->body);
  buffer_init(&x->hdrs);
  x->curl = curl_easy_init();
  return x->curl != NULL;
}

void xfer_cleanup(xfer *x) {
  if (x->curl) curl_easy_cleanup(x->curl);
  x->curl = NULL;
  free(x->hlist);
  x->hlist = NULL;
  x->hcap = 0;
  forget_applied(x);
  buffer_free(&x->hcopy);
  buffer_free(&x->reqbody);
  buffer_free(&x->body);
  buffer_free(&x->hdrs);
}

static void keep_or_free(iothub_buffer *b) {
  if (b->cap > KEEP_BUFFER_BYTES) buffer_free(b); else buffer_reset(b);
}

/* Forget the last exchange; big buffers are released rather than kept for reuse. */
void xfer_clear(xfer *x) {
  keep_or_free(&x->body);
  keep_or_free(&x->hdrs);
  keep_or_free(&x->hcopy);
  keep_or_free(&x->reqbody);
}

/* "METHOD scheme://host:port" for messages, by plain string work; never the path or query. */
void format_where(char *out, size_t outsz, const char *method, const char *url) {
  const char *sep = url ? strstr(url, "://") : NULL;
  const char *host, *end, *colon;
  const char *dflt = "";
  if (!sep) {
    snprintf(out, outsz, "%s <invalid URL>", method);
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
  snprintf(out, outsz, "%s %.*s%s", method, (int)(end - url), url, dflt);
}

static int streq_null(const char *a, const char *b) {
  return a == b || (a && b && strcmp(a, b) == 0);
}

#define SET(opt, val) do { if (rc == CURLE_OK) rc = curl_easy_setopt(c, opt, val); } while (0)

/* Options that never change, plus the connection settings; after a change of the latter the
 * handle is reset first (which keeps its connections: keep-alive survives). */
static CURLcode apply_connection(xfer *x, const connopts *o) {
  CURL *c = x->curl;
  CURLcode rc = CURLE_OK;
  int oom = 0;
  if (x->ready && x->verify == o->verify && x->verbose == o->verbose &&
      streq_null(x->caFile, o->caFile) && streq_null(x->proxy, o->proxy) &&
      streq_null(x->noProxy, o->noProxy))
    return CURLE_OK;
  curl_easy_reset(c); /* also undoes whatever a failed earlier attempt left set */
  forget_applied(x);
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
  SET(CURLOPT_SSL_VERIFYPEER, o->verify ? 1L : 0L);
  SET(CURLOPT_SSL_VERIFYHOST, o->verify ? 2L : 0L);
  SET(CURLOPT_PROXY_SSL_VERIFYPEER, o->verify ? 1L : 0L);
  SET(CURLOPT_PROXY_SSL_VERIFYHOST, o->verify ? 2L : 0L);
  if (o->caFile) {
    /* only this file: the system bundle and directory are never loaded */
    SET(CURLOPT_CAINFO, o->caFile);
    SET(CURLOPT_CAPATH, (char *)NULL);
    SET(CURLOPT_PROXY_CAINFO, o->caFile);
    SET(CURLOPT_PROXY_CAPATH, (char *)NULL);
  }
  /* nil leaves libcurl's environment handling (http_proxy, no_proxy, ...) alone */
  if (o->proxy) SET(CURLOPT_PROXY, o->proxy);
  if (o->noProxy) SET(CURLOPT_NOPROXY, o->noProxy);
  SET(CURLOPT_VERBOSE, o->verbose ? 1L : 0L);
  if (rc != CURLE_OK) return rc;
  x->caFile = dup_or_null(o->caFile, &oom);
  x->proxy = dup_or_null(o->proxy, &oom);
  x->noProxy = dup_or_null(o->noProxy, &oom);
  if (oom) {
    forget_applied(x);
    return CURLE_OUT_OF_MEMORY;
  }
  x->verify = o->verify;
  x->verbose = o->verbose;
  x->timeoutMs = x->connectMs = -1; /* reset cleared them: set again below */
  x->maxFile = -1;
  x->ready = 1;
  return CURLE_OK;
}

/* Points the handle's header list at the request's lines: the Lua strings themselves when the
 * transfer ends within this call (easy), else copies kept in the transfer (multi). */
static CURLcode build_headers(lua_State *L, xfer *x, const reqspec *s, int sendBody, int copy) {
  int n = s->nheaders + 2, used = 0, i;
  size_t len;
  if (n > x->hcap) {
    struct curl_slist *p = (struct curl_slist *)realloc(x->hlist, (size_t)n * sizeof *p);
    if (!p) return CURLE_OUT_OF_MEMORY;
    x->hlist = p;
    x->hcap = n;
  }
  if (copy) { /* one allocation that never moves while the lines are copied in */
    size_t total = 0;
    for (i = 1; i <= s->nheaders; i++) {
      lua_rawgeti(L, s->headers, i);
      lua_tolstring(L, -1, &len);
      total += len + 1;
      lua_pop(L, 1);
    }
    buffer_reset(&x->hcopy);
    if (!buffer_reserve(&x->hcopy, total)) return CURLE_OUT_OF_MEMORY;
  }
  for (i = 1; i <= s->nheaders; i++) {
    const char *h;
    lua_rawgeti(L, s->headers, i);
    h = lua_tolstring(L, -1, &len);
    if (copy) {
      char *dst = x->hcopy.data + x->hcopy.len;
      memcpy(dst, h, len + 1); /* with the NUL Lua keeps after every string */
      x->hcopy.len += len + 1;
      x->hlist[used++].data = dst;
    } else {
      x->hlist[used++].data = (char *)h; /* anchored by the headers table on the stack */
    }
    lua_pop(L, 1);
  }
  if (sendBody) { /* without a body libcurl adds neither, and a shorter list is cheaper */
    if (!s->userExpect) x->hlist[used++].data = EXPECT_OFF;
    if (!s->userCtype) x->hlist[used++].data = CTYPE_OFF;
  }
  for (i = 0; i < used; i++) x->hlist[i].next = i + 1 < used ? &x->hlist[i + 1] : NULL;
  return curl_easy_setopt(x->curl, CURLOPT_HTTPHEADER, used ? x->hlist : NULL);
}

/* Apply pass: never raises; returns the first setopt failure. copy: the transfer outlives
 * this call (multi) while the request's strings may not, so libcurl gets copies. */
CURLcode xfer_setup(lua_State *L, xfer *x, const reqspec *s, int copy) {
  CURL *c = x->curl;
  CURLcode rc;
  const char *m = s->method;
  int isGet = m == METHOD_NAMES[0], isPost = m == METHOD_NAMES[2];
  int sendBody = s->body != NULL || isPost || m == METHOD_NAMES[1] || m == METHOD_NAMES[3];
  curl_off_t maxFile = (curl_off_t)s->maxBody;

  xfer_clear(x);
  x->maxBody = s->maxBody;
  x->tooLarge = 0;
  x->result = CURLE_OK;
  x->errbuf[0] = '\0';
  x->method = m;

  rc = apply_connection(x, &s->conn);
  if (rc == CURLE_OK) rc = build_headers(L, x, s, sendBody, copy);
  SET(CURLOPT_URL, s->url); /* libcurl copies it */
  if (sendBody) {
    const char *b = s->body ? s->body : "";
    if (copy && s->bodylen > 0) {
      buffer_append(&x->reqbody, s->body, s->bodylen);
      if (x->reqbody.failed) return CURLE_OUT_OF_MEMORY;
      b = x->reqbody.data;
    }
    SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->bodylen);
    SET(CURLOPT_POSTFIELDS, b); /* not copied: the Lua string or reqbody outlives the transfer */
  } else {
    SET(CURLOPT_HTTPGET, 1L);
  }
  SET(CURLOPT_CUSTOMREQUEST, (!isGet && !isPost) || (sendBody && isGet) ? m : NULL);
  if (x->timeoutMs != s->timeoutMs) {
    SET(CURLOPT_TIMEOUT_MS, s->timeoutMs);
    if (rc == CURLE_OK) x->timeoutMs = s->timeoutMs;
  }
  if (x->connectMs != s->connectMs) {
    SET(CURLOPT_CONNECTTIMEOUT_MS, s->connectMs);
    if (rc == CURLE_OK) x->connectMs = s->connectMs;
  }
  if (x->maxFile != maxFile) {
    /* lets libcurl refuse early when Content-Length is already too big; 0 means no limit */
    SET(CURLOPT_MAXFILESIZE_LARGE, maxFile);
    if (rc == CURLE_OK) x->maxFile = maxFile;
  }
  return rc;
}

#undef SET

/* Describes a failed transfer as (message, code) on the stack. url: the request's, or NULL to
 * ask libcurl (it never follows redirects, so that is the same URL). */
void push_error(lua_State *L, xfer *x, CURLcode rc, const char *url) {
  char where[384];
  if (!url) {
    char *eff = NULL;
    curl_easy_getinfo(x->curl, CURLINFO_EFFECTIVE_URL, &eff);
    url = eff;
  }
  format_where(where, sizeof where, x->method ? x->method : "?", url);
  if (x->tooLarge == 1 || rc == CURLE_FILESIZE_EXCEEDED) {
    char n[32];
    snprintf(n, sizeof n, "%zu", x->maxBody); /* lua_pushfstring has no size_t format */
    lua_pushfstring(L, "%s: response body exceeds maxBody (%s bytes)", where, n);
    lua_pushliteral(L, "ResponseTooLarge");
  } else if (x->tooLarge == 2) {
    lua_pushfstring(L, "%s: response headers exceed %d bytes", where, (int)MAX_HEADER_BYTES);
    lua_pushliteral(L, "ResponseTooLarge");
  } else if (rc == CURLE_WRITE_ERROR && (x->body.failed || x->hdrs.failed)) {
    lua_pushfstring(L, "%s: out of memory buffering the response", where);
    lua_pushliteral(L, "CURLE_OUT_OF_MEMORY");
  } else {
    lua_pushfstring(L, "%s: %s (%s)", where, x->errbuf[0] ? x->errbuf : curl_easy_strerror(rc),
                    curle_name(rc));
    lua_pushstring(L, curle_name(rc));
  }
}

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

/* Pushes a table of lower-cased header name -> value from the raw header bytes (status lines
 * skipped; lower-cases the names in place); repeats are joined with ", ". */
static void push_header_table(lua_State *L, char *data, size_t len) {
  char *p = data, *end = data ? data + len : NULL; /* no header bytes: data is NULL */
  const char *last = NULL;
  size_t lastlen = 0;
  lua_createtable(L, 0, 8); /* sized for a typical response: no rehashing while filling */
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

void push_headers(lua_State *L, xfer *x) {
  push_header_table(L, x->hdrs.data, x->hdrs.len);
}

/* curl.parse_headers(raw) -> table: the response-header parser on its own, for tests and
 * fuzzing (it sees whatever bytes a server sends). */
static int l_parse_headers(lua_State *L) {
  size_t len;
  const char *raw = luaL_checklstring(L, 1, &len);
  char *copy = len ? (char *)lua_newuserdatauv(L, len, 0) : NULL; /* parsed in place */
  if (copy) memcpy(copy, raw, len);
  push_header_table(L, copy, len);
  return 1;
}

int response_status(xfer *x) {
  long code = 0;
  curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &code);
  return (int)code;
}

/* Sets status, headers and body of a finished transfer in the table on top of the stack. */
void set_response_fields(lua_State *L, xfer *x) {
  lua_pushinteger(L, response_status(x));
  lua_setfield(L, -2, "status");
  push_headers(L, x);
  lua_setfield(L, -2, "headers");
  lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
  lua_setfield(L, -2, "body");
}

/* Pushes { status =, headers =, body = } for a finished transfer. */
void push_response(lua_State *L, xfer *x) {
  lua_createtable(L, 0, 3);
  set_response_fields(L, x);
}

static int l_version(lua_State *L) {
  curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);
  lua_pushstring(L, curl_version());
  lua_pushstring(L, info && info->version ? info->version : "");
  return 2;
}

void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction close,
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

int transfer_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    { "version", l_version }, { "parse_headers", l_parse_headers }, { NULL, NULL }
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
