/* sandbox.c: runs untrusted Lua (definitions files, devices files and their handlers) under
 * three limits that each fire:
 *   memory        net bytes allocated while the sandbox is active, enforced by wrapping the
 *                 state's allocator (allocations past the cap are refused); a run starts
 *                 with a full collection, so freeing older garbage does not count for it;
 *   instructions  VM instructions executed, counted by a count hook;
 *   seconds       wall-clock time, checked against a monotonic clock from the hook and from
 *                 the allocator (so it also fires when each instruction does a lot of work).
 * One place for the limits' defaults, their knobs (--sandbox-* and IOTHUB_SANDBOX_*), their
 * parsing and the messages that say which limit fired and how to raise it.
 *
 *   core.sandbox_limits([values[, getenv]]) -> limits | nil, message, code
 *   core.sandbox_load(source, chunkname, env) -> fn | nil, message
 *   core.sandbox_run(fn, limits, ...)         -> true, results... | nil, message, code
 *   core.sandbox_session(limits)              -> session (session:enter/pause/leave/restart)
 *
 * LuaJIT runs no hooks inside compiled traces and its hooks are global: sandbox_load turns the
 * JIT off for the chunk and every function in it, and the hook is saved and restored around
 * each use. Only one thread runs while a sandbox is active (nothing in it can yield), so a
 * global hook and allocator only ever see the sandboxed code and what it calls. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "clock.h"

#define MIB (1024.0 * 1024.0)
#define DEFAULT_MEMORY (256.0 * MIB)
#define DEFAULT_INSTRUCTIONS 5e8 /* ~1 s of interpreted LuaJIT, ~2.5 s of Lua 5.4 */
#define DEFAULT_SECONDS 10.0
#define MIN_MEMORY (1.0 * MIB)
#define MAX_MEMORY (1024.0 * 1024.0 * MIB) /* 1 TB */
#define MIN_INSTRUCTIONS 1e5
#define MAX_INSTRUCTIONS 1e15
#define MIN_SECONDS 0.01
#define MAX_SECONDS 86400.0

#define HOOK_EVERY 1000           /* instructions between two hook calls ... */
#define HOOK_FIRST 100            /* ... but the first comes sooner, to see the file's line */
#define ALLOC_CLOCK_EVERY 64      /* growing allocations between two clock reads ... */
#define ALLOC_CLOCK_BYTES 65536   /* ... unless one is at least this large */
#define RESERVE (1024 * 1024)     /* allowed past the cap once a limit fired: error messages */
#define MAX_FRAMES 256            /* frames searched for the file's line */

#if defined(LUAJIT_VERSION)
#define IS_LUAJIT 1
#else
#define IS_LUAJIT 0
#endif
/* Lua 5.4 collects garbage and retries before an allocation fails; LuaJIT does not, and its
 * incremental collector falls behind a file that makes megabytes of garbage per instruction.
 * Past half the cap it collects eagerly, so the cap counts what the file keeps. */
#define EAGER_PAUSE 100
#define EAGER_STEPMUL 1000

enum { LIMIT_NONE, LIMIT_MEMORY, LIMIT_INSTRUCTIONS, LIMIT_SECONDS };
enum { OFF, ARMED, PAUSED };

static const struct knob {
  const char *kind, *flag, *env;
} KNOBS[] = {
    {"memory", "--sandbox-memory", "IOTHUB_SANDBOX_MEMORY"},
    {"instructions", "--sandbox-instructions", "IOTHUB_SANDBOX_INSTRUCTIONS"},
    {"seconds", "--sandbox-seconds", "IOTHUB_SANDBOX_SECONDS"},
};
#define KNOB_MEMORY (&KNOBS[0])
#define KNOB_INSTRUCTIONS (&KNOBS[1])
#define KNOB_SECONDS (&KNOBS[2])

