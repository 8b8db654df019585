/* validate.c: client-side checks that turn the service's terse 400s into actionable messages.
 * Each check returns true, or nil, message, "InvalidArgument". */
#include <stdio.h>
#include <string.h>
#include "common.h"
#include "query.h"
#include "validate.h"

#define CODE "InvalidArgument"
#define JOB_ID_MAX 64
#define NAME_MAX_BYTES 1024
#define DEPTH_MAX 10
#define ECHO_MAX 64
#define HINT_MAX 200

#define FORBIDDEN_SET "$ ( ) < > @ , ; : \\ \" / [ ] ? = { }"
#define NAME_RULE \
  "job property names may only contain printable US-ASCII characters other than " FORBIDDEN_SET \
  " . space and tab"
#define VALUE_RULE \
  "with value checking on, string values may only contain printable US-ASCII characters other than " \
  FORBIDDEN_SET " space and tab"

/* Copies at most max bytes for a message, showing non-printable bytes as '?'. */
static void echo_copy(char *out, size_t outsz, const char *s, size_t n, size_t max) {
  size_t i, o = 0, lim = n > max ? max : n;
  for (i = 0; i < lim && o + 4 < outsz; i++) {
    unsigned char c = (unsigned char)s[i];
    out[o++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
  }
  if (lim < n && o + 4 < outsz) { memcpy(out + o, "...", 3); o += 3; }
  out[o] = '\0';
}

/* Human description of one byte, e.g. "' '", "a tab", "byte 0x0A". */
static void describe_byte(char *out, size_t outsz, unsigned char c) {
  if (c == '\t') snprintf(out, outsz, "a tab");
  else if (c >= 0x20 && c < 0x7f) snprintf(out, outsz, "'%c'", c);
  else if (c >= 0x80) snprintf(out, outsz, "non-ASCII byte 0x%02X", c);
  else snprintf(out, outsz, "control byte 0x%02X", c);
}

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

static int is_alnum(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static int ieq_prefix(const char *s, size_t n, const char *word) {
  size_t i, wl = strlen(word);
  if (n < wl) return 0;
  for (i = 0; i < wl; i++) {
    char c = s[i];
    if (c >= 'a' && c <= 'z') c = (char)(c - 'a' + 'A');
    if (c != word[i]) return 0;
  }
  return 1;
}

/* ---- jobId ---- */

/* 0 when s is a valid job id, else 1 with the message pushed. */
int validate_job_id(lua_State *L, const char *s, size_t n) {
  size_t i;
  if (n == 0) {
    lua_pushliteral(L, "jobId is empty; use 1 to 64 characters: letters, digits and '-'");
    return 1;
  }
  if (n > JOB_ID_MAX) {
    lua_pushfstring(L, "jobId is %d characters long; IoT Hub allows at most 64; use a shorter id "
                       "(letters, digits and '-')", (int)n);
    return 1;
  }
  for (i = 0; i < n; i++) {
    if (!is_alnum(s[i]) && s[i] != '-') {
      char shown[ECHO_MAX + 8], what[40];
      echo_copy(shown, sizeof shown, s, n, ECHO_MAX);
      describe_byte(what, sizeof what, (unsigned char)s[i]);
      lua_pushfstring(L, "jobId '%s' is invalid: character %d (%s) is not allowed; use only "
                         "letters, digits and '-'", shown, (int)(i + 1), what);
      return 1;
    }
  }
  return 0;
}

/* Turns a helper's 0 / 1-with-message into the Lua convention: true | nil, message, code. */
static int result(lua_State *L, int failed) {
  if (!failed) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  lua_insert(L, -2);
  lua_pushliteral(L, CODE);
  return 3;
}

static int l_check_job_id(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return result(L, validate_job_id(L, s, n));
}

/* ---- deviceId ---- */

#define DEVICE_ID_MAX 128
#define DEVICE_ID_PUNCT "-:.+%_#*?!(),=@;$'"

/* IoT Hub's device-id rule (the client, the CLI, definitions files and the emulator all ask
 * this one): 1 to 128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ' */
static int l_check_device_id(lua_State *L) {
  size_t n, i;
  const char *s;
  if (lua_type(L, 1) != LUA_TSTRING)
    return iothub_fail(L, CODE, "deviceId must be a string, got %s", luaL_typename(L, 1));
  s = lua_tolstring(L, 1, &n);
  if (n == 0) return iothub_fail(L, CODE, "deviceId must not be empty");
  if (n > DEVICE_ID_MAX)
    return iothub_fail(L, CODE, "deviceId is %d characters long; IoT Hub allows at most %d", (int)n, DEVICE_ID_MAX);
  for (i = 0; i < n; i++) {
    if (!is_alnum(s[i]) && (s[i] == '\0' || !strchr(DEVICE_ID_PUNCT, s[i]))) {
      char shown[ECHO_MAX + 8], what[40];
      echo_copy(shown, sizeof shown, s, n, ECHO_MAX);
      describe_byte(what, sizeof what, (unsigned char)s[i]);
      return iothub_fail(L, CODE, "deviceId '%s' has a character IoT Hub does not allow at position %d (%s); "
                                  "use letters, digits and - : . + %% _ # * ? ! ( ) , = @ ; $ '",
                         shown, (int)(i + 1), what);
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- queryCondition ---- */

/* The text of s after offset from, trimmed and echoed for a hint; 0 when there is none. */
static int hint_after(char *hint, size_t hintsz, const char *s, size_t n, size_t from) {
  const char *h = s + from;
  size_t hn = n - from;
  if (from == 0) return 0;
  while (hn > 0 && is_space(*h)) { h++; hn--; }
  while (hn > 0 && is_space(h[hn - 1])) hn--;
  if (hn == 0) return 0;
  echo_copy(hint, hintsz, h, hn, HINT_MAX);
  return 1;
}

/* Compiles the condition with the query language itself (query.c); the mistakes people make
 * most (an empty condition, a long device list, a whole SELECT, a leading WHERE) get hints. */
/* Pushes the formatted message and returns 1 (a failed check). */
static int fail_msg(lua_State *L, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  return 1;
}

int validate_condition(lua_State *L, const char *s, size_t n) {
  char msg[512], hint[HINT_MAX + 8];
  switch (query_check_condition(s, n, msg, sizeof msg)) {
    case QUERY_OK:
      return 0;
    case QUERY_EMPTY:
      return fail_msg(L, "queryCondition is empty; use \"*\" to target all devices, or a condition "
                                  "such as deviceId = 'myDevice' or tags.building = '43'");
    case QUERY_TOO_LONG:
      return fail_msg(L, "queryCondition is %d characters long; the service rejects conditions longer "
                                  "than %d characters; target the devices by a tag (e.g. tags.rollout = "
                                  "'wave1') or split the device list across several jobs",
                         (int)query_char_count(s, n), QUERY_MAX_LENGTH);
    case QUERY_FULL_SELECT:
      if (hint_after(hint, sizeof hint, s, n, query_where_end(s, n)))
        return fail_msg(L, "queryCondition must be only the condition of a WHERE clause, not a full "
                                    "SELECT query; pass \"%s\" instead",
                           hint);
      return fail_msg(L, "queryCondition must be only the condition of a WHERE clause, not a full "
                                  "SELECT query; pass just the condition after WHERE, or \"*\" for all devices");
    case QUERY_LEADING_WHERE:
      if (hint_after(hint, sizeof hint, s, n, query_where_end(s, n)))
        return fail_msg(L, "queryCondition starts with WHERE; drop the leading WHERE and pass only the "
                                    "condition, e.g. \"%s\"",
                           hint);
      return fail_msg(L, "queryCondition starts with WHERE; drop the leading WHERE and pass only the "
                                  "condition");
    default:
      return fail_msg(L, "queryCondition: %s", msg);
  }
}

static int l_check_query_condition(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  return result(L, validate_condition(L, s, n));
}

/* ---- properties ---- */

static int is_forbidden(unsigned char c) {
  return c != 0 && strchr("$()<>@,;:\\\"/[]?={}", c) != NULL;
}

static int is_ident(const char *s, size_t n) {
  size_t i;
  if (n == 0 || (s[0] >= '0' && s[0] <= '9')) return 0;
  for (i = 0; i < n; i++)
    if (!is_alnum(s[i]) && s[i] != '_') return 0;
  return 1;
}

/* Pushes parent.key, or parent['key'] when key is not a plain identifier. */
static void push_child_path(lua_State *L, int pathidx, const char *key, size_t klen) {
  const char *parent = lua_tostring(L, pathidx);
  if (is_ident(key, klen) && klen <= ECHO_MAX) {
    lua_pushfstring(L, "%s.%s", parent, key);
  } else {
    char shown[ECHO_MAX + 8];
    echo_copy(shown, sizeof shown, key, klen, ECHO_MAX);
    lua_pushfstring(L, "%s['%s']", parent, shown);
  }
}

static void push_index_path(lua_State *L, int pathidx, int i) {
  lua_pushfstring(L, "%s[%d]", lua_tostring(L, pathidx), i);
}

static void fmt_number(char *out, size_t outsz, double v) {
  if (v != v) snprintf(out, outsz, "NaN");
  else if (v > 1e308 || v < -1e308) snprintf(out, outsz, v > 0 ? "inf" : "-inf");
  else if (v < 1e15 && v > -1e15 && v == (double)(long long)v) snprintf(out, outsz, "%.0f", v);
  else snprintf(out, outsz, "%.14g", v);
}

static int walk(lua_State *L, int t, int pathidx, int toppathidx, int depth, int check_values);

/* Checks the value at the top of the stack, whose path is at childidx. Returns 0, or 1
 * with a message pushed. */
static int check_value(lua_State *L, int childidx, int toppathidx, int depth, int check_values) {
  int v = lua_gettop(L);
  switch (lua_type(L, v)) {
    case LUA_TSTRING:
      if (check_values) {
        size_t n, i;
        const char *s = lua_tolstring(L, v, &n);
        for (i = 0; i < n; i++) {
          unsigned char c = (unsigned char)s[i];
          if (c < 0x21 || c > 0x7e || is_forbidden(c)) {
            char what[40];
            if (c == ' ') snprintf(what, sizeof what, "a space");
            else describe_byte(what, sizeof what, c);
            lua_pushfstring(L, "%s has %s at position %d of its value; " VALUE_RULE
                               "; replace that character or encode the value",
                            lua_tostring(L, childidx), what, (int)(i + 1));
            return 1;
          }
        }
      }
      return 0;
    case LUA_TNUMBER: {
      lua_Number x = lua_tonumber(L, v);
      if (x != x || x > 1.7976931348623157e308 || x < -1.7976931348623157e308) {
        lua_pushfstring(L, "%s is NaN or infinite, which JSON cannot represent; use a finite number",
                        lua_tostring(L, childidx));
        return 1;
      }
      return 0;
    }
    case LUA_TBOOLEAN:
    case LUA_TLIGHTUSERDATA: /* json null */
      return 0;
    case LUA_TTABLE:
      return walk(L, v, childidx, toppathidx, depth + 1, check_values);
    default:
      lua_pushfstring(L, "%s is a %s; job properties may only hold strings, numbers, booleans, tables and "
                         "json null",
                      lua_tostring(L, childidx), luaL_typename(L, v));
      return 1;
  }
}

static int check_name(lua_State *L, int childidx, const char *k, size_t kn) {
  size_t i;
  if (kn == 0) {
    lua_pushfstring(L, "%s has an empty name; give the property a name of 1 to 1024 characters",
                    lua_tostring(L, childidx));
    return 1;
  }
  if (kn > NAME_MAX_BYTES) {
    lua_pushfstring(L, "%s has a name of %d bytes; job property names may be at most 1024 bytes; "
                       "use a shorter name", lua_tostring(L, childidx), (int)kn);
    return 1;
  }
  for (i = 0; i < kn; i++) {
    unsigned char c = (unsigned char)k[i];
    if (c < 0x21 || c > 0x7e || c == '.' || is_forbidden(c)) {
      char what[64];
      if (c == ' ') snprintf(what, sizeof what, "a space");
      else if (c == '.') snprintf(what, sizeof what, "a '.' (twins do not allow dots; nest an object instead)");
      else describe_byte(what, sizeof what, c);
      lua_pushfstring(L, "%s has %s in its name; " NAME_RULE "; rename the property",
                      lua_tostring(L, childidx), what);
      return 1;
    }
  }
  return 0;
}

/* Walks the table at index t, whose entries sit depth levels below the top path. */
static int walk(lua_State *L, int t, int pathidx, int toppathidx, int depth, int check_values) {
  int nstr = 0, nother = 0, count = 0, seq = 1;
  luaL_checkstack(L, 8, "check_properties: nesting too deep");
  t = lua_absindex(L, t);

  /* First pass: classify keys, to tell an object from an array-like sequence. */
  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    count++;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING) {
      nstr++;
    } else {
      nother++;
      if (lua_type(L, -1) != LUA_TNUMBER) seq = 0;
    }
  }
  if (count == 0) return 0;
  if (depth > DEPTH_MAX) {
    lua_pushfstring(L, "%s nests deeper than %d levels below %s; twins allow at most 10 levels; flatten "
                       "the object",
                    lua_tostring(L, pathidx), DEPTH_MAX, lua_tostring(L, toppathidx));
    return 1;
  }

  if (nother > 0) {
    int i;
    if (nstr == 0 && seq) {
      for (i = 1; i <= count; i++) {
        lua_rawgeti(L, t, i);
        if (lua_isnil(L, -1)) { seq = 0; lua_pop(L, 1); break; }
        lua_pop(L, 1);
      }
    } else {
      seq = 0;
    }
    if (!seq) {
      /* Name a key that breaks the sequence: any non-string key in a mixed table, else one
       * outside 1..count (one must exist when the sequence has a hole). */
      char what[64];
      lua_pushnil(L);
      while (lua_next(L, t) != 0) {
        lua_pop(L, 1);
        if (lua_type(L, -1) == LUA_TSTRING) continue;
        if (nstr > 0 || lua_type(L, -1) != LUA_TNUMBER) break;
        {
          lua_Number x = lua_tonumber(L, -1);
          if (!(x >= 1 && x <= count && x == (lua_Number)(int)x)) break;
        }
      }
      if (lua_type(L, -1) == LUA_TNUMBER) {
        char num[40];
        fmt_number(num, sizeof num, lua_tonumber(L, -1));
        snprintf(what, sizeof what, "number key %s", num);
      } else {
        snprintf(what, sizeof what, "%s key", luaL_typename(L, -1));
      }
      lua_pushfstring(L, "%s has a %s, but job properties are objects with string keys or arrays "
                         "(sequences 1..n); use string property names, or a proper sequence",
                      lua_tostring(L, pathidx), what);
      return 1;
    }
    for (i = 1; i <= count; i++) {
      push_index_path(L, pathidx, i);
      lua_rawgeti(L, t, i);
      if (check_value(L, lua_gettop(L) - 1, toppathidx, depth, check_values)) return 1;
      lua_pop(L, 2);
    }
    return 0;
  }

  lua_pushnil(L);
  while (lua_next(L, t) != 0) {
    size_t kn;
    const char *k = lua_tolstring(L, -2, &kn); /* keys are strings here: no in-place conversion */
    int child;
    push_child_path(L, pathidx, k, kn);
    child = lua_gettop(L);
    if (check_name(L, child, k, kn)) return 1;
    lua_pushvalue(L, -2); /* value on top for check_value */
    if (check_value(L, child, toppathidx, depth, check_values)) return 1;
    lua_pop(L, 3); /* value copy, path, value; key stays for lua_next */
  }
  return 0;
}

/* 0 when the table at idx is valid job properties under path (e.g. "patch.tags"), else 1
 * with the message pushed; the stack is otherwise as it was. */
int validate_properties(lua_State *L, int idx, const char *path, int check_values) {
  int top = lua_gettop(L), failed;
  idx = lua_absindex(L, idx);
  lua_pushstring(L, path);
  /* The section itself is depth 0: the devguide's valid example nests ten objects below it. */
  failed = walk(L, idx, top + 1, top + 1, 0, check_values);
  if (failed) lua_replace(L, top + 1);
  lua_settop(L, top + failed);
  return failed;
}

static int l_check_properties(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  return result(L, validate_properties(L, 1, luaL_optstring(L, 2, "properties"), lua_toboolean(L, 3)));
}

/* ---- integer ranges ---- */

static int contains_ci(const char *s, const char *word) {
  size_t n = strlen(s), wl = strlen(word), i;
  for (i = 0; i + wl <= n; i++)
    if (ieq_prefix(s + i, n - i, word)) return 1;
  return 0;
}

/* 0 when the value at idx is a whole number in [min, max], else 1 with "<name> must be a whole
 * number[ of seconds] between min and max (got x)" pushed. */
int validate_integer_range(lua_State *L, const char *name, int idx, double min, double max) {
  const char *unit = contains_ci(name, "SECONDS") ? " of seconds" : "";
  char smin[40], smax[40], got[64];
  if (lua_type(L, idx) == LUA_TNUMBER) {
    lua_Number v = lua_tonumber(L, idx);
    long long whole;
    if (iothub_whole_int64(v, &whole) && v >= min && v <= max) return 0;
    fmt_number(got, sizeof got, v);
  } else if (lua_isnoneornil(L, idx)) {
    snprintf(got, sizeof got, "nil");
  } else {
    snprintf(got, sizeof got, "a %s", luaL_typename(L, idx));
  }
  fmt_number(smin, sizeof smin, min);
  fmt_number(smax, sizeof smax, max);
  lua_pushfstring(L, "%s must be a whole number%s between %s and %s (got %s)", name, unit, smin, smax, got);
  return 1;
}

static int l_check_integer_range(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  lua_Number min = luaL_checknumber(L, 3), max = luaL_checknumber(L, 4);
  if (!(min <= max)) return luaL_argerror(L, 3, "min must not be greater than max");
  return result(L, validate_integer_range(L, name, 2, min, max));
}

int validate_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"check_job_id", l_check_job_id},
    {"check_device_id", l_check_device_id},
    {"check_query_condition", l_check_query_condition},
    {"check_properties", l_check_properties},
    {"check_integer_range", l_check_integer_range},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
