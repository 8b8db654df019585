/* query.c: the IoT Hub query language (hub-behavior.md section 1), shared by the client's
 * queryCondition check (validate.c) and the emulator's twin, device-job and job-target queries.
 *
 * Lua API (in iothub.core):
 *   core.query_compile(sql)     -> query | nil, message, "InvalidArgument"
 *       SELECT [TOP n | TOP (n)] * | item [AS alias], ... FROM devices | devices.jobs | devices.modules
 *       [WHERE condition] [GROUP BY path, ...]; item = property path | COUNT() | SUM/AVG/MIN/MAX(path)
 *   core.query_condition(cond)  -> query | nil, message, "InvalidArgument"
 *       a job queryCondition: "*" (every device), a WHERE condition, or FROM devices WHERE condition
 *   core.query_max_length       -> 8192 (characters)
 *   q:match(doc)                -> true when the WHERE condition is true for doc
 *   q:project(doc)              -> doc itself for SELECT *, else a new table of the selected properties
 *   q:filter(docs [, start [, limit [, stop]]]) -> matching docs among docs[start..stop] (at most
 *                                  limit of them), and where to resume: the next match (looked
 *                                  ahead, so a last page is known to be last), stop + 1 when the
 *                                  scan ended at stop, or nil when nothing is left
 *   q:select(docs [, start [, limit [, stop]]]) -> the same, projected
 *   q:aggregate(docs)           -> array of result rows of an aggregate/GROUP BY query (TOP applied)
 *   q:info()                    -> { collection=, top=n|nil, star=, aggregate=, groupBy={"a.b",...},
 *                                    columns={output names}, all=(condition "*"),
 *                                    equals={["lower.case.path"]=constant} for the condition's
 *                                    top-level "path = constant" conjuncts }
 * Messages name the column (1-based, in characters) and what was expected, e.g.
 *   "syntax error at column 23: expected a value after '=' but found 'AND'".
 * Documents are Lua tables as the JSON codec decodes them: core.null is JSON null, tables with
 * core.json_array_mt (or non-empty sequences) are arrays. Property names match exactly first,
 * then ignoring ASCII case; keywords ignore case; values compare case-sensitively.
 * Semantics: comparisons between different types, non-primitives or undefined are undefined;
 * NOT/AND/OR are three-valued; a document matches only when the condition is true. */
#include <locale.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "query.h"

#define QUERY_MT "iothub.query"
#define CODE "InvalidArgument"
#define MSG_MAX 512
#define NEST_MAX 200   /* parentheses / NOT / unary nesting; keeps the C stack bounded */
#define SHOW_MAX 40    /* bytes of source echoed in a message */
#define AGG_MAX 64     /* aggregates in one SELECT list */

#if LUA_VERSION_NUM >= 504
#  define set_uservalue(L, idx) ((void)lua_setiuservalue((L), (idx), 1))
#  define push_uservalue(L, idx) ((void)lua_getiuservalue((L), (idx), 1))
#elif LUA_VERSION_NUM >= 502
#  define set_uservalue(L, idx) lua_setuservalue((L), (idx))
#  define push_uservalue(L, idx) ((void)lua_getuservalue((L), (idx)))
#else
#  define set_uservalue(L, idx) ((void)lua_setfenv((L), (idx)))
#  define push_uservalue(L, idx) lua_getfenv((L), (idx))
#endif

/* ---------------------------------------------------------------- data */

enum { QV_UNDEF, QV_NULL, QV_BOOL, QV_NUM, QV_STR, QV_OBJ, QV_ARR };

typedef struct {
  unsigned char t, isint, b; /* type, number held exactly in i, boolean */
  double n;
  long long i;
  const char *s; /* string bytes: the pool, or a Lua string anchored by the document */
  size_t len;
  size_t off; /* pool offset of a constant string while the pool may still move */
} qval;

enum {
  T_EOF, T_NAME, T_ESCNAME, T_STRING, T_NUMBER, T_LPAREN, T_RPAREN, T_LBRACK, T_RBRACK, T_COMMA,
  T_DOT, T_STAR, T_PLUS, T_MINUS, T_SLASH, T_PERCENT, T_EQ, T_NE, T_LT, T_GT, T_LE, T_GE
};

enum {
  K_NONE, K_SELECT, K_FROM, K_WHERE, K_GROUP, K_ORDER, K_BY, K_AND, K_OR, K_NOT, K_IN, K_NIN,
  K_AS, K_TOP, K_TRUE, K_FALSE, K_NULL, K_UNDEFINED
};
/* Reserved: a property with one of these names is written [[name]] (e.g. tags.[[group]]). */
static const char *const KEYWORDS[] = {
  NULL, "SELECT", "FROM", "WHERE", "GROUP", "ORDER", "BY", "AND", "OR", "NOT", "IN", "NIN",
  "AS", "TOP", "TRUE", "FALSE", "NULL", "UNDEFINED"
};

typedef struct {
  unsigned char type, kw;
  size_t pos, len; /* span in the source */
  qval v;          /* numbers; strings and names as pool off/len */
} token;

enum { N_CONST, N_ARRAY, N_PATH, N_NOT, N_NEG, N_AND, N_OR, N_CMP, N_ARITH, N_IN, N_CALL };

/* a, b, c by kind: CONST a=const; ARRAY a=first const, b=count; PATH a=first seg, b=count;
 * NOT/NEG a=child; AND/OR a=first kid, b=count; CMP/ARITH a, b children, op=token type;
 * IN a=child, b=first const, c=count, op=1 for NIN; CALL op=function, a, b args (-1 absent). */
typedef struct {
  unsigned char kind, op;
  int a, b, c;
  size_t pos;
} qnode;

typedef struct { size_t off, len; } qseg;

enum {
  F_IS_DEFINED, F_IS_NULL, F_IS_BOOL, F_IS_NUMBER, F_IS_STRING, F_IS_OBJECT, F_IS_ARRAY,
  F_IS_PRIMITIVE, F_STARTSWITH, F_ENDSWITH, F_COUNT, F_SUM, F_AVG, F_MIN, F_MAX, F_NONE
};
static const struct { const char *name; int arity; } FUNCS[] = {
  {"IS_DEFINED", 1}, {"IS_NULL", 1}, {"IS_BOOL", 1}, {"IS_NUMBER", 1}, {"IS_STRING", 1},
  {"IS_OBJECT", 1}, {"IS_ARRAY", 1}, {"IS_PRIMITIVE", 1}, {"STARTSWITH", 2}, {"ENDSWITH", 2},
  {"COUNT", 0}, {"SUM", 1}, {"AVG", 1}, {"MIN", 1}, {"MAX", 1}
};
#define SELECT_AGGREGATES "COUNT(), SUM(), AVG(), MIN() and MAX()"
#define FUNC_LIST "IS_DEFINED, IS_NULL, IS_BOOL, IS_NUMBER, IS_STRING, IS_OBJECT, IS_ARRAY, " \
                  "IS_PRIMITIVE, STARTSWITH and ENDSWITH"

/* One SELECT item: a property path (func == F_NONE) or an aggregate. */
typedef struct {
  int func, path;       /* path: N_PATH node, -1 for COUNT() */
  int named;            /* name_off/len hold the alias or "$n"; else the path's last property */
  size_t name_off, name_len;
  size_t pos, len;      /* source span, for messages */
} qitem;

enum { COLL_DEVICES, COLL_JOBS, COLL_MODULES };
static const char *const COLLECTIONS[] = { "devices", "devices.jobs", "devices.modules" };

typedef struct {
  qnode *nodes; int nnodes, capnodes;
  qval *consts; int nconsts, capconsts;
  qseg *segs; int nsegs, capsegs;
  int *kids; int nkids, capkids;
  qitem *items; int nitems, capitems;
  int *groups; int ngroups, capgroups; /* GROUP BY: N_PATH nodes */
  char *pool; size_t plen, pcap;
  int where;          /* condition root, -1: every document */
  int collection;
  long long top;      /* -1: no TOP */
  unsigned char star, aggregate, condition, all;
} query;

static void query_free(query *q) {
  free(q->nodes); free(q->consts); free(q->segs); free(q->kids);
  free(q->items); free(q->groups); free(q->pool);
  memset(q, 0, sizeof *q);
  q->where = -1;
}

/* ---------------------------------------------------------------- text helpers */

static int is_space(unsigned char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}
static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
static int is_hex(unsigned char c) {
  return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}
static int name_start(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '$' || c >= 0x80;
}
static int name_char(unsigned char c) { return name_start(c) || is_digit(c); }
static unsigned char upper(unsigned char c) { return (c >= 'a' && c <= 'z') ? (unsigned char)(c - 32) : c; }

/* ASCII case-insensitive equality of two byte strings. */
static int ieq(const char *a, size_t an, const char *b, size_t bn) {
  size_t i;
  if (an != bn) return 0;
  for (i = 0; i < an; i++)
    if (upper((unsigned char)a[i]) != upper((unsigned char)b[i])) return 0;
  return 1;
}

size_t query_char_count(const char *s, size_t n) {
  size_t i, count = 0;
  for (i = 0; i < n; i++)
    if (((unsigned char)s[i] & 0xC0) != 0x80) count++;
  return count;
}

