/* C-level checks of validate.c, for the job request builder (job_request.c). Each returns 0
 * when the value is valid, else 1 with a message saying what to fix pushed on the stack. */
#ifndef IOTHUB_VALIDATE_H
#define IOTHUB_VALIDATE_H
#include <stddef.h>
#include "compat.h"

int validate_job_id(lua_State *L, const char *s, size_t n);
int validate_condition(lua_State *L, const char *s, size_t n);
/* The table at idx as job properties under path ("patch.tags"): names, values, depth. */
int validate_properties(lua_State *L, int idx, const char *path, int check_values);
/* The value at idx as a whole number in [min, max]; name starts the message. */
int validate_integer_range(lua_State *L, const char *name, int idx, double min, double max);

#endif
