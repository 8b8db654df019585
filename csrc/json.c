/* Exact-number JSON codec: integers stay integers, floats are printed with enough
 * digits to round-trip, and anything that could be silently rounded is refused. */
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "json.h"

#define JSON_MAX_DEPTH 128

/* Registry key (its address) for the array metatable. */
static const char array_mt_key = 'a';

static void push_array_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&array_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
}

/* ---------------------------------------------------------------- shared helpers */

/* Length of the UTF-8 sequence at p, or 0 when it is not well-formed
 * (overlong forms, surrogates and code points above U+10FFFF are rejected). */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
  unsigned char c = p[0], lo = 0x80, hi = 0xBF;
  size_t n, i;
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;
  if (c < 0xE0) n = 2;
  else if (c < 0xF0) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    else if (c == 0xED) hi = 0x9F;
  } else if (c < 0xF5) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    else if (c == 0xF4) hi = 0x8F;
  } else return 0;
  if ((size_t)(end - p) < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (i = 2; i < n; i++)
    if ((p[i] & 0xC0) != 0x80) return 0;
  return n;
}

/* Writes v in decimal; out needs 21 bytes. Returns the length. */
static size_t fmt_integer(char *out, long long v) {
  char tmp[24];
  size_t n = 0, i;
  unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
  do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
  i = 0;
  if (v < 0) out[i++] = '-';
  while (n) out[i++] = tmp[--n];
  out[i] = '\0';
  return i;
}

/* snprintf uses the C locale's decimal separator; JSON needs '.'.
 * Any run of bytes that cannot belong to a %g number is the separator. */
static size_t fix_decimal_point(char *s, size_t n) {
  size_t i, j = 0;
  int in_sep = 0;
  for (i = 0; i < n; i++) {
    char c = s[i];
    if ((c >= '0' && c <= '9') || c == '-' || c == '+' || c == 'e' || c == 'E') {
      s[j++] = c;
      in_sep = 0;
    } else if (!in_sep) {
      s[j++] = '.';
      in_sep = 1;
    }
  }
  s[j] = '\0';
  return j;
}

/* Shortest of %.15g/%.16g/%.17g that reads back as the same double; out needs 40 bytes. */
static size_t fmt_double(char *out, double x) {
  int prec, n = 0;
  for (prec = 15; prec <= 17; prec++) {
    n = snprintf(out, 40, "%.*g", prec, x);
    if (prec == 17 || strtod(out, NULL) == x) break; /* same locale as snprintf */
  }
  if (n < 0) n = 0;
  return fix_decimal_point(out, (size_t)n);
}

/* ---------------------------------------------------------------- encoding */

/* Byte classes for both directions: 0 plain ASCII (copied as is), 1 '"', '\\' or a
 * control character (escaped, or ends a fast scan), 2 non-ASCII (UTF-8 to validate). */
static const unsigned char char_class[256] = {
  [0 ... 0x1F] = 1, ['"'] = 1, ['\\'] = 1, [0x80 ... 0xFF] = 2,
};

/* Returns 0, or -1 with *bad set to the offset of the first invalid byte.
 * On failure b is rolled back to its previous length. */
static int append_string(iothub_buffer *b, const char *str, size_t len, size_t *bad) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *s = (const unsigned char *)str, *p = s, *end = s + len, *run = s;
  size_t start = b->len;
  if (!buffer_reserve(b, len + 2)) return 0; /* caller checks b->failed */
  b->data[b->len++] = '"';
  while (p < end) {
    unsigned char c = *p;
    unsigned char cls = char_class[c];
    if (cls == 0) { p++; continue; }
    if (cls == 2) {
      size_t n = utf8_seq(p, end);
      if (!n) {
        *bad = (size_t)(p - s);
        if (b->len > start) b->len = start;
        return -1;
      }
      p += n;
      continue;
    }
    buffer_append(b, (const char *)run, (size_t)(p - run));
    switch (c) {
      case '"': buffer_append(b, "\\\"", 2); break;
      case '\\': buffer_append(b, "\\\\", 2); break;
      case '\b': buffer_append(b, "\\b", 2); break;
      case '\f': buffer_append(b, "\\f", 2); break;
      case '\n': buffer_append(b, "\\n", 2); break;
      case '\r': buffer_append(b, "\\r", 2); break;
      case '\t': buffer_append(b, "\\t", 2); break;
      default: {
        char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
        buffer_append(b, u, 6);
      }
    }
    run = ++p;
  }
  buffer_append(b, (const char *)run, (size_t)(p - run));
  buffer_addc(b, '"');
  return 0;
}

