/* C-level entry points of json.c, used by request.c to build bodies with a fixed field order. */
#ifndef IOTHUB_JSON_H
#define IOTHUB_JSON_H

#include "compat.h"
#include "buffer.h"

/* Appends the JSON text of the Lua value at idx to b.
 * Returns 0, or -1 with a human-readable reason in err (and the code name in *code). */
int json_encode_value(lua_State *L, int idx, iothub_buffer *b, char *err, size_t errlen,
                      const char **code);

/* Appends s as a quoted, escaped JSON string. Returns 0, or -1 if s is not valid UTF-8. */
int json_append_string(iothub_buffer *b, const char *s, size_t len);

/* JSON null is represented by a NULL light userdata (as lua-cjson does). */
#define json_isnull(L, idx) (lua_type((L), (idx)) == LUA_TLIGHTUSERDATA && lua_touserdata((L), (idx)) == NULL)

#endif
