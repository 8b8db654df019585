--- Runs job definitions (iothub.definitions) beyond what one service call does:
--   * device lists too long for one queryCondition are split into several jobs, run within
--     the hub's active-job limit (learnt from 429004 ThrottlingMaxActiveJobCountExceeded, or
--     given), and reported as one aggregated progress;
--   * staged rollouts: each stage reaches a cumulative count or percent of the targets, in a
--     deterministic order, and its gate (minSuccessRatio, maxFailures) must hold before the
--     next stage starts;
--   * resuming: every job id is derived from the job's name, content hash, stage and chunk,
--     so a re-run adopts the jobs an interrupted run created instead of creating them twice.
--
--     local r = Rollout.new{ jobs = jobClient, registry = registry, onProgress = print_view }
--     local plan = assert(r:plan(defs))     -- reads only: counts, request bodies, existing jobs
--     local result = assert(r:run(defs))    -- result.status: "succeeded" | "completed_with_failures"
--                                           --   | "gate_failed" | "job_failed"
-- @module iothub.rollout
local core = require "iothub.core"
local errors = require "iothub.errors"
local job_request = require "iothub.job_request"
local Scheduler = require "iothub.scheduler"
local definitions = require "iothub.definitions"

local Rollout = {}
Rollout.__index = Rollout

--- The service refuses longer queryConditions (hub-behavior.md §1.4).
Rollout.MAX_CONDITION_LENGTH = 8192
local TYPES = { method = "scheduleDeviceMethod", twin = "scheduleUpdateTwin" }
local ID_PAGE_SIZE = 1000

---------------------------------------------------------------------------
-- Targets, stages and chunks (pure functions)

--- A device id as a query string literal.
function Rollout.quote(id)
  return "'" .. id:gsub("\\", "\\\\"):gsub("'", "\\'") .. "'"
end

--- The queryCondition that targets exactly these devices.
function Rollout.condition_for(ids)
  local quoted = {}
  for i, id in ipairs(ids) do quoted[i] = Rollout.quote(id) end
  return "deviceId IN [" .. table.concat(quoted, ",") .. "]"
end