/* Copies at most SHOW_MAX bytes of s for a message (control bytes as '?', cut on a character). */
static void show(char *out, size_t outsz, const char *s, size_t n) {
  size_t i, lim = n;
  if (lim > SHOW_MAX) {
    lim = SHOW_MAX;
    while (lim > 0 && ((unsigned char)s[lim] & 0xC0) == 0x80) lim--;
  }
  if (lim + 4 > outsz) lim = outsz - 4;
  for (i = 0; i < lim; i++) out[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
  if (lim < n) { memcpy(out + i, "...", 3); i += 3; }
  out[i] = '\0';
}

/* ---------------------------------------------------------------- parser state */

typedef struct {
  const char *src;
  size_t n;
  token *toks;
  int ntoks, captoks, i, depth;
  query *q;
  char *msg;
  size_t msglen;
  int kind;       /* QUERY_* of the failure */
  int condition;  /* parsing a job queryCondition */
} parser;

#define RESERVE(p, arr, cnt, cap)                                              \
  do {                                                                         \
    if ((cnt) >= (cap)) {                                                      \
      int nc_ = (cap) ? (cap) * 2 : 16;                                        \
      void *np_ = realloc((arr), (size_t)nc_ * sizeof *(arr));                 \
      if (!np_) return oom(p);                                                 \
      (arr) = np_;                                                             \
      (cap) = nc_;                                                             \
    }                                                                          \
  } while (0)

static int oom(parser *p) {
  snprintf(p->msg, p->msglen, "out of memory while compiling the query");
  p->kind = QUERY_INVALID;
  return -1;
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static int fail_at(parser *p, size_t pos, const char *fmt, ...) {
  va_list ap;
  int k = snprintf(p->msg, p->msglen, "syntax error at column %d: ", (int)query_char_count(p->src, pos) + 1);
  va_start(ap, fmt);
  if (k > 0 && (size_t)k < p->msglen) vsnprintf(p->msg + k, p->msglen - (size_t)k, fmt, ap);
  va_end(ap);
  p->kind = QUERY_INVALID;
  return -1;
}

static token *cur(parser *p) { return &p->toks[p->i]; }
static int at(parser *p, int type) { return p->toks[p->i].type == type; }
static int at_kw(parser *p, int kw) { return p->toks[p->i].type == T_NAME && p->toks[p->i].kw == kw; }

static const char *describe(parser *p, const token *t, char *buf, size_t sz) {
  char shown[SHOW_MAX + 8];
  if (t->type == T_EOF) return p->condition ? "the end of the condition" : "the end of the query";
  show(shown, sizeof shown, p->src + t->pos, t->len);
  if (t->type == T_STRING) snprintf(buf, sz, "the string %s", shown);
  else if (t->type == T_NUMBER) snprintf(buf, sz, "the number %s", shown);
  else snprintf(buf, sz, "'%s'", shown);
  return buf;
}

/* "expected <what> [after '<previous token>'] but found <current token>" */
static int fail_expected(parser *p, const char *what, int after) {
  char buf[SHOW_MAX + 32], prev[SHOW_MAX + 8];
  token *t = cur(p);
  const char *found = describe(p, t, buf, sizeof buf);
  if (after && p->i > 0) {
    token *pt = &p->toks[p->i - 1];
    show(prev, sizeof prev, p->src + pt->pos, pt->len);
    return fail_at(p, t->pos, "expected %s after '%s' but found %s", what, prev, found);
  }
  return fail_at(p, t->pos, "expected %s but found %s", what, found);
}

static int pool_reserve(parser *p, size_t extra) {
  query *q = p->q;
  if (q->plen + extra + 1 > q->pcap) {
    size_t nc = q->pcap ? q->pcap * 2 : 256;
    char *np;
    while (nc < q->plen + extra + 1) nc *= 2;
    np = realloc(q->pool, nc);
    if (!np) return oom(p);
    q->pool = np;
    q->pcap = nc;
  }
  return 0;
}

static int pool_add(parser *p, const char *s, size_t n, size_t *off) {
  query *q = p->q;
  if (pool_reserve(p, n) != 0) return -1;
  memcpy(q->pool + q->plen, s, n);
  q->pool[q->plen + n] = '\0';
  *off = q->plen;
  q->plen += n + 1;
  return 0;
}

/* ---------------------------------------------------------------- lexer */

static int keyword_of(const char *s, size_t n) {
  int k;
  for (k = 1; k < (int)(sizeof KEYWORDS / sizeof KEYWORDS[0]); k++)
    if (ieq(s, n, KEYWORDS[k], strlen(KEYWORDS[k]))) return k;
  return K_NONE;
}

static void put_utf8(char *out, size_t *o, unsigned long cp) {
  if (cp < 0x80) {
    out[(*o)++] = (char)cp;
  } else if (cp < 0x800) {
    out[(*o)++] = (char)(0xC0 | (cp >> 6));
    out[(*o)++] = (char)(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out[(*o)++] = (char)(0xE0 | (cp >> 12));
    out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[(*o)++] = (char)(0x80 | (cp & 0x3F));
  } else {
    out[(*o)++] = (char)(0xF0 | (cp >> 18));
    out[(*o)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[(*o)++] = (char)(0x80 | (cp & 0x3F));
  }
}

static unsigned long hex4(const char *s) {
  unsigned long v = 0;
  int k;
  for (k = 0; k < 4; k++) {
    unsigned char c = (unsigned char)s[k];
    v = v * 16 + (unsigned long)(is_digit(c) ? c - '0' : upper(c) - 'A' + 10);
  }
  return v;
}

/* A quoted string at i; decodes the escapes into the pool. Returns the index after it. */
static int lex_string(parser *p, token *t, size_t i, size_t *next) {
  const char *s = p->src;
  char quote = s[i], *out;
  size_t j, o = 0;
  for (j = i + 1; j < p->n && s[j] != quote; j++)
    if (s[j] == '\\') j++;
  if (j >= p->n)
    return fail_at(p, i, "unterminated string literal; close it with a matching %c (escape a quote inside "
                         "it with a backslash)", quote);
  if (pool_reserve(p, j - i) != 0) return -1;
  out = p->q->pool + p->q->plen;
  for (j = i + 1; s[j] != quote; j++) {
    if (s[j] != '\\') { out[o++] = s[j]; continue; }
    j++;
    switch (s[j]) {
      case '\'': case '"': case '\\': case '/': out[o++] = s[j]; break;
      case 'b': out[o++] = '\b'; break;
      case 'f': out[o++] = '\f'; break;
      case 'n': out[o++] = '\n'; break;
      case 'r': out[o++] = '\r'; break;
      case 't': out[o++] = '\t'; break;
      case 'u': {
        unsigned long cp;
        if (j + 4 >= p->n || !is_hex(s[j + 1]) || !is_hex(s[j + 2]) || !is_hex(s[j + 3]) || !is_hex(s[j + 4]))
          return fail_at(p, j - 1, "\\u in a string must be followed by 4 hexadecimal digits, e.g. \\u00e9");
        cp = hex4(s + j + 1);
        j += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF && j + 6 < p->n && s[j + 1] == '\\' && s[j + 2] == 'u' &&
            is_hex(s[j + 3]) && is_hex(s[j + 4]) && is_hex(s[j + 5]) && is_hex(s[j + 6])) {
          unsigned long lo = hex4(s + j + 3);
          if (lo >= 0xDC00 && lo <= 0xDFFF) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            j += 6;
          }
        }
        if (cp >= 0xD800 && cp <= 0xDFFF)
          return fail_at(p, j - 5, "\\u%04lX is half of a UTF-16 surrogate pair; write the whole pair "
                                   "(\\uD83D\\uDE00) or the character itself", cp);
        put_utf8(out, &o, cp);
        break;
      }
      default:
        if ((unsigned char)s[j] < 0x20 || (unsigned char)s[j] >= 0x7f)
          return fail_at(p, j - 1, "a backslash in a string must start an escape: \\' \\\" \\\\ \\/ \\b \\f "
                                   "\\n \\r \\t or \\uXXXX");
        return fail_at(p, j - 1, "unknown escape '\\%c' in a string; use \\' \\\" \\\\ \\/ \\b \\f \\n \\r "
                                 "\\t or \\uXXXX (write a backslash as \\\\)", s[j]);
    }
  }
  out[o] = '\0';
  t->type = T_STRING;
  t->v.t = QV_STR;
  t->v.off = p->q->plen;
  t->v.len = o;
  p->q->plen += o + 1;
  *next = j + 1;
  return 0;
}

static int lex_number(parser *p, token *t, size_t i, size_t *next) {
  const char *s = p->src;
  size_t j = i;
  t->type = T_NUMBER;
  t->v.t = QV_NUM;
  if (s[i] == '0' && i + 1 < p->n && (s[i + 1] == 'x' || s[i + 1] == 'X')) {
    unsigned long long v = 0;
    j = i + 2;
    if (j >= p->n || !is_hex(s[j]))
      return fail_at(p, i, "a hexadecimal number needs digits after 0x, e.g. 0x1F");
    for (; j < p->n && is_hex(s[j]); j++) {
      unsigned char c = (unsigned char)s[j];
      if (v > 0x7FFFFFFFFFFFFFFULL) return fail_at(p, i, "hexadecimal number is too large (at most 0x7FFFFFFFFFFFFFFF)");
      v = v * 16 + (unsigned long long)(is_digit(c) ? c - '0' : upper(c) - 'A' + 10);
    }
    t->v.isint = 1;
    t->v.i = (long long)v;
    t->v.n = (double)v;
  } else {
    char buf[64];
    int isint = 1;
    size_t k;
    while (j < p->n && is_digit(s[j])) j++;
    if (j < p->n && s[j] == '.') {
      isint = 0;
      j++;
      while (j < p->n && is_digit(s[j])) j++;
    }
    if (j < p->n && (s[j] == 'e' || s[j] == 'E')) {
      size_t e = j + 1;
      if (e < p->n && (s[e] == '+' || s[e] == '-')) e++;
      if (e < p->n && is_digit(s[e])) {
        isint = 0;
        j = e;
        while (j < p->n && is_digit(s[j])) j++;
      }
    }
    if (j - i >= sizeof buf) return fail_at(p, i, "number is too long (at most 63 characters)");
    memcpy(buf, s + i, j - i);
    buf[j - i] = '\0';
    if (isint) {
      unsigned long long v = 0;
      for (k = 0; k < j - i; k++) {
        if (v > (0x7FFFFFFFFFFFFFFFULL - 9) / 10) { isint = 0; break; }
        v = v * 10 + (unsigned long long)(buf[k] - '0');
      }
      if (isint) { t->v.i = (long long)v; t->v.n = (double)v; }
    }
    if (!isint) {
      /* strtod follows the C locale's decimal point, which a host may have changed */
      const char *dp = localeconv()->decimal_point;
      if (dp && dp[0] && dp[0] != '.' && !dp[1])
        for (k = 0; buf[k]; k++) if (buf[k] == '.') buf[k] = dp[0];
      t->v.n = strtod(buf, NULL);
      if (!isfinite(t->v.n)) return fail_at(p, i, "number %s is out of range", buf);
    }
    t->v.isint = (unsigned char)isint;
  }
  if (j < p->n && (name_char((unsigned char)s[j]) || s[j] == '.')) {
    char shown[SHOW_MAX + 8];
    size_t e = j;
    while (e < p->n && (name_char((unsigned char)s[e]) || s[e] == '.')) e++;
    show(shown, sizeof shown, s + i, e - i);
    return fail_at(p, i, "malformed number '%s' (a property name cannot start with a digit unless "
                         "escaped, e.g. [[%s]])", shown, shown);
  }
  *next = j;
  return 0;
}

static int lex_punct(parser *p, token *t, size_t i, size_t *next) {
  const char *s = p->src;
  char c = s[i], d = i + 1 < p->n ? s[i + 1] : '\0';
  size_t len = 1;
  switch (c) {
    case '(': t->type = T_LPAREN; break;
    case ')': t->type = T_RPAREN; break;
    case '[': t->type = T_LBRACK; break;
    case ']': t->type = T_RBRACK; break;
    case ',': t->type = T_COMMA; break;
    case '.': t->type = T_DOT; break;
    case '*': t->type = T_STAR; break;
    case '+': t->type = T_PLUS; break;
    case '-': t->type = T_MINUS; break;
    case '/': t->type = T_SLASH; break;
    case '%': t->type = T_PERCENT; break;
    case '=': t->type = T_EQ; break;
    case '<':
      if (d == '=') { t->type = T_LE; len = 2; }
      else if (d == '>') { t->type = T_NE; len = 2; }
      else t->type = T_LT;
      break;
    case '>':
      if (d == '=') { t->type = T_GE; len = 2; }
      else t->type = T_GT;
      break;
    case '!':
      if (d != '=') return fail_at(p, i, "'!' is only valid in '!='; negate a condition with NOT");
      t->type = T_NE;
      len = 2;
      break;
    case '&': return fail_at(p, i, "unexpected character '&'; combine conditions with AND");
    case '|': return fail_at(p, i, "unexpected character '|'; combine conditions with OR");
    default:
      if ((unsigned char)c < 0x20 || c == 0x7f)
        return fail_at(p, i, "unexpected control character 0x%02X", (unsigned)(unsigned char)c);
      return fail_at(p, i, "unexpected character '%c'", c);
  }
  t->len = len;
  *next = i + len;
  return 0;
}

static int lex(parser *p) {
  const char *s = p->src;
  size_t i = 0;
  for (;;) {
    token *t;
    unsigned char c;
    int prev;
    while (i < p->n && is_space((unsigned char)s[i])) i++;
    RESERVE(p, p->toks, p->ntoks, p->captoks);
    prev = p->ntoks ? p->toks[p->ntoks - 1].type : T_EOF;
    t = &p->toks[p->ntoks];
    memset(t, 0, sizeof *t);
    t->pos = i;
    if (i >= p->n) {
      t->type = T_EOF;
      p->ntoks++;
      return 0;
    }
    c = (unsigned char)s[i];
    if (name_start(c)) {
      size_t j = i;
      while (j < p->n && name_char((unsigned char)s[j])) j++;
      t->type = T_NAME;
      t->kw = (unsigned char)keyword_of(s + i, j - i);
      if (pool_add(p, s + i, j - i, &t->v.off) != 0) return -1;
      t->v.len = j - i;
      t->len = j - i;
      i = j;
    } else if (c == '[' && i + 1 < p->n && s[i + 1] == '[') {
      const char *close = NULL;
      size_t j;
      for (j = i + 2; j + 1 < p->n; j++)
        if (s[j] == ']' && s[j + 1] == ']') { close = s + j; break; }
      if (!close) return fail_at(p, i, "'[[' starts an escaped property name that is never closed with ']]'");
      if (j == i + 2) return fail_at(p, i, "'[[]]' is an empty property name");
      t->type = T_ESCNAME;
      if (pool_add(p, s + i + 2, j - i - 2, &t->v.off) != 0) return -1;
      t->v.len = j - i - 2;
      t->len = j + 2 - i;
      i = j + 2;
    } else if (is_digit(c) || (c == '.' && i + 1 < p->n && is_digit((unsigned char)s[i + 1]) &&
                               prev != T_NAME && prev != T_ESCNAME && prev != T_RPAREN && prev != T_RBRACK)) {
      size_t j = i;
      if (lex_number(p, t, i, &j) != 0) return -1;
      t->len = j - i;
      i = j;
    } else if (c == '\'' || c == '"') {
      size_t j = i;
      if (lex_string(p, t, i, &j) != 0) return -1;
      t->len = j - i;
      i = j;
    } else {
      size_t j = i;
      if (lex_punct(p, t, i, &j) != 0) return -1;
      i = j;
    }
    p->ntoks++;
  }
}

/* Brackets are checked on the tokens before parsing, so a misplaced one gets its own message. */
static int check_brackets(parser *p) {
  int *open = malloc(sizeof(int) * (size_t)p->ntoks), depth = 0, k;
  if (!open) return oom(p);
  for (k = 0; k < p->ntoks; k++) {
    int ty = p->toks[k].type;
    if (ty == T_LPAREN || ty == T_LBRACK) {
      open[depth++] = k;
    } else if (ty == T_RPAREN || ty == T_RBRACK) {
      char c = ty == T_RPAREN ? ')' : ']', want = ty == T_RPAREN ? '(' : '[';
      if (depth == 0) {
        free(open);
        return fail_at(p, p->toks[k].pos, "'%c' has no matching '%c'; remove it or add the opening '%c'", c,
                       want, want);
      }
      if (p->toks[open[depth - 1]].type != (ty == T_RPAREN ? T_LPAREN : T_LBRACK)) {
        token *o = &p->toks[open[depth - 1]];
        char oc = o->type == T_LPAREN ? '(' : '[';
        free(open);
        return fail_at(p, p->toks[k].pos, "'%c' does not match the innermost open bracket, '%c' at column %d; "
                                          "close that with '%c' first",
                       c, oc, (int)query_char_count(p->src, o->pos) + 1, oc == '(' ? ')' : ']');
      }
      depth--;
    }
  }
  if (depth > 0) {
    token *o = &p->toks[open[depth - 1]];
    char oc = o->type == T_LPAREN ? '(' : '[';
    free(open);
    return fail_at(p, o->pos, "'%c' is never closed; add a matching '%c'", oc, oc == '(' ? ')' : ']');
  }
  free(open);
  return 0;
}

/* ---------------------------------------------------------------- parser */

static int new_node(parser *p, int kind, size_t pos) {
  query *q = p->q;
  qnode *nd;
  RESERVE(p, q->nodes, q->nnodes, q->capnodes);
  nd = &q->nodes[q->nnodes];
  memset(nd, 0, sizeof *nd);
  nd->kind = (unsigned char)kind;
  nd->a = nd->b = nd->c = -1;
  nd->pos = pos;
  return q->nnodes++;
}

static int new_const(parser *p, const qval *v) {
  query *q = p->q;
  RESERVE(p, q->consts, q->nconsts, q->capconsts);
  q->consts[q->nconsts] = *v;
  return q->nconsts++;
}

static int parse_or(parser *p);

/* A constant of an IN list or array: string, (signed) number, true, false, null. Appends it. */
static int parse_list_constant(parser *p, const char *ctx) {
  token *t = cur(p);
  qval v;
  memset(&v, 0, sizeof v);
  if (t->type == T_STRING || t->type == T_NUMBER) {
    v = t->v;
  } else if ((t->type == T_MINUS || t->type == T_PLUS) && p->toks[p->i + 1].type == T_NUMBER) {
    p->i++;
    v = cur(p)->v;
    if (t->type == T_MINUS) { v.n = -v.n; v.i = -v.i; }
  } else if (at_kw(p, K_TRUE) || at_kw(p, K_FALSE)) {
    v.t = QV_BOOL;
    v.b = t->kw == K_TRUE;
  } else if (at_kw(p, K_NULL)) {
    v.t = QV_NULL;
  } else {
    char what[96];
    snprintf(what, sizeof what, "a constant (string, number, true, false or null) in %s", ctx);
    return fail_expected(p, what, 0);
  }
  p->i++;
  return new_const(p, &v);
}

/* '[' constants ']' (or '(' ... ')' as older docs wrote IN lists), found at first, count of them. */
static int parse_list(parser *p, const char *ctx, int *first, int *count) {
  int close;
  *first = p->q->nconsts;
  *count = 0;
  if (at(p, T_LBRACK)) close = T_RBRACK;
  else if (at(p, T_LPAREN)) close = T_RPAREN;
  else {
    char what[96];
    snprintf(what, sizeof what, "a list such as ['a', 'b'] for %s", ctx);
    return fail_expected(p, what, 1);
  }
  p->i++;
  if (at(p, close)) { p->i++; return 0; }
  for (;;) {
    if (parse_list_constant(p, ctx) < 0) return -1;
    (*count)++;
    if (at(p, T_COMMA)) { p->i++; continue; }
    if (at(p, close)) { p->i++; return 0; }
    return fail_expected(p, close == T_RBRACK ? "',' or ']' in the list" : "',' or ')' in the list", 0);
  }
}

/* name ('.' name)* where a name is a plain identifier or [[escaped]]. */
static int parse_path(parser *p) {
  query *q = p->q;
  size_t pos = cur(p)->pos;
  int first = q->nsegs, nd;
  for (;;) {
    token *t = cur(p);
    if (t->type == T_ESCNAME || (t->type == T_NAME && t->kw == K_NONE)) {
      RESERVE(p, q->segs, q->nsegs, q->capsegs);
      q->segs[q->nsegs].off = t->v.off;
      q->segs[q->nsegs].len = t->v.len;
      q->nsegs++;
      p->i++;
    } else if (t->type == T_NAME) {
      char shown[SHOW_MAX + 8];
      show(shown, sizeof shown, p->src + t->pos, t->len);
      return fail_at(p, t->pos, "'%s' is a reserved word; write a property of that name as [[%s]]", shown, shown);
    } else {
      return fail_expected(p, "a property name", 1);
    }
    if (!at(p, T_DOT)) break;
    p->i++;
  }
  nd = new_node(p, N_PATH, pos);
  if (nd < 0) return -1;
  q->nodes[nd].a = first;
  q->nodes[nd].b = q->nsegs - first;
  return nd;
}

static int lookup_func(const char *s, size_t n) {
  int f;
  for (f = 0; f < F_NONE; f++)
    if (ieq(s, n, FUNCS[f].name, strlen(FUNCS[f].name))) return f;
  return F_NONE;
}

static int parse_call(parser *p) {
  token *t = cur(p);
  char shown[SHOW_MAX + 8];
  size_t pos = t->pos, extra = 0; /* extra: where an argument beyond the arity starts */
  int f = lookup_func(p->src + t->pos, t->len), args[2] = { -1, -1 }, nargs = 0, nd;
  show(shown, sizeof shown, p->src + t->pos, t->len);
  if (f == F_NONE) {
    const char *instead = ieq(p->src + t->pos, t->len, "STARTS_WITH", 11) ? "STARTSWITH"
                        : ieq(p->src + t->pos, t->len, "ENDS_WITH", 9) ? "ENDSWITH" : NULL;
    if (instead) /* the service rejects the routing spelling in twin queries (hub-behavior.md 1.6) */
      return fail_at(p, pos, "%s is the message-routing spelling; twin queries use %s, e.g. %s(deviceId, 'door-')",
                     shown, instead, instead);
    return fail_at(p, pos, "unknown function '%s'; conditions support " FUNC_LIST, shown);
  }
  if (f >= F_COUNT)
    return fail_at(p, pos, "%s() is an aggregate; aggregates may only appear in the SELECT list", FUNCS[f].name);
  p->i += 2; /* name and '(' */
  if (!at(p, T_RPAREN)) {
    for (;;) {
      int a;
      if (nargs == FUNCS[f].arity && !extra) extra = cur(p)->pos;
      a = parse_or(p);
      if (a < 0) return -1;
      if (nargs < 2) args[nargs] = a;
      nargs++;
      if (at(p, T_COMMA)) { p->i++; continue; }
      if (at(p, T_RPAREN)) break;
      {
        char what[64];
        snprintf(what, sizeof what, "',' or ')' in the arguments of %s", FUNCS[f].name);
        return fail_expected(p, what, 0);
      }
    }
  }
  p->i++;
  if (nargs != FUNCS[f].arity)
    return fail_at(p, nargs > FUNCS[f].arity ? extra : pos, "%s takes %d argument%s but was given %d", FUNCS[f].name,
                   FUNCS[f].arity, FUNCS[f].arity == 1 ? "" : "s", nargs);
  nd = new_node(p, N_CALL, pos);
  if (nd < 0) return -1;
  p->q->nodes[nd].op = (unsigned char)f;
  p->q->nodes[nd].a = args[0];
  p->q->nodes[nd].b = args[1];
  return nd;
}

static int const_node(parser *p, const qval *v, size_t pos) {
  int c = new_const(p, v), nd;
  if (c < 0) return -1;
  nd = new_node(p, N_CONST, pos);
  if (nd < 0) return -1;
  p->q->nodes[nd].a = c;
  return nd;
}

static int parse_primary(parser *p) {
  token *t = cur(p);
  qval v;
  memset(&v, 0, sizeof v);
  switch (t->type) {
    case T_LPAREN: {
      int e;
      size_t open = t->pos;
      if (++p->depth > NEST_MAX) return fail_at(p, t->pos, "expression nested too deeply");
      p->i++;
      e = parse_or(p);
      if (e < 0) return -1;
      if (!at(p, T_RPAREN)) {
        char what[64];
        snprintf(what, sizeof what, "')' to close the '(' at column %d", (int)query_char_count(p->src, open) + 1);
        return fail_expected(p, what, 0);
      }
      p->i++;
      p->depth--;
      return e;
    }
    case T_LBRACK: {
      int first, count, nd;
      size_t pos = t->pos;
      if (parse_list(p, "an array", &first, &count) != 0) return -1;
      nd = new_node(p, N_ARRAY, pos);
      if (nd < 0) return -1;
      p->q->nodes[nd].a = first;
      p->q->nodes[nd].b = count;
      return nd;
    }
    case T_STRING:
    case T_NUMBER:
      p->i++;
      return const_node(p, &t->v, t->pos);
    case T_ESCNAME:
      return parse_path(p);
    case T_NAME:
      switch (t->kw) {
        case K_TRUE: case K_FALSE:
          v.t = QV_BOOL;
          v.b = t->kw == K_TRUE;
          p->i++;
          return const_node(p, &v, t->pos);
        case K_NULL:
          v.t = QV_NULL;
          p->i++;
          return const_node(p, &v, t->pos);
        case K_UNDEFINED:
          v.t = QV_UNDEF;
          p->i++;
          return const_node(p, &v, t->pos);
        case K_NONE:
          if (p->toks[p->i + 1].type == T_LPAREN) return parse_call(p);
          return parse_path(p);
        default: {
          /* A keyword followed by '.', a comparison or IN is meant as a property (e.g. group.name). */
          int next = p->toks[p->i + 1].type;
          if (next == T_DOT || (next >= T_EQ && next <= T_GE) ||
              (p->toks[p->i + 1].type == T_NAME && p->toks[p->i + 1].kw == K_IN)) {
            char shown[SHOW_MAX + 8];
            show(shown, sizeof shown, p->src + t->pos, t->len);
            return fail_at(p, t->pos, "'%s' is a reserved word; write a property of that name as [[%s]]", shown,
                           shown);
          }
          break;
        }
      }
      break;
    case T_EQ:
      if (p->i > 0 && p->toks[p->i - 1].type == T_EQ)
        return fail_at(p, p->toks[p->i - 1].pos, "'==' is not an operator; compare with a single '='");
      break;
    default:
      break;
  }
  return fail_expected(p, "a value", p->i > 0);
}

static int parse_unary(parser *p) {
  token *t = cur(p);
  if (t->type == T_MINUS || t->type == T_PLUS) {
    int e, neg = t->type == T_MINUS;
    size_t pos = t->pos;
    if (++p->depth > NEST_MAX) return fail_at(p, pos, "expression nested too deeply");
    p->i++;
    e = parse_unary(p);
    if (e < 0) return -1;
    p->depth--;
    if (!neg) return e;
    if (p->q->nodes[e].kind == N_CONST && p->q->consts[p->q->nodes[e].a].t == QV_NUM) {
      qval *v = &p->q->consts[p->q->nodes[e].a];
      v->n = -v->n;
      v->i = -v->i;
      p->q->nodes[e].pos = pos;
      return e;
    }
    {
      int nd = new_node(p, N_NEG, pos);
      if (nd < 0) return -1;
      p->q->nodes[nd].a = e;
      return nd;
    }
  }
  return parse_primary(p);
}

static int binary(parser *p, int kind, int op, int a, int b, size_t pos) {
  int nd = new_node(p, kind, pos);
  if (nd < 0) return -1;
  p->q->nodes[nd].op = (unsigned char)op;
  p->q->nodes[nd].a = a;
  p->q->nodes[nd].b = b;
  return nd;
}

static int parse_mul(parser *p) {
  int e = parse_unary(p);
  while (e >= 0 && (at(p, T_STAR) || at(p, T_SLASH) || at(p, T_PERCENT))) {
    token *t = cur(p);
    int op = t->type, r;
    size_t pos = t->pos;
    p->i++;
    r = parse_unary(p);
    if (r < 0) return -1;
    e = binary(p, N_ARITH, op, e, r, pos);
  }
  return e;
}

static int parse_add(parser *p) {
  int e = parse_mul(p);
  while (e >= 0 && (at(p, T_PLUS) || at(p, T_MINUS))) {
    token *t = cur(p);
    int op = t->type, r;
    size_t pos = t->pos;
    p->i++;
    r = parse_mul(p);
    if (r < 0) return -1;
    e = binary(p, N_ARITH, op, e, r, pos);
  }
  return e;
}

static int parse_cmp(parser *p) {
  int e = parse_add(p), ty;
  token *t;
  if (e < 0) return -1;
  t = cur(p);
  ty = t->type;
  if (ty == T_EQ || ty == T_NE || ty == T_LT || ty == T_GT || ty == T_LE || ty == T_GE) {
    int r;
    size_t pos = t->pos;
    p->i++;
    r = parse_add(p);
    if (r < 0) return -1;
    return binary(p, N_CMP, ty, e, r, pos);
  }
  if (at_kw(p, K_IN) || at_kw(p, K_NIN) ||
      (at_kw(p, K_NOT) && p->toks[p->i + 1].type == T_NAME && p->toks[p->i + 1].kw == K_IN)) {
    int neg = !at_kw(p, K_IN), first, count, nd;
    size_t pos = t->pos;
    p->i += at_kw(p, K_NOT) ? 2 : 1;
    if (parse_list(p, neg ? "NIN" : "IN", &first, &count) != 0) return -1;
    nd = new_node(p, N_IN, pos);
    if (nd < 0) return -1;
    p->q->nodes[nd].op = (unsigned char)neg;
    p->q->nodes[nd].a = e;
    p->q->nodes[nd].b = first;
    p->q->nodes[nd].c = count;
    return nd;
  }
  return e;
}

static int parse_not(parser *p) {
  if (at_kw(p, K_NOT)) {
    size_t pos = cur(p)->pos;
    int e, nd;
    if (++p->depth > NEST_MAX) return fail_at(p, pos, "expression nested too deeply");
    p->i++;
    e = parse_not(p);
    if (e < 0) return -1;
    p->depth--;
    nd = new_node(p, N_NOT, pos);
    if (nd < 0) return -1;
    p->q->nodes[nd].a = e;
    return nd;
  }
  return parse_cmp(p);
}

/* operand (kw operand)* as one n-ary node, so long AND/OR chains evaluate without deep recursion. */
static int parse_chain(parser *p, int kw, int kind, int (*operand)(parser *)) {
  int first = operand(p), *tmp, n = 0, cap = 8, nd, k;
  query *q = p->q;
  size_t pos;
  if (first < 0 || !at_kw(p, kw)) return first;
  pos = cur(p)->pos;
  tmp = malloc(sizeof(int) * (size_t)cap);
  if (!tmp) return oom(p);
  tmp[n++] = first;
  while (at_kw(p, kw)) {
    int e;
    p->i++;
    e = operand(p);
    if (e < 0) { free(tmp); return -1; }
    if (n == cap) {
      int *nt = realloc(tmp, sizeof(int) * (size_t)cap * 2);
      if (!nt) { free(tmp); return oom(p); }
      tmp = nt;
      cap *= 2;
    }
    tmp[n++] = e;
  }
  nd = new_node(p, kind, pos);
  if (nd >= 0) {
    q->nodes[nd].a = q->nkids;
    q->nodes[nd].b = n;
    for (k = 0; k < n && nd >= 0; k++) {
      if (q->nkids >= q->capkids) {
        int nc = q->capkids ? q->capkids * 2 : 16;
        int *nk = realloc(q->kids, sizeof(int) * (size_t)nc);
        if (!nk) { nd = oom(p); break; }
        q->kids = nk;
        q->capkids = nc;
      }
      q->kids[q->nkids++] = tmp[k];
    }
  }
  free(tmp);
  return nd;
}

static int parse_and(parser *p) { return parse_chain(p, K_AND, N_AND, parse_not); }
static int parse_or(parser *p) { return parse_chain(p, K_OR, N_OR, parse_and); }

/* FROM's collection: devices, devices.jobs or devices.modules. */
static int parse_collection(parser *p) {
  token *t = cur(p);
  if (t->type != T_NAME || !ieq(p->src + t->pos, t->len, "devices", 7))
    return fail_expected(p, "devices, devices.jobs or devices.modules", 1);
  p->i++;
  p->q->collection = COLL_DEVICES;
  if (at(p, T_DOT)) {
    p->i++;
    t = cur(p);
    if (t->type == T_NAME && ieq(p->src + t->pos, t->len, "jobs", 4)) p->q->collection = COLL_JOBS;
    else if (t->type == T_NAME && ieq(p->src + t->pos, t->len, "modules", 7)) p->q->collection = COLL_MODULES;
    else return fail_expected(p, "jobs or modules", 1);
    p->i++;
  }
  return 0;
}

static int add_item(parser *p, int func, int path, size_t pos) {
  query *q = p->q;
  qitem *it;
  RESERVE(p, q->items, q->nitems, q->capitems);
  it = &q->items[q->nitems];
  memset(it, 0, sizeof *it);
  it->func = func;
  it->path = path;
  it->pos = pos;
  return q->nitems++;
}

static int parse_select_item(parser *p) {
  token *t = cur(p);
  size_t pos = t->pos;
  int k;
  if (t->type == T_NAME && t->kw == K_NONE && p->toks[p->i + 1].type == T_LPAREN) {
    int f = lookup_func(p->src + t->pos, t->len), path = -1;
    if (f < F_COUNT || f == F_NONE) {
      char shown[SHOW_MAX + 8];
      show(shown, sizeof shown, p->src + t->pos, t->len);
      if (f == F_NONE)
        return fail_at(p, pos, "unknown function '%s'; the SELECT list takes property paths or the aggregates "
                               SELECT_AGGREGATES, shown);
      return fail_at(p, pos, "'%s(...)' cannot be selected; select property paths or the aggregates "
                             SELECT_AGGREGATES, shown);
    }
    p->i += 2;
    if (f == F_COUNT) {
      if (!at(p, T_RPAREN)) return fail_expected(p, "')': COUNT takes no argument, as in COUNT()", 0);
    } else {
      path = parse_path(p);
      if (path < 0) return -1;
      if (!at(p, T_RPAREN)) {
        char what[64];
        snprintf(what, sizeof what, "')' after the property of %s", FUNCS[f].name);
        return fail_expected(p, what, 0);
      }
    }
    p->i++;
    k = add_item(p, f, path, pos);
  } else if (t->type == T_ESCNAME || (t->type == T_NAME && t->kw == K_NONE)) {
    int path = parse_path(p);
    if (path < 0) return -1;
    k = add_item(p, F_NONE, path, pos);
  } else {
    return fail_expected(p, "'*', a property path or an aggregate such as COUNT()", 1);
  }
  if (k < 0) return -1;
  if (at_kw(p, K_AS)) {
    p->i++;
    t = cur(p);
    if (t->type != T_ESCNAME && !(t->type == T_NAME && t->kw == K_NONE))
      return fail_expected(p, "a name for the column (write a reserved word as [[name]])", 1);
    p->q->items[k].named = 1;
    p->q->items[k].name_off = t->v.off;
    p->q->items[k].name_len = t->v.len;
    p->i++;
  }
  p->q->items[k].len = p->toks[p->i - 1].pos + p->toks[p->i - 1].len - pos;
  return 0;
}

static int same_path(const query *q, int a, int b) {
  const qnode *x = &q->nodes[a], *y = &q->nodes[b];
  int k;
  if (x->b != y->b) return 0;
  for (k = 0; k < x->b; k++) {
    const qseg *s = &q->segs[x->a + k], *t = &q->segs[y->a + k];
    if (!ieq(q->pool + s->off, s->len, q->pool + t->off, t->len)) return 0;
  }
  return 1;
}

/* Output name of item k: alias, "$n", or the path's last property. */
static void item_name(const query *q, const qitem *it, const char **s, size_t *n) {
  if (it->named) {
    *s = q->pool + it->name_off;
    *n = it->name_len;
  } else {
    const qnode *nd = &q->nodes[it->path];
    const qseg *sg = &q->segs[nd->a + nd->b - 1];
    *s = q->pool + sg->off;
    *n = sg->len;
  }
}

/* Rules that need the whole query: what devices.jobs allows, GROUP BY, duplicate names. */
static int check_select(parser *p, size_t group_pos) {
  query *q = p->q;
  int k, j, unnamed = 0;
  if (q->collection == COLL_JOBS && !q->star)
    return fail_at(p, q->items[0].pos, "FROM devices.jobs supports only SELECT *; projections and aggregates "
                                      "work on FROM devices");
  if (q->ngroups > 0 && q->collection == COLL_JOBS)
    return fail_at(p, group_pos, "GROUP BY works on FROM devices, not devices.jobs");
  if (q->ngroups > 0 && q->star)
    return fail_at(p, group_pos, "GROUP BY needs a SELECT list of the grouped properties and aggregates "
                                 "instead of *, e.g. SELECT tags.city, COUNT() AS n FROM devices GROUP BY tags.city");
  for (k = 0, j = 0; k < q->nitems; k++)
    if (q->items[k].func != F_NONE && ++j > AGG_MAX)
      return fail_at(p, q->items[k].pos, "a query may have at most %d aggregates", AGG_MAX);
  q->aggregate = j > 0 || q->ngroups > 0;
  for (k = 0; k < q->nitems; k++) {
    qitem *it = &q->items[k];
    if (it->func == F_NONE && q->aggregate) {
      int grouped = 0;
      for (j = 0; j < q->ngroups; j++)
        if (same_path(q, it->path, q->groups[j])) grouped = 1;
      if (!grouped) {
        char shown[SHOW_MAX + 8];
        show(shown, sizeof shown, p->src + it->pos, it->len);
        return fail_at(p, it->pos, "'%s' is neither an aggregate nor in GROUP BY; add it to GROUP BY, select "
                                   "only aggregates, or drop the aggregates to list twins (e.g. SELECT *)", shown);
      }
    }
    if (it->func != F_NONE && !it->named) {
      char name[24];
      snprintf(name, sizeof name, "$%d", ++unnamed);
      if (pool_add(p, name, strlen(name), &it->name_off) != 0) return -1;
      it->name_len = strlen(name);
      it->named = 1;
    }
  }
  for (k = 0; k < q->nitems; k++) {
    const char *a, *b;
    size_t an, bn;
    item_name(q, &q->items[k], &a, &an);
    for (j = 0; j < k; j++) {
      item_name(q, &q->items[j], &b, &bn);
      if (ieq(a, an, b, bn)) {
        char shown[SHOW_MAX + 8];
        show(shown, sizeof shown, a, an);
        return fail_at(p, q->items[k].pos, "two selected columns are both named '%s'; rename one with AS", shown);
      }
    }
  }
  return 0;
}

static int parse_query(parser *p) {
  query *q = p->q;
  size_t group_pos = 0;
  if (!at_kw(p, K_SELECT)) return fail_expected(p, "SELECT at the start of the query", 0);
  p->i++;
  if (at_kw(p, K_TOP)) {
    token *t;
    int paren;
    p->i++;
    paren = at(p, T_LPAREN);
    if (paren) p->i++;
    t = cur(p);
    if (t->type != T_NUMBER || !(t->v.isint || (t->v.n == floor(t->v.n) && t->v.n <= 9007199254740992.0)))
      return fail_expected(p, "a whole number of items after TOP, e.g. SELECT TOP 10 *", 0);
    q->top = t->v.isint ? t->v.i : (long long)t->v.n;
    p->i++;
    if (paren) {
      if (!at(p, T_RPAREN)) return fail_expected(p, "')' after the TOP count", 0);
      p->i++;
    }
  }
  if (at(p, T_STAR)) {
    q->star = 1;
    p->i++;
  } else {
    for (;;) {
      if (parse_select_item(p) != 0) return -1;
      if (!at(p, T_COMMA)) break;
      p->i++;
    }
  }
  if (!at_kw(p, K_FROM)) {
    if (q->star && at(p, T_COMMA))
      return fail_at(p, cur(p)->pos, "'*' selects whole twins and cannot be combined with other columns");
    return fail_expected(p, q->star ? "FROM" : "',' or FROM", 1);
  }
  p->i++;
  if (parse_collection(p) != 0) return -1;
  if (at_kw(p, K_WHERE)) {
    p->i++;
    q->where = parse_or(p);
    if (q->where < 0) return -1;
  }
  if (at_kw(p, K_GROUP)) {
    group_pos = cur(p)->pos;
    p->i++;
    if (!at_kw(p, K_BY)) return fail_expected(p, "BY", 1);
    p->i++;
    for (;;) {
      int g = parse_path(p);
      if (g < 0) return -1;
      RESERVE(p, q->groups, q->ngroups, q->capgroups);
      q->groups[q->ngroups++] = g;
      if (!at(p, T_COMMA)) break;
      p->i++;
    }
  }
  if (at_kw(p, K_ORDER))
    return fail_at(p, cur(p)->pos, "ORDER BY is not supported by IoT Hub twin queries; sort the results yourself");
  if (!at(p, T_EOF)) {
    const char *what = q->ngroups ? "',' or the end of the query"
                     : q->where >= 0 ? "AND, OR, GROUP BY or the end of the query"
                     : "WHERE, GROUP BY or the end of the query";
    return fail_expected(p, what, 0);
  }
  return check_select(p, group_pos);
}

static int parse_condition(parser *p) {
  query *q = p->q;
  q->condition = 1;
  if (at(p, T_STAR) && p->toks[p->i + 1].type == T_EOF) {
    q->all = 1;
    return 0;
  }
  if (at(p, T_EOF)) {
    p->kind = QUERY_EMPTY;
    snprintf(p->msg, p->msglen, "the condition is empty; use * for all devices, or a condition such as "
                                "deviceId = 'myDevice'");
    return -1;
  }
  if (at_kw(p, K_SELECT)) {
    fail_at(p, cur(p)->pos, "a condition is only what follows WHERE, not a full SELECT query");
    p->kind = QUERY_FULL_SELECT;
    return -1;
  }
  if (at_kw(p, K_WHERE)) {
    fail_at(p, cur(p)->pos, "a condition is only what follows WHERE; drop the leading WHERE");
    p->kind = QUERY_LEADING_WHERE;
    return -1;
  }
  if (at_kw(p, K_FROM)) { /* seen in the wild: "FROM devices.modules WHERE moduleId = 'x'" */
    p->i++;
    if (parse_collection(p) != 0) return -1;
    if (q->collection == COLL_JOBS)
      return fail_at(p, p->toks[p->i - 1].pos, "a job targets devices or devices.modules, not devices.jobs");
    if (!at_kw(p, K_WHERE)) return fail_expected(p, "WHERE", 1);
    p->i++;
  }
  q->where = parse_or(p);
  if (q->where < 0) return -1;
  if (!at(p, T_EOF)) return fail_expected(p, "AND, OR or the end of the condition", 0);
  return 0;
}

static int compare_order(const qval *a, const qval *b);

static int qsort_order(const void *a, const void *b) { return compare_order(a, b); }

/* After parsing: fix string pointers (the pool no longer moves), drop collection prefixes
 * (devices.jobs.jobId is jobId), sort IN lists for binary search. */
static void finish(query *q) {
  int k;
  for (k = 0; k < q->nconsts; k++)
    if (q->consts[k].t == QV_STR) q->consts[k].s = q->pool + q->consts[k].off;
  for (k = 0; k < q->nnodes; k++) {
    qnode *nd = &q->nodes[k];
    if (nd->kind == N_PATH) {
      const qseg *s = &q->segs[nd->a];
      int skip = 0;
      if (nd->b >= 2 && ieq(q->pool + s[0].off, s[0].len, "devices", 7)) {
        if (q->collection == COLL_DEVICES) skip = 1;
        else if (nd->b >= 3 && ieq(q->pool + s[1].off, s[1].len, q->collection == COLL_JOBS ? "jobs" : "modules",
                                   q->collection == COLL_JOBS ? 4 : 7))
          skip = 2;
      }
      nd->a += skip;
      nd->b -= skip;
    } else if (nd->kind == N_IN && nd->c > 1) {
      qsort(q->consts + nd->b, (size_t)nd->c, sizeof(qval), qsort_order);
    }
  }
}

/* Parses into q (zeroed by the caller). Returns QUERY_OK or a QUERY_* failure with msg set. */
static int compile_source(query *q, const char *s, size_t n, int condition, char *msg, size_t msglen) {
  parser p;
  int r;
  memset(&p, 0, sizeof p);
  p.src = s;
  p.n = n;
  p.q = q;
  p.msg = msg;
  p.msglen = msglen;
  p.condition = condition;
  q->where = -1;
  q->top = -1;
  msg[0] = '\0';
  if (query_char_count(s, n) > QUERY_MAX_LENGTH) {
    snprintf(msg, msglen, "the %s is %d characters long; IoT Hub accepts at most %d", condition ? "condition" : "query",
             (int)query_char_count(s, n), QUERY_MAX_LENGTH);
    return QUERY_TOO_LONG;
  }
  r = lex(&p);
  if (r == 0) r = check_brackets(&p);
  if (r != 0 && condition && p.ntoks > 0 && p.toks[0].type == T_NAME) {
    /* a whole query (or a leading WHERE) is the mistake to report, even if its text is broken too */
    if (p.toks[0].kw == K_SELECT) p.kind = QUERY_FULL_SELECT;
    else if (p.toks[0].kw == K_WHERE) p.kind = QUERY_LEADING_WHERE;
  }
  if (r == 0) {
    if (!condition && p.toks[0].type == T_EOF) {
      snprintf(msg, msglen, "the query is empty; write e.g. SELECT * FROM devices WHERE tags.building = '43'");
      p.kind = QUERY_EMPTY;
      r = -1;
    } else {
      r = condition ? parse_condition(&p) : parse_query(&p);
    }
  }
  free(p.toks);
  if (r != 0) return p.kind ? p.kind : QUERY_INVALID;
  finish(q);
  return QUERY_OK;
}

int query_check_condition(const char *s, size_t n, char *msg, size_t msglen) {
  query q;
  int r;
  memset(&q, 0, sizeof q);
  r = compile_source(&q, s, n, 1, msg, msglen);
  query_free(&q);
  return r;
}

size_t query_where_end(const char *s, size_t n) {
  query q;
  parser p;
  char msg[MSG_MAX];
  size_t end = 0;
  int k, depth = 0;
  memset(&q, 0, sizeof q);
  memset(&p, 0, sizeof p);
  p.src = s;
  p.n = n;
  p.q = &q;
  p.msg = msg;
  p.msglen = sizeof msg;
  if (lex(&p) == 0) {
    for (k = 0; k < p.ntoks; k++) {
      token *t = &p.toks[k];
      if (t->type == T_LPAREN || t->type == T_LBRACK) depth++;
      else if (t->type == T_RPAREN || t->type == T_RBRACK) depth--;
      else if (depth == 0 && t->type == T_NAME && t->kw == K_WHERE) { end = t->pos + t->len; break; }
    }
  }
  free(p.toks);
  query_free(&q);
  return end;
}

/* ---------------------------------------------------------------- evaluation */

enum { TV_FALSE = 0, TV_TRUE = 1, TV_UNDEF = 2 };

typedef struct {
  lua_State *L;
  const query *q;
  int doc;   /* stack index of the document */
  int keys;  /* stack index of the names table: segment k's name at k+1, and at nsegs+k+1 the
              * spelling a document last used for it (false until a lookup ignored case) */
  int arrmt; /* pseudo-index of the JSON array metatable */
} ectx;

static int is_primitive(const qval *v) {
  return v->t == QV_NULL || v->t == QV_BOOL || v->t == QV_NUM || v->t == QV_STR;
}

static int num_order(const qval *a, const qval *b) {
  if (a->isint && b->isint) return a->i < b->i ? -1 : a->i > b->i;
  return a->n < b->n ? -1 : a->n > b->n;
}

static int str_order(const qval *a, const qval *b) {
  size_t n = a->len < b->len ? a->len : b->len;
  int r = memcmp(a->s, b->s, n);
  if (r) return r < 0 ? -1 : 1;
  return a->len < b->len ? -1 : a->len > b->len;
}

/* Total order over primitives (null < booleans < numbers < strings), as MIN/MAX and IN use it. */
static int compare_order(const qval *a, const qval *b) {
  if (a->t != b->t) return a->t < b->t ? -1 : 1; /* QV_* are declared in this order */
  switch (a->t) {
    case QV_BOOL: return (int)a->b - (int)b->b;
    case QV_NUM: return num_order(a, b);
    case QV_STR: return str_order(a, b);
    default: return 0;
  }
}

static int is_array_at(const ectx *c, int idx) {
  lua_State *L = c->L;
  if (lua_getmetatable(L, idx)) {
    int r = lua_rawequal(L, -1, c->arrmt);
    lua_pop(L, 1);
    return r;
  }
  return lua_rawlen(L, idx) > 0;
}

static void to_qval(const ectx *c, int idx, qval *v) {
  lua_State *L = c->L;
  v->isint = 0;
  switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN:
      v->t = QV_BOOL;
      v->b = (unsigned char)lua_toboolean(L, idx);
      break;
    case LUA_TNUMBER:
      v->t = QV_NUM;
#if IOTHUB_HAS_INTEGERS
      if (lua_isinteger(L, idx)) {
        v->isint = 1;
        v->i = (long long)lua_tointeger(L, idx);
        v->n = (double)v->i;
        break;
      }
#endif
      v->n = (double)lua_tonumber(L, idx);
      break;
    case LUA_TSTRING:
      v->t = QV_STR;
      v->s = lua_tolstring(L, idx, &v->len);
      break;
    case LUA_TLIGHTUSERDATA:
      v->t = lua_touserdata(L, idx) == NULL ? QV_NULL : QV_UNDEF;
      break;
    case LUA_TTABLE:
      v->t = is_array_at(c, idx) ? QV_ARR : QV_OBJ;
      break;
    default:
      v->t = QV_UNDEF;
  }
}

/* With the object on top: finds the member whose name equals seg ignoring ASCII case.
 * Leaves key value above the object and returns 1, or leaves the stack as it was. */
static int find_ignoring_case(const ectx *c, const qseg *seg) {
  lua_State *L = c->L;
  const char *name = c->q->pool + seg->off;
  lua_pushnil(L);
  while (lua_next(L, -2) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING) {
      size_t kl;
      const char *k = lua_tolstring(L, -2, &kl);
      if (ieq(k, kl, name, seg->len)) return 1;
    }
    lua_pop(L, 1);
  }
  return 0;
}

