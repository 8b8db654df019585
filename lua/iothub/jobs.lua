--- JobClient: schedule, inspect, cancel, list and monitor IoT Hub jobs (jobs/v2).
-- Method names and argument order follow the Node SDK's JobClient so its samples port line
-- by line; every call returns its result or nil, err (see iothub.errors).
-- @classmod iothub.JobClient
local core = require "iothub.core"
local errors = require "iothub.errors"
local Pager = require "iothub.pager"
local job_request = require "iothub.job_request"

local JobClient = {}
JobClient.__index = JobClient

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

--- Checks direct-method parameters and fills the Node SDK's defaults (payload null,
-- responseTimeoutInSeconds 30): iothub.job_request's, kept under the SDK-style name.
function JobClient.methodParams(params, operation, target)
  return job_request.action("method", params, operation or "methodParams", target)
end

--- Normalises a twin patch for a job (top-level `desired` under properties, etag "*") after
-- checking names, values, sizes and depth: iothub.job_request's.
function JobClient.twinPatch(patch, operation, target)
  return job_request.action("twin", patch, operation or "twinPatch", target)
end

-- Is the job the hub holds the one `request` (the decoded body we sent) describes? Same
-- type, condition, start (to the millisecond; the hub echoes 7 fractional digits) and method.
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

-- Builds the request (iothub.job_request: every check) and PUTs it to /jobs/v2/{id}. A
-- retried PUT whose first response was lost can meet its own job and get 409: read the job
-- back and accept it if it is the one we asked for. internal: { activeJobLimitFinal = true }
-- returns a 429004 at once instead of retrying it (a rollout manages job slots itself).
function JobClient:_schedule(op, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds, internal)
  local body, err = job_request.build(op, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds,
    self.cfg.clock.time(), op)
  if not body then return nil, err end
  return self.pipeline:call({
    operation = op, target = jobId, method = "PUT", path = job_request.path(jobId), body = body,
    activeJobLimitFinal = internal and internal.activeJobLimitFinal,
    onConflict = function(conflict)
      local job = self:getJob(jobId)
      if same_job(job, core.json_decode(body)) then return job end
      conflict.message = (conflict.message or "") ..
        " (a different job already has this id; job ids must be unique, e.g. iothub.uuid())"
      return nil, conflict
    end,
  })
end

--- Schedules a job that invokes a direct method on every device matching queryCondition.
-- @param jobId letters, digits and '-' (at most 64)
-- @param queryCondition WHERE clause only, e.g. "deviceId IN ['a','b']" or "*"
-- @param methodParams { methodName=, payload=, responseTimeoutInSeconds=30, connectTimeoutInSeconds= }
-- @param[opt] startTime nil (now), epoch seconds or ISO-8601 string
-- @param[opt] maxExecutionTimeInSeconds default 3600
-- @return the job as the hub answered, or nil, err
function JobClient:scheduleDeviceMethod(jobId, queryCondition, methodParams, startTime, maxExecutionTimeInSeconds)
  return self:_schedule("scheduleDeviceMethod", jobId, queryCondition, methodParams, startTime,
    maxExecutionTimeInSeconds)
end

--- Schedules a job that applies a twin patch (tags and/or desired properties).
-- @param patch { tags=, properties = { desired = } } (etag "*" is added)
-- Other parameters and the result as scheduleDeviceMethod.
function JobClient:scheduleTwinUpdate(jobId, queryCondition, patch, startTime, maxExecutionTimeInSeconds)
  return self:_schedule("scheduleTwinUpdate", jobId, queryCondition, patch, startTime,
    maxExecutionTimeInSeconds)
end

-- getJob with per-call pipeline options (the monitor disables retries and supplies sleep);
-- checked: the id was checked already (a monitor checks it once, not at every poll).
function JobClient:_get_job(jobId, extra, checked)
  if not checked then
    local ok, err = check_job_id(jobId, "getJob")
    if not ok then return nil, err end
  end
  local op = { operation = "getJob", target = jobId, method = "GET", path = job_request.path(jobId) }
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
    path = job_request.path(jobId, true) })
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
  local last, start_text, start_epoch, last_err
  local pipeline = self.pipeline
  local id_ok, id_err = check_job_id(jobId, "getJob")
  local poll_opts = { retry = false, sleep = opts.sleep }

  return function()
    if finished then return nil end
    while true do
      if polled then
        local now = clock.now()
        local action, delay, reason = core.monitor_decision({ status = last and last.status, now = now,
          started = started, timeout = timeout, interval = interval, maxInterval = max_interval,
          errors = errors_in_row, retryAfter = errors_in_row > 0 and last_err.retryAfter or nil,
          startTime = start_epoch and (now + start_epoch - clock.time()) or nil })
        if action == "done" then
          finished = true
          return nil
        end
        if action == "timeout" or action == "unavailable" then
          finished = true
          return false, monitor_stop(action, reason, jobId, timeout, last, last_err, errors_in_row)
        end
        pipeline:sleep(delay, opts.sleep)
      end
      polled = true
      local job, err
      if id_ok then job, err = self:_get_job(jobId, poll_opts, true) else err = id_err end
      if job then
        errors_in_row, last = 0, job
        if type(job.startTime) == "string" and job.startTime ~= start_text then
          start_text, start_epoch = job.startTime, core.parse_time(job.startTime)
        end
        return job -- a terminal one ends the loop at the next call: core.monitor_decision says "done"
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
