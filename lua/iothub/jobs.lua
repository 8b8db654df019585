--- JobClient: schedule, inspect, cancel, list and monitor IoT Hub jobs (jobs/v2).
-- Method names and argument order follow the Node SDK's JobClient so its samples port line
-- by line; every call returns its result or nil, err (see iothub.errors).
-- @classmod iothub.JobClient
local core = require "iothub.core"
local errors = require "iothub.errors"
local Pager = require "iothub.pager"

local JobClient = {}
JobClient.__index = JobClient

local DEFAULT_MAX_EXECUTION = 3600   -- seconds, as the Node SDK and the az CLI
local DEFAULT_RESPONSE_TIMEOUT = 30  -- seconds, the service default for direct methods
local MAX_PAYLOAD_BYTES = 128 * 1024 -- direct-method payload limit
local TAGS_MAX_BYTES, DESIRED_MAX_BYTES = 8 * 1024, 32 * 1024

local JOB_TYPES = { scheduleDeviceMethod = true, scheduleUpdateTwin = true }
-- Job-level statuses as the wire has them (note the job level spells "cancelled").
local JOB_STATUSES = { unknown = true, enqueued = true, queued = true, scheduled = true,
  running = true, completed = true, failed = true, cancelled = true }
-- Device-row statuses in devices.jobs (note the device level spells "canceled").
local DEVICE_JOB_STATUSES = { pending = true, scheduled = true, running = true,
  completed = true, failed = true, canceled = true }

require("iothub.client").add_constructors(JobClient)

local function check_type(value, want, name)
  if type(value) ~= want then
    errors.misuse(name .. " must be a " .. want .. ", got " .. type(value))
  end
end

local function invalid(message, operation, target)
  return nil, errors.invalid(message, { operation = operation, target = target })
end

local function check_job_id(job_id, operation)
  check_type(job_id, "string", "jobId")
  local ok, msg = core.check_job_id(job_id)
  if not ok then return invalid(msg, operation, job_id) end
  return true
end

-- Accepts nil (now), epoch seconds, or an ISO-8601 string; returns the UTC "...Z" form the
-- service expects (it rejects a null startTime).
function JobClient:_start_time(start, operation, job_id)
  if start == nil then return core.format_time(self.cfg.clock.time()) end
  if type(start) == "number" then
    if start ~= start or start < 0 or start > 253402300799 then
      return invalid("startTime " .. tostring(start) .. " is not a usable epoch time in seconds",
        operation, job_id)
    end
    return core.format_time(start)
  end
  if type(start) == "string" then
    local epoch, msg = core.parse_time(start)
    if not epoch then return invalid("startTime: " .. msg, operation, job_id) end
    return core.format_time(epoch)
  end
  errors.misuse("startTime must be nil, epoch seconds or an ISO-8601 string, got " .. type(start))
end

local function max_execution(value, operation, job_id)
  if value == nil then return DEFAULT_MAX_EXECUTION end
  check_type(value, "number", "maxExecutionTimeInSeconds")
  local ok, msg = core.check_integer_range("maxExecutionTimeInSeconds", value, 1, 2147483647)
  if not ok then return invalid(msg, operation, job_id) end
  return math.floor(value)
end

local function check_condition(condition, operation, job_id)
  check_type(condition, "string", "queryCondition")
  local ok, msg = core.check_query_condition(condition)
  if not ok then return invalid(msg, operation, job_id) end
  return true
end

local METHOD_FIELDS = { methodName = true, payload = true, responseTimeoutInSeconds = true,
  connectTimeoutInSeconds = true, timeoutInSeconds = true }