/* With the object on top, looks up name (the names-table entry at slot): pushes [key] value
 * and returns 1, or leaves the stack as it was and returns 0. */
static int lookup(const ectx *c, int slot, int with_key) {
  lua_State *L = c->L;
  lua_rawgeti(L, c->keys, slot);                           /* obj key */
  if (lua_type(L, -1) != LUA_TSTRING) { lua_pop(L, 1); return 0; }
  if (with_key) { lua_pushvalue(L, -1); lua_rawget(L, -3); } /* obj key value */
  else lua_rawget(L, -2);                                  /* obj value */
  if (!lua_isnil(L, -1)) return 1;
  lua_pop(L, with_key ? 2 : 1);
  return 0;
}

/* Pushes the value at the path (and the document's own spelling of its last name below it
 * when with_key) and returns 1; pushes nothing and returns 0 when it is undefined.
 * Names match exactly, else as the last document spelled them (documents of one fleet
 * spell alike, so this saves most scans), else by scanning the object ignoring case. */
static int push_path(const ectx *c, const qnode *nd, int with_key) {
  lua_State *L = c->L;
  int k, n = nd->b, nsegs = c->q->nsegs;
  lua_pushvalue(L, c->doc);
  for (k = 0; k < n; k++) {
    int last = with_key && k == n - 1, seg = nd->a + k;
    if (lua_type(L, -1) != LUA_TTABLE) { lua_pop(L, 1); return 0; }
    if (!lookup(c, seg + 1, last) && !lookup(c, nsegs + seg + 1, last)) {
      if (!find_ignoring_case(c, &c->q->segs[seg])) { lua_pop(L, 1); return 0; }
      lua_pushvalue(L, -2);                                  /* obj key value key */
      lua_rawseti(L, c->keys, nsegs + seg + 1);
      if (!last) lua_remove(L, -2);
    }
    if (last) lua_remove(L, -3);
    else lua_replace(L, -2);
  }
  if (with_key && n == 0) { lua_pop(L, 1); return 0; }
  return 1;
}

