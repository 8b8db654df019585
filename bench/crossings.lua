-- Lua -> C crossings per call: how many times the client calls into iothub.core and
-- iothub.curl (module functions and the methods of their objects) for one
-- scheduleDeviceMethod, one scheduleTwinUpdate and one monitor poll, in steady state (token
-- cached, connection open), over HTTPS to the local test server's simulated hub. Prints the
-- count and which functions; asserts nothing.
--   lua5.4 bench/crossings.lua      luajit bench/crossings.lua
package.path = "bench/?.lua;" .. package.path
local common = require "common"
local core = common.core
local curl = require "iothub.curl"

local counts, counting = {}, false

-- Wraps every function of t (in place) so each call is counted under prefix.name.
local function wrap(t, prefix)
  for name, fn in pairs(t) do
    if type(fn) == "function" then
      local key = prefix .. name
      t[name] = function(...)
        if counting then counts[key] = (counts[key] or 0) + 1 end
        return fn(...)
      end
    end
  end
end

-- The C objects' methods live in their metatables' __index tables.
local function wrap_methods(obj, prefix)
  local mt = getmetatable(obj)
  if mt and type(mt.__index) == "table" and not mt.__wrapped then
    mt.__wrapped = true
    wrap(mt.__index, prefix)
  end
end

wrap(core, "core.")
local easy_fn, multi_fn = curl.easy, curl.multi
wrap(curl, "curl.")
curl.easy = function(...)
  local e, msg, code = easy_fn(...)
  if e then wrap_methods(e, "easy:") end
  return e, msg, code
end
curl.multi = function(...)
  local m, msg, code = multi_fn(...)
  if m then wrap_methods(m, "multi:") end
  return m, msg, code
end

local function measure(label, fn)
  for _ = 1, 3 do assert(fn()) end -- warm: token, connection, presized tables
  counts, counting = {}, true
  assert(fn())
  counting = false
  local names, total = {}, 0
  for k, n in pairs(counts) do names[#names + 1] = k; total = total + n end
  table.sort(names)
  local parts = {}
  for _, k in ipairs(names) do parts[#parts + 1] = counts[k] > 1 and (k .. " x" .. counts[k]) or k end
  print(("%-28s %2d crossings: %s"):format(label, total, table.concat(parts, ", ")))
end

common.run(function(srv, client_for)
  local jobs = client_for(srv.https_url, { caFile = srv.ca_file })
  print(common.interpreter)
  local n = 0
  measure("scheduleDeviceMethod", function()
    n = n + 1
    return jobs:scheduleDeviceMethod("bench-m" .. n, "deviceId IN ['door-1']",
      { methodName = "lockDoor", payload = { force = true }, responseTimeoutInSeconds = 15 })
  end)
  measure("scheduleTwinUpdate", function()
    n = n + 1
    return jobs:scheduleTwinUpdate("bench-t" .. n, "tags.building = '43'",
      { tags = { rollout = "r1" }, properties = { desired = { mode = "auto" } } })
  end)
  -- One poll of a monitor that is past its first: decide, sleep, read the job, decide again.
  measure("monitor poll", function()
    n = n + 1
    local step = jobs:watchJob("poll5-bench" .. n, { interval = 0.001 })
    counting = false
    assert(step())
    counting = true
    return step()
  end)
end)
