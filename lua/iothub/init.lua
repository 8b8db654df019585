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
local job_request = require "iothub.job_request"

return {
  _VERSION = config.VERSION,
  JobClient = require "iothub.jobs",
  Registry = require "iothub.registry",
  Scheduler = require "iothub.scheduler",
  errors = require "iothub.errors",
  json = require "iothub.json",
  --- The exact body of a job request, checked: buildJobRequest(kind, jobId, queryCondition,
  -- action [, startTime [, maxExecutionTimeInSeconds]]) -> body, normalised action | nil, err.
  -- kind is "method" (action: methodParams) or "twin" (action: the twin patch); err.field
  -- names the field at fault. The same function every JobClient schedule call uses.
  buildJobRequest = function(kind, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds)
    return job_request.build(kind, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds)
  end,
  null = core.null,
  --- A fresh random job id (UUID v4), as the Node samples use.
  uuid = core.uuid4,
  DEFAULT_API_VERSION = config.DEFAULT_API_VERSION,
}
