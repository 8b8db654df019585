-- luacheck: globals ngx
--- Live jobs dashboard for OpenResty / nginx + lua module (see README.md next to this file).
--
-- Nothing here holds a browser request open while the hub is polled:
--   * worker 0 polls the hub from `ngx.timer.every` (queryJobs + deviceJobs) and writes
--     what it sees into the `iothub_dashboard` lua_shared_dict;
--   * a job scheduled from the page gets a `monitorJob` in its own `ngx.timer.at`, which
--     waits through ngx.sleep and writes every snapshot into the dict;
--   * GET /api/jobs and GET /api/jobs/{id}/devices only read the dict.
-- Hub requests go through the cosocket transport, chosen automatically inside nginx.
local iothub = require "iothub"
local core = require "iothub.core"
local json = require "iothub.json"

local M = {}

local DICT = "iothub_dashboard"
local POLL_EVERY = 2         -- seconds between hub listings
local MONITOR_INTERVAL = 0.5 -- seconds between getJob polls of a job scheduled here
local MAX_JOBS = 50          -- newest jobs shown
local MAX_ROWS = 500         -- device rows kept per job
local KEEP = 24 * 3600       -- seconds a job stays in the dict after its last sighting
local SETTLE_WAIT = 60       -- seconds a finished job's device rows may lag before we stop re-reading them

local function dict() return ngx.shared[DICT] end

-- One JobClient per worker, from the environment (nginx.conf: env IOTHUB_CONNECTION_STRING;).
local client, client_err
local function jobs_client()
  if client then return client end
  local cs = os.getenv("IOTHUB_CONNECTION_STRING")
  if not cs or cs == "" then
    return nil, "IOTHUB_CONNECTION_STRING is not set: export it and keep `env IOTHUB_CONNECTION_STRING;` in nginx.conf"
  end
  local endpoint = os.getenv("IOTHUB_ENDPOINT")
  local err
  client, err = iothub.JobClient.fromConnectionString(cs,
    { endpoint = endpoint ~= "" and endpoint or nil, timeout = 20 })
  if not client then client_err = tostring(err) end
  return client, client_err
end

---------------------------------------------------------------------------
-- The dict. Snapshots of one job come from the poller, its monitor and the POST handlers,
-- possibly in different workers, and the hub's listing is eventually consistent, so they
-- can land out of order. A terminal snapshot therefore has its own key that nothing older
-- can overwrite, and readers prefer it:
--   job:<id> / done:<id>         the hub's job JSON while it runs / once it has finished
--   rows:<id> / done_rows:<id>   its device rows / the settled rows (job over, every row ended)
--   ended:<id>                   when we first saw the job finished (bounds waiting for rows)
--   watched:<id>                 a monitor timer owns the job (the poller leaves its rows alone)
--   order                        ids shown, newest first; poll: the last poll's outcome

local function store_job(job)
  local key = (core.is_terminal(job.status) and "done:" or "job:") .. job.jobId
  dict():set(key, json.encode(job), KEEP)
end

local function read_job(id)
  local d = dict()
  return d:get("done:" .. id) or d:get("job:" .. id)
end

local function store_order(ids)
  dict():set("order", json.encode(json.array(ids)))
end

local function read_order()
  local raw = dict():get("order")
  return raw and json.decode(raw) or {}
end

-- Device-row statuses after which a row no longer changes (rows spell it "canceled").
local ROW_ENDED = { completed = true, failed = true, canceled = true }

-- Rows are settled once the job has finished and every target's row has ended; the hub's
-- query view can lag behind getJob, so until then they are read again (for SETTLE_WAIT at
-- most after the job finished: a failed job may leave rows that never end).
local function rows_settled(job, rows)
  if not core.is_terminal(job.status) then return false end
  local d = dict()
  d:add("ended:" .. job.jobId, ngx.now(), KEEP)
  if ngx.now() - (d:get("ended:" .. job.jobId) or ngx.now()) > SETTLE_WAIT then return true end
  local stats = job.deviceJobStatistics
  if #rows < math.min(stats and tonumber(stats.deviceCount) or 0, MAX_ROWS) then return false end
  for _, row in ipairs(rows) do
    if not ROW_ENDED[row.status] then return false end
  end
  return true
end

-- Reads the device rows of `job` (a snapshot taken before this call). Returns whether they
-- are settled, or nil and the error.
local function refresh_rows(jobs, job)
  local rows = {}
  for row, err in jobs:deviceJobs(job.jobId, { pageSize = 100 }) do
    if not row then return nil, err end
    if #rows < MAX_ROWS then rows[#rows + 1] = row end
  end
  local settled = rows_settled(job, rows)
  dict():set((settled and "done_rows:" or "rows:") .. job.jobId, json.encode(json.array(rows)), KEEP)
  return settled
