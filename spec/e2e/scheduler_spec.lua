-- The client over real libcurl against a real local server (nginx): blocking calls with
-- connection reuse, and many monitors running concurrently in the iothub Scheduler.
local iothub = require "iothub"
local server = require "support.server"

local CS = "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ="

describe("Scheduler without I/O", function()
  it("wakes sleeping tasks in deadline order and collects results", function()
    local sched = iothub.Scheduler.new()
    local order = {}
    local tasks = {}
    for _, d in ipairs({ 0.03, 0.01, 0.02 }) do
      tasks[#tasks + 1] = sched:spawn(function(delay)
        sched:sleep(delay)
        order[#order + 1] = delay
        return delay * 100
      end, d)
    end
    assert.is_true(sched:run())
    assert.same({ 0.01, 0.02, 0.03 }, order)
    assert.equal(3, math.floor(tasks[1].results[1] + 0.5))
  end)

  it("finishes the other tasks and reports a task that raised", function()
    local sched = iothub.Scheduler.new()
    local ok_task = sched:spawn(function() sched:sleep(0.01) return "fine" end)
    sched:spawn(function() error("boom") end)
    local ok, err = sched:run()
    assert.is_nil(ok)
    assert.matches("boom", tostring(err))
    assert.equal("fine", ok_task.results[1])
  end)

  it("refuses a bare coroutine.yield inside a task with a clear message", function()
    local sched = iothub.Scheduler.new()
    sched:spawn(function() coroutine.yield("mine") end)
    local ok, err = sched:run()
    assert.is_nil(ok)
    assert.matches("scheduler:sleep", err)
  end)

  it("raises when sleep is called outside one of its tasks", function()
    assert.has_error(function() iothub.Scheduler.new():sleep(0) end)
  end)
end)

describe("client over libcurl", function()
  local srv
  lazy_setup(function() srv = server.start() end)
  lazy_teardown(function() if srv then srv:stop() end end)

  local function client(base, opts)
    local o = { endpoint = base .. "/sim" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return assert(iothub.JobClient.fromConnectionString(CS, o))
  end

  it("reuses one connection across a run of calls (HTTP and HTTPS)", function()
    for _, base in ipairs({ srv.http_url, srv.https_url }) do
      local jobs = client(base, { caFile = srv.ca_file })
      for i = 1, 5 do
        local job = assert(jobs:getJob("bench-" .. i))
        assert.equal("completed", job.status)
        if i > 1 then assert.equal(0, jobs.pipeline:transport():stats().connects) end
      end
    end
  end)

  it("refuses the private CA's server unless trusted (verification is on by default)", function()
    local jobs = client(srv.https_url, { retry = false })
    local _, err = jobs:getJob("x")
    assert.equal("tls", err.kind)
  end)

  it("runs 40 monitors concurrently: their polls overlap on the server", function()
    srv:reset_stats()
    local jobs = client(srv.http_url)
    local sched = iothub.Scheduler.new()
    local tasks = {}
    for i = 1, 40 do
      tasks[i] = sched:spawn(function()
        return jobs:monitorJob("poll3-" .. i, { interval = 0.05 })
      end)
    end
    assert.is_true(sched:run())
    for i = 1, 40 do
      local final = tasks[i].results[1]
      assert.is_truthy(final, tostring(tasks[i].results[2]))
      assert.equal("completed", final.status)
    end
    assert.is_true(srv:stats().maxInflight > 1)
  end)

  it("streams device rows across pages", function()
    local jobs = client(srv.http_url)
    local n, last = 0, nil
    for row, err in jobs:deviceJobs("rows2500", { pageSize = 1000 }) do
      assert.is_truthy(row, tostring(err))
      n, last = n + 1, row
    end
    assert.equal(2500, n)
    assert.equal("door-0002500", last.deviceId)
    assert.equal(200, last.outcome.deviceMethodResponse.status)
  end)

  it("monitors with a caller-supplied sleep without blocking other coroutines", function()
    local jobs = client(srv.http_url)
    local sleeps = 0
    local final = assert(jobs:monitorJob("poll2-coop", { interval = 0.01,
      sleep = function(s) sleeps = sleeps + 1; require("iothub.core").sleep(s) end }))
    assert.equal("completed", final.status)
    assert.is_true(sleeps > 1) -- the poll interval and the cooperative HTTP waits both used it
  end)
end)