--- Validates direct-method parameters and fills the Node SDK's defaults
-- (payload null, responseTimeoutInSeconds 30). Shared with Registry:invokeDeviceMethod.
function JobClient.methodParams(params, operation, target)
  check_type(params, "table", "methodParams")
  for key in pairs(params) do
    if not METHOD_FIELDS[key] then
      return invalid("methodParams has an unknown field '" .. tostring(key) ..
        "' (expected methodName, payload, responseTimeoutInSeconds, connectTimeoutInSeconds)",
        operation, target)
    end
  end
  local name = params.methodName
  if type(name) ~= "string" or name == "" then
    return invalid("methodParams.methodName must be a non-empty string (the device's method name)",
      operation, target)
  end
  if #name > 100 or name:find("[^%w%-_%.]") then
    return invalid("methodParams.methodName '" .. name:sub(1, 100) ..
      "' may only contain letters, digits, '-', '_' and '.' (at most 100 characters)", operation, target)
  end
  if params.timeoutInSeconds and params.responseTimeoutInSeconds then
    return invalid("methodParams has both timeoutInSeconds (2016 name) and responseTimeoutInSeconds; keep only responseTimeoutInSeconds",
      operation, target)
  end
  -- The 2016 preview called the response timeout timeoutInSeconds.
  local response_timeout = params.responseTimeoutInSeconds or params.timeoutInSeconds or DEFAULT_RESPONSE_TIMEOUT
  local ok, msg = core.check_integer_range("responseTimeoutInSeconds", response_timeout, 5, 300)
  if not ok then return invalid(msg, operation, target) end
  if params.connectTimeoutInSeconds ~= nil then
    ok, msg = core.check_integer_range("connectTimeoutInSeconds", params.connectTimeoutInSeconds, 0, 300)
    if not ok then return invalid(msg, operation, target) end
  end
  local payload = params.payload
  if payload ~= nil then
    local text, why = core.json_encode(payload)
    if not text then return invalid("methodParams.payload cannot be sent: " .. why, operation, target) end
    if #text > MAX_PAYLOAD_BYTES then
      return invalid(("methodParams.payload is %d bytes as JSON; direct methods allow at most %d (128 KB)")
        :format(#text, MAX_PAYLOAD_BYTES), operation, target)
    end
  end
  return { methodName = name, payload = payload, responseTimeoutInSeconds = math.floor(response_timeout),
    connectTimeoutInSeconds = params.connectTimeoutInSeconds and math.floor(params.connectTimeoutInSeconds) }
end

local function shallow_copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

local function encoded_size(value)
  local text = core.json_encode(value)
  return text and #text or 0
end

--- Normalises a twin patch for a job: moves the 2016 tutorial's top-level `desired` under
-- `properties.desired`, adds `etag = "*"` (the hub requires it: twin jobs are force updates)
-- and checks names, values, sizes and depth before anything is sent.
function JobClient.twinPatch(patch, operation, target)
  check_type(patch, "table", "patch")
  local out = shallow_copy(patch)
  if out.desired ~= nil then
    if out.properties ~= nil then
      return invalid("patch has both 'desired' and 'properties'; put desired properties under properties.desired",
        operation, target)
    end
    out.properties = { desired = out.desired }
    out.desired = nil
  end
  for key in pairs(out) do
    if key ~= "tags" and key ~= "properties" and key ~= "etag" then
      return invalid("patch has an unknown field '" .. tostring(key) ..
        "'; a twin job may set only tags and properties.desired", operation, target)
    end
  end
  if out.etag == nil then
    out.etag = "*"
  elseif out.etag ~= "*" then
    return invalid("patch.etag must be '*': twin update jobs are force updates and the hub accepts no other etag",
      operation, target)
  end
  if out.tags == nil and out.properties == nil then
    return invalid("patch sets nothing: give tags and/or properties.desired", operation, target)
  end
  if out.properties ~= nil then
    if type(out.properties) ~= "table" then
      return invalid("patch.properties must be a table with a 'desired' table", operation, target)
    end
    for key in pairs(out.properties) do
      if key ~= "desired" then
        return invalid("patch.properties." .. tostring(key) ..
          " cannot be set by a job; only properties.desired (reported properties belong to the device)",
          operation, target)
      end
    end
    if type(out.properties.desired) ~= "table" then
      return invalid("patch.properties.desired must be a table", operation, target)
    end
    local ok, msg = core.check_properties(out.properties.desired, "patch.properties.desired", true)
    if not ok then return invalid(msg, operation, target) end
    if encoded_size(out.properties.desired) > DESIRED_MAX_BYTES then
      return invalid("patch.properties.desired is larger than the hub's 32 KB limit", operation, target)
    end
  end
  if out.tags ~= nil then
    if type(out.tags) ~= "table" then return invalid("patch.tags must be a table", operation, target) end
    local ok, msg = core.check_properties(out.tags, "patch.tags", true)
    if not ok then return invalid(msg, operation, target) end
    if encoded_size(out.tags) > TAGS_MAX_BYTES then
      return invalid("patch.tags is larger than the hub's 8 KB limit", operation, target)
    end
  end
  return out
end

-- Is the job the hub holds the one `request` describes? Same type, condition, start (to the
-- millisecond; the hub echoes 7 fractional digits) and method name.
local function same_job(job, request)
  if type(job) ~= "table" or job.type ~= request.type or job.queryCondition ~= request.queryCondition then
    return false
  end
  local held, wanted = core.parse_time(tostring(job.startTime)), core.parse_time(request.startTime)
  if not held or not wanted or math.abs(held - wanted) >= 0.001 then return false end
  if request.cloudToDeviceMethod then
    local method = job.cloudToDeviceMethod
    return type(method) == "table" and method.methodName == request.cloudToDeviceMethod.methodName
  end
  return true
end

-- PUT /jobs/v2/{id}. A retried PUT whose first response was lost can meet its own job and
-- get 409: read the job back and accept it if it is the one we asked for.
function JobClient:_schedule(operation, request)
  local body, msg, code = core.job_request_body(request)
  if not body then
    return nil, errors.new({ kind = "invalid_argument", code = code, message = msg,
      operation = operation, target = request.jobId })
  end
  return self.pipeline:call({
    operation = operation, target = request.jobId, method = "PUT",
    path = { "jobs", "v2", request.jobId }, body = body,
    onConflict = function(conflict) -- same job, same answer, whether or not an attempt was uncertain
      local job = self:getJob(request.jobId)
      if same_job(job, request) then return job end
      conflict.message = (conflict.message or "") ..
        " (a different job already has this id; job ids must be unique, e.g. iothub.uuid())"
      return nil, conflict
    end,
  })
end

-- What the two kinds of job differ in: the service's type name, the body field that carries
-- the action, and the check that builds that field.
local JOB_KINDS = {
  scheduleDeviceMethod = { type = "scheduleDeviceMethod", field = "cloudToDeviceMethod", build = "methodParams" },
  scheduleTwinUpdate = { type = "scheduleUpdateTwin", field = "updateTwin", build = "twinPatch" },
}

-- Checks everything a job request carries, then creates the job; returns it or nil, err.
function JobClient:_schedule_kind(op, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds)
  local ok, err = check_job_id(jobId, op)
  if not ok then return nil, err end
  ok, err = check_condition(queryCondition, op, jobId)
  if not ok then return nil, err end
  local start
  start, err = self:_start_time(startTime, op, jobId)
  if not start then return nil, err end
  local max_exec
  max_exec, err = max_execution(maxExecutionTimeInSeconds, op, jobId)
  if not max_exec then return nil, err end
  local kind = JOB_KINDS[op]
  local value
  value, err = JobClient[kind.build](action, op, jobId)
  if not value then return nil, err end
  return self:_schedule(op, { jobId = jobId, type = kind.type, [kind.field] = value,
    queryCondition = queryCondition, startTime = start, maxExecutionTimeInSeconds = max_exec })
end

--- Schedules a job that invokes a direct method on every device matching queryCondition.
-- @param jobId letters, digits and '-' (at most 64)
-- @param queryCondition WHERE clause only, e.g. "deviceId IN ['a','b']" or "*"
-- @param methodParams { methodName=, payload=, responseTimeoutInSeconds=30, connectTimeoutInSeconds= }
-- @param[opt] startTime nil (now), epoch seconds or ISO-8601 string
-- @param[opt] maxExecutionTimeInSeconds default 3600
-- @return the job as the hub answered, or nil, err
function JobClient:scheduleDeviceMethod(jobId, queryCondition, methodParams, startTime, maxExecutionTimeInSeconds)
  return self:_schedule_kind("scheduleDeviceMethod", jobId, queryCondition, methodParams, startTime,
    maxExecutionTimeInSeconds)
end

--- Schedules a job that applies a twin patch (tags and/or desired properties).
-- @param patch { tags=, properties = { desired = } } (etag "*" is added)
-- Other parameters and the result as scheduleDeviceMethod.
function JobClient:scheduleTwinUpdate(jobId, queryCondition, patch, startTime, maxExecutionTimeInSeconds)
  return self:_schedule_kind("scheduleTwinUpdate", jobId, queryCondition, patch, startTime,
    maxExecutionTimeInSeconds)
end

-- getJob with per-call pipeline options (the monitor disables retries and supplies sleep).
function JobClient:_get_job(jobId, extra)
  local ok, err = check_job_id(jobId, "getJob")
  if not ok then return nil, err end
  local op = { operation = "getJob", target = jobId, method = "GET", path = { "jobs", "v2", jobId } }
  for k, v in pairs(extra or {}) do op[k] = v end
  local job, err2 = self.pipeline:call(op)
  if not job then return nil, err2 end
  if type(job) ~= "table" then
    return nil, errors.new({ kind = "protocol", code = "InvalidResponse", operation = "getJob",
      target = jobId, message = "the hub answered with something that is not a job" })
  end
  -- The hub answers 200 {"status":"unknown"} for ids it has no v2 job for.
  if job.status == "unknown" then
    return nil, errors.new({ kind = "service", status = 404, code = "JobNotFound", operation = "getJob",
      target = jobId, message = "no job with this id (the hub reported status 'unknown')" })
  end
  return job
end

--- Reads a job: status, deviceJobStatistics, times.
function JobClient:getJob(jobId)
  return self:_get_job(jobId)
end

--- Cancels a job that has not finished. Returns the job (status "cancelled") or nil, err.
function JobClient:cancelJob(jobId)
  local ok, err = check_job_id(jobId, "cancelJob")
  if not ok then return nil, err end
  return self.pipeline:call({ operation = "cancelJob", target = jobId, method = "POST",
    path = { "jobs", "v2", jobId, "cancel" } })
end

local function check_page_size(value, operation)
  if value == nil then return true end
  check_type(value, "number", "pageSize")
  local ok, msg = core.check_integer_range("pageSize", value, 1, 10000)
  if not ok then return invalid(msg, operation) end
  return true
end

--- Iterates every job, across all pages, optionally filtered.
-- @param[opt] opts { type = "scheduleDeviceMethod"|"scheduleUpdateTwin", status = "running"|…, pageSize = n }
-- @return an iterator (see iothub.pager): `for job, err in jobs:queryJobs{} do … end`
function JobClient:queryJobs(opts)
  opts = opts or {}
  check_type(opts, "table", "options")
  local failed
  if opts.type ~= nil and not JOB_TYPES[opts.type] then
    failed = "type '" .. tostring(opts.type) .. "' is not a jobs/v2 type; use scheduleDeviceMethod or scheduleUpdateTwin"
  elseif opts.status ~= nil and not JOB_STATUSES[opts.status] then
    failed = "status '" .. tostring(opts.status) .. "' is not a job status" ..
      (opts.status == "canceled" and "; jobs spell it 'cancelled' (device rows use 'canceled')" or
        "; use queued, scheduled, running, completed, failed or cancelled")
  end
  local ok, err = check_page_size(opts.pageSize, "queryJobs")
  if failed then ok, err = invalid(failed, "queryJobs") end
  if not ok then
    return Pager.new(function() return nil, err end)
  end
  -- Filters in the Node SDK's order: jobStatus, then jobType.
  local query = { { "jobStatus", opts.status }, { "jobType", opts.type } }
  return Pager.query(opts.pageSize or self.cfg.pageSize, function(headers)
    return self.pipeline:send({ operation = "queryJobs", method = "GET", path = { "jobs", "v2", "query" },
      query = query, headers = headers })
  end)
end

--- Iterates the per-device rows of a job (`SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '…'`).
-- @param[opt] opts { status = "failed"|"completed"|…|"canceled", pageSize = n }
function JobClient:deviceJobs(jobId, opts)
  opts = opts or {}
  check_type(opts, "table", "options")
  local ok, err = check_job_id(jobId, "deviceJobs")
  if ok and opts.status ~= nil and not DEVICE_JOB_STATUSES[opts.status] then
    ok, err = invalid("status '" .. tostring(opts.status) .. "' is not a device job status" ..
      (opts.status == "cancelled" and "; device rows spell it 'canceled' (jobs use 'cancelled')" or
        "; use pending, scheduled, running, completed, failed or canceled"), "deviceJobs", jobId)
  end
  if ok then ok, err = check_page_size(opts.pageSize, "deviceJobs") end
  if not ok then return Pager.new(function() return nil, err end) end
  local sql = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '" .. jobId .. "'"
  if opts.status then sql = sql .. " AND devices.jobs.status = '" .. opts.status .. "'" end
  local body = core.json_encode({ query = sql })
  return Pager.query(opts.pageSize or self.cfg.pageSize, function(headers)
    return self.pipeline:send({ operation = "deviceJobs", target = jobId, method = "POST",
      path = { "devices", "query" }, headers = headers, body = body })
  end)
end

local MONITOR_OPTIONS = { interval = "number", timeout = "number", maxInterval = "number",
  onProgress = "function", sleep = "function" }

local function check_monitor_options(opts)
  opts = opts or {}
  check_type(opts, "table", "options")
  for key, value in pairs(opts) do
    local want = MONITOR_OPTIONS[key]
    if not want then errors.misuse("unknown monitor option '" .. tostring(key) .. "'") end
    check_type(value, want, "option '" .. key .. "'")
  end
  if opts.interval and opts.interval <= 0 then errors.misuse("option 'interval' must be positive") end
  if opts.timeout and opts.timeout <= 0 then errors.misuse("option 'timeout' must be positive") end
  return opts
end

local function progress_text(job)
  local s = job.deviceJobStatistics
  if type(s) ~= "table" then return "status " .. tostring(job.status) end
  return ("status %s, %s of %s devices succeeded, %s failed"):format(tostring(job.status),
    tostring(s.succeededCount or 0), tostring(s.deviceCount or 0), tostring(s.failedCount or 0))
end

-- What a monitor that stopped says. decision: "timeout" or "unavailable"; reason: the
-- decision's ("deadline" or "retry-after").
local function monitor_stop(decision, reason, job_id, timeout, last, last_err, errors_in_row)
  local seen = last and ("last seen: " .. progress_text(last)) or "the job was never read"
  local e
  if decision == "timeout" then
    e = errors.new({ kind = "timeout", code = "MonitorTimeout",
      message = ("job did not finish within %g s (%s)"):format(timeout, seen) })
  else
    local why = reason == "retry-after"
      and ("the hub asked to wait %g s (Retry-After) before the next poll, past the monitor's %g s timeout")
        :format(last_err.retryAfter, timeout)
      or ("the hub kept failing until the monitor's %g s timeout (%d poll%s in a row)")
        :format(timeout, errors_in_row, errors_in_row == 1 and "" or "s")
    e = errors.new({ kind = "unavailable", code = "HubUnavailable",
      message = ("hub unavailable: %s; last error: %s; %s"):format(why,
        (tostring(last_err):gsub("^iothub: ", "")), seen) })
    e.lastError = last_err
  end
  e.operation, e.target, e.retryable, e.job = "monitorJob", job_id, true, last
  return e
end

--- Polls a job until it reaches completed, failed or cancelled, yielding every snapshot.
--     for job, err in jobs:watchJob(id, { interval = 2 }) do
--       if not job then error(err) end
--       print(job.status)
--     end
-- Transient errors (throttling, 5xx, network, unreadable answers) back off and keep watching,
-- each next poll waiting at least as long as the failed one's Retry-After; anything else ends
-- the loop with one `false, err` pair. So does the timeout: kind "timeout" (MonitorTimeout)
-- while the job was still unfinished at the last poll, kind "unavailable" (HubUnavailable,
-- err.lastError the hub's last error) when the polls kept failing until the deadline or the
-- hub asked to wait past it.
-- @param[opt] opts { interval = 5, maxInterval = 60, timeout = 3600, sleep = fn }
function JobClient:watchJob(jobId, opts)
  opts = check_monitor_options(opts)
  check_type(jobId, "string", "jobId")
  local clock = self.cfg.clock
  local interval, max_interval = opts.interval or 5, opts.maxInterval or 60
  local timeout = opts.timeout or 3600
  local started = clock.now()
  local polled, finished, errors_in_row = false, false, 0
  local last, start_epoch, last_err
  local pipeline = self.pipeline

  return function()
    if finished then return nil end
    while true do
      if polled then
        local now = clock.now()
        local action, delay, reason = core.monitor_decision({ status = last and last.status, now = now,
          started = started, timeout = timeout, interval = interval, maxInterval = max_interval,
          errors = errors_in_row, retryAfter = errors_in_row > 0 and last_err.retryAfter or nil,
          startTime = start_epoch and (now + start_epoch - clock.time()) or nil })
        if action == "timeout" or action == "unavailable" then
          finished = true
          return false, monitor_stop(action, reason, jobId, timeout, last, last_err, errors_in_row)
        end
        pipeline:sleep(delay, opts.sleep)
      end
      polled = true
      local job, err = self:_get_job(jobId, { retry = false, sleep = opts.sleep })
      if job then
        errors_in_row, last = 0, job
        if type(job.startTime) == "string" then start_epoch = core.parse_time(job.startTime) end
        if core.is_terminal(job.status) then finished = true end
        return job
      end
      if not err.retryable then
        finished = true
        return false, err
      end
      errors_in_row, last_err = errors_in_row + 1, err
    end
  end
end

--- Waits for a job to finish and returns it (completed, failed or cancelled), or nil, err.
-- Works as a plain blocking call, inside an iothub Scheduler task (many monitors at once),
-- or with a caller-supplied `sleep` (cqueues.sleep, ngx.sleep).
-- @param[opt] opts { interval = 5, maxInterval = 60, timeout = 3600, onProgress = fn(job), sleep = fn }
function JobClient:monitorJob(jobId, opts)
  opts = check_monitor_options(opts)
  local on_progress = opts.onProgress
  local watch_opts = {}
  for k, v in pairs(opts) do if k ~= "onProgress" then watch_opts[k] = v end end
  local last
  for job, err in self:watchJob(jobId, watch_opts) do
    if not job then return nil, err end
    last = job
    if on_progress then on_progress(job) end
  end
  return last
end

JobClient.progressText = progress_text

return JobClient