static void eval(const ectx *c, int ni, qval *out);

static int truth(const qval *v) {
  if (v->t == QV_BOOL) return v->b ? TV_TRUE : TV_FALSE;
  return TV_UNDEF;
}

static void set_truth(qval *out, int tv) {
  if (tv == TV_UNDEF) { out->t = QV_UNDEF; return; }
  out->t = QV_BOOL;
  out->b = (unsigned char)(tv == TV_TRUE);
}

static int compare_values(int op, const qval *a, const qval *b) {
  int r;
  if (!is_primitive(a) || !is_primitive(b) || a->t != b->t) return TV_UNDEF;
  switch (a->t) {
    case QV_NULL: r = 0; break;
    case QV_BOOL: r = (int)a->b - (int)b->b; break;
    case QV_NUM: r = num_order(a, b); break;
    default: r = str_order(a, b); break;
  }
  if ((a->t == QV_NULL || a->t == QV_BOOL) && op != T_EQ && op != T_NE) return TV_UNDEF;
  if (a->t == QV_NUM && (isnan(a->n) || isnan(b->n))) return op == T_NE ? TV_TRUE : TV_FALSE;
  switch (op) {
    case T_EQ: return r == 0;
    case T_NE: return r != 0;
    case T_LT: return r < 0;
    case T_GT: return r > 0;
    case T_LE: return r <= 0;
    default: return r >= 0;
  }
}

