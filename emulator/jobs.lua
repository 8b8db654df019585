-- Scheduled jobs v2 (hub-behavior.md §2-3): validation, the lifecycle
-- queued -> scheduled -> running -> completed|failed|cancelled driven by ngx.timer,
-- paced per-device execution, device-job rows and live statistics.
local util = require "emulator.util"
local errors = require "emulator.errors"
local registry = require "emulator.registry"
local methods = require "emulator.methods"
local query = require "emulator.query"

local null = util.null
local M = {}

local settings = {
  rate = 50,           -- device operations per second (S3-like pacing)
  queue_delay = 0.2,   -- seconds a new job stays "queued" before it is picked up
  max_active = 0,      -- concurrent queued/scheduled/running jobs; 0 = unlimited
}

local jobs, order = {}, {}

function M.configure(opts)
  for k, v in pairs(opts or {}) do
    if settings[k] ~= nil and v ~= nil then settings[k] = v end
  end
end

function M.reset()
  for _, job in pairs(jobs) do job.status = "cancelled" end -- stops running loops
  jobs, order = {}, {}
end

local ACTIVE = { queued = true, scheduled = true, running = true }
local TYPES = { scheduleDeviceMethod = true, scheduleUpdateTwin = true }

---------------------------------------------------------------------------
-- JSON views