int json_append_string(iothub_buffer *b, const char *s, size_t len) {
  size_t bad;
  return append_string(b, s, len, &bad);
}

typedef struct {
  const char *key; /* NULL for an array index */
  size_t klen;
  long long index;
} path_seg;

typedef struct {
  const char *key;
  size_t klen;
  size_t off, len; /* the member's `"key":value` text in the output buffer */
} member;

typedef struct {
  lua_State *L;
  iothub_buffer *b;
  char *err;
  size_t errlen;
  const char *code;
  int mtidx;
  int depth;
  int npath;
  path_seg path[JSON_MAX_DEPTH + 2];
  member *members; /* stack of members of the objects being encoded */
  size_t nmembers, capmembers;
  iothub_buffer scratch;
} encoder;

static int is_identifier(const char *s, size_t n) {
  size_t i;
  if (n == 0 || n > 40) return 0;
  for (i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
          (i > 0 && c >= '0' && c <= '9')))
      return 0;
  }
  return 1;
}

/* One path segment: .key, ["odd key"] (truncated, non-printables as \xNN) or [i]. */
static size_t render_segment(const path_seg *seg, char *out, size_t outsz) {
  size_t n = 0, i;
  if (!seg->key) {
    n = (size_t)snprintf(out, outsz, "[%lld]", seg->index);
    return n < outsz ? n : outsz - 1;
  }
  if (is_identifier(seg->key, seg->klen)) {
    out[n++] = '.';
    memcpy(out + n, seg->key, seg->klen);
    return n + seg->klen;
  }
  out[n++] = '[';
  out[n++] = '"';
  for (i = 0; i < seg->klen && i < 24; i++) {
    unsigned char c = (unsigned char)seg->key[i];
    if (c == '"' || c == '\\') { out[n++] = '\\'; out[n++] = (char)c; }
    else if (c >= 0x20 && c < 0x7F) out[n++] = (char)c;
    else n += (size_t)snprintf(out + n, outsz - n, "\\x%02X", c);
  }
  if (seg->klen > 24) { memcpy(out + n, "...", 3); n += 3; }
  out[n++] = '"';
  out[n++] = ']';
  return n;
}

/* Renders the path of the value being encoded; deep paths keep their tail. */
static void render_path(const encoder *e, char *out, size_t outsz) {
  char tmp[200];
  char seg[128];
  size_t pos = sizeof tmp;
  int i, cut = 0;
  for (i = e->npath - 1; i >= 0; i--) {
    size_t n = render_segment(&e->path[i], seg, sizeof seg);
    if (n > pos) { cut = 1; break; }
    pos -= n;
    memcpy(tmp + pos, seg, n);
  }
  snprintf(out, outsz, "%s%.*s", cut ? "$(...)" : "$", (int)(sizeof tmp - pos), tmp + pos);
}

static int enc_fail(encoder *e, const char *code, const char *fmt, ...) {
  va_list ap;
  e->code = code;
  if (e->err && e->errlen) {
    va_start(ap, fmt);
    vsnprintf(e->err, e->errlen, fmt, ap);
    va_end(ap);
  }
  return -1;
}

static int encode_value(encoder *e, int idx);

static void push_path_key(encoder *e, const char *k, size_t kl) {
  path_seg *s = &e->path[e->npath++];
  s->key = k;
  s->klen = kl;
}

static void push_path_index(encoder *e, long long i) {
  path_seg *s = &e->path[e->npath++];
  s->key = NULL;
  s->index = i;
}