static void arith(int op, const qval *a, const qval *b, qval *out) {
  if (a->t != QV_NUM || b->t != QV_NUM) { out->t = QV_UNDEF; return; }
  out->t = QV_NUM;
  out->isint = 0;
  if (a->isint && b->isint) {
    long long r;
    int ok = 0;
    switch (op) {
      case T_PLUS: ok = !__builtin_add_overflow(a->i, b->i, &r); break;
      case T_MINUS: ok = !__builtin_sub_overflow(a->i, b->i, &r); break;
      case T_STAR: ok = !__builtin_mul_overflow(a->i, b->i, &r); break;
      case T_PERCENT:
        if (b->i == 0) { out->t = QV_UNDEF; return; }
        r = b->i == -1 ? 0 : a->i % b->i;
        ok = 1;
        break;
      default: break;
    }
    if (ok) {
      out->isint = 1;
      out->i = r;
      out->n = (double)r;
      return;
    }
  }
  switch (op) {
    case T_PLUS: out->n = a->n + b->n; break;
    case T_MINUS: out->n = a->n - b->n; break;
    case T_STAR: out->n = a->n * b->n; break;
    case T_SLASH:
      if (b->n == 0) { out->t = QV_UNDEF; return; }
      out->n = a->n / b->n;
      break;
    default:
      if (b->n == 0) { out->t = QV_UNDEF; return; }
      out->n = fmod(a->n, b->n);
  }
  if (!isfinite(out->n)) out->t = QV_UNDEF;
}

