-- Scheduled jobs v2 (hub-behavior.md §2-3): validation, the lifecycle
-- queued -> scheduled -> running -> completed|failed|cancelled driven by ngx timers,
-- paced per-device execution, device-job rows kept as ready JSON documents (updated in
-- place, so paging 100,000 of them costs nothing to build), live statistics, the tiers'
-- active-job caps, and the records and import the state store (emulator/store.lua) uses:
-- every change is reported through M.on_change, and a running job's progress is committed
-- through M.commit in batches.
local util = require "emulator.util"
local errors = require "emulator.errors"
local registry = require "emulator.registry"
local methods = require "emulator.methods"
local query = require "emulator.query"

local core = util.core
local null = util.null
local M = {}

-- Concurrent (queued, scheduled or running) jobs per tier (hub-behavior.md §3.9).
M.TIERS = { F1 = 1, S1 = 1, S2 = 5, S3 = 10 }

local settings = {
  rate = 50,           -- device operations per second; 0 = unpaced
  queue_delay = 0.2,   -- seconds a new job stays "queued" before it is picked up
  max_active = 0,      -- explicit cap on active jobs; 0 = the tier's cap, or none
  tier = nil,          -- "F1" | "S1" | "S2" | "S3" | nil
  slice = 0.02,        -- seconds of work between yields to the event loop (bounds request latency)
  parallel = 32,       -- method invocations in flight per job
}

-- Called after every change the state store keeps: fn(job, row) for a device row, fn(job)
-- for the job's own fields (status, times, its target list), fn() when every job changed (a
-- reset or an import).
M.on_change = nil
-- Called by the engine after a batch of device rows, before it lets requests in, so progress
-- is kept in batches (the store commits it): fn() -> true | nil, message. Every response
-- commits too, so nothing a client sees depends on this call.
M.commit = nil

local jobs, order = {}, {}
local all_rows          -- every job's rows in job order; rebuilt after rows are added
local engine_started = false -- timers exist only in the nginx worker (not in init_by_lua)

local ACTIVE = { queued = true, scheduled = true, running = true }
local TERMINAL = { completed = true, failed = true, cancelled = true }
local TYPES = { scheduleDeviceMethod = true, scheduleUpdateTwin = true }
local ROW_STATUSES = { pending = true, scheduled = true, running = true, completed = true, failed = true,
  canceled = true }
local END_NOZONE = (util.END_OF_TIME:gsub("Z$", ""))
local NULL_OUTCOME = { deviceMethodResponse = null } -- shared by every row without a response; never mutated
local STATE_FORMAT = "iothub-emulator-jobs/1"

local function changed(job, row)
  if M.on_change then M.on_change(job, row) end
end

-- How often a paced job's progress is committed at most; an unpaced one commits after every
-- slice, and its slices shrink so that the rows' work plus their commit fit in settings.slice.
local COMMIT_EVERY = 0.02

local function commit_progress()
  if not M.commit then return end
  local ok, err = M.commit()
  if not ok then ngx.log(ngx.ERR, "job progress not saved: ", tostring(err)) end
end

local function active_cap()
  if settings.max_active > 0 then return settings.max_active end
  return settings.tier and M.TIERS[settings.tier] or 0
end

-- opts: rate, queue_delay, max_active, tier (case-insensitive), slice, parallel.
-- Returns true or nil, message (a bad tier or number).
function M.configure(opts)
  opts = opts or {}
  if opts.tier == null then
    settings.tier = nil -- JSON null from the control plane: no tier cap
  elseif opts.tier ~= nil and type(opts.tier) ~= "string" then
    return nil, "tier must be a string (F1, S1, S2 or S3), or null for no tier limit"
  elseif opts.tier ~= nil and opts.tier ~= "" then
    local tier = opts.tier:upper()
    if not M.TIERS[tier] then
      return nil, "unknown tier '" .. tostring(opts.tier) .. "': use F1, S1, S2 or S3"
    end
    settings.tier = tier
  end
  for _, k in ipairs({ "rate", "queue_delay", "max_active", "slice", "parallel" }) do
    local v = opts[k]
    if v ~= nil then
      v = tonumber(v)
      if not v or v < 0 or v ~= v or v == math.huge then
        return nil, k .. " must be a finite number >= 0"
      end
      settings[k] = v
    end
  end
  settings.parallel = math.max(1, math.floor(settings.parallel))
  return true
