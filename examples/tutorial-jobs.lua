-- The seed tutorial's two jobs (examples/schedule_jobs.lua) as a definitions file: call
-- lockDoor on the tutorial's device, and set its desired building and floor.
--
--   bin/iothub-jobs plan examples/tutorial-jobs.lua --emulator=DIR
--   bin/iothub-jobs run examples/tutorial-jobs.lua --emulator=DIR
--
-- Job ids come from each job's name and content, so running the file again finds the jobs
-- it already created instead of creating them twice. To run the same jobs once more, bump
-- `revision`.
-- luacheck: read globals job

job "tutorial-lock" {
  method = "lockDoor",
  responseTimeout = 15,          -- the tutorial's responseTimeoutInSeconds
  devices = { "myDeviceId" },
  ttl = 3600,                    -- maxExecutionTimeInSeconds
  revision = 1,
}

job "tutorial-twin" {
  patch = { desired = { building = "43", floor = 3 } },
  devices = { "myDeviceId" },
  ttl = 3600,
  revision = 1,
}
