--- Helpers shared by the fuzz targets (fuzz/targets/*.lua): a reader that turns the fuzzer's
-- bytes into numbers, strings and whole Lua values, and checks that raise with context.
local core = require "iothub.core"

local M = {}

local Bytes = {}
Bytes.__index = Bytes

--- Reads the input front to back; past its end every read yields zeros / empty strings, so a
-- target never has to check lengths.
function M.bytes(data)
  return setmetatable({ s = data, i = 1 }, Bytes)
end

function Bytes:left() return #self.s - self.i + 1 end

function Bytes:byte()
  local b = self.s:byte(self.i)
  if not b then return 0 end
  self.i = self.i + 1
  return b
end

function Bytes:bool() return self:byte() % 2 == 1 end

--- An integer in [lo, hi] (spans up to 2^16 values).
function Bytes:int(lo, hi)
  local v = self:byte() * 256 + self:byte()
  return lo + v % (hi - lo + 1)
end

function Bytes:pick(list) return list[self:int(1, #list)] end

--- Up to max bytes: a length byte, then the bytes themselves.
function Bytes:string(max)
  local n = math.min(self:byte(), max or 255, self:left())
  local s = self.s:sub(self.i, self.i + n - 1)
  self.i = self.i + n
  return s
end

--- Everything not read yet.
function Bytes:rest()
  local s = self.s:sub(self.i)
  self.i = #self.s + 1
  return s
end

--- The numbers that break conversions: NaN, infinities, -0, the edges of 2^53 and 2^63,
-- integers and floats of the same value, and any 8 bytes read as a double or an integer.
local EDGE_NUMBERS = {
  0, -0.0, 1, -1, 0.5, -0.5, 1.0, 2, 3.0, 10, 100, 429, 500, 503, 504, 999, 1000, 65535, 86400,
  0 / 0, math.huge, -math.huge, 2 ^ 31, -2 ^ 31, 2 ^ 32, 2 ^ 53, 2 ^ 53 + 2, -2 ^ 53, 2 ^ 63, -2 ^ 63,
  2 ^ 64, 1e15, 1e19, -1e19, 1e300, -1e300, 5e-324, 1e-300, math.maxinteger, math.mininteger,
  math.maxinteger - 1, 253402300799.999, 253402300800, -62167219200, -62167219201, 1.7976931348623157e308,
}

function Bytes:number()
  local k = self:byte()
  if k < 128 then return EDGE_NUMBERS[k % #EDGE_NUMBERS + 1] end
  if self:left() < 8 then return k - 192 end
  local raw = self.s:sub(self.i, self.i + 7)
  self.i = self.i + 8
  if k < 192 then return (string.unpack("<d", raw)) end
  return (string.unpack("<i8", raw))
end

local KEYS = { "a", "b", "tags", "properties", "desired", "reported", "$version", "deviceId", "x.y", "", "A",
  "with space", "jobId", "\0", "\xff", "é", "1" }

--- Any value a caller could hand the C core: JSON-shaped trees (objects, arrays marked with
-- core.json_array, core.null) plus what JSON cannot say (NaN, sparse or mixed tables, booleans
-- and numbers as keys, functions, deep nesting).
function Bytes:value(depth)
  depth = depth or 0
  local k = self:byte() % (depth > 12 and 6 or 11)
  if k == 0 then return self:string(40)
  elseif k == 1 then return self:number()
  elseif k == 2 then return self:bool()
  elseif k == 3 then return core.null
  elseif k == 4 then return self:pick(KEYS)
  elseif k == 5 then return nil
  elseif k <= 7 then -- object
    local t = {}
    for _ = 1, self:byte() % 6 do
      local key = self:bool() and self:pick(KEYS) or self:string(12)
      t[key] = self:value(depth + 1)
    end
    return t
  elseif k == 8 then -- array, marked or not
    local t = {}
    for i = 1, self:byte() % 6 do t[i] = self:value(depth + 1) end
    if self:bool() then core.json_array(t) end
    return t
  elseif k == 9 then -- odd keys
    local t = {}
    for _ = 1, self:byte() % 4 do
      local key = self:pick({ 1, 2, 3, 0, -1, 1.5, true, 2 ^ 53, math.maxinteger })
      t[key] = self:value(depth + 1)
    end
    if self:bool() then t[self:pick(KEYS)] = 1 end
    return t
  else -- a chain of nesting
    local t = {}
    local inner = t
    for _ = 1, self:byte() % 200 do
      local c = {}
      inner[self:bool() and "n" or 1] = c
      inner = c
    end
    return t
  end
end

--- Wraps t so that every field read goes through __index, which may run a full garbage
-- collection first and hands strings back as fresh copies: C code must keep what it reads
-- on the Lua stack while it uses it (the table no longer anchors it).
function M.proxy(t, collect)
  return setmetatable({}, {
    __index = function(_, key)
      if collect then collectgarbage() end
      local v = rawget(t, key)
      if type(v) == "string" then v = (v .. "#"):sub(1, -2) end
      return v
    end,
  })
end

--- Raises with a message when ok is false; the message formats the remaining arguments.
function M.check(ok, fmt, ...)
  if not ok then
    local args = table.pack(...)
    for i = 1, args.n do
      if type(args[i]) == "string" then args[i] = ("%q"):format(args[i]:sub(1, 200)) else args[i] = tostring(args[i]) end
    end
    error("invariant broken: " .. fmt:format(table.unpack(args, 1, args.n)), 2)
  end
end

--- Deep equality of decoded values; numbers compare by value (3 == 3.0), metatables are ignored.
function M.same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do
    if not M.same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

--- A runtime failure must be nil, message, code with a string message and code.
function M.check_failure(what, r1, msg, code)
  M.check(r1 == nil, "%s: a failure returns nil first (got %s)", what, r1)
  M.check(type(msg) == "string" and #msg > 0, "%s: failure without a message", what)
  M.check(type(code) == "string" and #code > 0, "%s: failure without a code (%s)", what, msg)
end

return M
