-- Simulated devices for the "Schedule and broadcast jobs" tutorial, run by the emulator:
--   bin/iothub-emulator --devices examples/devices.lua
-- This file is Lua evaluated in a sandbox (string, table, math, os.time/date, print).
-- A method handler is function(payload, ctx) and returns status, payload; ctx has
-- deviceId, methodName, log(fmt, ...), json(v), twin(), report(patch), sleep(s), now(),
-- random() and disconnect([seconds]). See emulator/README.md, "Devices file".

-- The tutorial's simDevice: answer lockDoor with 200 and print "Locking Door!".
local function lock_door(_payload, ctx)
  ctx.log("Locking Door!")
  ctx.report({ door = { locked = true, lockedAt = os.date("!%Y-%m-%dT%H:%M:%SZ") } })
  return 200, { locked = true }
end

local function unlock_door(_payload, ctx)
  ctx.log("Unlocking Door!")
  ctx.report({ door = { locked = false } })
  return 200, { locked = false }
end

-- Answers, then drops off the network for a few seconds as a rebooting door would:
-- calls meanwhile get 404103 DeviceNotOnline unless connectTimeoutInSeconds covers it.
local function reboot(payload, ctx)
  local seconds = type(payload) == "table" and tonumber(payload.seconds) or 5
  ctx.log("Rebooting for %g s", seconds)
  ctx.disconnect(seconds)
  return 200, { rebooting = true, seconds = seconds }
end

-- Desired-property changes (e.g. the tutorial's twin job setting building/floor) arrive
-- here; echo them as reported properties like a well-behaved device.
local function on_desired(patch, ctx)
  ctx.log("desired properties changed: " .. ctx.json(patch))
  local applied = {}
  for k, v in pairs(patch) do
    if k ~= "$version" then applied[k] = v end
  end
  ctx.report(applied)
end

return {
  devices = {
    {
      id = "myDeviceId",
      tags = { location = { building = "43", floor = 3 } },
      reported = { door = { locked = false } },
      methods = { lockDoor = lock_door, unlockDoor = unlock_door, rebootDoor = reboot },
      onDesired = on_desired,
    },
    -- Registered but not connected: method calls answer 404103 DeviceNotOnline and
    -- method jobs record a failed device row.
    { id = "door-basement", tags = { location = { building = "43", floor = 0 } }, offline = true },
  },
  fleets = {
    -- door-001 .. door-005 on floors 1-3 of building 43.
    {
      count = 5,
      id = "door-%03d",
      tags = function(i) return { location = { building = "43", floor = (i - 1) % 3 + 1 } } end,
      reported = { door = { locked = false } },
      methods = { lockDoor = lock_door, unlockDoor = unlock_door },
      onDesired = on_desired,
    },
    -- Knobs for less reliable hardware, e.g. a flaky outdoor fleet (uncomment to try):
    -- {
    --   count = 20, id = "gate-%02d",
    --   tags = { location = { building = "yard" } },
    --   methods = { lockDoor = lock_door },
    --   latency = { 0.05, 0.4 },   -- seconds before each answer (fixed, or a range)
    --   failureRate = 0.1,         -- 10% of calls fail ...
    --   failure = "error",         -- ... answering status 500 ("timeout": 504101, "offline": 404103)
    --   offline = 0.15,            -- 15% of the gates are offline (picked by the seed)
    -- },
  },
}
