-- A staged rollout over the fleet in examples/fleet-devices.lua: lock every door of
-- building 7, a canary first, then half, then the rest; each stage must pass its gate
-- before the next one starts. Then tag the doors with the rollout wave.
--
--   bin/iothub-emulator --devices examples/fleet-devices.lua --dir /tmp/hub &
--   bin/iothub-jobs plan examples/rollout.lua --emulator=/tmp/hub   # what would be sent; changes nothing
--   bin/iothub-jobs run examples/rollout.lua --emulator=/tmp/hub    # run it (re-run to resume)
-- luacheck: read globals job ids

job "lock-b7" {
  description = "Lock every door in building 7",
  method = "lockDoor",
  payload = { force = true },
  responseTimeout = 15,                    -- seconds each door has to answer
  query = "tags.location.building = '7'",  -- the targets: every door there, counted at run time
  ttl = "30m",                             -- maxExecutionTimeInSeconds of each job
  stages = {
    -- Each stage reaches a cumulative count or percent of the targets (in a stable,
    -- hash-spread order), and its gate must hold before the next stage starts.
    { name = "canary", count = 2, gate = { minSuccessRatio = 1 } },
    { name = "half", percent = 50, gate = { minSuccessRatio = 0.9, maxFailures = 3 } },
    { name = "rest", percent = 100, gate = { minSuccessRatio = 0.9 } },
  },
}

job "tag-b7" {
  description = "Record which rollout wave locked the doors",
  patch = { tags = { rollout = "2026-11-lock" }, desired = { lockPolicy = { mode = "auto", relockAfter = 30 } } },
  devices = ids("b7-door-%03d", 1, 60),    -- an explicit device list (split into jobs if too long)
  ttl = 600,
}