local function stats(job)
  local s = { deviceCount = #job.rows, failedCount = 0, succeededCount = 0, runningCount = 0, pendingCount = 0 }
  for _, row in ipairs(job.rows) do
    local st = row.status
    if st == "completed" then s.succeededCount = s.succeededCount + 1
    elseif st == "failed" then s.failedCount = s.failedCount + 1
    elseif st == "running" then s.runningCount = s.runningCount + 1
    elseif st == "pending" or st == "scheduled" then s.pendingCount = s.pendingCount + 1
    end
  end
  return s
end

local function job_json(job)
  local t = {
    jobId = job.id,
    type = job.type,
    status = job.status,
    queryCondition = job.queryCondition,
    createdTime = util.iso(job.created),
    startTime = util.iso(job.start),
    endTime = job.finished and util.iso(job.finished) or util.END_OF_TIME,
    maxExecutionTimeInSeconds = job.ttl,
    deviceJobStatistics = stats(job),
  }
  if job.type == "scheduleDeviceMethod" then
    t.cloudToDeviceMethod = util.deepcopy(job.method)
  else
    t.updateTwin = util.deepcopy(job.updateTwin)
  end
  if job.failureReason then t.failureReason = job.failureReason end
  if job.statusMessage then t.statusMessage = job.statusMessage end
  return t
end

local END_NOZONE = (util.END_OF_TIME:gsub("Z$", ""))

local function row_json(job, row)
  local t = {
    deviceId = row.deviceId,
    jobId = job.id,
    jobType = job.type,
    status = row.status,
    startTimeUtc = util.iso_nozone(row.started or job.started or job.start),
    endTimeUtc = row.ended and util.iso_nozone(row.ended) or END_NOZONE,
    createdDateTimeUtc = util.iso(row.created),
    lastUpdatedDateTimeUtc = util.iso(row.updated),
    outcome = { deviceMethodResponse = row.outcome or null },
  }
  if row.error then t.error = row.error end
  return t
end

---------------------------------------------------------------------------
-- Engine

local function now()
  return util.now()
end

local function finish(job, status, reason)
  job.status = status
  job.finished = now()
  if reason then
    job.failureReason = reason
    job.statusMessage = reason
  end
  local s = stats(job)
  util.log("hub", string.format("job %s %s: %d device(s), %d succeeded, %d failed%s", job.id, status,
    s.deviceCount, s.succeededCount, s.failedCount, reason and (" (" .. reason .. ")") or ""))
end

local function fail_row(row, code, description)
  row.status = "failed"
  row.error = { code = code, description = description }
  row.ended = now()
  row.updated = row.ended
end

local function execute(job, row)
  local t = now()
  row.status, row.started, row.updated = "running", t, t
  local dev = registry.get(row.deviceId)
  if not dev then
    return fail_row(row, "DeviceNotFound", "Device " .. row.deviceId .. " not found.")
  end
  if job.type == "scheduleDeviceMethod" then
    local res, err = methods.invoke(dev, job.method)
    if not res then
      row.outcome = null
      return fail_row(row, err.name, err.message)
    end
    row.outcome = res
  else
    local ok, err = registry.update_twin(dev.id, job.patch, "*")
    if not ok then return fail_row(row, err.name, err.message) end
  end
  row.status = "completed"
  row.ended = now()
  row.updated = row.ended
end

local function run(premature, job)
  if premature or job.status ~= "queued" and job.status ~= "scheduled" then return end
  job.status = "running"
  job.started = now()
  local plan, perr = query.parse_condition(job.queryCondition)
  if not plan then
    return finish(job, "failed", "SQL query parse failed: " .. perr)
  end
  for _, dev in ipairs(registry.list()) do
    if query.matches(plan, registry.twin_json(dev)) then
      local t = now()
      job.rows[#job.rows + 1] = { deviceId = dev.id, status = "pending", created = t, updated = t }
    end
  end
  util.log("hub", string.format("job %s running on %d device(s)", job.id, #job.rows))
  local deadline = job.start + job.ttl
  local interval = 1 / settings.rate
  for i, row in ipairs(job.rows) do
    if job.status ~= "running" then return end -- cancelled meanwhile
    if ngx and ngx.worker.exiting() then return end
    if now() >= deadline then
      for j = i, #job.rows do
        fail_row(job.rows[j], "JobExecutionTimeExpired",
          "maxExecutionTimeInSeconds elapsed before the job reached the device")
      end
      break
    end
    execute(job, row)
    if i < #job.rows and ngx then ngx.sleep(interval) end
  end
  if job.status == "running" then finish(job, "completed") end
end

local function pick_up(premature, job)
  if premature or job.status ~= "queued" then return end
  local delay = job.start - now()
  if delay > 0 then
    job.status = "scheduled"
    util.log("hub", string.format("job %s scheduled, starts in %.1f s", job.id, delay))
    local ok, err = ngx.timer.at(delay, run, job)
    if not ok then finish(job, "failed", "cannot schedule the job: " .. tostring(err)) end
    return
  end
  run(false, job)
end

---------------------------------------------------------------------------
-- API

local function invalid(msg)
  return nil, errors.new("ArgumentInvalid", msg)
end

-- PUT /jobs/v2/{id}
function M.create(id, body)
  if not util.is_object(body) then return invalid("The job request must be a JSON object.") end
  if body.jobId ~= nil and body.jobId ~= id then
    return invalid("jobId in the body ('" .. tostring(body.jobId) .. "') does not match the URL ('" .. id .. "').")
  end
  if #id == 0 or #id > 64 or id:find("[^%w%-]") then
    return invalid("The jobId must be 1 to 64 characters of US-ASCII letters, numbers and '-'.")
  end
  if not TYPES[body.type] then
    return nil, errors.new("GenericBadRequest", "BadRequest: job type '" .. tostring(body.type)
      .. "' is not valid; use scheduleDeviceMethod or scheduleUpdateTwin.")
  end
  if jobs[id] then
    return nil, errors.new("JobAlreadyExists", "A job with id '" .. id .. "' already exists.")
  end
  local job = { id = id, type = body.type, rows = {} }
  if body.type == "scheduleDeviceMethod" then
    local m, err = methods.validate(body.cloudToDeviceMethod)
    if not m then
      if body.cloudToDeviceMethod == nil then return invalid("cloudToDeviceMethod is required.") end
      return nil, err
    end
    job.method = m
  else
    local patch = body.updateTwin
    if not util.is_object(patch) then return invalid("updateTwin is required.") end
    if patch.etag ~= "*" then
      return invalid("Missing or invalid etag for job type ScheduleUpdateTwin. ScheduleUpdateTwin job type is a "
        .. "force update, which only accepts '*' as the Etag.")
    end
    local parts, err = registry.split_patch(patch)
    if not parts then return nil, err end
    job.updateTwin = util.deepcopy(patch)
    job.patch = { tags = parts.tags, properties = parts.desired and { desired = parts.desired } or nil }
  end
  local cond = body.queryCondition
  if type(cond) ~= "string" or cond:match("^%s*$") then
    return invalid("queryCondition is required (a WHERE clause, or '*' for all devices).")
  end
  if #cond > query.MAX_LENGTH then
    return nil, errors.new("PreconditionFailed", "queryCondition is longer than " .. query.MAX_LENGTH .. " characters.")
  end
  local start = type(body.startTime) == "string" and util.core.parse_time(body.startTime)
  if not start then return invalid("startTime is required as an ISO-8601 date-time.") end
  local ttl = body.maxExecutionTimeInSeconds
  if type(ttl) ~= "number" or ttl % 1 ~= 0 or ttl <= 0 then
    return invalid("maxExecutionTimeInSeconds is required as a positive integer.")
  end
  if settings.max_active > 0 then
    local active = 0
    for _, j in pairs(jobs) do if ACTIVE[j.status] then active = active + 1 end end
    if active >= settings.max_active then
      return nil, errors.new("ThrottlingMaxActiveJobCountExceeded",
        "The maximum number of active jobs (" .. settings.max_active .. ") has been reached.")
    end
  end
  job.queryCondition, job.start, job.ttl = cond, start, ttl
  job.created = now()
  job.status = "queued"
  local ok, err = ngx.timer.at(settings.queue_delay, pick_up, job)
  if not ok then return nil, errors.new("ServerError", "cannot queue the job: " .. tostring(err)) end
  jobs[id] = job
  order[#order + 1] = id
  util.log("hub", "job " .. id .. " (" .. job.type .. ") queued for " .. cond)
  return job_json(job)
end

local function lookup(id)
  local job = jobs[id]
  if not job then return nil, errors.new("JobNotFound", "Job " .. tostring(id) .. " not found.") end
  return job
end

function M.get(id)
  local job, err = lookup(id)
  if not job then return nil, err end
  return job_json(job)
end

-- Cancels a queued/scheduled/running job; finished jobs are returned unchanged.
function M.cancel(id)
  local job, err = lookup(id)
  if not job then return nil, err end
  if ACTIVE[job.status] then
    for _, row in ipairs(job.rows) do
      if row.status == "pending" or row.status == "scheduled" then
        row.status = "canceled" -- device level spells it with one "l"
        row.updated = now()
      end
    end
    finish(job, "cancelled")
  end
  return job_json(job)
end

-- GET /jobs/v2/query: filters match case-insensitively (the .NET SDK sends PascalCase).
function M.list(job_type, job_status)
  job_type = job_type and job_type ~= "" and job_type:lower() or nil
  job_status = job_status and job_status ~= "" and job_status:lower() or nil
  if job_status == "enqueued" then job_status = "queued" end
  local out = {}
  for _, id in ipairs(order) do
    local job = jobs[id]
    if job and (not job_type or job.type:lower() == job_type)
      and (not job_status or job.status == job_status) then
      out[#out + 1] = job_json(job)
    end
  end
  return out
end

-- All device-job rows, for SELECT * FROM devices.jobs.
function M.device_rows()
  local out = {}
  for _, id in ipairs(order) do
    local job = jobs[id]
    for _, row in ipairs(job.rows) do out[#out + 1] = row_json(job, row) end
  end
  return out
end

return M
