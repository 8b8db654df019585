/* C-level entry points of query.c, used by validate.c for the client's queryCondition check. */
#ifndef IOTHUB_QUERY_H
#define IOTHUB_QUERY_H

#include <stddef.h>

/* The service rejects queries and job conditions longer than this many characters. */
#define QUERY_MAX_LENGTH 8192

/* What query_check_condition found; validate.c turns the special cases into hints. */
enum {
  QUERY_OK = 0,
  QUERY_INVALID,        /* a syntax error; msg names the column */
  QUERY_EMPTY,          /* only whitespace */
  QUERY_TOO_LONG,       /* more than QUERY_MAX_LENGTH characters */
  QUERY_FULL_SELECT,    /* starts with SELECT: a whole query instead of its condition */
  QUERY_LEADING_WHERE   /* starts with WHERE */
};

/* Compiles s as a job queryCondition ("*", a WHERE condition, or FROM devices WHERE ...).
 * Returns QUERY_OK, or another QUERY_* value with a message in msg. */
int query_check_condition(const char *s, size_t n, char *msg, size_t msglen);

/* Byte offset just after the first WHERE keyword outside brackets and string literals,
 * or 0 when there is none or s does not lex. */
size_t query_where_end(const char *s, size_t n);

/* Length in characters (UTF-8 code points), the unit of the service's limit and of columns. */
size_t query_char_count(const char *s, size_t n);

#endif