end

-- The settings as the control plane shows them.
function M.describe_settings()
  return {
    tier = settings.tier or null,
    maxActiveJobs = active_cap(),
    jobRate = settings.rate,
    queueDelaySeconds = settings.queue_delay,
  }
end

---------------------------------------------------------------------------
-- Time stamps

local function stamp(t)
  return util.iso(t or util.now())
end

local function nozone(z)
  return (z:gsub("Z$", ""))
end

---------------------------------------------------------------------------
-- JSON views

local function stats(job)
  local c = job.counts
  return {
    deviceCount = #job.rows,
    failedCount = c.failed,
    succeededCount = c.completed,
    runningCount = c.running,
    pendingCount = c.pending + c.scheduled,
  }
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

---------------------------------------------------------------------------
-- Device rows: each row is the devices.jobs document itself.

local function new_row(job, device_id, created_z, start_nz)
  return {
    deviceId = device_id,
    jobId = job.id,
    jobType = job.type,
    status = "pending",
    startTimeUtc = start_nz,
    endTimeUtc = END_NOZONE,
    createdDateTimeUtc = created_z,
    lastUpdatedDateTimeUtc = created_z,
    outcome = NULL_OUTCOME,
  }
end

local function new_counts()
  return { pending = 0, scheduled = 0, running = 0, completed = 0, failed = 0, canceled = 0 }
end

local function set_row(job, row, status, z)
  local c = job.counts
  c[row.status] = c[row.status] - 1
  c[status] = c[status] + 1
  row.status = status
  row.lastUpdatedDateTimeUtc = z
  changed(job, row)
end

local function end_row(job, row, status, z)
  row.endTimeUtc = nozone(z)
  set_row(job, row, status, z)
end

local function fail_row(job, row, code, description, z)
  row.error = { code = code, description = description }
  end_row(job, row, "failed", z or stamp())
end

-- A row as the state store keeps it, a compact array: { deviceId, status, startTimeUtc,
-- endTimeUtc, createdDateTimeUtc, lastUpdatedDateTimeUtc, deviceMethodResponse, error code,
-- error description }. The documents are rebuilt from it.
function M.row_record(row)
  local dmr = row.outcome.deviceMethodResponse
  local e = row.error
  return util.array({ row.deviceId, row.status, row.startTimeUtc, row.endTimeUtc, row.createdDateTimeUtc,
    row.lastUpdatedDateTimeUtc, dmr, e and e.code or null, e and e.description or null })
end

-- The rows a job has not touched one by one share one state, job.untouched: a row record
-- without its deviceId. It is "pending" once the targets are resolved; a cancel or a timeout
-- ends all such rows at once and says so here. The store saves the target list once and
-- then only rows that differ from it, so a 100,000-device job is not 100,000 inserts up
-- front, nor a cancel 100,000 updates.
local function untouched_state(status, start_nz, end_nz, created_z, updated_z, code, description)
  return util.array({ status, start_nz, end_nz, created_z, updated_z, null, code or null, description or null })
end

local function end_untouched(job, status, z, code, description)
  local u = job.untouched
  if u then job.untouched = untouched_state(status, u[2], nozone(z), u[4], z, code, description) end
end

-- Whether a row is in its job's untouched state (every saved field equal).
function M.row_is_untouched(job, row)
  local u = job.untouched
  if not u or row.outcome ~= NULL_OUTCOME then return false end
  local e = row.error
  return row.status == u[1] and row.startTimeUtc == u[2] and row.endTimeUtc == u[3]
    and row.createdDateTimeUtc == u[4] and row.lastUpdatedDateTimeUtc == u[5]
    and (e and e.code or null) == u[7] and (e and e.description or null) == u[8]
end

local function install_rows(job, rows, created_z, start_nz)
  job.rows = rows
  job.counts = new_counts()
  job.counts.pending = #rows
  job.next_row = 1
  job.resolved = true
  job.untouched = untouched_state("pending", start_nz, END_NOZONE, created_z, created_z)
  all_rows = nil
  changed(job)
