/* codec.c: base64 (standard, padded), strict percent-encoding, random v4 UUIDs. */
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <openssl/rand.h>
#include "common.h"
#include "codec.h"

static const char B64_ALPHABET[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static const char HEX_UPPER[] = "0123456789ABCDEF";

size_t base64_encode(const unsigned char *in, size_t n, char *out) {
  size_t i, o = 0;
  for (i = 0; i + 2 < n; i += 3) {
    unsigned long v = ((unsigned long)in[i] << 16) | ((unsigned long)in[i + 1] << 8) | in[i + 2];
    out[o++] = B64_ALPHABET[(v >> 18) & 63];
    out[o++] = B64_ALPHABET[(v >> 12) & 63];
    out[o++] = B64_ALPHABET[(v >> 6) & 63];
    out[o++] = B64_ALPHABET[v & 63];
  }
  if (i < n) {
    unsigned long v = (unsigned long)in[i] << 16;
    if (i + 1 < n) v |= (unsigned long)in[i + 1] << 8;
    out[o++] = B64_ALPHABET[(v >> 18) & 63];
    out[o++] = B64_ALPHABET[(v >> 12) & 63];
    out[o++] = (i + 1 < n) ? B64_ALPHABET[(v >> 6) & 63] : '=';
    out[o++] = '=';
  }
  return o;
}

static int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}

/* Decoder with a reason, so the Lua wrapper can say what is wrong without echoing input
 * (it may be a key). *badpos gets the 1-based position of the offending character (0 if none). */
static int base64_decode_why(const char *in, size_t n, unsigned char *out, size_t *outlen,
                             const char **why, size_t *badpos) {
  size_t i, o = 0, pad = 0;
  *badpos = 0;
  if (n % 4 != 0) {
    *why = "length is not a multiple of 4";
    return -1;
  }
  if (n >= 1 && in[n - 1] == '=') pad++;
  if (n >= 2 && in[n - 2] == '=') pad++;
  for (i = 0; i < n; i += 4) {
    int k, vals[4];
    int last = (i + 4 == n);
    for (k = 0; k < 4; k++) {
      unsigned char c = (unsigned char)in[i + k];
      if (c == '=' && last && k >= 4 - (int)pad) { vals[k] = 0; continue; }
      vals[k] = b64_value(c);
      if (vals[k] < 0) {
        *why = (c == '=') ? "misplaced '=' padding" : "invalid character";
        *badpos = i + k + 1;
        return -1;
      }
    }
    {
      unsigned long v = ((unsigned long)vals[0] << 18) | ((unsigned long)vals[1] << 12) |
                        ((unsigned long)vals[2] << 6) | (unsigned long)vals[3];
      out[o++] = (unsigned char)(v >> 16);
      if (!last || pad < 2) out[o++] = (unsigned char)(v >> 8);
      if (!last || pad < 1) out[o++] = (unsigned char)v;
    }
  }
  *outlen = o;
  return 0;
}

int base64_decode(const char *in, size_t n, unsigned char *out, size_t *outlen) {
  const char *why;
  size_t pos;
  return base64_decode_why(in, n, out, outlen, &why, &pos);
}

/* RFC 3986 unreserved characters pass; everything else is %XX. The one encoding rule for
 * path segments, query values and the Lua url_encode. */
static int is_unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '_' || c == '.' || c == '~';
}

void url_encode_append(iothub_buffer *b, const char *s, size_t len) {
  size_t i;
  for (i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (is_unreserved(c)) {
      buffer_addc(b, (char)c);
    } else {
      char esc[3];
      esc[0] = '%';
      esc[1] = HEX_UPPER[c >> 4];
      esc[2] = HEX_UPPER[c & 15];
      buffer_append(b, esc, 3);
    }
  }
}

/* RAND_bytes has a fixed cost far above 16 bytes' worth, and every request takes a Request-Id:
 * draw randomness in blocks. Per thread, and refilled after a fork so a child never repeats
 * its parent's ids (getpid is compared rather than an atfork handler, which would outlive an
 * unloaded module). */
#define UUID_POOL 512
static __thread unsigned char uuid_pool[UUID_POOL];
static __thread size_t uuid_left;
static __thread pid_t uuid_pid;