static int encode_number(encoder *e, int idx) {
  lua_State *L = e->L;
  char num[48], where[256];
  size_t n;
  double x;
#if IOTHUB_HAS_INTEGERS
  if (lua_isinteger(L, idx)) {
    n = fmt_integer(num, (long long)lua_tointeger(L, idx));
    buffer_append(e->b, num, n);
    return 0;
  }
#endif
  x = (double)lua_tonumber(L, idx);
  if (isnan(x) || isinf(x)) {
    render_path(e, where, sizeof where);
    return enc_fail(e, "NumberOutOfRange", "cannot encode %s at %s: JSON has no NaN or infinity",
                    isnan(x) ? "NaN" : x > 0 ? "inf" : "-inf", where);
  }
  if (floor(x) == x) {
    if (fabs(x) > IOTHUB_MAX_SAFE_INTEGER) {
      render_path(e, where, sizeof where);
      n = (size_t)snprintf(num, sizeof num, "%.17g", x);
      fix_decimal_point(num, n < sizeof num ? n : sizeof num - 1);
      return enc_fail(e, "NumberOutOfRange",
                      "cannot encode float %s at %s: integral floats beyond 2^53 may already have "
                      "been rounded; pass the value as a string or (under Lua 5.4) as an integer",
                      num, where);
    }
    n = fmt_integer(num, (long long)x);
  } else {
    n = fmt_double(num, x);
  }
  buffer_append(e->b, num, n);
  return 0;
}

static int encode_string(encoder *e, int idx) {
  size_t len, bad;
  const char *s = lua_tolstring(e->L, idx, &len);
  if (append_string(e->b, s, len, &bad) != 0) {
    char where[256];
    render_path(e, where, sizeof where);
    return enc_fail(e, "InvalidUtf8", "invalid UTF-8 in string at %s (byte %lu of the string)",
                    where, (unsigned long)bad + 1);
  }
  return 0;
}

/* Elements 1..n; nil (only possible in marked arrays) becomes null. */
static int encode_array(encoder *e, int idx, size_t n) {
  lua_State *L = e->L;
  size_t i;
  buffer_addc(e->b, '[');
  for (i = 1; i <= n; i++) {
    if (i > 1) buffer_addc(e->b, ',');
    lua_rawgeti(L, idx, (int)i);
    push_path_index(e, (long long)i);
    if (lua_isnil(L, -1)) buffer_append(e->b, "null", 4);
    else if (encode_value(e, lua_gettop(L)) != 0) return -1;
    e->npath--;
    lua_pop(L, 1);
  }
  buffer_addc(e->b, ']');
  return 0;
}

static int member_cmp(const void *a, const void *b) {
  const member *x = (const member *)a, *y = (const member *)b;
  size_t n = x->klen < y->klen ? x->klen : y->klen;
  int c = memcmp(x->key, y->key, n);
  if (c) return c;
  return x->klen < y->klen ? -1 : x->klen > y->klen;
}

static int invalid_table(encoder *e, int keytype, int mixed) {
  char where[256];
  render_path(e, where, sizeof where);
  if (mixed)
    return enc_fail(e, "InvalidTable",
                    "table at %s mixes string and number keys; use only string keys (object) or "
                    "only keys 1..n (array)", where);
  if (keytype != LUA_TNUMBER)
    return enc_fail(e, "InvalidTable",
                    "table at %s has a %s key; JSON object keys must be strings", where,
                    lua_typename(e->L, keytype));
  return enc_fail(e, "InvalidTable",
                  "table at %s has number keys that are not exactly 1..n (sparse array?); "
                  "fill holes with core.null or use core.json_array(t), or use string keys", where);
}

/* Members are written in iteration order (the key strings stay anchored by the table,
 * and nothing here allocates on the Lua side, so no GC can run), then reordered by key. */