typedef struct Sandbox {
  /* limits */
  long long memory_cap;
  double instruction_cap, seconds_cap;
  char name[40];    /* "definitions-file": says whose limit it is */
  char subject[24]; /* "file" or "handler": what ran too long */
  char source[256]; /* chunkname of the file's code ("@rollout.lua"); "" = none given */
  int restricted;   /* raise only while the file's own code runs (sessions) */
  /* state */
  int mode, tripped, sticky;
  int interval; /* the hook's count now */
  int refused; /* an allocation was refused; refused_* is the request */
  void *refused_ptr;
  size_t refused_osize, refused_nsize;
  int line;      /* the file's line the hook last saw */
  int trip_line; /* the file's line where the hook first raised */
  long long used; /* net bytes allocated since the stretch began */
  double instructions, started;
  unsigned alloc_ticks;
  /* what was there before */
  lua_Alloc inner;
  void *inner_ud;
  lua_State *hooked, *gc_L; /* gc_L: where the collector was made eager (LuaJIT) */
  int old_pause, old_stepmul;
  lua_Hook old_hook;
  int old_mask, old_count;
} Sandbox;

#define SESSION_MT "iothub.sandbox.session"

/* ------------------------------------------------------------------------------------------
 * Values: parsing what a user writes, formatting what a message shows */

/* "512M", "2G", "1.5g", "65536K", "268435456" (bytes), "512MB", "512MiB". */
static int parse_size(const char *s, double *out) {
  char *end;
  double v, unit = 1;
  errno = 0;
  v = strtod(s, &end);
  if (end == s || errno != 0 || !(v >= 0)) return 0;
  while (*end == ' ') end++;
  switch (*end) {
    case 'k': case 'K': unit = 1024.0; end++; break;
    case 'm': case 'M': unit = MIB; end++; break;
    case 'g': case 'G': unit = 1024.0 * MIB; end++; break;
    case 't': case 'T': unit = 1024.0 * 1024.0 * MIB; end++; break;
    default: break;
  }
  if (unit > 1 && *end == 'i') end++;
  if (*end == 'b' || *end == 'B') end++;
  while (*end == ' ') end++;
  if (*end != '\0') return 0;
  *out = floor(v * unit);
  return 1;
}

/* "1000000000", "1e9", "1_000_000_000", "1,000,000,000". */
static int parse_count(const char *s, double *out) {
  char buf[64], *end;
  size_t n = 0;
  double v;
  for (; *s && n < sizeof buf - 1; s++)
    if (*s != '_' && *s != ',') buf[n++] = *s;
  if (*s) return 0;
  buf[n] = '\0';
  errno = 0;
  v = strtod(buf, &end);
  while (*end == ' ') end++;
  if (end == buf || *end != '\0' || errno != 0 || !(v >= 0) || v != floor(v)) return 0;
  *out = v;
  return 1;
}

/* "10", "2.5", "10s". */
static int parse_seconds(const char *s, double *out) {
  char *end;
  double v;
  errno = 0;
  v = strtod(s, &end);
  while (*end == ' ') end++;
  if (*end == 's') end++;
  if (end == s || *end != '\0' || errno != 0 || !(v >= 0)) return 0;
  *out = v;
  return 1;
}

/* 268435456 -> "256 MB" (spaced, for messages) or "256M" (as a knob value). */
static void format_size(double bytes, int knob, char *out, size_t size) {
  static const char *const UNITS[][2] = {{" TB", "T"}, {" GB", "G"}, {" MB", "M"}, {" KB", "K"}};
  double scale = 1024.0 * 1024.0 * MIB;
  int i;
  for (i = 0; i < 4; i++, scale /= 1024.0) {
    if (bytes >= scale && fmod(bytes, scale) == 0) {
      snprintf(out, size, "%.0f%s", bytes / scale, UNITS[i][knob]);
      return;
    }
  }
  snprintf(out, size, knob ? "%.0f" : "%.0f bytes", bytes);
}

/* 1000000000 -> "1,000,000,000". */
static void format_count(double v, char *out, size_t size) {
  char digits[40];
  size_t n, i, o = 0;
  snprintf(digits, sizeof digits, "%.0f", v);
  n = strlen(digits);
  for (i = 0; i < n && o + 2 < size; i++) {
    if (i > 0 && (n - i) % 3 == 0) out[o++] = ',';
    out[o++] = digits[i];
  }
  out[o] = '\0';
}

static void format_seconds(double v, char *out, size_t size) {
  snprintf(out, size, "%g", v);
}