--- Splits ids into lists whose condition_for() fits in max_length characters.
function Rollout.chunk(ids, max_length)
  max_length = max_length or Rollout.MAX_CONDITION_LENGTH
  local fixed = #"deviceId IN []"
  local chunks, current, length = {}, {}, fixed
  for _, id in ipairs(ids) do
    local size = #Rollout.quote(id) + (#current > 0 and 1 or 0)
    if #current > 0 and length + size > max_length then
      chunks[#chunks + 1] = current
      current, length, size = {}, fixed, size - 1
    end
    if fixed + size > max_length then
      error("max condition length " .. max_length .. " cannot hold even one device id", 2)
    end
    current[#current + 1] = id
    length = length + size
  end
  if #current > 0 then chunks[#chunks + 1] = current end
  return chunks
end

local function hex(s)
  return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

--- The targets in rollout order: by a stable hash of (job name, device id), so stages are
-- a spread of the fleet (not, say, the first building in id order) and the same on every run.
function Rollout.order(name, ids)
  local keyed = {}
  for i, id in ipairs(ids) do keyed[i] = { key = hex(core.hmac_sha256(name, id)), id = id } end
  table.sort(keyed, function(a, b)
    if a.key ~= b.key then return a.key < b.key end
    return a.id < b.id
  end)
  local out = {}
  for i, k in ipairs(keyed) do out[i] = k.id end
  return out
end

--- Splits ordered targets into stages: stage k ends at its cumulative count, or at
-- ceil(percent * n / 100). Returns { { stage=, ids= } ... } and how many targets no stage reaches.
function Rollout.split(stages, ordered)
  local n, previous, out = #ordered, 0, {}
  for _, stage in ipairs(stages) do
    local last = stage.count and math.min(stage.count, n) or math.min(n, math.ceil(stage.percent * n / 100 - 1e-9))
    if last < previous then last = previous end
    local ids = {}
    for i = previous + 1, last do ids[#ids + 1] = ordered[i] end
    out[#out + 1] = { stage = stage, ids = ids }
    previous = last
  end
  return out, n - previous
end

--- The id of one job of a definition: name, content hash, then stage and chunk numbers
-- where the definition has stages or a device list.
function Rollout.job_id(job, stage_index, chunk_index)
  local id = job.name .. "-" .. job.hash
  if job.stages then id = id .. "-s" .. stage_index end
  if job.devices or job.stages then id = id .. "-c" .. chunk_index end
  return id
end

---------------------------------------------------------------------------
-- Construction

--- opts: jobs (JobClient), registry (Registry, for counting and query targets),
-- create (JobClient used for job PUTs, default jobs: its retry policy retries them, except a
-- 429004, which is handled here at once),
-- maxActiveJobs (default: learnt from 429004), maxConditionLength, interval (poll, 2 s),
-- timeout (per job watch, default none), onProgress(view), onEvent(text, kind),
-- sleep (how the loop blocks; give one that returns to Lua often so Ctrl-C is prompt),
-- tick (seconds between progress refreshes, 0.5), clock ({ now, time }).
function Rollout.new(opts)
  opts = opts or {}
  if type(opts.jobs) ~= "table" then error("Rollout.new: opts.jobs must be a JobClient", 2) end
  local self = setmetatable({
    jobs = opts.jobs, registry = opts.registry, creator = opts.create or opts.jobs,
    maxActiveJobs = opts.maxActiveJobs, maxConditionLength = opts.maxConditionLength or Rollout.MAX_CONDITION_LENGTH,
    interval = opts.interval or 2, timeout = opts.timeout or 1e9,
    onProgress = opts.onProgress, onEvent = opts.onEvent,
    sleep = opts.sleep, tick = opts.tick or 0.5,
    now = opts.clock and opts.clock.now or core.monotime,
    time = opts.clock and opts.clock.time or core.time,
    features = {},
    known = {}, -- every unit (job) this rollout created, adopted or watched, in order
  }, Rollout)
  return self
end

--- The ids of the jobs this rollout created, adopted or watched that had not finished when
-- last seen (after an interruption: what keeps running on the hub).
function Rollout:unfinished()
  local out = {}
  for _, u in ipairs(self.known) do
    if not (u.job and core.is_terminal(u.job.status)) then out[#out + 1] = u.jobId end
  end
  return out
end

function Rollout:_event(text, kind)
  if self.onEvent then self.onEvent(text, kind or "info") end
end

---------------------------------------------------------------------------
-- Reading the fleet

-- The SELECT around a condition counts towards the hub's query limit (hub-behavior.md §1.4),
-- so a condition that fills a job's 8192 characters cannot be queried as it is.
local COUNT_SELECT = "COUNT() AS n"
local function with_where(select_list, condition)
  local query = condition == "*" and ("SELECT " .. select_list .. " FROM devices") or
    ("SELECT " .. select_list .. " FROM devices WHERE " .. condition)
  if #query > core.query_max_length then
    return nil, errors.new({ kind = "invalid_argument", code = "QueryTooLong", operation = "queryTwins",
      message = ("SELECT %s FROM devices WHERE <the condition> would be %d characters long; IoT Hub accepts " ..
        "at most %d"):format(select_list, #query, core.query_max_length) })
  end
  return query
end

--- The longest condition Rollout:count can query (and device lists are counted in parts
-- whose condition fits it).
Rollout.MAX_COUNTED_CONDITION_LENGTH = core.query_max_length - #with_where(COUNT_SELECT, "")

local function unsupported(err)
  return err and err.status == 400
end

--- The ids of the devices matching condition now (a projection if the hub supports it,
-- else every twin, one page at a time). A condition too long to query is refused before
-- anything is sent (err.code "QueryTooLong").
function Rollout:device_ids(condition)
  if not self.registry then error("Rollout: a registry is needed to resolve query targets", 2) end
  local function collect(select_list)
    local query, qerr = with_where(select_list, condition)
    if not query then return nil, qerr end
    local ids = {}
    for row, err in self.registry:queryTwins(query, { pageSize = ID_PAGE_SIZE }) do
      if not row then return nil, err end
      ids[#ids + 1] = row.deviceId or row.DeviceId
    end
    return ids
  end
  if self.features.projection ~= false then
    local ids, err = collect("deviceId")
    if ids then self.features.projection = true return ids end
    if not unsupported(err) or self.features.projection then return nil, err end
    self.features.projection = false
  end
  return collect("*")
end

--- How many devices match condition now (COUNT() if the hub supports it, else counted ids).
-- A condition longer than MAX_COUNTED_CONDITION_LENGTH is refused before anything is sent
-- (err.code "QueryTooLong"); count_ids counts a device list of any length.
function Rollout:count(condition)
  if not self.registry then error("Rollout: a registry is needed to count targets", 2) end
  if self.features.count ~= false then
    local query, qerr = with_where(COUNT_SELECT, condition)
    if not query then return nil, qerr end
    local rows, err = self.registry:queryTwins(query):all()
    if rows then
      local n = rows[1] and tonumber(rows[1].n)
      if n then self.features.count = true return math.floor(n) end
      err = errors.new({ kind = "protocol", code = "InvalidResponse", message = "COUNT() query returned no number" })
    end
    if not unsupported(err) or self.features.count then return nil, err end
    self.features.count = false
  end
  local ids, err = self:device_ids(condition)
  if not ids then return nil, err end
  return #ids
end

--- How many of these device ids exist now, counted in parts whose query fits the hub's limit.
function Rollout:count_ids(ids)
  local total = 0
  for _, part in ipairs(Rollout.chunk(ids, Rollout.MAX_COUNTED_CONDITION_LENGTH)) do
    local n, err = self:count(Rollout.condition_for(part))
    if not n then return nil, err end
    total = total + n
  end
  return total
end

--- The stages and chunks of one job definition, with their job ids and conditions.
-- Query targets of a staged job are listed now (stages need the devices by name).
-- Returns { job=, stages = { { index=, name=, gate=, ids=, chunks = { { jobId=, condition=, ids= } } } },
-- targets = n|nil, uncovered = n } or nil, err.
function Rollout:resolve(job)
  local resolved = { job = job, stages = {}, uncovered = 0 }
  if not job.stages and job.query then
    resolved.stages[1] = { index = 1, chunks = { { jobId = Rollout.job_id(job, 1, 1), condition = job.query } } }
    return resolved
  end
  local targets = job.devices
  if not targets then
    local err
    targets, err = self:device_ids(job.query)
    if not targets then return nil, err end
    table.sort(targets)
  end
  resolved.targets = #targets
  local splits
  if job.stages then
    splits, resolved.uncovered = Rollout.split(job.stages, Rollout.order(job.name, targets))
  else
    splits = { { stage = { index = 1 }, ids = targets } }
  end
  for k, split in ipairs(splits) do
    local stage = { index = k, name = split.stage.name, gate = split.stage.gate, count = split.stage.count,
      percent = split.stage.percent, ids = split.ids, chunks = {} }
    for c, ids in ipairs(Rollout.chunk(split.ids, self.maxConditionLength)) do
      stage.chunks[c] = { jobId = Rollout.job_id(job, k, c), condition = Rollout.condition_for(ids), ids = ids }
    end
    resolved.stages[k] = stage
  end
  return resolved
end

-- Schedules chunk's job through client, whose retry policy retries everything transient but
-- the hub's active-job limit (429004): that comes back at once, for _run_units to wait for a
-- free slot.
local function schedule(client, job, chunk, start)
  if job.type == "method" then
    return client:_schedule("scheduleDeviceMethod", chunk.jobId, chunk.condition, job.methodParams, start, job.ttl,
      { activeJobLimitFinal = true })
  end
  return client:_schedule("scheduleTwinUpdate", chunk.jobId, chunk.condition, job.patch, start, job.ttl,
    { activeJobLimitFinal = true })
end

--- What running `defs` would do, without changing anything: per job and stage, the device
-- counts now, each request exactly as it would be sent, and any job already created (which
-- a run adopts). Returns { jobs = { { job=, targets=, uncovered=, stages = { { ...,
-- requests = { { jobId=, method=, path=, body=, condition=, devices=, existing= } } } } } } }
-- or nil, err. devices (per request and the job's total) is nil, and request.uncounted says
-- why, when a query condition is too long to count. Sends only reads (twin queries and job GETs).
function Rollout:plan(defs, only)
  local now = self.time()
  local out = { file = defs.file, jobs = {} }
  for _, job in ipairs(defs.jobs) do
    if not only or only[job.name] then
      local resolved, err = self:resolve(job)
      if not resolved then return nil, err end
      local entry = { job = job, stages = resolved.stages, uncovered = resolved.uncovered, targets = resolved.targets }
      local total = 0
      for k, stage in ipairs(resolved.stages) do
        stage.requests = {}
        local start = k == 1 and definitions.resolve_start(job.start, now) or nil
        for _, chunk in ipairs(stage.chunks) do
          local body, berr = job_request.build(job.type, chunk.jobId, chunk.condition,
            job.type == "method" and job.methodParams or job.patch, start, job.ttl, now)
          if not body then return nil, berr end
          -- A listed chunk is counted by its ids; a query target too long to wrap in a
          -- counting query is shown uncounted rather than sent and refused.
          local n, cerr
          if chunk.ids then n, cerr = self:count_ids(chunk.ids) else n, cerr = self:count(chunk.condition) end
          local uncounted
          if not n then
            if cerr.code ~= "QueryTooLong" then return nil, cerr end
            uncounted, total = cerr.message, nil
          elseif total then
            total = total + n
          end
          local existing, gerr = self.jobs:getJob(chunk.jobId)
          if not existing and gerr.code ~= "JobNotFound" then return nil, gerr end
          stage.requests[#stage.requests + 1] = { jobId = chunk.jobId, method = "PUT",
            path = job_request.path_text(chunk.jobId), body = body, condition = chunk.condition,
            listed = chunk.ids and #chunk.ids or nil, devices = n, uncounted = uncounted, existing = existing or nil }
        end
      end
      entry.devices = total
      out.jobs[#out.jobs + 1] = entry
    end
  end
  return out
end

---------------------------------------------------------------------------
-- Running jobs: one Scheduler task per job, a ticker for progress, and a shared slot count

local function is_interrupt(e)
  return type(e) == "string" and e:find("interrupted!", 1, true) ~= nil
end

local TERMINAL_ORDER = { failed = 3, cancelled = 2, completed = 1 }

-- Sums the statistics of the jobs in units; units not yet started count their listed devices
-- as pending. Units to create and not created yet are "creating" (or "waiting" for a slot).
local function aggregate(units)
  local t = { deviceCount = 0, succeededCount = 0, failedCount = 0, runningCount = 0, pendingCount = 0,
    jobs = #units, created = 0, finished = 0 }
  local statuses = {}
  for _, u in ipairs(units) do
    local job = u.job
    local s = job and job.deviceJobStatistics
    if job then t.created = t.created + 1 end
    if job and core.is_terminal(job.status) then t.finished = t.finished + 1 end
    if type(s) == "table" and (tonumber(s.deviceCount) or 0) > 0 then
      t.deviceCount = t.deviceCount + (s.deviceCount or 0)
      t.succeededCount = t.succeededCount + (s.succeededCount or 0)
      t.failedCount = t.failedCount + (s.failedCount or 0)
      t.runningCount = t.runningCount + (s.runningCount or 0)
      t.pendingCount = t.pendingCount + (s.pendingCount or 0)
    elseif u.listed and not (job and core.is_terminal(job.status)) then
      t.deviceCount = t.deviceCount + u.listed
      t.pendingCount = t.pendingCount + u.listed
      t.estimated = true
    end
    -- A unit we only watch has no status of its own until the hub answers for it.
    if job then
      statuses[#statuses + 1] = job.status
    elseif u.create then
      statuses[#statuses + 1] = u.waiting and "waiting" or "creating"
    end
    if job and type(job.startTime) == "string" then
      local start = core.parse_time(job.startTime)
      if start and (not t.startTime or start < t.startTime) then t.startTime = start end
    end
  end
  -- One status for the lot: anything still moving wins, else the worst terminal one.
  local status
  for _, want in ipairs({ "running", "queued", "enqueued", "scheduled", "creating", "waiting" }) do
    for _, s in ipairs(statuses) do if s == want then status = want break end end
    if status then break end
  end
  if not status then
    local worst = 0
    for _, s in ipairs(statuses) do
      if (TERMINAL_ORDER[s] or 0) > worst then worst, status = TERMINAL_ORDER[s], s end
    end
  end
  t.status = status or "unknown"
  return t
end
Rollout.aggregate = aggregate

-- Adopts the job if it exists (a resumed run), else creates it. Returns job, how
-- ("adopted" | "created") or nil, err; err.errorCode 429004 means "no free job slot".
function Rollout:_adopt_or_create(unit)
  local existing, err = self.jobs:getJob(unit.jobId)
  if existing then
    if unit.type and existing.type ~= unit.type then
      return nil, errors.new({ kind = "service", code = "JobConflict", operation = "run", target = unit.jobId,
        message = "a " .. tostring(existing.type) .. " job already has this id; rename the definition's job" })
    end
    if unit.condition and existing.queryCondition ~= unit.condition then
      self:_event("job " .. unit.jobId .. " already exists with a different device list (the fleet changed " ..
        "since it was created); adopting it as it is", "warning")
    end
    return existing, "adopted"
  end
  if err.code ~= "JobNotFound" then return nil, err end
  if not unit.create then return nil, err end
  -- The client retries transient failures by its own policy (see schedule above).
  local job, cerr = unit.create()
  if job then return job, "created" end
  return nil, cerr
end

--- Runs (or adopts) and watches units concurrently within the active-job limit.
-- extra: { name=, stage=, stages= } copied into each view (the job's name and "stage of
-- stages", for a progress line that must shorten its label), and halt below.
-- unit = { jobId=, type=, condition=, listed=, create = function() -> job | nil, err }
-- (no create: watch an existing job). Fills unit.job (last snapshot), unit.how, unit.error.
-- halt(unit) -> reason: stop creating further units (running ones are still watched).
-- Raises "interrupted!" when interrupted.
function Rollout:_run_units(label, units, extra)
  extra = extra or {}
  local sched = Scheduler.new({ sleep = self.sleep })
  -- active: slots held (creating or live); live: our jobs created and not yet finished.
  local state = { active = 0, live = 0, limit = self.maxActiveJobs or math.huge, remaining = #units,
    started = self.now() }
  local function view()
    local t = aggregate(units)
    t.label, t.started = label, state.started
    t.name, t.stage, t.stages = extra.name, extra.stage, extra.stages
    t.jobIds = {}
    for i, u in ipairs(units) do t.jobIds[i] = u.jobId end
    return t
  end
  local function progress()
    if not self.onProgress then return end
    -- Watching only: nothing to show until the hub has answered for every job, so the
    -- status shown is theirs.
    if units[1] and not units[1].create then
      for _, u in ipairs(units) do
        if not (u.job or u.error) then return end
      end
    end
    self.onProgress(view())
  end
  local function guard(fn, counted)
    return function(...)
      local ok, e = pcall(fn, ...)
      if counted then state.remaining = state.remaining - 1 end
      if not ok then
        if is_interrupt(e) then state.interrupted = state.interrupted or e
        else state.failure = state.failure or e end
      end
    end
  end
  local throttle_noted = false

  local function run_unit(u)
    -- Wait for a free slot; a 429004 shrinks the limit to what we hold, or (if the slots are
    -- someone else's) backs off and tries again.
    local backoff = 0
    while true do
      while state.active >= state.limit and not state.halt and not state.interrupted do
        u.waiting = true
        sched:sleep(0.2)
      end
      u.waiting = nil
      if state.halt or state.interrupted then u.skipped = state.halt return end
      state.active = state.active + 1
      local job, how = self:_adopt_or_create(u)
      if job then
        u.job, u.how = job, how
        self.known[#self.known + 1] = u
        if u.create then
          self:_event((how == "adopted" and "adopted existing job " or "created job ") .. u.jobId ..
            " (" .. tostring(job.status) .. ")", how)
        end
        break
      end
      state.active = state.active - 1
      if how.errorCode ~= 429004 then
        u.error = how
        state.halt = state.halt or ("job " .. u.jobId .. " could not be created: " .. tostring(how))
        return
      end
      -- Only jobs we have actually created are evidence of the hub's limit; while others of
      -- ours are still being created, look again shortly.
      if state.live > 0 or state.active > 0 then
        if state.live > 0 and state.limit > state.live then
          state.limit = state.live
          self:_event(("the hub's active-job limit is reached (429004): running %d of our jobs at a time")
            :format(state.limit), "throttled")
        end
        u.waiting = true
        sched:sleep(0.2)
      else
        backoff = backoff + 1
        local delay = self.creator.pipeline:retry_delay(how, backoff)
        if not throttle_noted then
          throttle_noted = true
          self:_event(("the hub's active-job limit is taken by other jobs (429004); retrying in %.0f s"):format(delay),
            "throttled")
        end
        u.waiting = true
        sched:sleep(delay)
      end
    end
    progress()
    if core.is_terminal(u.job.status) then -- adopted, already finished
      state.active = state.active - 1
      if extra.halt and not state.halt then state.halt = extra.halt(u) end
      return
    end
    state.live = state.live + 1
    for job, err in self.jobs:watchJob(u.jobId, { interval = self.interval, maxInterval = math.max(self.interval, 30),
      timeout = self.timeout }) do
      if not job then u.error = err break end
      u.job = job
      if state.interrupted then break end
      progress()
    end
    state.active, state.live = state.active - 1, state.live - 1
    if extra.halt and not state.halt then state.halt = extra.halt(u) end
  end

  for _, u in ipairs(units) do sched:spawn(guard(run_unit, true), u) end
  sched:spawn(guard(function()
    while state.remaining > 0 and not state.interrupted do
      progress()
      sched:sleep(self.tick)
    end
  end))
  local ok, err = sched:run()
  if state.interrupted then error(state.interrupted, 0) end
  if state.failure then error(state.failure, 0) end
  if not ok then error(err, 0) end
  local final = view()
  if self.onProgress then self.onProgress(final, true) end
  return final, state.halt
end

--- Watches existing jobs until each finishes (aggregated progress). Returns the final
-- aggregate view with view.jobs = { snapshot... } or nil, err (the first watch error).
function Rollout:watch(job_ids, label)
  local units = {}
  for i, id in ipairs(job_ids) do units[i] = { jobId = id } end
  local final = self:_run_units(label or (#job_ids == 1 and job_ids[1] or (#job_ids .. " jobs")), units)
  local snapshots = {}
  for i, u in ipairs(units) do
    if u.error then return nil, u.error, units end
    snapshots[i] = u.job
  end
  final.snapshots = snapshots
  return final, nil, units
end

---------------------------------------------------------------------------
-- Gates and the run

--- Does a finished stage pass its gate? Returns passed, reason.
function Rollout.check_gate(gate, totals)
  if not gate then return true, "no gate" end
  local n, ok_count, failed = totals.deviceCount, totals.succeededCount, totals.failedCount
  local ratio = n > 0 and ok_count / n or 1
  local reasons = {}
  if gate.maxFailures and failed > gate.maxFailures then
    reasons[#reasons + 1] = ("%d device(s) failed, more than maxFailures %d"):format(failed, gate.maxFailures)
  end
  if gate.minSuccessRatio and ratio + 1e-9 < gate.minSuccessRatio then
    reasons[#reasons + 1] = ("%d of %d device(s) succeeded (%.1f%%), below minSuccessRatio %g")
      :format(ok_count, n, ratio * 100, gate.minSuccessRatio)
  end
  if #reasons > 0 then return false, table.concat(reasons, "; ") end
  return true, ("%d of %d device(s) succeeded, %d failed"):format(ok_count, n, failed)
end

-- What a stage's outcome means for the rollout: nil to go on, else a status and why.
local function judge_stage(stage, final, units)
  for _, u in ipairs(units) do
    if u.job and (u.job.status == "failed" or u.job.status == "cancelled") then
      local why = u.job.failureReason or u.job.statusMessage
      return "job_failed", ("job %s %s%s"):format(u.jobId, u.job.status, why and (": " .. why) or "")
    end
  end
  local passed, why = Rollout.check_gate(stage.gate, final)
  stage.gateResult = { passed = passed, reason = why }
  if not passed then return "gate_failed", ("stage %d gate failed: %s"):format(stage.index, why) end
  return nil
end

--- Runs every job of `defs` (or those named in `only`) in order, stage by stage.
-- Returns a result { status=, reason=, jobs = { { name=, status=, reason=, stages = { { index=,
-- totals=, jobs = { snapshot... }, gateResult= } } } } } or nil, err, partial result.
-- status: "succeeded" (every device succeeded), "completed_with_failures", "gate_failed",
-- "job_failed" (a job failed or was cancelled). The run stops at the first gate_failed or job_failed.
function Rollout:run(defs, only)
  local result = { file = defs.file, status = "succeeded", jobs = {} }
  for _, job in ipairs(defs.jobs) do
    if not only or only[job.name] then
      local jr = { name = job.name, status = "succeeded", stages = {} }
      result.jobs[#result.jobs + 1] = jr
      local resolved, err = self:resolve(job)
      if not resolved then return nil, err, result end
      jr.targets, jr.uncovered = resolved.targets, resolved.uncovered
      local start = definitions.resolve_start(job.start, self.time())
      local stage_count = #resolved.stages
      for k, stage in ipairs(resolved.stages) do
        local sr = { index = k, name = stage.name, gate = stage.gate, devices = stage.ids and #stage.ids or nil, jobs = {} }
        jr.stages[k] = sr
        if #stage.chunks == 0 then
          sr.skipped = "no devices left for this stage"
          self:_event(("%s stage %d/%d adds no devices; skipped"):format(job.name, k, stage_count), "info")
        else
          local units = {}
          for c, chunk in ipairs(stage.chunks) do
            local stage_start = k == 1 and start or nil
            units[c] = { jobId = chunk.jobId, type = TYPES[job.type], condition = chunk.condition,
              listed = chunk.ids and #chunk.ids or nil,
              create = function() return schedule(self.creator, job, chunk, stage_start) end }
          end
          local label = job.name .. (stage_count > 1 and (" stage " .. k .. "/" .. stage_count) or "")
          if stage_count > 1 then
            self:_event(("%s stage %d/%d: %d device(s) in %d job(s)"):format(job.name, k, stage_count,
              #stage.ids, #units), "stage")
          end
          -- A job that fails or is cancelled stops further creation in its stage.
          local final = self:_run_units(label, units, { name = job.name, stage = k, stages = stage_count,
            halt = function(u)
              if u.job and (u.job.status == "failed" or u.job.status == "cancelled") then
                return "job " .. u.jobId .. " " .. u.job.status
              end
            end })
          sr.totals = { deviceCount = final.deviceCount, succeededCount = final.succeededCount,
            failedCount = final.failedCount, runningCount = final.runningCount, pendingCount = final.pendingCount }
          for c, u in ipairs(units) do sr.jobs[c] = u.job or { jobId = u.jobId, status = u.skipped and "not created" } end
          for _, u in ipairs(units) do
            if u.error then
              jr.status, jr.reason = "error", tostring(u.error)
              result.status, result.reason = "error", tostring(u.error)
              return nil, u.error, result
            end
          end
          local status, why = judge_stage(stage, final, units)
          sr.gateResult = stage.gateResult
          if stage_count > 1 and stage.gateResult then
            self:_event(("%s stage %d/%d %s: %s"):format(job.name, k, stage_count,
              stage.gateResult.passed and "passed" or "FAILED", stage.gateResult.reason),
              stage.gateResult.passed and "gate" or "gate_failed")
          end
          if status then
            jr.status, jr.reason = status, why
            result.status, result.reason = status, job.name .. ": " .. why
            if k + 1 == stage_count then
              result.reason = result.reason .. (" (stage %d not started)"):format(stage_count)
            elseif k < stage_count then
              result.reason = result.reason .. (" (stages %d-%d not started)"):format(k + 1, stage_count)
            end
            return result
          end
          if final.failedCount > 0 and jr.status == "succeeded" then jr.status = "completed_with_failures" end
        end
      end
      if jr.status == "completed_with_failures" and result.status == "succeeded" then
        result.status = "completed_with_failures"
      end
    end
  end
  return result
end

return Rollout
