/* The libFuzzer driver behind every fuzz target: one Lua 5.4 state (built with API checks and
 * the sanitizers, see lua-src.sh) with iothub.core and iothub.curl compiled in, instrumented, and
 * the target's script fuzz/targets/<FUZZ_TARGET>.lua. The script returns a function taking the
 * input as a string (or a table { run = function, cover = { "lua/iothub/x.lua", ... } }); it
 * calls the project's functions and raises when an invariant breaks. Any error that escapes it
 * is a finding: the harness prints it and aborts, and libFuzzer saves the input.
 *
 * Lua code under test (cover) gets coverage feedback too: a line hook maps each transition
 * between two lines of those files to a counter in libFuzzer's extra-counters section. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#ifndef FUZZ_TARGET
#  error "build with -DFUZZ_TARGET='\"name\"' (fuzz/targets/name.lua)"
#endif
#ifndef FUZZ_ROOT
#  error "build with -DFUZZ_ROOT='\"/path/to/checkout\"'"
#endif

int luaopen_iothub_core(lua_State *L);
int luaopen_iothub_curl(lua_State *L);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EDGES (1 << 16)
__attribute__((used, section("__libfuzzer_extra_counters"))) static uint8_t lua_edges[EDGES];

static lua_State *L;
static int run_ref = LUA_NOREF;
static char cover[8][128]; /* "@" FUZZ_ROOT "/lua/iothub/x.lua": chunk names of the covered files */
static int ncover;
static const char *last_source;
static int last_covered;
static uint32_t prev_edge;

static void line_hook(lua_State *Ls, lua_Debug *ar) {
  uint32_t cur;
  int k;
  if (!lua_getinfo(Ls, "S", ar)) return;
  if (ar->source != last_source) { /* chunk names are interned strings: compare text once */
    last_source = ar->source;
    last_covered = 0;
    for (k = 0; k < ncover; k++)
      if (strcmp(ar->source, cover[k]) == 0) last_covered = 1;
  }
  if (!last_covered) return;
  cur = ((uint32_t)(uintptr_t)ar->source * 2654435761u) ^ ((uint32_t)ar->currentline * 40503u);
  lua_edges[(cur ^ prev_edge) & (EDGES - 1)]++;
  prev_edge = cur >> 1;
}

static int traceback(lua_State *Ls) {
  const char *msg = lua_tostring(Ls, 1);
  if (!msg) msg = lua_pushfstring(Ls, "(error object is a %s value)", luaL_typename(Ls, 1));
  luaL_traceback(Ls, Ls, msg, 1);
  return 1;
}

static void die(const char *what) {
  fprintf(stderr, "fuzz target '%s': %s\n", FUZZ_TARGET, what);
  abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  L = luaL_newstate();
  if (!L) die("cannot create a Lua state");
  luaL_openlibs(L);
  /* The project's modules come from the instrumented objects linked in, never from disk. */
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_iothub_core);
  lua_setfield(L, -2, "iothub.core");
  lua_pushcfunction(L, luaopen_iothub_curl);
  lua_setfield(L, -2, "iothub.curl");
  lua_pop(L, 1);
  lua_getglobal(L, "package");
  /* the checkout root too, for the emulator's modules (emulator.mqtt_codec) */
  lua_pushstring(L, FUZZ_ROOT "/fuzz/?.lua;" FUZZ_ROOT "/lua/?.lua;" FUZZ_ROOT "/lua/?/init.lua;" FUZZ_ROOT "/?.lua");
  lua_setfield(L, -2, "path");
  lua_pushliteral(L, "");
  lua_setfield(L, -2, "cpath");
  lua_pop(L, 1);

  lua_pushcfunction(L, traceback);
  if (luaL_loadfile(L, FUZZ_ROOT "/fuzz/targets/" FUZZ_TARGET ".lua") != LUA_OK ||
      lua_pcall(L, 0, 1, 1) != LUA_OK)
    die(lua_tostring(L, -1));
  if (lua_istable(L, -1)) {
    int k, n;
    lua_getfield(L, -1, "cover");
    n = lua_istable(L, -1) ? (int)luaL_len(L, -1) : 0;
    for (k = 1; k <= n && ncover < 8; k++) {
      lua_rawgeti(L, -1, k);
      snprintf(cover[ncover++], sizeof cover[0], "@%s/%s", FUZZ_ROOT, luaL_checkstring(L, -1));
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    lua_getfield(L, -1, "run");
    lua_remove(L, -2);
  }
  if (!lua_isfunction(L, -1)) die("the target script must return a function or { run = function }");
  run_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, 0);
  if (ncover) lua_sethook(L, line_hook, LUA_MASKLINE, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  prev_edge = 0;
  lua_pushcfunction(L, traceback);
  lua_rawgeti(L, LUA_REGISTRYINDEX, run_ref);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 1) != LUA_OK) die(lua_tostring(L, -1));
  lua_settop(L, 0);
  /* Everything this input allocated is garbage now: collecting it keeps the per-input malloc
   * and free counts even, so libFuzzer's leak check sees only real leaks, and the next input
   * starts from the same heap. */
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}
