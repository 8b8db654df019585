-- Simulated devices for the "Schedule and broadcast jobs" tutorial, run by the emulator:
--   bin/iothub-emulator --devices examples/devices.lua
-- This file is Lua evaluated in a sandbox (string, table, math, os.time/date, print).
-- A method handler is function(payload, ctx) and returns status, payload; ctx has
-- deviceId, methodName, log(fmt, ...), json(v), twin(), report(patch), sleep(s), now().

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
      methods = { lockDoor = lock_door, unlockDoor = unlock_door },
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
  },
}
