/* Declarations shared by the C files of iothub.core (and iothub.curl). */
#ifndef IOTHUB_COMMON_H
#define IOTHUB_COMMON_H

#include <stdarg.h>
#include <string.h>
#include "compat.h"

/* Runtime failure convention (luv/LuaSocket): push nil, message, code; return 3.
 * Misuse (wrong argument types) raises through luaL_arg* instead. Inline so that both
 * modules (iothub.core and iothub.curl, separate .so files) share one definition. */
static inline int iothub_fail(lua_State *L, const char *code, const char *fmt, ...) {
  va_list ap;
  lua_pushnil(L);
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_pushstring(L, code);
  return 3;
}

/* 1 if s[0..n) holds a CR or LF, which would split a header line (or a request path) in two:
 * the one check both modules make before a caller's text goes on the wire. */
static inline int iothub_has_crlf(const char *s, size_t n) {
  return memchr(s, '\r', n) != NULL || memchr(s, '\n', n) != NULL;
}

/* Casting a double that does not fit the target type (or NaN) is undefined behaviour, so every
 * double -> integer conversion of a data-dependent value goes through one of these two. */

/* v as a whole number in [-2^63, 2^63): stores it and returns 1; otherwise (fraction, out of
 * range, NaN) returns 0. */
static inline int iothub_whole_int64(double v, long long *out) {
  long long i;
  if (!(v >= -9223372036854775808.0 && v < 9223372036854775808.0)) return 0;
  i = (long long)v;
  if ((double)i != v) return 0;
  *out = i;
  return 1;
}

/* v truncated toward zero and clamped to [lo, hi]; NaN gives lo. */
static inline long long iothub_clamp_int64(double v, long long lo, long long hi) {
  if (!(v > (double)lo)) return lo;
  if (v >= (double)hi) return hi;
  return (long long)v;
}

/* Each concern registers its functions into the module table at the top of the stack. */
int sas_open(lua_State *L);      /* sas.c: HMAC-SHA256, SAS tokens, connection strings */
int codec_open(lua_State *L);    /* codec.c: base64, strict URL encoding, uuid4 */
int json_open(lua_State *L);     /* json.c: exact-number JSON codec */
int clock_open(lua_State *L);    /* clock.c: monotonic/wall time, sleep, ISO-8601, isatty, rusage */
int validate_open(lua_State *L); /* validate.c: job ids, query conditions, properties, timeouts */
int request_open(lua_State *L);  /* request.c: URLs and header lines */
int job_request_open(lua_State *L); /* job_request.c: every check of a job request, and its body */
int policy_open(lua_State *L);   /* policy.c: retry backoff and monitor decisions */
int query_open(lua_State *L);    /* query.c: the IoT Hub query language (after json_open) */
int sandbox_open(lua_State *L);  /* sandbox.c: memory, instruction and time limits for untrusted Lua */

#endif
