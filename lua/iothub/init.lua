--- iothub: schedule, monitor and roll out Azure IoT Hub jobs from Lua.
--
--     local iothub = require "iothub"
--     local jobs = assert(iothub.JobClient.fromConnectionString(os.getenv("IOTHUB_CONNECTION_STRING")))
--     local job = assert(jobs:scheduleDeviceMethod(iothub.uuid(), "deviceId IN ['door1']",
--       { methodName = "lockDoor" }))
--     print(assert(jobs:monitorJob(job.jobId)).status)
-- @module iothub
local core = require "iothub.core"
local config = require "iothub.config"

return {
  _VERSION = config.VERSION,
  JobClient = require "iothub.jobs",
  Registry = require "iothub.registry",
  Scheduler = require "iothub.scheduler",
  errors = require "iothub.errors",
  json = require "iothub.json",
  null = core.null,
  --- A fresh random job id (UUID v4), as the Node samples use.
  uuid = core.uuid4,
  DEFAULT_API_VERSION = config.DEFAULT_API_VERSION,
}
