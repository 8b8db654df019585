-- monitorJob / watchJob decisions with an injected clock, and the C policy behind them.
local iothub = require "iothub"
local support = require "support.client"
local core = require "iothub.core"


local function make(script)
  return support.make(iothub.JobClient, script)
end

local function job(status, extra)
  local body = { jobId = "job01", type = "scheduleDeviceMethod", status = status,
    deviceJobStatistics = { deviceCount = 2, succeededCount = status == "completed" and 2 or 0,
      failedCount = 0, runningCount = 0, pendingCount = 0 } }
  for k, v in pairs(extra or {}) do body[k] = v end
  return { status = 200, body = body }
end

describe("monitorJob", function()
  it("polls until a terminal state and reports every snapshot", function()
    local jobs, rec, clock = make({ job("queued"), job("running"), job("completed") })
    local seen = {}
    local final = assert(jobs:monitorJob("job01", { interval = 5, onProgress = function(j) seen[#seen + 1] = j.status end }))
    assert.equal("completed", final.status)
    assert.same({ "queued", "running", "completed" }, seen)
    assert.same({ 5, 5 }, clock.sleeps)
    assert.equal(3, #rec.requests)
  end)

  for _, terminal in ipairs({ "failed", "cancelled" }) do
    it("stops on " .. terminal, function()
      local jobs = make({ job("running"), job(terminal) })
      assert.equal(terminal, assert(jobs:monitorJob("job01", { interval = 1 })).status)
    end)
  end

  it("backs off on transient errors and keeps watching", function()
    local jobs, rec, clock = make({ job("running"), { status = 503 }, { status = 429 }, job("completed") })
    local final = assert(jobs:monitorJob("job01", { interval = 2, maxInterval = 60 }))
    assert.equal("completed", final.status)
    assert.same({ 2, 4, 8 }, clock.sleeps)
    assert.equal(4, #rec.requests) -- the monitor's own backoff, not a nested retry loop
  end)

  it("stops with the error when the job cannot be read", function()
    local jobs = make({ job("running"), { status = 404, headers = { ["iothub-errorcode"] = "JobNotFound" } } })
    local final, err = jobs:monitorJob("job01", { interval = 1 })
    assert.is_nil(final)
    assert.equal(404, err.status)
  end)

  it("times out with the last snapshot attached", function()
    local script = {}
    for i = 1, 10 do script[i] = job("running") end
    local jobs, rec, clock = make(script)
    local final, err = jobs:monitorJob("job01", { interval = 4, timeout = 10 })
    assert.is_nil(final)
    assert.equal("timeout", err.kind)
    assert.equal("running", err.job.status)
    assert.same({ 4, 4, 2 }, clock.sleeps) -- the last sleep is cut at the deadline
    assert.equal(4, #rec.requests)
    assert.matches("10 s", err.message, 1, true)
  end)

  it("waits for a scheduled job's start time instead of polling every interval", function()
    local start = "2023-11-14T22:23:20.000Z" -- 1700000600: ten minutes after the fake clock's epoch
    local jobs, _, clock = make({ job("scheduled", { startTime = start }), job("running"), job("completed") })
    assert(jobs:monitorJob("job01", { interval = 5, maxInterval = 300 }))
    assert.same({ 300, 5 }, clock.sleeps)
  end)
end)

describe("watchJob", function()
  it("iterates snapshots and ends after the terminal one", function()
    local jobs = make({ job("running"), job("completed") })
    local statuses = {}
    for j, err in jobs:watchJob("job01", { interval = 1 }) do
      assert.is_truthy(j, tostring(err))
      statuses[#statuses + 1] = j.status
    end
    assert.same({ "running", "completed" }, statuses)
  end)

  it("ends with one false, err pair on failure", function()
    local jobs = make({ { status = 401 } })
    local items = {}
    for j, err in jobs:watchJob("job01") do items[#items + 1] = { j, err } end
    assert.equal(1, #items)
    assert.is_false(items[1][1])
    assert.equal(401, items[1][2].status)
  end)

  it("yields through a caller-supplied sleep inside a coroutine", function()
    local jobs = make({ job("running"), job("completed") })
    local co = coroutine.create(function()
      return jobs:monitorJob("job01", { interval = 3, sleep = function(s) coroutine.yield("slept", s) end })
    end)
    local ok, tag, seconds = coroutine.resume(co)
    assert.is_true(ok)
    assert.equal("slept", tag)
    assert.equal(3, seconds)
    local ok2, final = coroutine.resume(co)
    assert.is_true(ok2)
    assert.equal("completed", final.status)
  end)
end)

describe("C policy", function()
  it("classifies terminal states (job level spells cancelled)", function()
    assert.is_true(core.is_terminal("completed"))
    assert.is_true(core.is_terminal("failed"))
    assert.is_true(core.is_terminal("cancelled"))
    assert.is_false(core.is_terminal("canceled"))
    assert.is_false(core.is_terminal("running"))
    assert.is_false(core.is_terminal(nil))
  end)

  it("grows backoff exponentially up to the cap, with jitter", function()
    assert.equal(1, core.backoff(1, 1, 30, 0.5, 0))
    assert.equal(8, core.backoff(4, 1, 30, 0.5, 0))
    assert.equal(30, core.backoff(10, 1, 30, 0.5, 0))
    assert.equal(15, core.backoff(10, 1, 30, 0.5, 1))
  end)

  it("decides retries from status, attempts and deadline", function()
    assert.equal(1, core.retry_decision({ status = 503, attempt = 1, maxAttempts = 3 }))
    assert.is_nil(core.retry_decision({ status = 404, attempt = 1 }))
    assert.equal("not-retryable", select(2, core.retry_decision({ status = 404, attempt = 1 })))
    assert.equal("attempts", select(2, core.retry_decision({ status = 503, attempt = 3, maxAttempts = 3 })))
    assert.equal("deadline", select(2, core.retry_decision({ network = true, attempt = 1, now = 10, deadline = 10.5 })))
    assert.equal(42, core.retry_decision({ status = 429, attempt = 1, retryAfter = 42 }))
    for _, s in ipairs({ 429, 500, 503, 504 }) do assert.is_true(core.retryable(s)) end
    for _, s in ipairs({ 400, 401, 404, 409, 412, 502 }) do assert.is_false(core.retryable(s)) end
  end)

  it("decides monitor steps", function()
    assert.equal("done", (core.monitor_decision({ status = "completed", now = 0 })))
    assert.equal("timeout", (core.monitor_decision({ status = "running", now = 10, started = 0, timeout = 10 })))
    local action, delay = core.monitor_decision({ status = "running", now = 0, interval = 5, errors = 3, maxInterval = 30 })
    assert.equal("sleep", action)
    assert.equal(30, delay)
  end)
end)