static int encode_object(encoder *e, int idx) {
  lua_State *L = e->L;
  iothub_buffer *b = e->b;
  size_t base = e->nmembers, count = 0, i, start;
  int sorted = 1;
  buffer_addc(b, '{');
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    member *m;
    size_t kl, bad;
    const char *k;
    if (lua_type(L, -2) != LUA_TSTRING)
      return invalid_table(e, lua_type(L, -2), lua_type(L, -2) == LUA_TNUMBER);
    k = lua_tolstring(L, -2, &kl);
    if (count++) buffer_addc(b, ',');
    if (e->nmembers == e->capmembers) {
      size_t cap = e->capmembers ? e->capmembers * 2 : 32;
      member *p = (member *)realloc(e->members, cap * sizeof *p);
      if (!p) { b->failed = 1; return enc_fail(e, "OutOfMemory", "out of memory"); }
      e->members = p;
      e->capmembers = cap;
    }
    m = &e->members[e->nmembers++];
    m->key = k;
    m->klen = kl;
    m->off = b->len;
    push_path_key(e, k, kl);
    if (append_string(b, k, kl, &bad) != 0) {
      char where[256];
      e->npath--;
      render_path(e, where, sizeof where);
      return enc_fail(e, "InvalidUtf8",
                      "invalid UTF-8 in an object key at %s (byte %lu of the key)", where,
                      (unsigned long)bad + 1);
    }
    buffer_addc(b, ':');
    if (encode_value(e, lua_gettop(L)) != 0) return -1;
    e->npath--;
    m = &e->members[e->nmembers - 1]; /* realloc may have moved it */
    m->len = b->len - m->off;
    if (sorted && e->nmembers - base > 1 && member_cmp(m - 1, m) > 0) sorted = 0;
    lua_pop(L, 1);
  }
  if (!sorted && !b->failed) {
    member *ms = e->members + base;
    size_t n = e->nmembers - base;
    start = ms[0].off;
    buffer_reset(&e->scratch);
    buffer_append(&e->scratch, b->data + start, b->len - start);
    if (e->scratch.failed) { b->failed = 1; return enc_fail(e, "OutOfMemory", "out of memory"); }
    qsort(ms, n, sizeof *ms, member_cmp);
    b->len = start;
    for (i = 0; i < n; i++) {
      if (i) b->data[b->len++] = ',';
      memcpy(b->data + b->len, e->scratch.data + (ms[i].off - start), ms[i].len);
      b->len += ms[i].len;
    }
  }
  e->nmembers = base;
  buffer_addc(b, '}');
  return 0;
}

static int encode_table(encoder *e, int idx) {
  lua_State *L = e->L;
  int r;
  if (e->depth >= JSON_MAX_DEPTH || !lua_checkstack(L, 6)) {
    char where[256];
    render_path(e, where, sizeof where);
    return enc_fail(e, "JsonDepth",
                    "cannot encode the table at %s: nesting deeper than %d "
                    "(is there a reference cycle?)", where, JSON_MAX_DEPTH);
  }
  e->depth++;
  if (lua_getmetatable(L, idx)) {
    int marked = lua_rawequal(L, -1, e->mtidx);
    lua_pop(L, 1);
    if (marked) {
      r = encode_array(e, idx, (size_t)lua_rawlen(L, idx));
      e->depth--;
      return r;
    }
  }
  lua_pushnil(L);
  if (!lua_next(L, idx)) {
    buffer_append(e->b, "{}", 2);
  } else if (lua_type(L, -2) == LUA_TSTRING) {
    lua_pop(L, 2);
    if (encode_object(e, idx) != 0) return -1;
  } else {
    /* Not an object: it must hold exactly the keys 1..n. */
    size_t n = 0;
    double max = 0;
    int strings = 0, bad = 0, other = LUA_TNONE;
    lua_pop(L, 1); /* the value; the key stays for lua_next */
    for (;;) {
      int t = lua_type(L, -1);
      n++;
      if (t == LUA_TNUMBER) {
        double k = (double)lua_tonumber(L, -1);
        if (k >= 1 && floor(k) == k) { if (k > max) max = k; }
        else bad = 1;
      } else if (t == LUA_TSTRING) strings = 1;
      else if (other == LUA_TNONE) other = t;
      if (!lua_next(L, idx)) break;
      lua_pop(L, 1);
    }
    if (other != LUA_TNONE) return invalid_table(e, other, 0);
    if (strings) return invalid_table(e, LUA_TSTRING, 1);
    if (bad || max != (double)n) return invalid_table(e, LUA_TNUMBER, 0);
    if (encode_array(e, idx, n) != 0) return -1;
  }
  e->depth--;
  return 0;
}

static int encode_value(encoder *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
    case LUA_TSTRING: return encode_string(e, idx);
    case LUA_TNUMBER: return encode_number(e, idx);
    case LUA_TBOOLEAN:
      if (lua_toboolean(L, idx)) buffer_append(e->b, "true", 4);
      else buffer_append(e->b, "false", 5);
      return 0;
    case LUA_TTABLE: return encode_table(e, idx);
    case LUA_TLIGHTUSERDATA:
      if (lua_touserdata(L, idx) == NULL) {
        buffer_append(e->b, "null", 4);
        return 0;
      }
      /* fall through */
    default: {
      char where[256];
      int t = lua_type(L, idx);
      render_path(e, where, sizeof where);
      if (t == LUA_TNIL || t == LUA_TNONE)
        return enc_fail(e, "UnsupportedType",
                        "cannot encode nil at %s (use core.null for JSON null)", where);
      return enc_fail(e, "UnsupportedType", "cannot encode a %s at %s", lua_typename(L, t), where);
    }
  }
}