static int in_list(const query *q, const qnode *nd, const qval *v) {
  int lo = nd->b, hi = nd->b + nd->c - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2, r = compare_order(v, &q->consts[mid]);
    if (r == 0) return 1;
    if (r < 0) hi = mid - 1;
    else lo = mid + 1;
  }
  return 0;
}

static void eval_call(const ectx *c, const qnode *nd, qval *out) {
  qval a, b;
  eval(c, nd->a, &a);
  out->t = QV_BOOL;
  switch (nd->op) {
    case F_IS_DEFINED: out->b = a.t != QV_UNDEF; return;
    case F_IS_NULL: out->b = a.t == QV_NULL; return;
    case F_IS_BOOL: out->b = a.t == QV_BOOL; return;
    case F_IS_NUMBER: out->b = a.t == QV_NUM; return;
    case F_IS_STRING: out->b = a.t == QV_STR; return;
    case F_IS_OBJECT: out->b = a.t == QV_OBJ; return;
    case F_IS_ARRAY: out->b = a.t == QV_ARR; return;
    case F_IS_PRIMITIVE: out->b = (unsigned char)is_primitive(&a); return;
    default: break;
  }
  eval(c, nd->b, &b);
  if (a.t != QV_STR || b.t != QV_STR) { out->t = QV_UNDEF; return; }
  if (b.len > a.len) { out->b = 0; return; }
  if (nd->op == F_STARTSWITH) out->b = memcmp(a.s, b.s, b.len) == 0;
  else out->b = memcmp(a.s + a.len - b.len, b.s, b.len) == 0;
}