/* Checks one limit value; returns NULL or why it is not acceptable (a static string). */
static const char *check_limit(const struct knob *k, double v) {
  if (k == KNOB_MEMORY) {
    if (!(v >= MIN_MEMORY && v <= MAX_MEMORY)) return "must be from 1M to 1T, e.g. 512M or 2G";
  } else if (k == KNOB_INSTRUCTIONS) {
    if (!(v >= MIN_INSTRUCTIONS && v <= MAX_INSTRUCTIONS))
      return "must be a whole number from 100000 to 1e15, e.g. 2000000000 or 2e9";
  } else if (!(v >= MIN_SECONDS && v <= MAX_SECONDS)) {
    return "must be a number of seconds from 0.01 to 86400, e.g. 30";
  }
  return NULL;
}

static double default_of(const struct knob *k) {
  return k == KNOB_MEMORY ? DEFAULT_MEMORY : k == KNOB_INSTRUCTIONS ? DEFAULT_INSTRUCTIONS : DEFAULT_SECONDS;
}

/* Parses a value as written by a user (a string) or given by a program (a number). Returns 1
 * and sets *out, or 0 with why on the stack. */
static int parse_limit(lua_State *L, const struct knob *k, int idx, const char *from, double *out) {
  const char *why;
  double v;
  if (lua_type(L, idx) == LUA_TNUMBER) {
    v = lua_tonumber(L, idx);
  } else {
    const char *text = lua_tostring(L, idx);
    int ok = k == KNOB_MEMORY ? parse_size(text, &v) : k == KNOB_INSTRUCTIONS ? parse_count(text, &v)
                                                                             : parse_seconds(text, &v);
    if (!ok) {
      lua_pushfstring(L, "%s '%s' is not %s", from, text,
                      k == KNOB_MEMORY ? "a size; write e.g. 512M or 2G"
                      : k == KNOB_INSTRUCTIONS ? "a whole number; write e.g. 2000000000 or 2e9"
                                               : "a number of seconds; write e.g. 30");
      return 0;
    }
  }
  if ((why = check_limit(k, v)) != NULL) {
    lua_pushfstring(L, "%s %s", from, why);
    return 0;
  }
  *out = v;
  return 1;
}

/* core.sandbox_limits([values[, getenv]]): the limits to run a file with. Each of memory,
 * instructions and seconds comes from values (a --sandbox-* flag's text or a number; "" is
 * not given), else from the IOTHUB_SANDBOX_* variable (read through getenv, default getenv(3)),
 * else the default. Returns { memory = bytes, instructions = n, seconds = s } or nil, message, code. */
