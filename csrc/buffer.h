/* A growable byte buffer (malloc'd, reusable), for JSON output and HTTP bodies.
 * Header-only so both C modules can use it without sharing a library. */
#ifndef IOTHUB_BUFFER_H
#define IOTHUB_BUFFER_H

#include <stdlib.h>
#include <string.h>

typedef struct {
  char *data;
  size_t len;
  size_t cap;
  int failed; /* set when an allocation failed; later appends are ignored */
} iothub_buffer;

static inline void buffer_init(iothub_buffer *b) {
  b->data = NULL;
  b->len = b->cap = 0;
  b->failed = 0;
}

static inline void buffer_free(iothub_buffer *b) {
  free(b->data);
  buffer_init(b);
}

/* Keep the allocation (for reuse) but forget the contents. */
static inline void buffer_reset(iothub_buffer *b) {
  b->len = 0;
  b->failed = 0;
}

static inline int buffer_reserve(iothub_buffer *b, size_t extra) {
  size_t need, cap;
  char *p;
  if (b->failed) return 0;
  need = b->len + extra;
  if (need < b->len) { b->failed = 1; return 0; } /* overflow */
  if (need <= b->cap) return 1;
  cap = b->cap ? b->cap : 256;
  while (cap < need) {
    if (cap > ((size_t)-1) / 2) { cap = need; break; }
    cap *= 2;
  }
  p = (char *)realloc(b->data, cap);
  if (!p) { b->failed = 1; return 0; }
  b->data = p;
  b->cap = cap;
  return 1;
}

static inline void buffer_append(iothub_buffer *b, const char *s, size_t n) {
  if (n == 0 || !buffer_reserve(b, n)) return;
  memcpy(b->data + b->len, s, n);
  b->len += n;
}

static inline void buffer_addc(iothub_buffer *b, char c) {
  if (!buffer_reserve(b, 1)) return;
  b->data[b->len++] = c;
}

static inline void buffer_adds(iothub_buffer *b, const char *s) {
  buffer_append(b, s, strlen(s));
}

#endif