end

---------------------------------------------------------------------------
-- Engine

local function exiting()
  return ngx.worker.exiting()
end

-- Lets the event loop serve requests. Never ngx.sleep(0): without OpenResty's nginx patch
-- that is a 0 ms timer which nginx expires again in the same loop, starving all I/O.
local YIELD = 0.001
local function pause()
  ngx.sleep(YIELD)
end

local function finish(job, status, reason)
  job.status = status
  job.finished = util.now()
  job.gen = job.gen + 1 -- any armed timer becomes a no-op
  if reason then
    job.failureReason = reason
    job.statusMessage = reason
  end
  changed(job)
  local s = stats(job)
  util.log("hub", string.format("job %s %s: %d device(s), %d succeeded, %d failed%s", job.id, status,
    s.deviceCount, s.succeededCount, s.failedCount, reason and (" (" .. reason .. ")") or ""))
end

-- The TTL runs from startTime, or from the actual start when the job began late (a
-- startTime in the past, e.g. after the clock was advanced) [inf].
local function deadline_of(job)
  return math.max(job.start, job.started or job.start) + job.ttl
end

-- Runs fn(job) after delay seconds unless the job has moved on (each arm supersedes the last).
local function arm(job, delay, fn)
  job.gen = job.gen + 1
  local gen = job.gen
  return ngx.timer.at(math.max(0, delay), function(premature)
    if premature or job.gen ~= gen or jobs[job.id] ~= job then return end
    local ok, err = xpcall(fn, debug.traceback, job)
    if not ok then
      ngx.log(ngx.ERR, "job ", job.id, ": ", err)
      if ACTIVE[job.status] then finish(job, "failed", "emulator internal error: " .. tostring(err):match("^[^\n]*")) end
    end
  end)
end

local function execute_twin(job, row)
  local dev = registry.get(row.deviceId)
  local z = stamp()
  row.startTimeUtc = nozone(z)
  if not dev then return fail_row(job, row, "DeviceNotFound", "Device " .. row.deviceId .. " not found.") end
  local ok, err = registry.update_twin(dev.id, job.patch, "*")
  if not ok then return fail_row(job, row, err.name, err.message) end
  end_row(job, row, "completed", stamp())
end

