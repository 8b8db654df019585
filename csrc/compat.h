/* Thin shims so one source builds for Lua 5.1/LuaJIT 2.1 through 5.4. */
#ifndef IOTHUB_COMPAT_H
#define IOTHUB_COMPAT_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#if LUA_VERSION_NUM < 502
#  if defined(__has_include)
#    if __has_include(<luajit.h>)
#      include <luajit.h>
#    endif
#  endif
/* LuaJIT 2.1 already provides luaL_setfuncs, luaL_testudata, luaL_setmetatable,
 * luaL_newlib and lua_tointegerx; plain 5.1 does not. */
#  if !defined(LUAJIT_VERSION)
#    error "Lua 5.1 without LuaJIT is not supported; use LuaJIT 2.1 or Lua 5.2+"
#  endif
#  define lua_rawlen(L, i) lua_objlen((L), (i))
static inline int compat_absindex(lua_State *L, int i) {
  return (i > 0 || i <= LUA_REGISTRYINDEX) ? i : lua_gettop(L) + i + 1;
}
#  define lua_absindex(L, i) compat_absindex((L), (i))
#endif

#if LUA_VERSION_NUM < 504
#  define lua_newuserdatauv(L, sz, nuv) lua_newuserdata((L), (sz))
#endif

#if LUA_VERSION_NUM >= 503
#  define IOTHUB_HAS_INTEGERS 1
#else
#  define IOTHUB_HAS_INTEGERS 0
#endif

/* Largest integer a double holds exactly: beyond it a Lua 5.1/LuaJIT number would round. */
#define IOTHUB_MAX_SAFE_INTEGER 9007199254740992.0 /* 2^53 */

#endif
