#include "common.h"
/* TODO: filled in by the json work */
int json_open(lua_State *L) { (void)L; return 0; }