/* Nothing here raises or allocates Lua memory, so callers may hold malloc'd memory. */
int json_encode_value(lua_State *L, int idx, iothub_buffer *b, char *err, size_t errlen,
                      const char **code) {
  encoder e;
  int top = lua_gettop(L), r;
  size_t start = b->len;
  idx = lua_absindex(L, idx);
  e.L = L;
  e.b = b;
  e.err = err;
  e.errlen = errlen;
  e.code = NULL;
  e.depth = 0;
  e.npath = 0;
  e.members = NULL;
  e.nmembers = e.capmembers = 0;
  buffer_init(&e.scratch);
  if (!lua_checkstack(L, 4)) {
    r = enc_fail(&e, "JsonDepth", "Lua stack exhausted");
  } else {
    push_array_mt(L);
    e.mtidx = lua_gettop(L);
    r = encode_value(&e, idx);
    if (r == 0 && b->failed) r = enc_fail(&e, "OutOfMemory", "out of memory while encoding JSON");
  }
  free(e.members);
  buffer_free(&e.scratch);
  lua_settop(L, top);
  if (r != 0) {
    if (!b->failed && b->len > start) b->len = start;
    if (code) *code = e.code;
  }
  return r;
}

static int push_buffer_p(lua_State *L) {
  iothub_buffer *b = (iothub_buffer *)lua_touserdata(L, 1);
  lua_pushlstring(L, b->data, b->len);
  return 1;
}

static int l_json_encode(lua_State *L) {
  iothub_buffer b;
  char err[512];
  const char *code = "UnsupportedType";
  lua_settop(L, 1);
  /* Pushed before b owns memory: the copy into a Lua string then runs protected,
   * so an out-of-memory error cannot leak b. */
  lua_pushcfunction(L, push_buffer_p);
  buffer_init(&b);
  if (json_encode_value(L, 1, &b, err, sizeof err, &code) != 0) {
    buffer_free(&b);
    return iothub_fail(L, code, "%s", err);
  }
  lua_pushlightuserdata(L, &b);
  if (lua_pcall(L, 1, 1, 0) != 0) {
    buffer_free(&b);
    return lua_error(L);
  }
  buffer_free(&b);
  return 1;
}

/* ---------------------------------------------------------------- decoding */

typedef struct {
  lua_State *L;
  const unsigned char *s, *p, *end;
  int depth;
  int mtidx;
  const char *code;
  const char *decimal_point; /* the C locale's, looked up on the first fraction */
  char msg[256];
} decoder;

static unsigned long offset_of(const decoder *d, const unsigned char *at) {
  return (unsigned long)(at - d->s) + 1;
}

static int dec_fail(decoder *d, const char *code, const char *fmt, ...) {
  va_list ap;
  d->code = code;
  va_start(ap, fmt);
  vsnprintf(d->msg, sizeof d->msg, fmt, ap);
  va_end(ap);
  return -1;
}

/* Quotes at most 16 bytes of input, non-printables as \xNN. */
static int syntax_error(decoder *d, const unsigned char *at, const char *expected) {
  char near[80];
  size_t i, n = 0;
  if (at >= d->end)
    return dec_fail(d, "JsonSyntax",
                    "JSON syntax error at byte %lu: %s, found the end of the input",
                    offset_of(d, at), expected);
  for (i = 0; i < 16 && at + i < d->end; i++) {
    unsigned char c = at[i];
    if (c >= 0x20 && c < 0x7F) near[n++] = (char)c;
    else n += (size_t)snprintf(near + n, sizeof near - n, "\\x%02X", c);
  }
  near[n] = '\0';
  return dec_fail(d, "JsonSyntax", "JSON syntax error at byte %lu: %s, found '%s%s'",
                  offset_of(d, at), expected, near, at + 16 < d->end ? "..." : "");
}

static void skip_ws(decoder *d) {
  const unsigned char *p = d->p, *end = d->end;
  while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
  d->p = p;
}

static int parse_value(decoder *d, int hint, int *count);

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Reads the four hex digits after "\u" at p; -1 if malformed. */
static long read_hex4(const unsigned char *p, const unsigned char *end) {
  long v = 0;
  int i;
  if (end - p < 4) return -1;
  for (i = 0; i < 4; i++) {
    int h = hexval(p[i]);
    if (h < 0) return -1;
    v = v * 16 + h;
  }
  return v;
}