static void eval(const ectx *c, int ni, qval *out) {
  const query *q = c->q;
  const qnode *nd = &q->nodes[ni];
  qval a, b;
  switch (nd->kind) {
    case N_CONST:
      *out = q->consts[nd->a];
      return;
    case N_ARRAY:
      out->t = QV_ARR;
      return;
    case N_PATH:
      if (push_path(c, nd, 0)) {
        to_qval(c, -1, out);
        lua_pop(c->L, 1); /* a string stays alive: the document still holds it */
      } else {
        out->t = QV_UNDEF;
      }
      return;
    case N_CMP:
      eval(c, nd->a, &a);
      eval(c, nd->b, &b);
      set_truth(out, compare_values(nd->op, &a, &b));
      return;
    case N_AND: case N_OR: {
      int k, undef = 0, stop = nd->kind == N_AND ? TV_FALSE : TV_TRUE;
      for (k = 0; k < nd->b; k++) {
        int tv;
        eval(c, q->kids[nd->a + k], &a);
        tv = truth(&a);
        if (tv == stop) { set_truth(out, stop); return; }
        if (tv == TV_UNDEF) undef = 1;
      }
      set_truth(out, undef ? TV_UNDEF : (stop == TV_FALSE ? TV_TRUE : TV_FALSE));
      return;
    }
    case N_NOT: {
      int tv;
      eval(c, nd->a, &a);
      tv = truth(&a);
      set_truth(out, tv == TV_UNDEF ? TV_UNDEF : !tv);
      return;
    }
    case N_NEG:
      eval(c, nd->a, &a);
      if (a.t != QV_NUM) { out->t = QV_UNDEF; return; }
      *out = a;
      out->n = -a.n;
      if (a.isint) {
        if (a.i == (-9223372036854775807LL - 1)) out->isint = 0;
        else out->i = -a.i;
      }
      return;
    case N_ARITH:
      eval(c, nd->a, &a);
      eval(c, nd->b, &b);
      arith(nd->op, &a, &b, out);
      return;
    case N_IN:
      eval(c, nd->a, &a);
      if (!is_primitive(&a)) { out->t = QV_UNDEF; return; }
      out->t = QV_BOOL;
      out->b = (unsigned char)(in_list(q, nd, &a) != nd->op);
      return;
    case N_CALL:
      eval_call(c, nd, out);
      return;
    default:
      out->t = QV_UNDEF;
  }
}

static int matches(const ectx *c) {
  qval v;
  if (c->q->where < 0) return 1;
  eval(c, c->q->where, &v);
  return v.t == QV_BOOL && v.b;
}

/* ---------------------------------------------------------------- Lua API */

static query *check_query(lua_State *L) {
  return (query *)luaL_checkudata(L, 1, QUERY_MT);
}

/* Sets up c for the query at index 1 with the document at doc; pushes the names table. */
static void begin(lua_State *L, ectx *c, query *q, int doc) {
  push_uservalue(L, 1);
  c->L = L;
  c->q = q;
  c->doc = doc;
  c->keys = lua_gettop(L);
  c->arrmt = lua_upvalueindex(1);
}

static void push_array(lua_State *L, int narr) {
  lua_createtable(L, narr, 0);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
}

static void push_qval(lua_State *L, const qval *v) {
  switch (v->t) {
    case QV_NULL: lua_pushlightuserdata(L, NULL); break;
    case QV_BOOL: lua_pushboolean(L, v->b); break;
    case QV_NUM:
      if (v->isint) lua_pushinteger(L, (lua_Integer)v->i);
      else lua_pushnumber(L, (lua_Number)v->n);
      break;
    case QV_STR: lua_pushlstring(L, v->s, v->len); break;
    default: lua_pushnil(L);
  }
}

/* Sets [name] = value of a path item from the document into the table at tbl; nothing when undefined. */
static void set_path_item(const ectx *c, const qitem *it, int tbl) {
  lua_State *L = c->L;
  if (!push_path(c, &c->q->nodes[it->path], 1)) return; /* key value */
  if (it->named) {
    lua_pushlstring(L, c->q->pool + it->name_off, it->name_len);
    lua_replace(L, -3);
  }
  lua_rawset(L, tbl);
}

static void push_projection(const ectx *c) {
  lua_State *L = c->L;
  int k, tbl;
  if (c->q->star) {
    lua_pushvalue(L, c->doc);
    return;
  }
  lua_createtable(L, 0, c->q->nitems);
  tbl = lua_gettop(L);
  for (k = 0; k < c->q->nitems; k++) set_path_item(c, &c->q->items[k], tbl);
}

static int l_match(lua_State *L) {
  query *q = check_query(L);
  ectx c;
  luaL_checkany(L, 2);
  lua_settop(L, 2);
  begin(L, &c, q, 2);
  lua_pushboolean(L, matches(&c));
  return 1;
}

static int l_project(lua_State *L) {
  query *q = check_query(L);
  ectx c;
  luaL_checkany(L, 2);
  if (q->aggregate) return luaL_error(L, "project: this query aggregates; use q:aggregate(docs)");
  lua_settop(L, 2);
  begin(L, &c, q, 2);
  push_projection(&c);
  return 1;
}

/* docs[start..stop]: the matching documents (projected or not), at most limit of them, and
 * where to resume: the next match after those (looked ahead, so a last page is known to be
 * last), stop + 1 when the scan ended at stop, or nil when nothing is left. */
static int scan(lua_State *L, int project) {
  query *q = check_query(L);
  lua_Integer start = luaL_optinteger(L, 3, 1), limit = luaL_optinteger(L, 4, -1), count = 0, next = 0, i, n,
              stop;
  ectx c;
  int out;
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_argcheck(L, start >= 1, 3, "start must be 1 or more");
  luaL_argcheck(L, lua_isnoneornil(L, 4) || limit >= 0, 4, "limit must be 0 or more");
  if (project && q->aggregate) return luaL_error(L, "select: this query aggregates; use q:aggregate(docs)");
  n = (lua_Integer)lua_rawlen(L, 2);
  stop = luaL_optinteger(L, 5, n);
  if (stop < n) next = stop + 1;
  else stop = n;
  luaL_checkstack(L, 16, "scan");
  lua_settop(L, 5);
  begin(L, &c, q, 8);   /* 6: names */
  push_array(L, 0);     /* 7: results */
  out = 7;
  for (i = start; i <= stop; i++) {
    lua_rawgeti(L, 2, i); /* 8 */
    if (!lua_isnil(L, 8) && matches(&c)) { /* a hole in docs is no document */
      if (count == limit) { next = i; lua_pop(L, 1); break; }
      if (project) push_projection(&c);
      else lua_pushvalue(L, 8);
      lua_rawseti(L, out, ++count);
    }
    lua_pop(L, 1);
  }
  if (next) lua_pushinteger(L, next);
  else lua_pushnil(L);
  return 2;
}

static int l_filter(lua_State *L) { return scan(L, 0); }
static int l_select(lua_State *L) { return scan(L, 1); }

/* Accumulator of one aggregate in one group. */
typedef struct {
  long long count, isum;
  double sum;
  int nnum, sum_exact, has_best;
  qval best; /* MIN/MAX so far; its string is anchored by the docs table */
} acc;

static acc *grow_accs(lua_State *L, int slot, acc *old, size_t oldn, size_t newn) {
  acc *a = (acc *)lua_newuserdatauv(L, newn * sizeof(acc), 0);
  if (oldn) memcpy(a, old, oldn * sizeof(acc));
  lua_replace(L, slot);
  return a;
}

/* Pushes the group key of the document: each GROUP BY value, type-tagged, concatenated. */
static void push_group_key(const ectx *c) {
  lua_State *L = c->L;
  const query *q = c->q;
  int k;
  lua_pushliteral(L, "");
  for (k = 0; k < q->ngroups; k++) {
    qval v;
    eval(c, q->groups[k], &v);
    switch (v.t) {
      case QV_NULL: lua_pushliteral(L, "z|"); break;
      case QV_BOOL: lua_pushstring(L, v.b ? "t|" : "f|"); break;
      case QV_NUM: { /* 1 and 1.0 are one group; integers beyond 2^53 keep their exact digits */
        char num[40];
        if (v.isint && (v.i > 9007199254740992LL || v.i < -9007199254740992LL))
          snprintf(num, sizeof num, "i%lld|", v.i);
        else
          snprintf(num, sizeof num, "n%.17g|", v.n);
        lua_pushstring(L, num);
        break;
      }
      case QV_STR:
        lua_pushfstring(L, "s%d:", (int)v.len);
        lua_pushlstring(L, v.s, v.len);
        lua_concat(L, 2);
        break;
      default: lua_pushliteral(L, "u|"); /* undefined, objects and arrays form one group */
    }
    lua_concat(L, 2);
  }
}

