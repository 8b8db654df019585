/* clock.c: monotonic and wall time, sleep, ISO-8601 UTC format/parse, isatty, rusage. */
#define _GNU_SOURCE /* timegm */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/time.h>
#include "common.h"
#include "clock.h"

/* 0000-01-01T00:00:00Z and 10000-01-01T00:00:00Z: the range a 4-digit year can show. */
#define MIN_EPOCH (-62167219200.0)
#define MAX_EPOCH (253402300800.0)

#define TIME_FORMATS \
  "expected YYYY-MM-DDTHH:MM:SS[.fraction] followed by Z, +hh:mm, -hh:mm or nothing (UTC), " \
  "or YYYY-MM-DD"

double clock_monotime(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double clock_walltime(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int clock_format_iso8601(double epoch, char out[32]) {
  long long sec, ms;
  double whole;
  time_t t;
  struct tm tm;
  if (!(epoch >= MIN_EPOCH && epoch < MAX_EPOCH)) return -1; /* also rejects NaN */
  /* Milliseconds are truncated, as JavaScript's toISOString does; but a time read as x.123 is
   * the double nearest to it, which may lie just below (x.12299999...), by more than a
   * microsecond after 2106. When epoch is exactly the double parse_time makes of the next
   * millisecond, that millisecond is what it stands for. */
  whole = floor(epoch);
  ms = iothub_clamp_int64((epoch - whole) * 1000.0, 0, 999); /* the difference is exact but just below 0 */
  if (whole + (double)(ms + 1) / 1000.0 == epoch) ms++; /* never 1000: epoch < whole + 1 */
  if (!iothub_whole_int64(whole, &sec)) return -1;
  t = (time_t)sec;
  if (!gmtime_r(&t, &tm)) return -1;
  if (tm.tm_year + 1900 > 9999 || tm.tm_year + 1900 < 0) return -1;
  {
    /* Roomy scratch: the compiler cannot see the fields' ranges and would warn. */
    char tmp[96];
    int len = snprintf(tmp, sizeof tmp, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                       tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)ms);
    if (len != 24) return -1;
    memcpy(out, tmp, 25);
  }
  return 0;
}

static int l_monotime(lua_State *L) {
  lua_pushnumber(L, clock_monotime());
  return 1;
}

static int l_time(lua_State *L) {
  lua_pushnumber(L, clock_walltime());
  return 1;
}

static int l_sleep(lua_State *L) {
  lua_Number s = luaL_checknumber(L, 1);
  struct timespec req, rem;
  if (!(s > 0)) { /* 0, negative and NaN return at once */
    lua_pushboolean(L, 1);
    return 1;
  }
  if (s > 1e9) s = 1e9; /* keep tv_sec in range; ~31 years is "forever" enough */
  req.tv_sec = (time_t)s;
  req.tv_nsec = (long)((s - (lua_Number)req.tv_sec) * 1e9);
  if (req.tv_nsec >= 1000000000L) req.tv_nsec = 999999999L;
  while (nanosleep(&req, &rem) != 0 && errno == EINTR) req = rem; /* resume after signals */
  lua_pushboolean(L, 1);
  return 1;
}

static int l_format_time(lua_State *L) {
  lua_Number e = luaL_checknumber(L, 1);
  char out[32];
  if (clock_format_iso8601(e, out) != 0)
    return iothub_fail(L, "InvalidTime",
                       "format_time: epoch seconds must be a finite number between year 0000 and 9999");
  lua_pushstring(L, out);
  return 1;
}

/* Reads exactly n digits at *p; returns the value or -1. */
static int digits(const char **p, const char *end, int n) {
  int v = 0, i;
  for (i = 0; i < n; i++) {
    if (*p >= end || **p < '0' || **p > '9') return -1;
    v = v * 10 + (**p - '0');
    (*p)++;
  }
  return v;
}

static int is_leap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

static int days_in_month(int y, int m) {
  static const int dm[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return (m == 2 && is_leap(y)) ? 29 : dm[m - 1];
}

static const char *const MONTHS[12] = {"January", "February", "March", "April", "May", "June", "July",
                                       "August", "September", "October", "November", "December"};

int clock_parse_iso8601(lua_State *L, const char *s, size_t n, double *epoch) {
  const char *p = s, *end = s + n;
  int Y, M, D, h = 0, mi = 0, sec = 0, off = 0;
  double frac = 0;
  char shown[80];
  struct tm tm;
  time_t t;

  {
    size_t i, lim = n > 64 ? 64 : n, o = 0;
    for (i = 0; i < lim; i++) {
      unsigned char c = (unsigned char)s[i];
      shown[o++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    if (lim < n) { memcpy(shown + o, "...", 3); o += 3; }
    shown[o] = '\0';
  }

#define BAD(why) \
  do { lua_pushfstring(L, "time '%s' is not valid: %s; " TIME_FORMATS, shown, why); return -1; } while (0)

  if ((Y = digits(&p, end, 4)) < 0 || p >= end || *p++ != '-' || (M = digits(&p, end, 2)) < 0 ||
      p >= end || *p++ != '-' || (D = digits(&p, end, 2)) < 0)
    BAD("the date part is not YYYY-MM-DD");
  if (M < 1 || M > 12) BAD("the month must be 01 to 12");
  if (D < 1 || D > days_in_month(Y, M)) {
    lua_pushfstring(L, "time '%s' is not valid: %s %d has no day %d; " TIME_FORMATS, shown, MONTHS[M - 1], Y, D);
    return -1;
  }
  if (p < end) {
    if (*p != 'T' && *p != 't' && *p != ' ') BAD("the date must be followed by 'T' (or a space) and a time");
    p++;
    if ((h = digits(&p, end, 2)) < 0 || p >= end || *p++ != ':' || (mi = digits(&p, end, 2)) < 0 ||
        p >= end || *p++ != ':' || (sec = digits(&p, end, 2)) < 0)
      BAD("the time part is not HH:MM:SS");
    if (h > 23) BAD("the hour must be 00 to 23");
    if (mi > 59) BAD("the minutes must be 00 to 59");
    if (sec > 59) BAD("the seconds must be 00 to 59");
    if (p < end && *p == '.') {
      long fv = 0, scale = 1;
      p++;
      if (p >= end || *p < '0' || *p > '9') BAD("a '.' must be followed by fraction digits");
      while (p < end && *p >= '0' && *p <= '9') {
        if (scale < 1000000000L) { /* digits past nanoseconds are below double precision anyway */
          fv = fv * 10 + (*p - '0');
          scale *= 10;
        }
        p++;
      }
      frac = (double)fv / (double)scale;
    }
    if (p < end) {
      if (*p == 'Z' || *p == 'z') {
        p++;
      } else if (*p == '+' || *p == '-') {
        int sign = (*p == '-') ? -1 : 1, oh, om;
        p++;
        if ((oh = digits(&p, end, 2)) < 0 || p >= end || *p++ != ':' || (om = digits(&p, end, 2)) < 0)
          BAD("the zone offset must be +hh:mm or -hh:mm");
        if (oh > 23 || om > 59) BAD("the zone offset is out of range");
        off = sign * (oh * 3600 + om * 60);
      } else {
        BAD("unexpected text after the time");
      }
    }
  }
  if (p != end) BAD("unexpected text at the end");
#undef BAD

  memset(&tm, 0, sizeof tm);
  tm.tm_year = Y - 1900;
  tm.tm_mon = M - 1;
  tm.tm_mday = D;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = sec;
  t = timegm(&tm); /* fields were validated above, so no normalisation happens */
  *epoch = (double)t - off + frac;
  return 0;
}

static int l_parse_time(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  double epoch;
  if (clock_parse_iso8601(L, s, n, &epoch) != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    lua_pushliteral(L, "InvalidTime");
    return 3;
  }
  lua_pushnumber(L, epoch);
  return 1;
}

/* Case-insensitive match of the n letters at p against word. */
static int word_is(const char *p, const char *end, const char *word, size_t n) {
  size_t i;
  if ((size_t)(end - p) < n) return 0;
  for (i = 0; i < n; i++) {
    char c = p[i], w = word[i];
    if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
    if (w >= 'A' && w <= 'Z') w = (char)(w - 'A' + 'a');
    if (c != w) return 0;
  }
  return 1;
}

/* A three-letter month name at *p (advanced past it): 1..12, or -1. */
static int month_abbrev(const char **p, const char *end) {
  int m;
  for (m = 0; m < 12; m++) {
    if (word_is(*p, end, MONTHS[m], 3)) {
      *p += 3;
      return m + 1;
    }
  }
  return -1;
}

static int expect(const char **p, const char *end, char c) {
  if (*p >= end || **p != c) return 0;
  (*p)++;
  return 1;
}

/* "HH:MM:SS" at *p; 0 or -1. A leap second (60) is read as 59. */
static int hms(const char **p, const char *end, int *h, int *mi, int *sec) {
  if ((*h = digits(p, end, 2)) < 0 || !expect(p, end, ':') || (*mi = digits(p, end, 2)) < 0 ||
      !expect(p, end, ':') || (*sec = digits(p, end, 2)) < 0)
    return -1;
  if (*h > 23 || *mi > 59 || *sec > 60) return -1;
  if (*sec == 60) *sec = 59;
  return 0;
}

int clock_parse_http_date(const char *s, size_t n, double *epoch) {
  const char *p = s, *end = s + n;
  int Y, M, D, h, mi, sec;
  struct tm tm;
  while (p < end && ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z'))) p++; /* day name */
  if (p == s || p - s > 9) return -1;
  if (expect(&p, end, ',')) {
    if (!expect(&p, end, ' ') || (D = digits(&p, end, 2)) < 0) return -1;
    if (expect(&p, end, ' ')) { /* IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT */
      if ((M = month_abbrev(&p, end)) < 0 || !expect(&p, end, ' ') || (Y = digits(&p, end, 4)) < 0) return -1;
    } else if (expect(&p, end, '-')) { /* RFC 850: Sunday, 06-Nov-94 08:49:37 GMT */
      if ((M = month_abbrev(&p, end)) < 0 || !expect(&p, end, '-') || (Y = digits(&p, end, 2)) < 0) return -1;
      Y += Y < 70 ? 2000 : 1900;
    } else {
      return -1;
    }
    if (!expect(&p, end, ' ') || hms(&p, end, &h, &mi, &sec) != 0 || !expect(&p, end, ' ') ||
        !word_is(p, end, "GMT", 3))
      return -1;
    p += 3;
  } else { /* asctime: Sun Nov  6 08:49:37 1994 */
    if (!expect(&p, end, ' ') || (M = month_abbrev(&p, end)) < 0 || !expect(&p, end, ' ')) return -1;
    if (expect(&p, end, ' ')) {
      if ((D = digits(&p, end, 1)) < 0) return -1;
    } else if ((D = digits(&p, end, 2)) < 0) {
      return -1;
    }
    if (!expect(&p, end, ' ') || hms(&p, end, &h, &mi, &sec) != 0 || !expect(&p, end, ' ') ||
        (Y = digits(&p, end, 4)) < 0)
      return -1;
  }
  if (p != end || D < 1 || D > days_in_month(Y, M)) return -1;
  memset(&tm, 0, sizeof tm);
  tm.tm_year = Y - 1900;
  tm.tm_mon = M - 1;
  tm.tm_mday = D;
  tm.tm_hour = h;
  tm.tm_min = mi;
  tm.tm_sec = sec;
  *epoch = (double)timegm(&tm);
  return 0;
}

static int l_isatty(lua_State *L) {
  lua_Integer fd = luaL_checkinteger(L, 1);
  lua_pushboolean(L, fd >= 0 && fd <= 0x7fffffff && isatty((int)fd) == 1);
  return 1;
}

static int l_cputime(lua_State *L) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return iothub_fail(L, "SystemError", "getrusage failed: %s", strerror(errno));
  lua_pushnumber(L, (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                        (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
  return 1;
}

static int l_maxrss(lua_State *L) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return iothub_fail(L, "SystemError", "getrusage failed: %s", strerror(errno));
  lua_pushinteger(L, (lua_Integer)ru.ru_maxrss); /* KiB on Linux */
  return 1;
}

int clock_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"monotime", l_monotime},
    {"time", l_time},
    {"sleep", l_sleep},
    {"format_time", l_format_time},
    {"parse_time", l_parse_time},
    {"isatty", l_isatty},
    {"cputime", l_cputime},
    {"maxrss", l_maxrss},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