static int l_limits(lua_State *L) {
  size_t i;
  int has_values = !lua_isnoneornil(L, 1), has_getenv = !lua_isnoneornil(L, 2);
  if (has_values) luaL_checktype(L, 1, LUA_TTABLE);
  if (has_getenv) luaL_checktype(L, 2, LUA_TFUNCTION);
  lua_settop(L, 2);
  lua_newtable(L); /* 3: result */
  for (i = 0; i < sizeof KNOBS / sizeof KNOBS[0]; i++) {
    const struct knob *k = &KNOBS[i];
    const char *from = k->flag;
    double v = default_of(k);
    int found = 0;
    if (has_values) {
      lua_getfield(L, 1, k->kind);
      found = lua_type(L, -1) == LUA_TNUMBER ||
              (lua_type(L, -1) == LUA_TSTRING && lua_rawlen(L, -1) > 0);
      if (!found && !lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
        return luaL_error(L, "sandbox_limits: %s must be a string or a number", k->kind);
      if (!found) lua_pop(L, 1);
    }
    if (!found) {
      const char *text;
      if (has_getenv) {
        lua_pushvalue(L, 2);
        lua_pushstring(L, k->env);
        lua_call(L, 1, 1);
        text = lua_tostring(L, -1);
      } else {
        text = getenv(k->env);
        lua_pushstring(L, text);
      }
      found = text != NULL && text[0] != '\0';
      if (!found) lua_pop(L, 1);
      from = k->env;
    }
    if (found) {
      if (!parse_limit(L, k, -1, from, &v)) return iothub_fail(L, "InvalidSandboxLimit", "%s", lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    lua_pushnumber(L, v);
    lua_setfield(L, 3, k->kind);
  }
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * The allocator and the hook */

/* A refusal is final unless Lua 5.4 collects garbage and asks again for the same block (its
 * emergency collection); LuaJIT never asks again. So the memory limit has fired once another
 * request comes, or the hook or the run's end sees the refusal still pending. */
static void settle_refusal(Sandbox *sb) {
  if (sb->refused && !sb->tripped) sb->tripped = LIMIT_MEMORY;
  sb->refused = 0;
}

static void *sandbox_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  Sandbox *sb = (Sandbox *)ud;
  size_t old = ptr ? osize : 0; /* Lua 5.4 passes a type tag as osize for new blocks */
  void *p;
  if (nsize > old && sb->mode == ARMED) {
    size_t grow = nsize - old;
    long long room;
    if (sb->refused && !(ptr == sb->refused_ptr && osize == sb->refused_osize && nsize == sb->refused_nsize))
      settle_refusal(sb);
    room = sb->memory_cap - sb->used + (sb->tripped ? RESERVE : 0);
    if (room < 0 || grow > (size_t)room) {
      if (sb->refused || sb->tripped) {
        settle_refusal(sb);
      } else {
        sb->refused = 1;
        sb->refused_ptr = ptr;
        sb->refused_osize = osize;
        sb->refused_nsize = nsize;
      }
      return NULL;
    }
    sb->refused = 0; /* the collection made room */
    if (!sb->tripped && (++sb->alloc_ticks % ALLOC_CLOCK_EVERY == 0 || grow >= ALLOC_CLOCK_BYTES) &&
        clock_monotime() - sb->started > sb->seconds_cap) {
      sb->tripped = LIMIT_SECONDS;
      return NULL;
    }
  }
  p = sb->inner(sb->inner_ud, ptr, osize, nsize);
#if IS_LUAJIT
  /* Setting these two only stores numbers, which is safe from inside the allocator. */
  if (p != NULL && sb->gc_L == NULL && sb->mode == ARMED && sb->used > sb->memory_cap / 2) {
    sb->gc_L = sb->hooked;
    sb->old_pause = lua_gc(sb->gc_L, LUA_GCSETPAUSE, EAGER_PAUSE);
    sb->old_stepmul = lua_gc(sb->gc_L, LUA_GCSETSTEPMUL, EAGER_STEPMUL);
  }
#endif
  if (nsize == 0)
    sb->used -= (long long)old;
  else if (p != NULL)
    sb->used += (long long)nsize - (long long)old;
  return p;
}

/* Is the function ar describes part of the file? */
static int in_file(lua_State *L, Sandbox *sb, lua_Debug *ar) {
  if (!lua_getinfo(L, "Sl", ar)) return 0;
  return sb->source[0] != '\0' && ar->source != NULL && strcmp(ar->source, sb->source) == 0;
}

/* The line of the innermost frame of L that belongs to the file, or -1. */
static int file_line(lua_State *L, Sandbox *sb) {
  lua_Debug ar;
  int level;
  for (level = 0; level < MAX_FRAMES && lua_getstack(L, level, &ar); level++) {
    if (in_file(L, sb, &ar) && ar.currentline > 0) return ar.currentline;
  }
  return -1;
}

static const char *limit_code(int limit) {
  return limit == LIMIT_MEMORY ? "memory" : limit == LIMIT_INSTRUCTIONS ? "instructions" : "seconds";
}

/* Where a message starts: the file (its chunkname without '@'), with the line when known. */
static void push_where(lua_State *L, Sandbox *sb, int line) {
  const char *src = sb->source[0] == '@' || sb->source[0] == '=' ? sb->source + 1
                    : sb->source[0] ? sb->source
                                    : "sandbox";
  if (line > 0)
    lua_pushfstring(L, "%s:%d: ", src, line);
  else
    lua_pushfstring(L, "%s: ", src);
}

/* "rollout.lua:7: stopped after using 256 MB of memory (the definitions-file limit); raise it
 * with --sandbox-memory 512M or IOTHUB_SANDBOX_MEMORY=512M". */
static void push_limit_message(lua_State *L, Sandbox *sb, int line) {
  char shown[48], raised[48];
  const struct knob *k;
  push_where(L, sb, line);
  if (sb->tripped == LIMIT_MEMORY) {
    k = KNOB_MEMORY;
    format_size((double)sb->memory_cap, 0, shown, sizeof shown);
    format_size((double)sb->memory_cap * 2, 1, raised, sizeof raised);
    lua_pushfstring(L, "stopped after using %s of memory (the %s limit)", shown, sb->name);
  } else if (sb->tripped == LIMIT_INSTRUCTIONS) {
    k = KNOB_INSTRUCTIONS;
    format_count(sb->instruction_cap, shown, sizeof shown);
    snprintf(raised, sizeof raised, "%.0f", sb->instruction_cap * 2);
    lua_pushfstring(L, "the %s ran too long: stopped after %s instructions (the %s limit; an endless loop?)",
                    sb->subject, shown, sb->name);
  } else {
    k = KNOB_SECONDS;
    format_seconds(sb->seconds_cap, shown, sizeof shown);
    format_seconds(sb->seconds_cap * 2, raised, sizeof raised);
    lua_pushfstring(L, "the %s ran too long: stopped after %s s (the %s limit)", sb->subject, shown, sb->name);
  }
  lua_pushfstring(L, "; raise it with %s %s or %s=%s", k->flag, raised, k->env, raised);
  lua_concat(L, 3);
}

static Sandbox *active(lua_State *L) {
  void *ud;
  return lua_getallocf(L, &ud) == sandbox_alloc ? (Sandbox *)ud : NULL;
}

static void sandbox_hook(lua_State *L, lua_Debug *ar) {
  Sandbox *sb = active(L);
  int here;
  if (sb == NULL || sb->mode != ARMED) return;
  settle_refusal(sb);
  if (!sb->tripped && !sb->sticky) {
    sb->instructions += sb->interval;
    if (sb->interval != HOOK_EVERY) {
      sb->interval = HOOK_EVERY;
      lua_sethook(L, sandbox_hook, LUA_MASKCOUNT, HOOK_EVERY);
    }
    if (sb->instructions >= sb->instruction_cap)
      sb->tripped = LIMIT_INSTRUCTIONS;
    else if (clock_monotime() - sb->started > sb->seconds_cap)
      sb->tripped = LIMIT_SECONDS;
  }
  /* The line is kept for a memory limit, which fires in the allocator: a session's frames are
   * gone by the time it leaves, and LuaJIT loses a frame's line when it raises "not enough
   * memory" (Lua 5.4 keeps it: a run's end reads it from the thread and skips this). */
  if (!sb->tripped && !sb->restricted && !IS_LUAJIT) return;
  here = in_file(L, sb, ar);
  if (here && ar->currentline > 0) sb->line = ar->currentline;
  if (!sb->tripped) return;
  if (sb->restricted && !here) return; /* not in the caller's code: it must finish undisturbed */
  if (!here) {
    int line = file_line(L, sb);
    if (line > 0) sb->line = line;
  }
  if (!sb->sticky) {
    sb->trip_line = sb->line;
    /* From now on every instruction raises, so a pcall in the file cannot swallow it. */
    sb->sticky = 1;
    sb->interval = 1;
    lua_sethook(L, sandbox_hook, LUA_MASKCOUNT, 1);
  }
  push_limit_message(L, sb, sb->line);
  lua_error(L);
}

/* ------------------------------------------------------------------------------------------
 * Arming and disarming */

static void read_limits(lua_State *L, int idx, Sandbox *sb) {
  size_t i;
  const char *s;
  luaL_checktype(L, idx, LUA_TTABLE);
  for (i = 0; i < sizeof KNOBS / sizeof KNOBS[0]; i++) {
    const struct knob *k = &KNOBS[i];
    double v = default_of(k);
    lua_getfield(L, idx, k->kind);
    if (!lua_isnil(L, -1)) {
      const char *why;
      if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "sandbox: limits.%s must be a number", k->kind);
      v = lua_tonumber(L, -1);
      if ((why = check_limit(k, v)) != NULL) luaL_error(L, "sandbox: limits.%s %s", k->kind, why);
    }
    lua_pop(L, 1);
    if (k == KNOB_MEMORY)
      sb->memory_cap = (long long)iothub_clamp_int64(v, 0, (long long)MAX_MEMORY);
    else if (k == KNOB_INSTRUCTIONS)
      sb->instruction_cap = v;
    else
      sb->seconds_cap = v;
  }
  lua_getfield(L, idx, "name");
  s = luaL_optstring(L, -1, "sandbox");
  snprintf(sb->name, sizeof sb->name, "%s", s);
  lua_getfield(L, idx, "subject");
  s = luaL_optstring(L, -1, "file");
  snprintf(sb->subject, sizeof sb->subject, "%s", s);
  lua_getfield(L, idx, "source");
  s = luaL_optstring(L, -1, "");
  if (strlen(s) >= sizeof sb->source) luaL_error(L, "sandbox: limits.source is too long");
  snprintf(sb->source, sizeof sb->source, "%s", s);
  lua_pop(L, 3);
}

static void restart(Sandbox *sb) {
  sb->used = 0;
  sb->instructions = 0;
  sb->alloc_ticks = 0;
  sb->started = clock_monotime();
}

/* Installs the allocator (on the first enter) and the hook on thread T. */
static void enter(lua_State *L, lua_State *T, Sandbox *sb) {
  if (sb->mode == OFF) {
    sb->inner = lua_getallocf(L, &sb->inner_ud);
    lua_setallocf(L, sandbox_alloc, sb);
  } else if (sb->mode != PAUSED || active(L) != sb) {
    luaL_error(L, "sandbox: enter while it is active, or while another sandbox is");
  }
  sb->hooked = T;
  sb->old_hook = lua_gethook(T);
  sb->old_mask = lua_gethookmask(T);
  sb->old_count = lua_gethookcount(T);
  sb->interval = sb->sticky ? 1 : HOOK_FIRST;
  lua_sethook(T, sandbox_hook, LUA_MASKCOUNT, sb->interval);
  sb->mode = ARMED;
}

static void unhook(Sandbox *sb) {
  lua_sethook(sb->hooked, sb->old_hook, sb->old_mask, sb->old_count);
  sb->hooked = NULL;
}

/* Stops checking but keeps counting memory (the caller's own code runs on the file's behalf). */
static void pause_sandbox(lua_State *L, Sandbox *sb) {
  if (sb->mode != ARMED || active(L) != sb) luaL_error(L, "sandbox: pause while it is not the active one");
  unhook(sb);
  sb->mode = PAUSED;
}

/* Restores the allocator and the hook as they were. Never raises when sb is the active one. */
static void leave(lua_State *L, Sandbox *sb) {
  if (sb->mode == OFF) return;
  if (active(L) != sb) luaL_error(L, "sandbox: leave while another sandbox is active (leave the inner one first)");
  if (sb->mode == ARMED) unhook(sb);
  lua_setallocf(L, sb->inner, sb->inner_ud);
#if IS_LUAJIT
  if (sb->gc_L != NULL) {
    lua_gc(L, LUA_GCSETPAUSE, sb->old_pause);
    lua_gc(L, LUA_GCSETSTEPMUL, sb->old_stepmul);
    sb->gc_L = NULL;
  }
#endif
  sb->mode = OFF;
}

static void init_sandbox(lua_State *L, int idx, Sandbox *sb) {
  memset(sb, 0, sizeof *sb);
  read_limits(L, idx, sb);
  sb->mode = OFF;
  restart(sb);
}

/* ------------------------------------------------------------------------------------------
 * core.sandbox_load(source, chunkname, env): compiles text (never bytecode) with env as its
 * globals; under LuaJIT the chunk and every function in it stay interpreted so hooks fire. */
static int l_load(lua_State *L) {
  size_t len;
  const char *src = luaL_checklstring(L, 1, &len);
  const char *name = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (luaL_loadbufferx(L, src, len, name, "t") != 0) {
    lua_pushnil(L);
    lua_insert(L, -2);
    return 2;
  }
  lua_pushvalue(L, 3);
#if LUA_VERSION_NUM >= 502
  if (lua_setupvalue(L, -2, 1) == NULL) lua_pop(L, 1); /* the main chunk's first upvalue is _ENV */
#else
  lua_setfenv(L, -2);
#endif
#if defined(LUAJIT_VERSION)
  luaJIT_setmode(L, -1, LUAJIT_MODE_ALLFUNC | LUAJIT_MODE_OFF);
#endif
  return 1;
}

/* The error a failed run returns: nil, message, code. */
static int run_failure(lua_State *L, lua_State *co, Sandbox *sb, int status) {
  if (sb->tripped) {
    /* A refused allocation raised where it happened: co's stack is still there to say where. */
    int line = sb->tripped == LIMIT_MEMORY || sb->trip_line <= 0 ? file_line(co, sb) : sb->trip_line;
    lua_pushnil(L);
    push_limit_message(L, sb, line > 0 ? line : sb->line);
    lua_pushstring(L, limit_code(sb->tripped));
    return 3;
  }
  lua_pushnil(L);
  if (status == LUA_YIELD) {
    push_where(L, sb, file_line(co, sb));
    lua_pushfstring(L, "the %s must not yield (it runs to its end in one go)", sb->subject);
    lua_concat(L, 2);
    lua_pushliteral(L, "yield");
    return 3;
  }
  if (lua_type(co, -1) == LUA_TSTRING || lua_type(co, -1) == LUA_TNUMBER) {
    lua_pushstring(L, lua_tostring(co, -1));
  } else {
    push_where(L, sb, file_line(co, sb));
    lua_pushfstring(L, "error (a %s value)", luaL_typename(co, -1));
    lua_concat(L, 2);
  }
  lua_pushliteral(L, "error");
  return 3;
}

/* core.sandbox_run(fn, limits, ...): fn(...) in a fresh thread under the limits (memory,
 * instructions, seconds: numbers, defaults for the ones left out; name: whose limit it is,
 * e.g. "definitions-file"; source: the file's chunkname, to say file:line). Returns true and
 * fn's results, or nil, message, code with code "memory", "instructions", "seconds" (that
 * limit fired), "yield" (fn tried to yield) or "error" (it raised; message is the error). */
static int l_run(lua_State *L) {
  Sandbox sb;
  lua_State *co;
  int nargs, status, nres, i;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  init_sandbox(L, 2, &sb);
  nargs = lua_gettop(L) - 2;
  co = lua_newthread(L);
  if (!lua_checkstack(co, nargs + 1)) return luaL_error(L, "sandbox_run: too many arguments");
  lua_pushvalue(L, 1);
  for (i = 0; i < nargs; i++) lua_pushvalue(L, 3 + i);
  lua_xmove(L, co, nargs + 1);

  /* Garbage from before would be freed on the file's account and let it use more. */
  lua_gc(L, LUA_GCCOLLECT, 0);
  enter(L, co, &sb);
#if LUA_VERSION_NUM >= 504
  status = lua_resume(co, L, nargs, &nres);
#elif LUA_VERSION_NUM >= 502
  status = lua_resume(co, L, nargs);
  nres = lua_gettop(co);
#else
  status = lua_resume(co, nargs);
  nres = lua_gettop(co);
#endif
  leave(L, &sb);
  settle_refusal(&sb);

  /* A limit that fired fails the run even when the code caught the error and returned: a
   * pcall around a refused allocation (the loader's own, or the file's) must not turn it into
   * an ordinary error message or a success. */
  if (status != 0 || sb.tripped) return run_failure(L, co, &sb, status);
  if (!lua_checkstack(L, nres + 1)) return iothub_fail(L, "error", "sandbox_run: too many results (%d)", nres);
  lua_pushboolean(L, 1);
  lua_xmove(co, L, nres);
  return nres + 1;
}

/* ------------------------------------------------------------------------------------------
 * Sessions: the limits around code that yields in between (a devices file's handlers at
 * request time). session:enter() arms (on the running thread), session:pause() lets the
 * caller's own code run on the file's behalf (memory still counted, nothing refused or
 * raised), session:leave() disarms before a yield or at the end, session:restart() starts a
 * new stretch (counters at zero; a limit that fired stays fired). Limits raise only while the
 * file's own code (limits.source) runs. */

static Sandbox *check_session(lua_State *L) {
  return (Sandbox *)luaL_checkudata(L, 1, SESSION_MT);
}

static int l_session(lua_State *L) {
  Sandbox *sb;
  luaL_checktype(L, 1, LUA_TTABLE);
  sb = (Sandbox *)lua_newuserdatauv(L, sizeof *sb, 0);
  init_sandbox(L, 1, sb);
  if (sb->source[0] == '\0') return luaL_error(L, "sandbox_session: limits.source (the file's chunkname) is required");
  sb->restricted = 1;
  luaL_setmetatable(L, SESSION_MT);
  return 1;
}

static int l_session_enter(lua_State *L) {
  Sandbox *sb = check_session(L);
  enter(L, L, sb);
  /* Anchored while installed: the allocator points into this userdata. */
  lua_pushlightuserdata(L, sb);
  lua_pushvalue(L, 1);
  lua_rawset(L, LUA_REGISTRYINDEX);
  return 0;
}

static int l_session_pause(lua_State *L) {
  pause_sandbox(L, check_session(L));
  return 0;
}

/* Returns true, or nil, message, code when a limit fired in this session. */
static int l_session_leave(lua_State *L) {
  Sandbox *sb = check_session(L);
  leave(L, sb);
  settle_refusal(sb);
  lua_pushlightuserdata(L, sb);
  lua_pushnil(L);
  lua_rawset(L, LUA_REGISTRYINDEX);
  if (!sb->tripped) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  push_limit_message(L, sb, sb->trip_line > 0 ? sb->trip_line : sb->line);
  lua_pushstring(L, limit_code(sb->tripped));
  return 3;
}

static int l_session_restart(lua_State *L) {
  Sandbox *sb = check_session(L);
  if (sb->mode != OFF) return luaL_error(L, "sandbox: restart while it is active; leave it first");
  restart(sb);
  return 0;
}

/* A session collected while installed (a state closed mid-handler): put things back. */
static int l_session_gc(lua_State *L) {
  Sandbox *sb = check_session(L);
  if (sb->mode != OFF && active(L) == sb) leave(L, sb);
  return 0;
}

int sandbox_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
      {"sandbox_limits", l_limits},
      {"sandbox_load", l_load},
      {"sandbox_run", l_run},
      {"sandbox_session", l_session},
      {NULL, NULL},
  };
  static const luaL_Reg methods[] = {
      {"enter", l_session_enter},
      {"pause", l_session_pause},
      {"leave", l_session_leave},
      {"restart", l_session_restart},
      {NULL, NULL},
  };
  size_t i;
  if (luaL_newmetatable(L, SESSION_MT)) {
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_session_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "sandbox session");
    lua_setfield(L, -2, "__name");
  }
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  /* The defaults and the knobs, for help texts: { memory = { default =, flag =, env = }, ... }. */
  lua_newtable(L);
  for (i = 0; i < sizeof KNOBS / sizeof KNOBS[0]; i++) {
    lua_newtable(L);
    lua_pushnumber(L, default_of(&KNOBS[i]));
    lua_setfield(L, -2, "default");
    {
      char text[48];
      if (&KNOBS[i] == KNOB_MEMORY)
        format_size(default_of(&KNOBS[i]), 1, text, sizeof text);
      else if (&KNOBS[i] == KNOB_INSTRUCTIONS)
        snprintf(text, sizeof text, "%.0f", default_of(&KNOBS[i]));
      else
        format_seconds(default_of(&KNOBS[i]), text, sizeof text);
      lua_pushstring(L, text);
      lua_setfield(L, -2, "default_text");
    }
    lua_pushstring(L, KNOBS[i].flag);
    lua_setfield(L, -2, "flag");
    lua_pushstring(L, KNOBS[i].env);
    lua_setfield(L, -2, "env");
    lua_setfield(L, -2, KNOBS[i].kind);
  }
  lua_setfield(L, -2, "sandbox_knobs");
  return 0;
}