-- A device that is offline gets connectTimeoutInSeconds (bounded by the job's TTL) to
-- connect; the row is "scheduled" meanwhile.
local function execute_method(job, row)
  local dev = registry.get(row.deviceId)
  if not dev then return fail_row(job, row, "DeviceNotFound", "Device " .. row.deviceId .. " not found.") end
  local wait = job.method.connectTimeoutInSeconds or 0
  if wait > 0 and not registry.is_connected(dev) then
    set_row(job, row, "scheduled", stamp())
    local limit = math.min(util.now() + wait, deadline_of(job))
    while row.status == "scheduled" and job.status == "running" and util.now() < limit and not exiting() do
      ngx.sleep(0.05)
      dev = registry.get(row.deviceId)
      if not dev or registry.is_connected(dev) then break end
    end
    if row.status ~= "scheduled" or exiting() then return end -- cancelled, or shutting down
    if not dev then return fail_row(job, row, "DeviceNotFound", "Device " .. row.deviceId .. " not found.") end
  end
  local z = stamp()
  row.startTimeUtc = nozone(z)
  set_row(job, row, "running", z)
  local res, err = methods.invoke(dev, job.method, { connect_wait = false }) -- waited above, within the TTL
  if not res then return fail_row(job, row, err.name, err.message) end
  row.outcome = { deviceMethodResponse = res }
  end_row(job, row, "completed", stamp())
end

-- Rows not reached before the deadline fail; rows in flight finish on their own.
local function expire(job)
  local rows = job.rows
  local z = stamp()
  local code, description = "JobExecutionTimeExpired", "maxExecutionTimeInSeconds elapsed before the job reached the device"
  end_untouched(job, "failed", z, code, description)
  for i = job.next_row, #rows do
    local row = rows[i]
    if row.status == "pending" then fail_row(job, row, code, description, z) end
  end
  job.next_row = #rows + 1
end

-- Pacing: rows released so far = rows at the last (re)base + rate * elapsed real seconds.
local function new_pacer(job)
  return { rate = settings.rate, base = job.next_row - 1, t = core.monotime() }
end

local function released(pacer, job)
  local n = #job.rows
  if settings.rate ~= pacer.rate then -- changed through the control plane: rebase
    pacer.rate, pacer.base, pacer.t = settings.rate, job.next_row - 1, core.monotime()
  end
  if pacer.rate <= 0 then return n end
  return math.min(n, pacer.base + 1 + math.floor((core.monotime() - pacer.t) * pacer.rate))
end

local function tick(pacer)
  if pacer.rate <= 0 then return YIELD end
  return math.max(YIELD, math.min(0.05, 1 / pacer.rate))
end

local function method_worker(job, pacer)
  local rows = job.rows
  while job.status == "running" and not exiting() do
    local i = job.next_row
    if i > #rows then return end
    if i <= job.released then
      job.next_row = i + 1
      local row = rows[i]
      if row.status == "pending" then
        job.inflight = job.inflight + 1
        local ok, err = pcall(execute_method, job, row)
        job.inflight = job.inflight - 1
        if not ok then
          ngx.log(ngx.ERR, "job ", job.id, " device ", row.deviceId, ": ", err)
          if row.status == "running" or row.status == "pending" or row.status == "scheduled" then
            fail_row(job, row, "ServerError", "Emulator internal error while invoking the method.")
          end
        end
      end
    else
      ngx.sleep(tick(pacer))
    end
  end
end

-- Runs the job's rows until all are done, the job is cancelled, its TTL passes or nginx exits.
local function drive(job)
  local rows = job.rows
  local pacer = new_pacer(job)
  local workers = {}
  local by_workers = job.type == "scheduleDeviceMethod" -- invocations may wait: run them side by side
  job.inflight = 0
  job.released = released(pacer, job)
  local committed = core.monotime()
  local budget = 0.001 -- seconds of row work in a slice: grows to fit (a first big commit would stall requests)
  if by_workers then
    for i = 1, math.min(settings.parallel, #rows - job.next_row + 1) do
      workers[i] = ngx.thread.spawn(method_worker, job, pacer)
    end
  end
  while job.status == "running" do
    if exiting() then return end -- saved as running; resumes at the next start
    if util.now() >= deadline_of(job) then
      expire(job)
      break
    end
    job.released = released(pacer, job)
    local slice_start, cut = core.monotime(), false
    if not by_workers then
      local slice_end = slice_start + budget
      local limit = job.released
      while job.next_row <= limit do
        local row = rows[job.next_row]
        job.next_row = job.next_row + 1
        if row.status == "pending" then execute_twin(job, row) end
        if job.next_row % 16 == 0 and core.monotime() > slice_end then
          cut = true
          break
        end
      end
    end
    if job.next_row > #rows and job.inflight == 0 then break end
    if cut or core.monotime() - committed >= COMMIT_EVERY then
      commit_progress() -- the batch of rows done since the last one, before requests see them
      committed = core.monotime()
      if cut then
        local fit = settings.slice / (committed - slice_start) -- grows at most twofold: one quick commit is no trend
        budget = math.max(0.001, math.min(settings.slice, budget * math.min(2, fit)))
      end
    end
    ngx.sleep(tick(pacer))
  end
  for _, th in ipairs(workers) do ngx.thread.wait(th) end
  if exiting() then return end
  if job.status == "running" then finish(job, "completed") end
  commit_progress()
end

-- Resolves the targets from the queryCondition against the twins as they are now.
local function resolve_targets(job, created_z, start_nz)
  local plan, perr = query.parse_condition(job.queryCondition)
  if not plan then return nil, "SQL query parse failed: " .. perr end
  local rows = {}
  local slice_end = core.monotime() + settings.slice
  for i, dev in ipairs(registry.list()) do
    if query.matches(plan, registry.twin_doc(dev)) then rows[#rows + 1] = new_row(job, dev.id, created_z, start_nz) end
    if i % 256 == 0 and core.monotime() > slice_end then
      pause() -- let requests in on a large fleet
      if job.status ~= "running" then return nil end
      slice_end = core.monotime() + settings.slice
    end
  end
  return rows
end

local function run(job)
  job.status = "running"
  job.started = util.now()
  changed(job)
  local created_z, start_nz = stamp(), nozone(stamp(job.started))
  local rows, err = resolve_targets(job, created_z, start_nz)
  if job.status ~= "running" then return end -- cancelled while resolving
  if not rows then return finish(job, "failed", err) end
  install_rows(job, rows, created_z, start_nz)
  util.log("hub", string.format("job %s running on %d device(s)", job.id, #rows))
  drive(job)
end

local function start_due(job)
  if job.status == "scheduled" then run(job) end
end

local function pick_up(job)
  if job.status ~= "queued" then return end
  local delay = job.start - util.now()
  if delay > 0 then
    job.status = "scheduled"
    changed(job)
    util.log("hub", string.format("job %s scheduled, starts in %.1f s", job.id, delay))
    local ok, err = arm(job, delay, start_due)
    if not ok then finish(job, "failed", "cannot schedule the job: " .. tostring(err)) end
    return
  end
  run(job)
end

-- A job found running after a restart continues with its unfinished rows.
local function resume(job)
  if job.status ~= "running" then return end
  if not job.resolved then return run(job) end
  local left = job.counts.pending
  util.log("hub", string.format("job %s resumed after a restart: %d of %d device(s) left", job.id, left, #job.rows))
  drive(job)
end

-- Re-arms scheduled jobs after the clock moved, so they start at the new "now".
util.on_clock_change(function()
  if not engine_started then return end
  for _, id in ipairs(order) do
    local job = jobs[id]
    if job.status == "scheduled" then arm(job, job.start - util.now(), start_due) end
  end
end)

local launch_settings -- the settings at start-up, restored by M.reset

-- Arms the timers of restored jobs; called once in the nginx worker (init_worker_by_lua).
function M.start_engine()
  engine_started = true
  launch_settings = util.deepcopy(settings)
  for _, id in ipairs(order) do
    local job = jobs[id]
    if job.status == "queued" then
      arm(job, settings.queue_delay, pick_up)
    elseif job.status == "scheduled" then
      arm(job, job.start - util.now(), start_due)
    elseif job.status == "running" then
      arm(job, 0, resume)
    end
  end
end

function M.reset()
  for _, job in pairs(jobs) do
    job.status = "cancelled" -- stops running loops
    job.gen = job.gen + 1
  end
  jobs, order, all_rows = {}, {}, nil
  if launch_settings then settings = util.deepcopy(launch_settings) end
  changed()
end

---------------------------------------------------------------------------
-- API

local function invalid(msg)
  return nil, errors.new("ArgumentInvalid", msg)
end

local function count_active()
  local n = 0
  for _, j in pairs(jobs) do
    if ACTIVE[j.status] then n = n + 1 end
  end
  return n
end

-- Splits a validated updateTwin into the patch registry.update_twin applies.
local function twin_patch(update)
  local parts, err = registry.split_patch(update)
  if not parts then return nil, err end
  return { tags = parts.tags, properties = parts.desired and { desired = parts.desired } or nil }
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
  local job = { id = id, type = body.type, rows = {}, counts = new_counts(), next_row = 1, gen = 0, inflight = 0 }
  if body.type == "scheduleDeviceMethod" then
    if body.cloudToDeviceMethod == nil then return invalid("cloudToDeviceMethod is required.") end
    local m, err = methods.validate(body.cloudToDeviceMethod)
    if not m then return nil, err end
    job.method = m
  else
    local update = body.updateTwin
    if not util.is_object(update) then return invalid("updateTwin is required.") end
    if update.etag ~= "*" then
      return nil, errors.new("PreconditionFailed", "The etag in the request does not match the etag of the "
        .. "existing resource: a scheduleUpdateTwin job is a forced update and accepts only '*' as updateTwin.etag.")
    end
    local patch, err = twin_patch(update)
    if not patch then return nil, err end
    job.updateTwin = util.deepcopy(update)
    job.patch = patch
  end
  local cond = body.queryCondition
  if type(cond) ~= "string" or cond:match("^%s*$") then
    return invalid("queryCondition is required (a WHERE clause, or '*' for all devices).")
  end
  if #cond > query.MAX_LENGTH then
    return nil, errors.new("PreconditionFailed", "queryCondition is longer than " .. query.MAX_LENGTH .. " characters.")
  end
  local start = type(body.startTime) == "string" and core.parse_time(body.startTime)
  if not start then return invalid("startTime is required as an ISO-8601 date-time.") end
  local ttl = body.maxExecutionTimeInSeconds
  if type(ttl) ~= "number" or ttl % 1 ~= 0 or ttl <= 0 then
    return invalid("maxExecutionTimeInSeconds is required as a positive integer.")
  end
  local cap = active_cap()
  if cap > 0 and count_active() >= cap then
    return nil, errors.new("ThrottlingMaxActiveJobCountExceeded",
      "The maximum number of active jobs (" .. cap .. (settings.tier and (", tier " .. settings.tier) or "")
      .. ") has been reached; retry when a job has finished or cancel one.")
  end
  job.queryCondition, job.start, job.ttl = cond, start, ttl
  job.created = util.now()
  job.status = "queued"
  local ok, err = arm(job, settings.queue_delay, pick_up)
  if not ok then return nil, errors.new("ServerError", "cannot queue the job: " .. tostring(err)) end
  jobs[id] = job
  order[#order + 1] = id
  changed(job)
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
    local z = stamp()
    end_untouched(job, "canceled", z)
    for _, row in ipairs(job.rows) do
      if row.status == "pending" or row.status == "scheduled" then
        end_row(job, row, "canceled", z) -- device level spells it with one "l"
      end
    end
    finish(job, "cancelled")
  end
  return job_json(job)
end

-- GET /jobs/v2/query: filters match case-insensitively (the .NET SDK sends PascalCase).
-- Jobs are listed in creation order.
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

-- Device-job rows for SELECT * FROM devices.jobs: the live documents themselves, in job
-- order then target order. READ-ONLY for callers. With job_id, only that job's rows
-- (an empty list for an unknown job). Both calls are O(1) except the first call after a
-- job resolved its targets, which concatenates once.
local EMPTY = {}
function M.device_rows(job_id)
  if job_id ~= nil then
    local job = jobs[job_id]
    return job and job.rows or EMPTY
  end
  if not all_rows then
    all_rows = {}
    local n = 0
    for _, id in ipairs(order) do
      for _, row in ipairs(jobs[id].rows) do
        n = n + 1
        all_rows[n] = row
      end
    end
  end
  return all_rows
end

---------------------------------------------------------------------------
-- Saved state (emulator/store.lua): job records, row records (M.row_record), and the import
-- of both.

M.STATE_FORMAT = STATE_FORMAT

-- Jobs in creation order: the live objects, READ-ONLY for callers (the store reads their
-- fields through M.job_record and their rows through M.row_record).
function M.jobs_in_order()
  local list = {}
  for i, id in ipairs(order) do list[i] = jobs[id] end
  return list
end

-- A job without its rows, as a plain table (the rows' shared state included).
function M.job_record(job)
  return {
    jobId = job.id, type = job.type, status = job.status, queryCondition = job.queryCondition,
    start = job.start, ttl = job.ttl, created = job.created, started = job.started, finished = job.finished,
    cloudToDeviceMethod = job.method, updateTwin = job.updateTwin,
    failureReason = job.failureReason, statusMessage = job.statusMessage,
    resolved = job.resolved or false, untouched = job.untouched,
  }
end

local function import_job(t, where)
  local function bad(msg) return nil, where .. ": " .. msg end
  if type(t) ~= "table" then return bad("not an object") end
  if type(t.jobId) ~= "string" or t.jobId == "" then return bad("jobId is missing") end
  where = where .. " (job '" .. t.jobId .. "')"
  if not TYPES[t.type] then return bad("unknown type '" .. tostring(t.type) .. "'") end
  if not (ACTIVE[t.status] or TERMINAL[t.status]) then return bad("unknown status '" .. tostring(t.status) .. "'") end
  for _, k in ipairs({ "start", "ttl", "created" }) do
    if type(t[k]) ~= "number" then return bad(k .. " is not a number") end
  end
  local job = {
    id = t.jobId, type = t.type, status = t.status, queryCondition = t.queryCondition,
    start = t.start, ttl = t.ttl, created = t.created,
    started = type(t.started) == "number" and t.started or nil,
    finished = type(t.finished) == "number" and t.finished or nil,
    failureReason = type(t.failureReason) == "string" and t.failureReason or nil,
    statusMessage = type(t.statusMessage) == "string" and t.statusMessage or nil,
    resolved = t.resolved == true, gen = 0, inflight = 0, counts = new_counts(), rows = {}, next_row = 1,
  }
  if type(job.queryCondition) ~= "string" then return bad("queryCondition is missing") end
  local u = t.untouched
  if u ~= nil and u ~= null then
    if type(u) ~= "table" or not ROW_STATUSES[u[1]] or type(u[2]) ~= "string" or type(u[4]) ~= "string" then
      return bad("untouched is malformed")
    end
    job.untouched = u
  end
  if job.type == "scheduleDeviceMethod" then
    local m, err = methods.validate(t.cloudToDeviceMethod)
    if not m then return bad("cloudToDeviceMethod: " .. tostring(err)) end
    job.method = m
  else
    if not util.is_object(t.updateTwin) then return bad("updateTwin is missing") end
    local patch, err = twin_patch(t.updateTwin)
    if not patch then return bad("updateTwin: " .. tostring(err)) end
    job.updateTwin, job.patch = t.updateTwin, patch
  end
  local rows = type(t.rows) == "table" and t.rows or {}
  local first_pending
  for i, r in ipairs(rows) do
    if type(r) ~= "table" or type(r[1]) ~= "string" or not ROW_STATUSES[r[2]] then
      return bad("device row " .. i .. " is malformed")
    end
    local row = new_row(job, r[1], r[5], r[3])
    row.status, row.endTimeUtc, row.lastUpdatedDateTimeUtc = r[2], r[4], r[6]
    if r[7] ~= nil and r[7] ~= null then row.outcome = { deviceMethodResponse = r[7] } end
    if type(r[8]) == "string" then row.error = { code = r[8], description = tostring(r[9]) } end
    -- a row in flight at shutdown is run again when the job resumes
    if job.status == "running" and (row.status == "running" or row.status == "scheduled") then
      row.status = "pending"
    end
    if row.status == "pending" and not first_pending then first_pending = i end
    job.counts[row.status] = job.counts[row.status] + 1
    job.rows[i] = row
  end
  job.next_row = first_pending or (#job.rows + 1)
  return job
end

-- Replaces all jobs with the saved state t = { format, clockOffset, jobs = { M.job_record(job)
-- plus rows = { M.row_record(row)... } } }; returns true or nil, message.
function M.import_state(t)
  if type(t) ~= "table" or t.format ~= STATE_FORMAT then
    return nil, "not a jobs state file (format '" .. tostring(type(t) == "table" and t.format) .. "', expected '"
      .. STATE_FORMAT .. "')"
  end
  local new_jobs, new_order = {}, {}
  for i, jt in ipairs(type(t.jobs) == "table" and t.jobs or {}) do
    local job, err = import_job(jt, "job #" .. i)
    if not job then return nil, err end
    if new_jobs[job.id] then return nil, "job #" .. i .. ": duplicate jobId '" .. job.id .. "'" end
    new_jobs[job.id] = job
    new_order[#new_order + 1] = job.id
  end
  for _, job in pairs(jobs) do job.gen = job.gen + 1 end
  jobs, order, all_rows = new_jobs, new_order, nil
  util.set_clock_offset(tonumber(t.clockOffset) or 0)
  return true
end

-- Counts for the control plane and the start-up log line.
function M.summary()
  local n, active = 0, 0
  for _, job in pairs(jobs) do
    n = n + 1
    if ACTIVE[job.status] then active = active + 1 end
  end
  return { jobs = n, active = active }
end

return M
