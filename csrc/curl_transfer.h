/* What curl_easy.c and curl_multi.c share (curl_transfer.c); private to curl.so. */
#ifndef IOTHUB_CURL_TRANSFER_H
#define IOTHUB_CURL_TRANSFER_H

#include <curl/curl.h>
#include "common.h"
#include "buffer.h"

/* Hidden: curl.so exports only luaopen_iothub_curl, as when it was one file, and these generic
 * names cannot bind to a like-named symbol of another library. */
#pragma GCC visibility push(hidden)

/* Settings a connection depends on. They rarely change between requests, so a handle applies
 * them once and again only when they differ (NULL strings: unset). */
typedef struct {
  const char *caFile;
  const char *proxy;   /* NULL: libcurl's environment handling (http_proxy, ...) */
  const char *noProxy;
  int verify, verbose;
} connopts;

/* Per-handle defaults (curl.easy(opts) / curl.multi(opts)); strings are owned copies. */
typedef struct {
  connopts conn;
  long timeoutMs, connectMs; /* 0: none */
  size_t maxBody;
} defaults;

typedef struct {
  const char *method; /* one of METHOD_NAMES: static, so it outlives any Lua string */
  const char *url;
  const char *body;   /* NULL: no body */
  size_t bodylen;
  int headers;        /* absolute stack index of the headers array, 0 if none */
  int nheaders;
  int userCtype;      /* caller set Content-Type / Expect itself */
  int userExpect;
  long timeoutMs, connectMs;
  size_t maxBody;
  connopts conn;
} reqspec;

typedef struct xfer {
  CURL *curl;
  struct curl_slist *hlist; /* request header list: nodes owned here, reused across requests */
  int hcap;
  iothub_buffer hcopy;      /* header text, when it must outlive the Lua strings (multi) */
  iothub_buffer reqbody;    /* request body copy, likewise */
  iothub_buffer body;
  iothub_buffer hdrs;
  size_t maxBody;
  int tooLarge; /* 1: body over maxBody, 2: headers over MAX_HEADER_BYTES */
  CURLcode result;
  lua_Integer id;
  struct xfer *next;
  const char *method; /* static (METHOD_NAMES) */
  /* what libcurl has been given; ready = 0 until the constant options are set */
  int ready;
  char *caFile, *proxy, *noProxy;
  int verify, verbose;
  long timeoutMs, connectMs;
  curl_off_t maxFile;
  char errbuf[CURL_ERROR_SIZE];
} xfer;

int rawfield(lua_State *L, int t, const char *k);
int bad_value(lua_State *L, int idx, const char *what, const char *k, const char *expected);
void read_req_table(lua_State *L, int t, reqspec *s, const defaults *d);
void read_req_args(lua_State *L, int first, reqspec *s, const defaults *d);
int read_defaults(lua_State *L, int idx, defaults *d);
void defaults_free(defaults *d);

int xfer_init(xfer *x);
void xfer_cleanup(xfer *x);
void xfer_clear(xfer *x);
CURLcode xfer_setup(lua_State *L, xfer *x, const reqspec *s, int copy);

void format_where(char *out, size_t outsz, const char *method, const char *url);
void push_error(lua_State *L, xfer *x, CURLcode rc, const char *url);
int response_status(xfer *x);
void push_headers(lua_State *L, xfer *x);
void set_response_fields(lua_State *L, xfer *x);
void push_response(lua_State *L, xfer *x);

void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction close,
               lua_CFunction tostring);

/* Each registers its functions into the module table at the top of the stack. */
int transfer_open(lua_State *L); /* curl_transfer.c: version, parse_headers */
int easy_open(lua_State *L);     /* curl_easy.c: curl.easy and its handle class */
int multi_open(lua_State *L);    /* curl_multi.c: curl.multi and its handle class */

#pragma GCC visibility pop

#endif
