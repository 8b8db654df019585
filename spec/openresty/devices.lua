-- Simulated devices for spec/openresty/run.sh (run by the emulator's sandbox):
--   the tutorial's doors, as in examples/devices.lua (myDeviceId, door-001..003, an offline
--   door-basement), one device whose method answers slowly, and a fleet the load jobs walk.
local function lock_door(_payload, ctx)
  ctx.report({ door = { locked = true } })
  return 200, { locked = true }
end

return {
  devices = {
    { id = "myDeviceId", tags = { location = { building = "43", floor = 3 } },
      methods = { lockDoor = lock_door }, onDesired = "report" },
    { id = "door-basement", tags = { location = { building = "43", floor = 0 } }, offline = true },
    -- Answers after `payload.seconds` (default 5): a slow hub response for the
    -- responsiveness test.
    { id = "slow-device", tags = { role = "slow" },
      methods = {
        slowOp = function(payload, ctx)
          local seconds = type(payload) == "table" and tonumber(payload.seconds) or 5
          ctx.sleep(seconds)
          return 200, { slept = seconds }
        end,
      } },
  },
  fleets = {
    { count = 3, id = "door-%03d",
      tags = function(i) return { location = { building = "43", floor = i } } end,
      methods = { lockDoor = lock_door }, onDesired = "report" },
    -- Twin jobs over these 40 devices run for about 40 / job-rate seconds.
    { count = 40, id = "load-%03d", tags = { fleet = "load" } },
  },
}
