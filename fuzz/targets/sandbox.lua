-- The sandbox runner (csrc/sandbox.c): limit text as flags and environment variables give it
-- (core.sandbox_limits), and small programs assembled from fragments (allocation, loops,
-- pcall around a limit, yields, metatables, errors) run under tight caps. Each run must end
-- with the documented shape and code, and the state's allocator and hook must be restored:
-- the harness goes on allocating after every run, so a wrapper left behind would be found.
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local CODES = { memory = true, instructions = true, seconds = true, yield = true, error = true }
local KINDS = { "memory", "instructions", "seconds" }
local TEXTS = { "256M", "1G", "512k", "0", "-1", "1e400", "nan", "10", "0.5", "1e5", "", " 2M ", "12MB", "3x" }

-- Program fragments: each is Lua source for one statement that may hit a limit or fail.
local FRAGMENTS = {
  "local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(1024) end",          -- memory
  "while true do end",                                                  -- instructions
  "local s = '' for i = 1, 1e9 do s = s .. 'y' end",                     -- memory or seconds
  "for i = 1, 100 do local x = i * 2 end",                              -- finishes
  "pcall(function() while true do end end)",                            -- a limit pcall must not swallow
  "pcall(function() local t = {} while true do t[#t + 1] = {} end end)",
  "coroutine.yield(1)",                                                  -- yield
  "error('boom')",                                                       -- error
  "error(setmetatable({}, { __tostring = function() return 'obj' end }))",
  "setmetatable({}, { __index = function(t, k) return k end })",
  "local co = coroutine.wrap(function() while true do coroutine.yield() end end) for i = 1, 1e6 do co() end",
  "local a = {} for i = 1, 5000 do a[i] = tostring(i) end table.sort(a)",
  "string.rep('z', 1 << 26)",
  "do return 1, 2, 3 end",
}

local ENV = { pcall = pcall, error = error, setmetatable = setmetatable, tostring = tostring,
  coroutine = coroutine, string = string, table = table }

return function(data)
  local b = fz.bytes(data)
  -- Limit text: a clear refusal or numbers within range, never a raise for a string.
  local values = {}
  for _, kind in ipairs(KINDS) do
    if b:bool() then values[kind] = b:bool() and b:pick(TEXTS) or b:string(12) end
  end
  local limits, msg, code = core.sandbox_limits(values, function() return nil end)
  if not limits then
    fz.check_failure("sandbox_limits", limits, msg, code)
  end

  -- A program under small caps (whatever the text said, so runs stay short).
  local parts = {}
  for _ = 1, 1 + b:byte() % 3 do parts[#parts + 1] = b:pick(FRAGMENTS) end
  local src = table.concat(parts, "\n")
  local fn, lerr = core.sandbox_load(src, "=fuzz", setmetatable({}, { __index = ENV }))
  check(fn ~= nil, "sandbox_load refused the fragments: %s", lerr)
  local tight = assert(core.sandbox_limits({ memory = (1 + b:byte() % 8) .. "M",
    instructions = tostring(1e5 + b:byte() * 1e3), seconds = "0.05" }, function() return nil end))
  local res = table.pack(core.sandbox_run(fn, tight))
  if res[1] ~= true then
    check(res[1] == nil and type(res[2]) == "string" and CODES[res[3]], "sandbox_run returned %s, %s, %s",
      res[1], res[2], res[3])
  end
  -- The allocator and hook are the state's own again: plenty of memory and instructions work.
  local after = {}
  for i = 1, 2000 do after[i] = ("a"):rep(64) .. i end
  check(#after == 2000, "allocation after a sandbox run failed")
  check(debug.gethook() == nil, "a hook is left behind after sandbox_run")
end
