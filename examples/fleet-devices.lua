-- A fleet for staged rollouts (examples/rollout.lua), run by the emulator:
--   bin/iothub-emulator --devices examples/fleet-devices.lua
-- Building 7 has 60 doors, b7-door-001 .. b7-door-060, on floors 1-4. Three of them have a
-- jammed bolt: their lockDoor handler fails, so the hub records a failed device row
-- (504 GatewayTimeout), which is what a rollout's gates are there to catch.
local JAMMED = { ["b7-door-013"] = true, ["b7-door-027"] = true, ["b7-door-041"] = true }

local function lock_door(_payload, ctx)
  if JAMMED[ctx.deviceId] then error("the bolt is jammed") end
  ctx.report({ door = { locked = true } })
  return 200, { locked = true }
end

return {
  fleets = {
    {
      count = 60,
      id = "b7-door-%03d",
      tags = function(i) return { location = { building = "7", floor = (i - 1) % 4 + 1 }, model = "bolt-2" } end,
      reported = { door = { locked = false }, firmware = "1.0.0" },
      methods = { lockDoor = lock_door },
      onDesired = "report", -- echo desired changes back as reported properties
    },
  },
}