static void accumulate(const ectx *c, const qitem *it, acc *a) {
  qval v;
  a->count++;
  if (it->func == F_COUNT) return;
  eval(c, it->path, &v);
  if (it->func == F_SUM || it->func == F_AVG) {
    if (v.t != QV_NUM) return;
    a->nnum++;
    a->sum += v.n;
    if (a->sum_exact && (!v.isint || __builtin_add_overflow(a->isum, v.i, &a->isum))) a->sum_exact = 0;
    return;
  }
  if (!is_primitive(&v)) return;
  if (!a->has_best || (it->func == F_MIN ? compare_order(&v, &a->best) < 0 : compare_order(&v, &a->best) > 0)) {
    a->best = v;
    a->has_best = 1;
  }
}

static void push_result(lua_State *L, const qitem *it, const acc *a) {
  switch (it->func) {
    case F_COUNT: lua_pushinteger(L, (lua_Integer)a->count); return;
    case F_SUM:
      if (a->sum_exact) lua_pushinteger(L, (lua_Integer)a->isum);
      else lua_pushnumber(L, (lua_Number)a->sum);
      return;
    case F_AVG:
      if (a->nnum == 0) lua_pushnil(L);
      else lua_pushnumber(L, (lua_Number)(a->sum / a->nnum));
      return;
    default:
      if (a->has_best) push_qval(L, &a->best);
      else lua_pushnil(L);
  }
}

static int l_aggregate(lua_State *L) {
  query *q = check_query(L);
  lua_Integer i, n, ngroups = 0, cap = 0;
  int k, nagg = 0, rows, index, slot, aggpos[AGG_MAX];
  acc *accs = NULL;
  ectx c;
  luaL_checktype(L, 2, LUA_TTABLE);
  if (!q->aggregate) return luaL_error(L, "aggregate: this query has no aggregate or GROUP BY; use q:select(docs)");
  for (k = 0; k < q->nitems; k++)
    if (q->items[k].func != F_NONE) aggpos[nagg++] = k; /* at most AGG_MAX: checked when compiled */
  luaL_checkstack(L, 24, "aggregate");
  lua_settop(L, 2);
  n = (lua_Integer)lua_rawlen(L, 2);
  begin(L, &c, q, 8);              /* 3: names */
  push_array(L, 0);                /* 4: rows */
  rows = 4;
  lua_newtable(L);                 /* 5: group key -> row number */
  index = 5;
  lua_pushnil(L);                  /* 6: accumulators (userdata) */
  slot = 6;
  lua_pushnil(L);                  /* 7: spare */
  for (i = 0; i <= n; i++) {
    lua_Integer g;
    if (i == 0) {
      if (q->ngroups > 0) continue;
      lua_pushnil(L);              /* 8: no document: the one group of a query without GROUP BY */
      lua_pushliteral(L, "");
    } else {
      lua_rawgeti(L, 2, i);        /* 8 */
      if (lua_isnil(L, 8) || !matches(&c)) { lua_pop(L, 1); continue; }
      push_group_key(&c);
    }
    lua_pushvalue(L, -1);
    lua_rawget(L, index);
    g = lua_isnil(L, -1) ? 0 : (lua_Integer)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (g == 0) {
      int tbl;
      g = ++ngroups;
      lua_pushinteger(L, g);
      lua_rawset(L, index);        /* pops the key */
      if (g > cap) {
        lua_Integer nc = cap ? cap * 2 : 8;
        accs = grow_accs(L, slot, accs, (size_t)(cap * nagg), (size_t)(nc * (nagg ? nagg : 1)));
        cap = nc;
      }
      for (k = 0; k < nagg; k++) {
        acc *a = &accs[(g - 1) * nagg + k];
        memset(a, 0, sizeof *a);
        a->sum_exact = 1;
      }
      lua_createtable(L, 0, q->nitems);
      tbl = lua_gettop(L);
      if (i > 0)
        for (k = 0; k < q->nitems; k++)
          if (q->items[k].func == F_NONE) set_path_item(&c, &q->items[k], tbl);
      lua_rawseti(L, rows, g);
    } else {
      lua_pop(L, 1);               /* the key */
    }
    if (i > 0)
      for (k = 0; k < nagg; k++) accumulate(&c, &q->items[aggpos[k]], &accs[(g - 1) * nagg + k]);
    lua_pop(L, 1);                 /* the document */
  }
  for (i = 1; i <= ngroups; i++) {
    lua_rawgeti(L, rows, i);
    for (k = 0; k < nagg; k++) {
      const qitem *it = &q->items[aggpos[k]];
      lua_pushlstring(L, q->pool + it->name_off, it->name_len);
      push_result(L, it, &accs[(i - 1) * nagg + k]);
      lua_rawset(L, -3);
    }
    lua_pop(L, 1);
  }
  if (q->top >= 0)
    for (i = ngroups; i > q->top; i--) {
      lua_pushnil(L);
      lua_rawseti(L, rows, i);
    }
  lua_pushvalue(L, rows);
  return 1;
}

/* A buffer, not one stack slot per segment: a path's length comes from the query text. */
static void push_path_text(lua_State *L, const query *q, int node) {
  const qnode *nd = &q->nodes[node];
  luaL_Buffer b;
  int k;
  luaL_buffinit(L, &b);
  for (k = 0; k < nd->b; k++) {
    const qseg *s = &q->segs[nd->a + k];
    if (k) luaL_addchar(&b, '.');
    luaL_addlstring(&b, q->pool + s->off, s->len);
  }
  luaL_pushresult(&b);
}

/* For a conjunct "path = constant" of the condition, sets equals[lower-case dotted path] =
 * constant in the table on top: a document can only match when that holds, so a caller
 * may narrow the documents it passes (e.g. devices.jobs.jobId = 'x' to that job's rows). */
static void push_equality(lua_State *L, const query *q, int node) {
  const qnode *nd = &q->nodes[node], *path, *val;
  luaL_Buffer b;
  int k;
  if (nd->kind != N_CMP || nd->op != T_EQ) return;
  path = &q->nodes[nd->a];
  val = &q->nodes[nd->b];
  if (path->kind != N_PATH) { const qnode *t = path; path = val; val = t; }
  if (path->kind != N_PATH || val->kind != N_CONST || !is_primitive(&q->consts[val->a])) return;
  luaL_buffinit(L, &b);
  for (k = 0; k < path->b; k++) {
    const qseg *s = &q->segs[path->a + k];
    size_t j;
    if (k) luaL_addchar(&b, '.');
    for (j = 0; j < s->len; j++) {
      char ch = q->pool[s->off + j];
      luaL_addchar(&b, (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch);
    }
  }
  luaL_pushresult(&b);
  lua_pushvalue(L, -1);
  lua_rawget(L, -3);
  if (!lua_isnil(L, -1)) { lua_pop(L, 2); return; } /* the first one is as good as any */
  lua_pop(L, 1);
  push_qval(L, &q->consts[val->a]);
  lua_rawset(L, -3);
}

static int l_info(lua_State *L) {
  query *q = check_query(L);
  int k;
  lua_createtable(L, 0, 8);
  lua_pushstring(L, COLLECTIONS[q->collection]);
  lua_setfield(L, -2, "collection");
  if (q->top >= 0) {
    lua_pushinteger(L, (lua_Integer)q->top);
    lua_setfield(L, -2, "top");
  }
  lua_pushboolean(L, q->star || q->condition);
  lua_setfield(L, -2, "star");
  lua_pushboolean(L, q->aggregate);
  lua_setfield(L, -2, "aggregate");
  lua_pushboolean(L, q->all || (q->condition && q->where < 0));
  lua_setfield(L, -2, "all");
  push_array(L, q->ngroups);
  for (k = 0; k < q->ngroups; k++) {
    push_path_text(L, q, q->groups[k]);
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "groupBy");
  push_array(L, q->nitems);
  for (k = 0; k < q->nitems; k++) {
    const char *s;
    size_t len;
    item_name(q, &q->items[k], &s, &len);
    lua_pushlstring(L, s, len);
    lua_rawseti(L, -2, k + 1);
  }
  lua_setfield(L, -2, "columns");
  lua_newtable(L);
  if (q->where >= 0) {
    const qnode *root = &q->nodes[q->where];
    if (root->kind == N_AND)
      for (k = 0; k < root->b; k++) push_equality(L, q, q->kids[root->a + k]);
    else
      push_equality(L, q, q->where);
  }
  lua_setfield(L, -2, "equals");
  return 1;
}

static int l_gc(lua_State *L) {
  query_free((query *)luaL_checkudata(L, 1, QUERY_MT));
  return 0;
}

static int l_tostring(lua_State *L) {
  query *q = check_query(L);
  lua_pushfstring(L, "iothub.query (%s%s)", COLLECTIONS[q->collection], q->condition ? " condition" : "");
  return 1;
}

static int compile(lua_State *L, int condition) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char msg[MSG_MAX];
  query *q;
  int k;
  lua_settop(L, 1);
  /* The userdata exists before any malloc, so its __gc frees whatever a later error leaves. */
  q = (query *)lua_newuserdatauv(L, sizeof *q, 1);
  memset(q, 0, sizeof *q);
  q->where = -1;
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_setmetatable(L, -2);
  if (compile_source(q, s, n, condition, msg, sizeof msg) != QUERY_OK) return iothub_fail(L, CODE, "%s", msg);
  lua_createtable(L, 2 * q->nsegs, 0);
  for (k = 0; k < q->nsegs; k++) {
    lua_pushlstring(L, q->pool + q->segs[k].off, q->segs[k].len);
    lua_rawseti(L, -2, k + 1);
  }
  for (k = 0; k < q->nsegs; k++) { /* sized now, so remembering a spelling never allocates */
    lua_pushboolean(L, 0);
    lua_rawseti(L, -2, q->nsegs + k + 1);
  }
  set_uservalue(L, 2);
  return 1;
}

static int l_query_compile(lua_State *L) { return compile(L, 0); }
static int l_query_condition(lua_State *L) { return compile(L, 1); }

int query_open(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"match", l_match},
    {"project", l_project},
    {"filter", l_filter},
    {"select", l_select},
    {"aggregate", l_aggregate},
    {"info", l_info},
    {NULL, NULL}
  };
  static const luaL_Reg funcs[] = {
    {"query_compile", l_query_compile},
    {"query_condition", l_query_condition},
    {NULL, NULL}
  };
  lua_getfield(L, -1, "json_array_mt"); /* json_open ran first */
  luaL_newmetatable(L, QUERY_MT);
  lua_createtable(L, 0, 6);
  lua_pushvalue(L, -3);
  luaL_setfuncs(L, methods, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "iothub.query");
  lua_setfield(L, -2, "__name");
  /* stack: module, array mt, query mt */
  luaL_setfuncs(L, funcs, 2); /* pops both upvalues */
  lua_pushinteger(L, QUERY_MAX_LENGTH);
  lua_setfield(L, -2, "query_max_length");
  return 0;
}
