#ifndef IOTHUB_CLOCK_H
#define IOTHUB_CLOCK_H

#include <stddef.h>
#include "compat.h"

double clock_monotime(void);  /* seconds, CLOCK_MONOTONIC */
double clock_walltime(void);  /* seconds since the Unix epoch, with fraction */
/* UTC "YYYY-MM-DDTHH:MM:SS.mmmZ" (24 chars + NUL). Returns 0, or -1 if out of range. */
int clock_format_iso8601(double epoch, char out[32]);
/* An ISO-8601 time (date, optional time, fraction, Z or +hh:mm): stores the epoch seconds and
 * returns 0, or returns -1 with a message saying what is wrong pushed on L's stack. */
int clock_parse_iso8601(lua_State *L, const char *s, size_t n, double *epoch);
/* An HTTP-date (RFC 9110 5.6.7) in any of its three forms: IMF-fixdate
 * "Sun, 06 Nov 1994 08:49:37 GMT", RFC 850 "Sunday, 06-Nov-94 08:49:37 GMT" and asctime
 * "Sun Nov  6 08:49:37 1994". Stores the epoch seconds and returns 0, or returns -1. */
int clock_parse_http_date(const char *s, size_t n, double *epoch);

#endif
