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

  it("waits at least a failed poll's Retry-After before the next poll", function()
    local jobs, rec, clock = make({ job("running"), { status = 503, headers = { ["Retry-After"] = "7" } },
      { status = 429, headers = { ["Retry-After"] = "1" } }, job("completed") })
    assert(jobs:monitorJob("job01", { interval = 2, maxInterval = 60 }))
    -- 7 s as asked (backoff alone would be 4); then the backoff's 8 s, more than the 1 s asked
    assert.same({ 2, 7, 8 }, clock.sleeps)
    assert.equal(4, #rec.requests)
  end)

  it("honours an HTTP-date Retry-After on a poll", function()
    local jobs, _, clock = make({ job("running"), { status = 503 }, job("completed") })
    -- the fake clock's wall time is 1700000000 + elapsed; the answer asks for 1700000030
    jobs.pipeline:transport().script[2].headers = { ["Retry-After"] = "Tue, 14 Nov 2023 22:13:50 GMT" }
    assert(jobs:monitorJob("job01", { interval = 2 }))
    assert.equal(2, clock.sleeps[1])
    assert.near(28, clock.sleeps[2], 1e-9) -- 30 s from the start, 2 of them already slept
  end)

  it("says the hub was unavailable when polls kept failing until the deadline", function()
    local script = { job("running") }
    for i = 2, 10 do script[i] = { status = 503, headers = { ["iothub-errorcode"] = "ServiceUnavailable" } } end
    local jobs, rec, clock = make(script)
    local final, err = jobs:monitorJob("job01", { interval = 2, timeout = 10 })
    assert.is_nil(final)
    assert.equal("unavailable", err.kind)
    assert.equal("HubUnavailable", err.code)
    assert.is_true(err.retryable)
    assert.same({ 2, 4, 4 }, clock.sleeps) -- polls at 0, 2, 6 and 10 s; the last two cut at the deadline
    assert.equal(4, #rec.requests)
    assert.equal(503, err.lastError.status)
    assert.equal("running", err.job.status)
    local text = tostring(err)
    assert.matches("monitorJob 'job01' failed: HubUnavailable: hub unavailable: the hub kept failing until the " ..
      "monitor's 10 s timeout (3 polls in a row); last error: getJob 'job01' failed: HTTP 503 ServiceUnavailable", text, 1, true)
    assert.matches("last seen: status running", text, 1, true)
  end)

  it("makes the CLI exit with the code of the hub's last failure", function()
    local exitcodes = require "iothub.cli.exitcodes"
    local jobs = make({ job("running"), { status = 503 }, { status = 503 }, { status = 503 } })
    local _, err = jobs:monitorJob("job01", { interval = 2, timeout = 4 })
    assert.equal("HubUnavailable", err.code)
    assert.equal(exitcodes.SERVICE, exitcodes.for_error(err))
    local NET = { err = { kind = "network", code = "CURLE_COULDNT_CONNECT", message = "refused" } }
    jobs = make({ job("running"), NET, NET, NET })
    _, err = jobs:monitorJob("job01", { interval = 2, timeout = 4 })
    assert.equal(exitcodes.NETWORK, exitcodes.for_error(err))
  end)

  it("stops at once, hub unavailable, when Retry-After asks to wait past the deadline", function()
    local jobs, rec, clock = make({ job("running"), { status = 429, headers = { ["Retry-After"] = "600" } }, job("completed") })
    local final, err = jobs:monitorJob("job01", { interval = 2, timeout = 60 })
    assert.is_nil(final)
    assert.equal("HubUnavailable", err.code)
    assert.matches("asked to wait 600 s (Retry-After) before the next poll, past the monitor's 60 s timeout", err.message, 1, true)
    assert.same({ 2 }, clock.sleeps)
    assert.equal(2, #rec.requests)
  end)

  it("keeps MonitorTimeout for a job merely still running, even after failures it got past", function()
    local jobs, _, clock = make({ job("running"), { status = 500 }, job("running"), job("running"), job("running") })
    local final, err = jobs:monitorJob("job01", { interval = 3, timeout = 10 })
    assert.is_nil(final)
    assert.equal("timeout", err.kind)
    assert.equal("MonitorTimeout", err.code)
    assert.is_nil(err.lastError)
    assert.same({ 3, 6, 1 }, clock.sleeps)
  end)

  it("keeps watching through an answer that is not JSON", function()
    local jobs, rec = make({ job("running"), { status = 200, body = "<html>captive portal</html>" }, job("completed") })
    assert.equal("completed", assert(jobs:monitorJob("job01", { interval = 1 })).status)
    assert.equal(3, #rec.requests)
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
    -- 502 is a proxy's or gateway's answer (the hub sends it only for a device's bad method
    -- answer, and direct methods are never retried): retried, as Azure's msrest does.
    for _, s in ipairs({ 429, 500, 502, 503, 504 }) do assert.is_true(core.retryable(s)) end
    for _, s in ipairs({ 400, 401, 404, 409, 412, 501 }) do assert.is_false(core.retryable(s)) end
    -- no answer: retried unless TLS failed (a certificate will not verify the next time either)
    for _, k in ipairs({ "network", "timeout", "protocol" }) do assert.is_true(core.retryable(nil, k)) end
    assert.is_false(core.retryable(nil, "tls"))
    assert.equal("not-retryable", select(2, core.retry_decision({ kind = "tls", attempt = 1 })))
    assert.equal(1, core.retry_decision({ kind = "timeout", attempt = 1, jitter = 0 }))
    -- the active-job limit, for a caller that manages job slots
    assert.is_number(core.retry_decision({ status = 429, errorCode = 429004, attempt = 1 }))
    assert.equal("job-limit", select(2, core.retry_decision({ status = 429, errorCode = 429004, attempt = 1,
      activeJobLimitFinal = true })))
  end)

  it("decides monitor steps", function()
    assert.equal("done", (core.monitor_decision({ status = "completed", now = 0 })))
    assert.equal("timeout", (core.monitor_decision({ status = "running", now = 10, started = 0, timeout = 10 })))
    local action, delay = core.monitor_decision({ status = "running", now = 0, interval = 5, errors = 3, maxInterval = 30 })
    assert.equal("sleep", action)
    assert.equal(30, delay)
  end)

  it("gives the reason of every monitor step", function()
    local function decide(t) return { core.monitor_decision(t) } end
    assert.same({ "done", 0, "terminal" }, decide({ status = "failed" }))
    assert.same({ "sleep", 5, "interval" }, decide({ status = "running", now = 0 }))
    assert.same({ "sleep", 20, "backoff" }, decide({ status = "running", now = 0, errors = 2 }))
    assert.same({ "sleep", 100, "start-time" }, decide({ status = "scheduled", now = 0, startTime = 100, maxInterval = 300 }))
    assert.same({ "sleep", 3, "deadline" }, decide({ status = "running", now = 7, started = 0, timeout = 10 }))
    -- a failed poll's Retry-After: the next poll waits at least that long ...
    assert.same({ "sleep", 45, "retry-after" }, decide({ status = "running", now = 0, errors = 1, retryAfter = 45 }))
    assert.same({ "sleep", 10, "backoff" }, decide({ status = "running", now = 0, errors = 1, retryAfter = 3 }))
    -- ... and only a failed poll has one
    assert.same({ "sleep", 5, "interval" }, decide({ status = "running", now = 0, errors = 0, retryAfter = 45 }))
    -- stopping: still running at the deadline, or the hub failing until then / asking to wait past it
    assert.same({ "timeout", 0, "deadline" }, decide({ status = "running", now = 10, started = 0, timeout = 10 }))
    assert.same({ "unavailable", 0, "deadline" }, decide({ status = "running", now = 10, started = 0, timeout = 10, errors = 1 }))
    assert.same({ "unavailable", 0, "deadline" }, decide({ now = 10, started = 0, timeout = 10, errors = 4 }))
    assert.same({ "unavailable", 0, "retry-after" },
      decide({ status = "running", now = 0, started = 0, timeout = 60, errors = 1, retryAfter = 61 }))
    assert.same({ "sleep", 60, "retry-after" },
      decide({ status = "running", now = 0, started = 0, timeout = 60, errors = 1, retryAfter = 60 }))
  end)

  it("reads Retry-After as seconds or an HTTP-date in all three forms", function()
    local now = 784111777 - 30 -- 30 s before Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example)
    assert.equal(120, core.retry_after("120", now))
    assert.equal(0, core.retry_after("0", now))
    assert.equal(1.5, core.retry_after(" 1.5 ", now))
    assert.equal(7, core.retry_after(7, now))
    assert.equal(30, core.retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now))
    assert.equal(30, core.retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now))
    assert.equal(30, core.retry_after("Sun Nov  6 08:49:37 1994", now))
    assert.equal(30, core.retry_after("sun, 06 nov 1994 08:49:37 gmt", now))
    assert.equal(0, core.retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now + 3600)) -- passed: at once
    for _, bad in ipairs({ "", "  ", "soon", "-5", "1e3", "5s", "1.", ".5", "Sun, 06 Nov 1994 08:49:37",
      "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 24:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 GMT x",
      ("9"):rep(400), ("Sun, "):rep(30) }) do
      assert.is_nil(core.retry_after(bad, now), bad)
    end
    assert.is_nil(core.retry_after(nil, now))
    assert.is_nil(core.retry_after(-1, now))
    assert.is_nil(core.retry_after(0 / 0, now))
    assert.has_error(function() core.retry_after({}, now) end)
  end)
end)