int uuid4(char out[37]) {
  unsigned char r[16];
  int i, o = 0;
  pid_t pid = getpid();
  if (uuid_left < sizeof r || uuid_pid != pid) {
    if (RAND_bytes(uuid_pool, UUID_POOL) != 1) return -1;
    uuid_left = UUID_POOL;
    uuid_pid = pid;
  }
  memcpy(r, uuid_pool + (UUID_POOL - uuid_left), sizeof r);
  memset(uuid_pool + (UUID_POOL - uuid_left), 0, sizeof r);
  uuid_left -= sizeof r;
  r[6] = (unsigned char)((r[6] & 0x0f) | 0x40); /* version 4 */
  r[8] = (unsigned char)((r[8] & 0x3f) | 0x80); /* RFC 4122 variant */
  for (i = 0; i < 16; i++) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
    out[o++] = "0123456789abcdef"[r[i] >> 4];
    out[o++] = "0123456789abcdef"[r[i] & 15];
  }
  out[o] = '\0';
  return 0;
}

/* ---- Lua bindings. Scratch space is a userdata so a raised error cannot leak it. ---- */

static int l_base64_encode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char *out;
  size_t olen;
  if (n > ((size_t)-1) / 2) return luaL_error(L, "base64_encode: input too large");
  out = (char *)lua_newuserdatauv(L, base64_encoded_len(n) + 1, 0);
  olen = base64_encode((const unsigned char *)s, n, out);
  lua_pushlstring(L, out, olen);
  return 1;
}

static int l_base64_decode(lua_State *L) {
  size_t n, olen = 0, pos;
  const char *s = luaL_checklstring(L, 1, &n);
  const char *why = NULL;
  unsigned char *out = (unsigned char *)lua_newuserdatauv(L, (n / 4) * 3 + 1, 0);
  if (base64_decode_why(s, n, out, &olen, &why, &pos) != 0) {
    if (pos)
      return iothub_fail(L, "InvalidBase64", "invalid base64: %s at position %d (input is %d characters)",
                         why, (int)pos, (int)n);
    return iothub_fail(L, "InvalidBase64", "invalid base64: %s (input is %d characters)", why, (int)n);
  }
  lua_pushlstring(L, (const char *)out, olen);
  return 1;
}

static int l_url_encode(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  iothub_buffer b;
  buffer_init(&b);
  url_encode_append(&b, s, n);
  if (b.failed) {
    buffer_free(&b);
    return luaL_error(L, "out of memory encoding a URL component");
  }
  lua_pushlstring(L, b.data, b.len);
  buffer_free(&b);
  return 1;
}

static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* RFC 3986 percent-decoding; '+' stays '+' (this is not form decoding). */
static int l_url_decode(lua_State *L) {
  size_t n, i, o = 0;
  const char *s = luaL_checklstring(L, 1, &n);
  char *out = (char *)lua_newuserdatauv(L, n + 1, 0);
  for (i = 0; i < n; i++) {
    if (s[i] == '%') {
      int hi = (i + 1 < n) ? hexval((unsigned char)s[i + 1]) : -1;
      int lo = (i + 2 < n) ? hexval((unsigned char)s[i + 2]) : -1;
      if (hi < 0 || lo < 0)
        return iothub_fail(L, "InvalidEncoding",
                           "invalid percent-encoding at position %d: '%%' must be followed by two hex digits",
                           (int)(i + 1));
      out[o++] = (char)((hi << 4) | lo);
      i += 2;
    } else {
      out[o++] = s[i];
    }
  }
  lua_pushlstring(L, out, o);
  return 1;
}

static int l_uuid4(lua_State *L) {
  char out[37];
  if (uuid4(out) != 0) return iothub_fail(L, "RandomFailed", "uuid4: RAND_bytes failed");
  lua_pushstring(L, out);
  return 1;
}

int codec_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"base64_encode", l_base64_encode},
    {"base64_decode", l_base64_decode},
    {"url_encode", l_url_encode},
    {"url_decode", l_url_decode},
    {"uuid4", l_uuid4},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
