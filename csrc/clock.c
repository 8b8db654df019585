#include "common.h"
/* TODO: filled in by the clock work */
int clock_open(lua_State *L) { (void)L; return 0; }