static size_t utf8_encode(char *out, unsigned long cp) {
  if (cp < 0x80) { out[0] = (char)cp; return 1; }
  if (cp < 0x800) {
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = (char)(0xE0 | (cp >> 12));
    out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
  }
  out[0] = (char)(0xF0 | (cp >> 18));
  out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
  out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
  out[3] = (char)(0x80 | (cp & 0x3F));
  return 4;
}

/* Handles the escape at p (which points at the backslash); appends to B. */
static int parse_escape(decoder *d, luaL_Buffer *B, const unsigned char **pp) {
  const unsigned char *p = *pp, *end = d->end;
  char out[4];
  long cp;
  if (p + 1 >= end) return syntax_error(d, p + 1, "expected an escape character after '\\'");
  switch (p[1]) {
    case '"': luaL_addchar(B, '"'); break;
    case '\\': luaL_addchar(B, '\\'); break;
    case '/': luaL_addchar(B, '/'); break;
    case 'b': luaL_addchar(B, '\b'); break;
    case 'f': luaL_addchar(B, '\f'); break;
    case 'n': luaL_addchar(B, '\n'); break;
    case 'r': luaL_addchar(B, '\r'); break;
    case 't': luaL_addchar(B, '\t'); break;
    case 'u':
      cp = read_hex4(p + 2, end);
      if (cp < 0) return syntax_error(d, p, "expected four hex digits after '\\u'");
      if (cp >= 0xDC00 && cp <= 0xDFFF)
        return syntax_error(d, p, "lone low surrogate in \\u escape");
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        long lo;
        if (end - (p + 6) < 2 || p[6] != '\\' || p[7] != 'u' ||
            (lo = read_hex4(p + 8, end)) < 0xDC00 || lo > 0xDFFF)
          return syntax_error(d, p, "high surrogate not followed by a \\u low surrogate");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
      }
      luaL_addlstring(B, out, utf8_encode(out, (unsigned long)cp));
      *pp = p + 6;
      return 0;
    default:
      return syntax_error(d, p, "invalid escape in string");
  }
  *pp = p + 2;
  return 0;
}

/* Pushes the string starting at the opening quote d->p. */
static int parse_string(decoder *d) {
  const unsigned char *p = d->p + 1, *end = d->end, *run = p;
  luaL_Buffer B;
  int buffered = 0;
  for (;;) {
    unsigned char c;
    /* Hot loop: most bytes are plain ASCII. */
    while (p < end && char_class[*p] == 0) p++;
    if (p >= end) return syntax_error(d, p, "expected '\"' to close the string");
    c = *p;
    if (c == '"') break;
    if (c >= 0x80) {
      size_t n = utf8_seq(p, end);
      if (!n)
        return dec_fail(d, "InvalidUtf8", "invalid UTF-8 in JSON string at byte %lu",
                        offset_of(d, p));
      p += n;
      continue;
    }
    if (c == '\\') {
      if (!buffered) { luaL_buffinit(d->L, &B); buffered = 1; }
      luaL_addlstring(&B, (const char *)run, (size_t)(p - run));
      if (parse_escape(d, &B, &p) != 0) return -1;
      run = p;
      continue;
    }
    return syntax_error(d, p, "control characters must be escaped in strings");
  }
  if (buffered) {
    luaL_addlstring(&B, (const char *)run, (size_t)(p - run));
    luaL_pushresult(&B);
  } else {
    lua_pushlstring(d->L, (const char *)run, (size_t)(p - run));
  }
  d->p = p + 1;
  return 0;
}

static int parse_float(decoder *d, const unsigned char *start, size_t len) {
  char local[64], *buf = local;
  const char *dp;
  size_t dplen, i, j = 0;
  double v;
  char *endp;
  if (!d->decimal_point) d->decimal_point = localeconv()->decimal_point;
  dp = d->decimal_point;
  dplen = strlen(dp);
  if (dplen == 0) { dp = "."; dplen = 1; }
  if (len + dplen + 1 > sizeof local) {
    buf = (char *)malloc(len + dplen + 1); /* freed below, before any Lua call */
    if (!buf) return dec_fail(d, "OutOfMemory", "out of memory");
  }
  for (i = 0; i < len; i++) {
    if (start[i] == '.') { memcpy(buf + j, dp, dplen); j += dplen; }
    else buf[j++] = (char)start[i];
  }
  buf[j] = '\0';
  v = strtod(buf, &endp);
  i = (size_t)(endp - buf);
  if (buf != local) free(buf);
  if (i != j) return syntax_error(d, start, "malformed number");
  if (isinf(v))
    return dec_fail(d, "NumberOutOfRange", "number at byte %lu is too large for a double",
                    offset_of(d, start));
  lua_pushnumber(d->L, (lua_Number)v);
  return 0;
}

