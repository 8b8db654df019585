#include "common.h"
/* TODO: filled in by the request work */
int request_open(lua_State *L) { (void)L; return 0; }
