-- The OpenResty dashboard (examples/openresty-dashboard/dashboard.lua) without nginx: a fake
-- ngx (support.fake_ngx) whose timers and requests the spec runs by hand, and a fake hub
-- whose every call waits once, as a cosocket read does. That is enough to replay the races
-- between the poller timer, a job's monitor timer and the POST handler: each writes snapshots
-- of the same job into the shared dict, and an older read must never win over a newer one.
local FakeNgx = require "support.fake_ngx"
local json = require "iothub.json"

local DASHBOARD = "examples/openresty-dashboard/dashboard.lua"
local DICT = "iothub_dashboard"
local DEVICES = { "door1", "door2" }
local SETTLE_WAIT = 60 -- dashboard.lua: how long a finished job's rows may lag before they stop being read

local TERMINAL = { completed = true, failed = true, cancelled = true }

---------------------------------------------------------------------------
-- The fake hub: jobs whose status and device rows the spec sets. A request is answered from
-- the hub's state when it arrives; the answer reaches the caller after one wait labelled with
-- the operation, so the spec can change the hub while an answer is in flight.

local Hub = {}
Hub.__index = Hub

local function new_hub(fake)
  return setmetatable({ fake = fake, jobs = {}, listing = {}, calls = {} }, Hub)
end

--- Creates or updates a job: `rows` maps deviceId to the row's status (rows spell "canceled").
function Hub:set(job_id, status, rows)
  local job = self.jobs[job_id]
  if not job then
    job = { rows = {} }
    self.jobs[job_id] = job
    self.listing[#self.listing + 1] = job_id -- the hub lists jobs oldest first
  end
  job.status = status
  for device, row_status in pairs(rows or {}) do job.rows[device] = row_status end
end

function Hub:count(operation, job_id)
  local n = 0
  for _, call in ipairs(self.calls) do
    if call.operation == operation and (job_id == nil or call.jobId == job_id) then n = n + 1 end
  end
  return n
end

function Hub:_job_json(job_id)
  local job = self.jobs[job_id]
  local stats = { deviceCount = 0, succeededCount = 0, failedCount = 0, runningCount = 0, pendingCount = 0 }
  for _, row_status in pairs(job.rows) do
    stats.deviceCount = stats.deviceCount + 1
    local field = ({ completed = "succeededCount", failed = "failedCount", canceled = "failedCount",
      running = "runningCount" })[row_status] or "pendingCount"
    stats[field] = stats[field] + 1
  end
  return { jobId = job_id, type = "scheduleDeviceMethod", status = job.status, deviceJobStatistics = stats }
end

function Hub:_rows_json(job_id)
  local rows = {}
  for _, device in ipairs(DEVICES) do
    local row_status = self.jobs[job_id].rows[device]
    if row_status then
      rows[#rows + 1] = { jobId = job_id, deviceId = device, jobType = "scheduleDeviceMethod", status = row_status }
    end
  end
  return rows
end

-- One request: the answer is taken now and handed over after the wait.
function Hub:_answer(operation, job_id, answer)
  self.calls[#self.calls + 1] = { operation = operation, jobId = job_id }
  local value = answer()
  self.fake:wait(operation)
  return value
end

-- A paged listing as the client's pager runs it: the request goes out on the first step.
function Hub:_pager(operation, job_id, items)
  local answered, i = nil, 0
  return function()
    answered = answered or self:_answer(operation, job_id, items)
    i = i + 1
    return answered[i]
  end
end

-- The JobClient calls dashboard.lua makes, with the real client's results.
local function new_client(hub)
  local client = {}
  function client.queryJobs(_, _)
    return hub:_pager("queryJobs", nil, function()
      local list = {}
      for i, id in ipairs(hub.listing) do list[i] = hub:_job_json(id) end
      return list
    end)
  end
  function client.deviceJobs(_, job_id, _)
    return hub:_pager("deviceJobs", job_id, function() return hub:_rows_json(job_id) end)
  end
  function client.getJob(_, job_id)
    return hub:_answer("getJob", job_id, function() return hub:_job_json(job_id) end)
  end
  function client.scheduleDeviceMethod(_, job_id, _, _)
    return hub:_answer("scheduleDeviceMethod", job_id, function()
      local pending = {}
      for _, device in ipairs(DEVICES) do pending[device] = "pending" end
      hub:set(job_id, "queued", pending)
      return hub:_job_json(job_id)
    end)
  end
  -- Like the real monitorJob: every snapshot goes to onProgress, sleeping between polls.
  function client.monitorJob(self, job_id, opts)
    while true do
      local job = self:getJob(job_id)
      if opts.onProgress then opts.onProgress(job) end
      if TERMINAL[job.status] then return job end
      hub.fake.ngx.sleep(opts.interval)
    end
  end
  return client
end

---------------------------------------------------------------------------
-- A fresh dashboard per test: its module state (client, poll flag) must not leak. It takes
-- its JobClient from iothub.JobClient.fromConnectionString with IOTHUB_CONNECTION_STRING, so
-- both are stood in for here and dashboard.lua itself is loaded unchanged.

local function load_dashboard(client)
  local iothub = require "iothub"
  package.loaded.iothub = setmetatable({
    JobClient = { fromConnectionString = function() return client end },
  }, { __index = iothub })
  local ok, dashboard = pcall(dofile, DASHBOARD)
  package.loaded.iothub = iothub
  assert(ok, dashboard)
  return dashboard
end

describe("openresty dashboard", function()
  local fake, hub, dashboard, real_getenv

  before_each(function()
    fake = FakeNgx.new({ dicts = { DICT } })
    _G.ngx = fake.ngx
    real_getenv = os.getenv
    os.getenv = function(name) -- luacheck: ignore 122
      if name == "IOTHUB_CONNECTION_STRING" then return "HostName=fake.azure-devices.net;SharedAccessKeyName=x;SharedAccessKey=eA==" end
      if name == "IOTHUB_ENDPOINT" then return "" end
      return real_getenv(name)
    end
    hub = new_hub(fake)
    dashboard = load_dashboard(new_client(hub))
    dashboard.init_worker()
    assert.equal(1, #fake.recurring, "init_worker starts one recurring poll")
    fake:timer_task():finish() -- the poll at start-up, on an empty hub
  end)

  after_each(function()
    os.getenv = real_getenv -- luacheck: ignore 122
    _G.ngx = nil
  end)

  local function poll() return fake:every_task(1) end

  local function call(method, uri, body)
    local task = fake:request({ method = method, uri = uri, body = body }, dashboard.api)
    return task, function() return task.request.response end
  end

  local function get(uri)
    local task, response = call("GET", uri)
    task:finish()
    assert.equal(200, response().status)
    return json.decode(response().body)
  end

  -- The POST /api/jobs request for a method job `job_id`, not started yet.
  local function schedule(job_id)
    return call("POST", "/api/jobs", json.encode({ type = "method", queryCondition = "*", methodName = "reboot",
      jobId = job_id }))
  end

  local function schedule_now(job_id)
    local task, response = schedule(job_id)
    task:finish()
    assert.equal(201, response().status, response().body)
  end

  -- The monitor timer the POST handler started (after the start-up poll, the only ngx.timer.at).
  local function monitor()
    assert.equal(1, #fake.timers, "one monitor timer pending")
    return fake:timer_task()
  end

  local function shown_ids()
    local ids = {}
    for i, job in ipairs(get("/api/jobs").jobs) do ids[i] = job.jobId end
    return ids
  end

  local function shown_job(job_id)
    for _, job in ipairs(get("/api/jobs").jobs) do
      if job.jobId == job_id then return job end
    end
  end

  local function shown_rows(job_id)
    local rows = {}
    for _, row in ipairs(get("/api/jobs/" .. job_id .. "/devices").devices) do rows[row.deviceId] = row.status end
    return rows
  end

  local function assert_poll_ok()
    local status = get("/api/jobs").poll
    assert.is_true(status.ok, tostring(status.error))
    assert.same({}, fake:logged(fake.ngx.ERR))
  end

  it("keeps a finished job finished when a listing taken while it ran lands after the monitor's last snapshot", function()
    schedule_now("job-a")
    hub:set("job-a", "running", { door1 = "running" })
    local poller = poll()
    assert.equal("queryJobs", poller:step()) -- the listing says "running"; its answer is in flight
    hub:set("job-a", "completed", { door1 = "completed", door2 = "failed" })
    monitor():finish()
    assert.equal("completed", shown_job("job-a").status)

    poller:finish() -- the stale "running" listing lands
    local job = shown_job("job-a")
    assert.equal("completed", job.status)
    assert.same({ deviceCount = 2, succeededCount = 1, failedCount = 1, runningCount = 0, pendingCount = 0 },
      job.deviceJobStatistics)
    assert.same({ door1 = "completed", door2 = "failed" }, shown_rows("job-a"))
    assert_poll_ok()
  end)

  it("keeps a job's settled rows when the poller's older read of them lands afterwards, then and on later polls", function()
    -- The hub has created the job but the POST handler has not heard back yet, so nothing marks
    -- the job as watched: the poller lists it and starts reading its rows.
    local post, response = schedule("job-b")
    assert.equal("scheduleDeviceMethod", post:step())
    local poller = poll()
    assert.equal("queryJobs", poller:step())
    assert.equal("deviceJobs", poller:step()) -- rows read while both are "pending"; answer in flight
    post:finish()
    assert.equal(201, response().status)
    hub:set("job-b", "completed", { door1 = "completed", door2 = "failed" })
    monitor():finish()
    assert.same({ door1 = "completed", door2 = "failed" }, shown_rows("job-b"))

    poller:finish() -- the stale "pending" rows land
    assert.same({ door1 = "completed", door2 = "failed" }, shown_rows("job-b"))

    local reads = hub:count("deviceJobs", "job-b")
    poll():finish()
    assert.same({ door1 = "completed", door2 = "failed" }, shown_rows("job-b"))
    assert.equal(reads, hub:count("deviceJobs", "job-b"), "settled rows are not read again")
    assert.equal("completed", shown_job("job-b").status)
    assert_poll_ok()
  end)

  it("shows a job scheduled from the page on top even when a poll's listing was taken before it existed", function()
    hub:set("older", "completed", { door1 = "completed", door2 = "completed" })
    poll():finish()
    assert.same({ "older" }, shown_ids())

    local poller = poll()
    assert.equal("queryJobs", poller:step()) -- listed before job-c is created
    schedule_now("job-c")
    assert.same({ "job-c", "older" }, shown_ids())
    poller:finish() -- that listing lands
    assert.same({ "job-c", "older" }, shown_ids())
    assert.equal("queued", shown_job("job-c").status)

    poll():finish() -- a listing that has it: still shown once, on top
    assert.same({ "job-c", "older" }, shown_ids())
    assert_poll_ok()
  end)

  describe("re-reads device rows that lag the job's status", function()
    it("for a job the poller follows, until every row has ended", function()
      hub:set("cli-job", "completed", { door1 = "completed", door2 = "running" }) -- job done, rows behind
      poll():finish()
      assert.equal("completed", shown_job("cli-job").status)
      assert.same({ door1 = "completed", door2 = "running" }, shown_rows("cli-job"))

      hub:set("cli-job", "completed", { door2 = "failed" })
      poll():finish()
      assert.same({ door1 = "completed", door2 = "failed" }, shown_rows("cli-job"))

      local reads = hub:count("deviceJobs", "cli-job")
      poll():finish()
      assert.equal(reads, hub:count("deviceJobs", "cli-job"), "settled rows are not read again")
      assert_poll_ok()
    end)

    it("for a job whose monitor ended before its rows did: the poller takes over", function()
      schedule_now("job-d")
      hub:set("job-d", "completed", { door1 = "completed", door2 = "running" })
      monitor():finish()
      assert.equal("completed", shown_job("job-d").status)
      assert.same({ door1 = "completed", door2 = "running" }, shown_rows("job-d"))

      hub:set("job-d", "completed", { door2 = "completed" })
      poll():finish()
      assert.same({ door1 = "completed", door2 = "completed" }, shown_rows("job-d"))
      assert_poll_ok()
    end)

    it("but stops reading rows that never end " .. SETTLE_WAIT .. " s after the job finished", function()
      hub:set("stuck", "failed", { door1 = "failed", door2 = "running" })
      poll():finish()
      fake:advance(SETTLE_WAIT / 2)
      poll():finish()
      assert.equal(2, hub:count("deviceJobs", "stuck"), "re-read while the wait lasts")
      fake:advance(SETTLE_WAIT / 2 + 1)
      poll():finish() -- past the wait: read once more and kept as they are
      fake:advance(2)
      poll():finish()
      assert.equal(3, hub:count("deviceJobs", "stuck"))
      assert.same({ door1 = "failed", door2 = "running" }, shown_rows("stuck"))
      assert_poll_ok()
    end)
  end)
end)