end

local function record_poll(ok, err)
  dict():set("poll", json.encode({ ok = ok, at = ngx.now(), error = err and tostring(err) or json.null }))
end

-- One listing of the hub: every job's summary, plus device rows for jobs whose rows have
-- not settled, unless a monitor timer is looking after them.
local function poll_once()
  local jobs, cerr = jobs_client()
  if not jobs then return record_poll(false, cerr) end
  local list = {}
  for job, err in jobs:queryJobs({ pageSize = 100 }) do
    if not job then return record_poll(false, err) end
    list[#list + 1] = job
  end
  local d = dict()
  -- The hub lists jobs oldest first; show the newest.
  local ids, listed, first_err = {}, {}, nil
  for i = #list, math.max(1, #list - MAX_JOBS + 1), -1 do
    local job = list[i]
    ids[#ids + 1], listed[job.jobId] = job.jobId, true
    store_job(job)
    if not d:get("watched:" .. job.jobId) and not d:get("done_rows:" .. job.jobId) then
      local settled, err = refresh_rows(jobs, job)
      if settled == nil then first_err = first_err or err end
    end
  end
  -- Jobs scheduled from the page that this listing does not show yet (it was taken before
  -- they were created, or the hub's listing lags) stay on top.
  local kept = {}
  for _, id in ipairs(read_order()) do
    if not listed[id] and d:get("watched:" .. id) then kept[#kept + 1] = id end
  end
  for i = #kept, 1, -1 do table.insert(ids, 1, kept[i]) end
  while #ids > MAX_JOBS do ids[#ids] = nil end
  store_order(ids)
  record_poll(first_err == nil, first_err)
end

local polling = false
local function poll(premature)
  if premature or polling then return end -- a slow hub must not stack polls up
  polling = true
  local ok, err = pcall(poll_once)
  polling = false
  if not ok then
    record_poll(false, err)
    ngx.log(ngx.ERR, "dashboard poll failed: ", err)
  end
end

-- Follows one job scheduled from the page: monitorJob waits through ngx.sleep in this timer.
-- schedule_job has marked it watched; whatever happens here, the mark goes at the end so
-- the poller takes over (it re-reads the rows until they settle).
local function monitor(premature, job_id)
  local d = dict()
  if premature then return d:delete("watched:" .. job_id) end
  local jobs = jobs_client()
  local ok, final, err = pcall(jobs.monitorJob, jobs, job_id, {
    interval = MONITOR_INTERVAL, maxInterval = 5, timeout = 3600,
    onProgress = function(job)
      store_job(job)
      local settled, rerr = refresh_rows(jobs, job)
      if settled == nil then ngx.log(ngx.WARN, "dashboard: rows of ", job_id, ": ", tostring(rerr)) end
    end,
  })
  if not ok or not final then
    ngx.log(ngx.WARN, "dashboard: monitoring ", job_id, " ended: ", tostring(ok and err or final))
  end
  d:delete("watched:" .. job_id)
end

--- init_worker_by_lua: the poller runs on worker 0 only; the dict serves every worker.
function M.init_worker()
  if ngx.worker.id() ~= 0 then return end
  assert(ngx.timer.at(0, poll))
  assert(ngx.timer.every(POLL_EVERY, poll))
end

---------------------------------------------------------------------------
-- HTTP handlers (content_by_lua).

local function send_json(status, text)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json; charset=utf-8"
  ngx.header["Cache-Control"] = "no-store"
  ngx.print(text)
end

local function send_error(status, message)
  send_json(status, json.encode({ error = message }))
end

--- GET /api/jobs: { jobs = [...newest first], poll = { ok, at, error } }, from the dict only.
function M.list_jobs()
  local d = dict()
  local parts = {}
  for _, id in ipairs(read_order()) do
    local raw = read_job(id)
    if raw then parts[#parts + 1] = raw end
  end
  send_json(200, '{"jobs":[' .. table.concat(parts, ",") .. '],"poll":' .. (d:get("poll") or "null") ..
    ',"now":' .. string.format("%.3f", ngx.now()) .. "}")
end

--- GET /api/jobs/{id}/devices: the job's device rows, from the dict only.
function M.device_rows(job_id)
  local d = dict()
  local raw = d:get("done_rows:" .. job_id) or d:get("rows:" .. job_id)
  send_json(200, '{"jobId":' .. json.encode(job_id) .. ',"devices":' .. (raw or "[]") .. "}")
end

local function decode_field(form, name, default)
  local text = form[name]
  if text == nil or text == json.null or text == "" then return default end
  if type(text) ~= "string" then return nil, name .. " must be JSON text" end
  local value, err = json.decode(text)
  if value == nil then return nil, name .. " is not valid JSON: " .. tostring(err) end
  return value
end

local function schedule(jobs, form)
  if type(form.queryCondition) ~= "string" or form.queryCondition == "" then
    return nil, "queryCondition is required, e.g. deviceId IN ['myDeviceId'] or * for every device"
  end
  local job_id = form.jobId
  if job_id == nil or job_id == "" then job_id = "dash-" .. iothub.uuid() end
  if type(job_id) ~= "string" then return nil, "jobId must be text" end
  if form.type == "method" then
    local payload, perr = decode_field(form, "payload", iothub.null)
    if payload == nil then return nil, perr end
    local timeout = tonumber(form.responseTimeoutInSeconds) or 30
    return jobs:scheduleDeviceMethod(job_id, form.queryCondition,
      { methodName = tostring(form.methodName or ""), payload = payload, responseTimeoutInSeconds = timeout })
  elseif form.type == "twin" then
    local patch = {}
    local tags, terr = decode_field(form, "tags")
    if terr then return nil, terr end
    local desired, derr = decode_field(form, "desired")
    if derr then return nil, derr end
    if tags ~= nil and type(tags) ~= "table" then return nil, "tags must be a JSON object" end
    if desired ~= nil and type(desired) ~= "table" then return nil, "desired must be a JSON object" end
    patch.tags = tags
    if desired then patch.properties = { desired = desired } end
    return jobs:scheduleTwinUpdate(job_id, form.queryCondition, patch)
  end
  return nil, "type must be 'method' or 'twin'"
end

local function read_form()
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if not body then return nil, "send the job as a JSON body (Content-Type: application/json)" end
  local form, err = json.decode(body)
  if type(form) ~= "table" then return nil, "the body is not a JSON object: " .. tostring(err) end
  return form
end

--- POST /api/jobs: schedules a method or twin job (one hub request), stores it and starts
-- its monitor timer. Answers 201 { job } or 4xx/5xx { error }.
function M.schedule_job()
  local jobs, cerr = jobs_client()
  if not jobs then return send_error(503, cerr) end
  local form, ferr = read_form()
  if not form then return send_error(400, ferr) end
  -- Wrong value types raise inside the client (they are bugs for a program, but here they
  -- come from a form): report them as a bad request.
  local ok, job, err = pcall(schedule, jobs, form)
  if not ok then return send_error(400, (tostring(job):gsub("^.-:%d+: ", ""))) end
  if not job then
    -- Our refusals and the hub's 4xx are the form's fault; anything else is the hub's.
    local status = 502
    if type(err) == "string" or err.kind == "invalid_argument" or (err.status and err.status < 500) then status = 400 end
    return send_error(status, tostring(err))
  end
  store_job(job)
  local d = dict()
  -- Watched before the timer runs: the poller must not read rows the monitor is about to own.
  d:set("watched:" .. job.jobId, true, 3600)
  local ids = read_order()
  table.insert(ids, 1, job.jobId)
  store_order(ids)
  local started, terr = ngx.timer.at(0, monitor, job.jobId)
  if not started then
    d:delete("watched:" .. job.jobId)
    ngx.log(ngx.ERR, "dashboard: cannot start a monitor: ", terr)
  end
  send_json(201, json.encode({ job = job }))
end

--- POST /api/jobs/{id}/cancel
function M.cancel_job(job_id)
  local jobs, cerr = jobs_client()
  if not jobs then return send_error(503, cerr) end
  local job, err = jobs:cancelJob(job_id)
  if not job then return send_error(err.status == 404 and 404 or 502, tostring(err)) end
  store_job(job)
  send_json(200, json.encode({ job = job }))
end

--- Routes /api/... (one content_by_lua location).
function M.api()
  local method, uri = ngx.req.get_method(), ngx.var.uri
  if uri == "/api/jobs" then
    if method == "GET" then return M.list_jobs() end
    if method == "POST" then return M.schedule_job() end
  end
  local id, rest = uri:match("^/api/jobs/([%w%-]+)(/%a+)$")
  if id and rest == "/devices" and method == "GET" then return M.device_rows(id) end
  if id and rest == "/cancel" and method == "POST" then return M.cancel_job(id) end
  send_error(404, "no such endpoint: " .. method .. " " .. uri)
end

return M