static int parse_number(decoder *d) {
  const unsigned char *start = d->p, *p = start, *end = d->end;
  unsigned long long acc = 0, limit;
  int neg = 0, overflow = 0, integral = 1;
  if (*p == '-') { neg = 1; p++; }
#if IOTHUB_HAS_INTEGERS
  limit = neg ? (unsigned long long)LUA_MAXINTEGER + 1 : (unsigned long long)LUA_MAXINTEGER;
#else
  limit = 9007199254740992ULL; /* 2^53 */
#endif
  if (p >= end || *p < '0' || *p > '9') return syntax_error(d, p, "expected a digit");
  if (*p == '0') {
    p++;
    if (p < end && *p >= '0' && *p <= '9')
      return syntax_error(d, start, "leading zeros are not allowed");
  } else {
    while (p < end && *p >= '0' && *p <= '9') {
      unsigned dgt = (unsigned)(*p - '0');
      if (acc > (limit - dgt) / 10) overflow = 1;
      else acc = acc * 10 + dgt;
      p++;
    }
  }
  if (p < end && *p == '.') {
    p++;
    integral = 0;
    if (p >= end || *p < '0' || *p > '9') return syntax_error(d, p, "expected a digit after '.'");
    while (p < end && *p >= '0' && *p <= '9') p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    p++;
    integral = 0;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (p >= end || *p < '0' || *p > '9')
      return syntax_error(d, p, "expected a digit in the exponent");
    while (p < end && *p >= '0' && *p <= '9') p++;
  }
  d->p = p;
  if (!integral) return parse_float(d, start, (size_t)(p - start));
  if (overflow) {
#if IOTHUB_HAS_INTEGERS
    return dec_fail(d, "NumberOutOfRange",
                    "integer at byte %lu does not fit in a 64-bit integer; "
                    "send it as a JSON string", offset_of(d, start));
#else
    return dec_fail(d, "NumberOutOfRange",
                    "integer at byte %lu is beyond 2^53, which LuaJIT cannot represent exactly; "
                    "send it as a JSON string", offset_of(d, start));
#endif
  }
#if IOTHUB_HAS_INTEGERS
  if (!neg) lua_pushinteger(d->L, (lua_Integer)acc);
  else if (acc > (unsigned long long)LUA_MAXINTEGER) lua_pushinteger(d->L, LUA_MININTEGER);
  else lua_pushinteger(d->L, -(lua_Integer)acc);
#else
  lua_pushnumber(d->L, neg && acc ? -(lua_Number)acc : (lua_Number)acc);
#endif
  return 0;
}

static int enter(decoder *d) {
  if (d->depth >= JSON_MAX_DEPTH)
    return dec_fail(d, "JsonDepth", "JSON nesting deeper than %d at byte %lu", JSON_MAX_DEPTH,
                    offset_of(d, d->p));
  if (!lua_checkstack(d->L, 8))
    return dec_fail(d, "JsonDepth", "Lua stack exhausted at byte %lu", offset_of(d, d->p));
  d->depth++;
  return 0;
}

/* hint: size of the previous sibling container, a good guess for rows of a page. */
static int parse_array(decoder *d, int hint, int *count) {
  lua_State *L = d->L;
  int n = 0, sibling = 0, c;
  if (enter(d) != 0) return -1;
  d->p++;
  lua_createtable(L, hint, 0);
  lua_pushvalue(L, d->mtidx);
  lua_setmetatable(L, -2);
  skip_ws(d);
  if (d->p < d->end && *d->p == ']') {
    d->p++;
  } else {
    for (;;) {
      if (parse_value(d, sibling, &c) != 0) return -1;
      sibling = c; /* also reset by empty ones, so "[big,{},{},...]" cannot amplify memory */
      lua_rawseti(L, -2, ++n);
      skip_ws(d);
      if (d->p < d->end && *d->p == ',') { d->p++; continue; }
      if (d->p < d->end && *d->p == ']') { d->p++; break; }
      return syntax_error(d, d->p, "expected ',' or ']' after an array element");
    }
  }
  d->depth--;
  *count = n;
  return 0;
}

