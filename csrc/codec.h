/* C-level entry points of codec.c shared with sas.c and request.c. */
#ifndef IOTHUB_CODEC_H
#define IOTHUB_CODEC_H

#include <stddef.h>
#include "buffer.h"

/* Strict percent-encoding: every byte except A-Z a-z 0-9 - _ . ~ becomes %XX (upper-case hex). */
void url_encode_append(iothub_buffer *b, const char *s, size_t len);

/* Standard base64 with padding. out must hold base64_encoded_len(n) bytes; no NUL is written. */
#define base64_encoded_len(n) ((((n) + 2) / 3) * 4)
size_t base64_encode(const unsigned char *in, size_t n, char *out);

/* Decodes standard base64 (padding required, no whitespace). out must hold (n / 4) * 3 bytes.
 * Returns 0 and sets *outlen, or -1 when the input is not valid base64. */
int base64_decode(const char *in, size_t n, unsigned char *out, size_t *outlen);

/* Random (version 4) UUID in canonical lower-case form; out gets 36 chars + NUL. Returns 0 or -1. */
int uuid4(char out[37]);

#endif
