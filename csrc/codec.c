#include "common.h"
/* TODO: filled in by the codec work */
int codec_open(lua_State *L) { (void)L; return 0; }