static int parse_object(decoder *d, int hint, int *count) {
  lua_State *L = d->L;
  int n = 0, c;
  if (enter(d) != 0) return -1;
  d->p++;
  skip_ws(d);
  /* A non-empty object with no sibling to go by gets a few slots: growing from 0 rehashes
   * the table at 1, 2 and 4 keys. Empty ones stay empty, so "[{},{},...]" cannot amplify. */
  lua_createtable(L, 0, (d->p < d->end && *d->p == '}') ? 0 : (hint > 0 ? hint : 4));
  if (d->p < d->end && *d->p == '}') {
    d->p++;
  } else {
    for (;;) {
      if (d->p >= d->end || *d->p != '"')
        return syntax_error(d, d->p,
                            n ? "expected a string key after ','" : "expected a string key or '}'");
      if (parse_string(d) != 0) return -1;
      skip_ws(d);
      if (d->p >= d->end || *d->p != ':')
        return syntax_error(d, d->p, "expected ':' after an object key");
      d->p++;
      if (parse_value(d, 0, &c) != 0) return -1;
      lua_rawset(L, -3);
      n++;
      skip_ws(d);
      if (d->p < d->end && *d->p == ',') { d->p++; skip_ws(d); continue; }
      if (d->p < d->end && *d->p == '}') { d->p++; break; }
      return syntax_error(d, d->p, "expected ',' or '}' after an object member");
    }
  }
  d->depth--;
  *count = n;
  return 0;
}

static int parse_literal(decoder *d, const char *word, size_t n) {
  if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0)
    return syntax_error(d, d->p, "expected a value");
  d->p += n;
  return 0;
}

static int parse_value(decoder *d, int hint, int *count) {
  *count = 0;
  skip_ws(d);
  if (d->p >= d->end) return syntax_error(d, d->p, "expected a value");
  switch (*d->p) {
    case '{': return parse_object(d, hint, count);
    case '[': return parse_array(d, hint, count);
    case '"': return parse_string(d);
    case 't':
      if (parse_literal(d, "true", 4) != 0) return -1;
      lua_pushboolean(d->L, 1);
      return 0;
    case 'f':
      if (parse_literal(d, "false", 5) != 0) return -1;
      lua_pushboolean(d->L, 0);
      return 0;
    case 'n':
      if (parse_literal(d, "null", 4) != 0) return -1;
      lua_pushlightuserdata(d->L, NULL);
      return 0;
    default:
      if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) return parse_number(d);
      return syntax_error(d, d->p, "expected a value");
  }
}

static int l_json_decode(lua_State *L) {
  decoder d;
  size_t len;
  int c;
  luaL_checktype(L, 1, LUA_TSTRING);
  d.s = d.p = (const unsigned char *)lua_tolstring(L, 1, &len);
  d.end = d.s + len;
  d.L = L;
  d.depth = 0;
  d.code = NULL;
  d.decimal_point = NULL;
  lua_settop(L, 1);
  push_array_mt(L);
  d.mtidx = 2;
  if (parse_value(&d, 0, &c) == 0) {
    skip_ws(&d);
    if (d.p >= d.end) return 1;
    syntax_error(&d, d.p, "expected the end of the input after the JSON value");
  }
  lua_settop(L, 1);
  return iothub_fail(L, d.code, "%s", d.msg);
}

/* ---------------------------------------------------------------- module */

static int l_json_array(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_newtable(L);
  } else {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
  }
  push_array_mt(L);
  lua_setmetatable(L, 1);
  return 1;
}

static const luaL_Reg json_funcs[] = {
  {"json_encode", l_json_encode},
  {"json_decode", l_json_decode},
  {"json_array", l_json_array},
  {NULL, NULL},
};

int json_open(lua_State *L) {
  luaL_setfuncs(L, json_funcs, 0);
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  /* Reuse an existing metatable so arrays decoded before a reload stay arrays. */
  push_array_mt(L);
  if (!lua_istable(L, -1)) {
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_pushliteral(L, "iothub.json_array");
    lua_setfield(L, -2, "__name");
    lua_pushlightuserdata(L, (void *)&array_mt_key);
    lua_pushvalue(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  lua_setfield(L, -2, "json_array_mt");
  return 0;
}
