-- Small helpers shared by the emulator modules (JSON, time, copies, the event log).
local core = require "iothub.core"

local M = {}

M.core = core
M.null = core.null

-- The real hub formats timestamps with 7 fractional digits; core gives milliseconds.
-- The last conversion is remembered (core formats milliseconds): bulk work stamps many
-- records within one millisecond.
local iso_ms, iso_s
function M.iso(t)
  local ms = math.floor(t * 1000)
  if ms ~= iso_ms then iso_ms, iso_s = ms, (core.format_time(ms / 1000):gsub("Z$", "0000Z")) end
  return iso_s
end

-- Device-job start/end times carry no zone suffix in the documented samples.
function M.iso_nozone(t)
  return (M.iso(t):gsub("Z$", ""))
end

M.END_OF_TIME = "9999-12-31T23:59:59.9999999Z" -- .NET DateTime.MaxValue, sent for unfinished jobs
M.NEVER = "0001-01-01T00:00:00Z"

---------------------------------------------------------------------------
-- Clock: the hub's notion of "now" is real time plus an offset that the control plane
-- (/_emulator/clock) can only move forward, so scheduled jobs start without waiting.
-- SAS expiry is checked against real time (M.real_now): clients sign with their own clock.
local clock_offset = 0
local clock_listeners = {}

function M.now()
  return core.time() + clock_offset
end

function M.real_now()
  return core.time()
end

function M.clock_offset()
  return clock_offset
end

-- fn() runs after every change of the offset (the job engine re-arms its timers).
function M.on_clock_change(fn)
  clock_listeners[#clock_listeners + 1] = fn
end

local function clock_changed()
  for _, fn in ipairs(clock_listeners) do fn() end
end

-- Moves the clock forward by seconds (>= 0); returns the new offset or nil, message.
function M.advance_clock(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds == math.huge then
    return nil, "the clock only moves forward: give a finite number of seconds >= 0"
  end
  clock_offset = clock_offset + seconds
  clock_changed()
  return clock_offset
end

-- Sets the offset directly (state restore and reset; the latter passes 0).
function M.set_clock_offset(offset)
  clock_offset = tonumber(offset) or 0
  clock_changed()
end

function M.json_encode(v)
  return core.json_encode(v)
end

function M.json_decode(s)
  return core.json_decode(s)
end

function M.array(t)
  return core.json_array(t or {})
end

function M.is_array(v)
  return type(v) == "table" and getmetatable(v) == core.json_array_mt
end

-- A JSON object in the sense of twin merges: a table that is not an array.
function M.is_object(v)
  return type(v) == "table" and v ~= core.null and not M.is_array(v)
end

function M.deepcopy(v)
  if type(v) ~= "table" or v == core.null then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = M.deepcopy(x) end
  local mt = getmetatable(v)
  if mt == core.json_array_mt then setmetatable(out, mt) end
  return out
end

-- Converts plain Lua tables written by people (devices file) into JSON-ready values:
-- sequences become arrays, everything else is left as is.
function M.jsonify(v)
  if type(v) ~= "table" or v == core.null then return v end
  local n = #v
  local out = {}
  for k, x in pairs(v) do out[k] = M.jsonify(x) end
  if n > 0 or getmetatable(v) == core.json_array_mt then core.json_array(out) end
  return out
end

-- Random bytes from /dev/urandom, read in 4 KB blocks: registering 100,000 devices makes
-- 200,000 keys, and one open() per key dominated start-up.
local pool, pool_pos = "", 1

function M.random_bytes(n)
  if pool_pos + n - 1 > #pool then
    local f = io.open("/dev/urandom", "rb")
    local block = f and f:read(math.max(4096, n))
    if f then f:close() end
    if not block or #block < n then
      local t = {}
      for i = 1, n do t[i] = string.char(math.random(0, 255)) end
      return table.concat(t)
    end
    pool, pool_pos = block, 1
  end
  local s = pool:sub(pool_pos, pool_pos + n - 1)
  pool_pos = pool_pos + n
  return s
end

function M.random_key()
  return core.base64_encode(M.random_bytes(32))
end

-- base64 of a big-endian int64, the way the hub renders twin etags ("AAAAAAAAAAI=").
function M.etag_of(n)
  local bytes = {}
  for i = 8, 1, -1 do
    bytes[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return core.base64_encode(table.concat(bytes))
end

-- Strips W/ and quotes so `"abc"`, `W/"abc"` and `abc` compare equal.
function M.unquote_etag(s)
  if type(s) ~= "string" then return nil end
  s = s:gsub("^%s+", ""):gsub("%s+$", ""):gsub("^W/", "")
  return (s:gsub('^"(.*)"$', "%1"))
end

---------------------------------------------------------------------------
-- Event log: device output (ctx.log) and hub events. The launcher tails the
-- file to its stdout so the demo shows "Locking Door!" like the tutorial.
local log_path, log_file

function M.set_log_path(path)
  log_path = path
end

function M.log(source, msg)
  local line = "[" .. tostring(source) .. "] " .. tostring(msg) .. "\n"
  if log_path and not log_file then log_file = io.open(log_path, "a") end
  if log_file then
    log_file:write(line)
    log_file:flush()
  elseif ngx then
    ngx.log(ngx.NOTICE, line)
  else
    io.stderr:write(line)
  end
end

return M
