--- The job request in one place. Every check, default and conversion of what a jobs/v2 PUT
-- carries is made by the C core (csrc/job_request.c); this module turns its refusals into
-- error values (or raises, for values of the wrong Lua type) and is what JobClient, Registry,
-- definitions files and rollout plans all call.
--
--     local body, err = iothub.buildJobRequest("method", "lock-1", "tags.building = '43'",
--       { methodName = "lockDoor", payload = { force = true } })
--     -- body: the exact JSON a scheduleDeviceMethod would PUT; err.field names what to fix
-- @module iothub.job_request
local core = require "iothub.core"
local errors = require "iothub.errors"

local M = {}

--- maxExecutionTimeInSeconds when none is given (seconds).
M.DEFAULT_MAX_EXECUTION = core.job_default_max_execution

--- The operation names of the two kinds, as JobClient calls them.
M.OPERATIONS = { method = "scheduleDeviceMethod", twin = "scheduleTwinUpdate",
  scheduleDeviceMethod = "scheduleDeviceMethod", scheduleTwinUpdate = "scheduleTwinUpdate",
  scheduleUpdateTwin = "scheduleTwinUpdate" }

-- The error for a refusal (message, code, field, detail from the core); raises for misuse.
local function refusal(message, code, field, detail, operation, target)
  if code == "Misuse" then errors.misuse(message) end
  local err = errors.invalid(message, { operation = operation, target = target })
  err.field, err.detail = field, detail
  return err
end

local function operation_of(kind)
  local op = M.OPERATIONS[kind]
  if not op then
    errors.misuse("job kind must be \"method\" or \"twin\" (or scheduleDeviceMethod, scheduleUpdateTwin), got "
      .. tostring(kind))
  end
  return op
end

--- Builds a job request. Returns the body (the exact JSON to PUT) and the action as
-- normalised (method defaults filled, a twin patch's desired under properties, etag "*"), or
-- nil, err with `err.field` the request field at fault ("methodParams.payload",
-- "queryCondition", ...) and `err.detail` what is wrong with it.
-- @param kind "method" | "twin" (or the JobClient operation / wire type names)
-- @param[opt] now epoch seconds a start of nil means (default: now)
-- @param[opt] operation the operation named in errors (default: the kind's)
function M.build(kind, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds, now, operation)
  operation = operation or operation_of(kind)
  local body, normalised, code, field, detail = core.job_request(kind, jobId, queryCondition, action, startTime,
    maxExecutionTimeInSeconds, now or core.time())
  if not body then return nil, refusal(normalised, code, field, detail, operation, jobId) end
  return body, normalised
end

--- Checks and normalises a job's action alone, and its maxExecutionTimeInSeconds when given
-- (a definitions file checks its jobs before ids and targets exist). Returns the action, or
-- nil, err as build's.
function M.action(kind, action, operation, target, maxExecutionTimeInSeconds)
  operation = operation or operation_of(kind)
  local normalised, message, code, field, detail = core.job_action(kind, action, maxExecutionTimeInSeconds)
  if not normalised then return nil, refusal(message, code, field, detail, operation, target) end
  return normalised
end

--- A direct method's request body (POST /twins/{id}/methods) from methodParams. Returns
-- body, responseTimeoutInSeconds, connectTimeoutInSeconds (or nil), or nil, err.
function M.method(methodParams, operation, target)
  local body, response, connect, field, detail = core.method_request(methodParams)
  if not body then return nil, refusal(response, connect, field, detail, operation, target) end
  return body, response, connect
end

--- The path of a job: PUT/GET /jobs/v2/{id}, POST /jobs/v2/{id}/cancel.
function M.path(jobId, cancel)
  if cancel then return { "jobs", "v2", jobId, "cancel" } end
  return { "jobs", "v2", jobId }
end

--- The same path as text, each segment encoded as the request carries it ("/jobs/v2/a%2Fb").
function M.path_text(jobId, cancel)
  local segments = M.path(jobId, cancel)
  for i, segment in ipairs(segments) do segments[i] = core.url_encode(segment) end
  return "/" .. table.concat(segments, "/")
end

return M
