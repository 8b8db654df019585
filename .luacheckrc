-- Lua shared by 5.4 and LuaJIT: the "min" standard catches globals only one of them has.
std = "min"
max_line_length = 140
exclude_files = { "build/", ".luarocks/", "node_modules/" }
read_globals = { "jit", "unpack", math = { fields = { "type", "tointeger" } } }

files["spec/"] = { std = "+busted" }
files["spec/support/server/"] = { std = "+ngx_lua" }
files["bench/"] = { allow_defined_top = true }
-- The emulator runs inside nginx's LuaJIT.
files["emulator/"] = { std = "ngx_lua" }
-- The fuzz targets run only in the Lua 5.4 state of fuzz/harness.c.
files["fuzz/"] = { std = "lua54" }
