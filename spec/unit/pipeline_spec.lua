-- Errors, retries, idempotent job creation and credentials, with an injected clock.
local iothub = require "iothub"
local support = require "support.client"
local errors = require "iothub.errors"
local json = require "iothub.json"
local Recorder = require "support.recording_transport"
local FakeClock = require "support.fake_clock"


local function make(script, opts)
  return support.make(iothub.JobClient, script, opts, 1700000000 - 3600)
end

local JOB = { status = 200, body = { jobId = "job01", type = "scheduleDeviceMethod", status = "running" } }
local NET = { err = { kind = "network", code = "CURLE_COULDNT_CONNECT", message = "cannot connect to https://myhub:443" } }

describe("service errors", function()
  it("parses envelope A with the iothub-errorcode header", function()
    local jobs = make({ { status = 404, headers = { ["iothub-errorcode"] = "DeviceNotFound" },
      body = '{"Message":"ErrorCode:DeviceNotFound;Device x was not found",' ..
        '"ExceptionMessage":"Tracking ID:abc123-G:5-TimeStamp:01/18/2017 08:11:45"}' } })
    local _, err = jobs:getJob("job01")
    assert.equal("service", err.kind)
    assert.equal(404, err.status)
    assert.equal("DeviceNotFound", err.code)
    assert.equal(404001, err.errorCode)
    assert.equal("Device x was not found", err.message)
    assert.equal("abc123-G:5-TimeStamp:01/18/2017", err.trackingId)
    assert.matches("^%x+%-", err.requestId)
    assert.is_false(err.retryable)
  end)

  it("parses envelope B nested as a JSON string inside Message", function()
    local inner = json.encode({ errorCode = 404103, trackingId = "t-1", message = "Timed out waiting for device to connect.",
      info = { timeout = "00:01:00" }, timestampUtc = "2018-11-07T09:22:57.6054134Z" })
    local jobs = make({ { status = 404, body = json.encode({ Message = inner, ExceptionMessage = "" }) } })
    local _, err = jobs:getJob("job01")
    assert.equal(404103, err.errorCode)
    assert.equal("DeviceNotOnline", err.code)
    assert.equal("t-1", err.trackingId)
    assert.equal("Timed out waiting for device to connect.", err.message)
  end)

  it("parses envelope B unwrapped and the throttling body nested inside envelope A", function()
    local jobs = make({ { status = 400, body = '{"errorCode":400004,"trackingId":"t-2","message":"bad arg","timestampUtc":"x"}' } })
    local _, err = jobs:getJob("job01")
    assert.equal("ArgumentInvalid", err.code)
    assert.equal("bad arg", err.message)
    local inner = json.encode({ Message = "ErrorCode:ThrottlingMaxActiveJobCountExceeded;429",
      ExceptionMessage = "Tracking ID:inner-1" })
    local throttled = json.encode({ Message = "ErrorCode:ThrottlingMaxActiveJobCountExceeded;Error: 429 " .. inner,
      ExceptionMessage = "Tracking ID:outer-1-G:3-TimeStamp:02/05/2018 11:41:55" })
    jobs = make({ { status = 429, body = throttled } }, { retry = false })
    _, err = jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" })
    assert.equal("ThrottlingMaxActiveJobCountExceeded", err.code)
    assert.equal(429004, err.errorCode)
    assert.is_true(err.retryable)
    assert.is_truthy(err.trackingId)
  end)

  it("prints as one readable line without secrets", function()
    local jobs = make({ { status = 401, headers = { ["iothub-errorcode"] = "IotHubUnauthorizedAccess" },
      body = '{"Message":"ErrorCode:IotHubUnauthorizedAccess;Unauthorized sig=abcdef%2B","ExceptionMessage":"Tracking ID:t9"}' } })
    local _, err = jobs:getJob("job01")
    local line = tostring(err)
    assert.is_nil(line:find("\n"))
    assert.matches("getJob 'job01' failed: HTTP 401 IotHubUnauthorizedAccess %(401002%)", line)
    assert.matches("trackingId=t9", line, 1, true)
    assert.matches("requestId=", line, 1, true)
    assert.is_nil(line:find("abcdef", 1, true))
  end)

  it("reads a proxy's HTML error page by its title, never echoing what it repeats", function()
    local page = "<html>\r\n<head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>" ..
      "<!-- Authorization: SharedAccessSignature sr=h&sig=SECRET1&se=1 --></body></html>"
    local jobs = make({ { status = 502, headers = { ["content-type"] = "text/html" }, body = page } }, { retry = false })
    local _, err = jobs:getJob("job01")
    assert.equal("service", err.kind)
    assert.equal(502, err.status)
    assert.equal("an HTML page, as a proxy in between sends: 502 Bad Gateway", err.message)
    assert.is_true(err.retryable)
    -- no title: the page's text, comments dropped, whitespace folded, secrets redacted
    jobs = make({ { status = 503, body = "<html><body>\n  <p>Service   down</p> sig=SECRET2 </body></html>" } },
      { retry = false })
    _, err = jobs:getJob("job01")
    assert.equal("an HTML page, as a proxy in between sends: Service down sig=<redacted>", err.message)
  end)

  it("shows a body that is neither JSON nor HTML readably and short", function()
    local jobs = make({ { status = 500, body = "not json \0\1\255 Authorization: SharedAccessSignature sr=h&sig=SECRET3&se=1 " ..
      ("x"):rep(400) } }, { retry = false })
    local _, err = jobs:getJob("job01")
    assert.equal("service", err.kind)
    assert.matches("^not json %?%?%? Authorization: SharedAccessSignature <redacted> x+%.%.%.$", err.message)
    assert.is_nil(tostring(err):find("SECRET", 1, true))
    assert.is_true(#err.message < 240)
  end)

  it("redacts signatures, keys and bearer tokens", function()
    local s = errors.redact("SharedAccessSignature sr=h&sig=SECRET1&se=1;SharedAccessKey=SECRET2; Bearer SECRET3")
    assert.is_nil(s:find("SECRET", 1, true))
  end)

  it("redacts tokens in connection strings and passwords in URLs, but keeps prose", function()
    local s = errors.redact("HostName=h;SharedAccessSignature=SharedAccessSignature sr=h&sig=SECRET1&se=1&skn=p")
    assert.is_nil(s:find("SECRET", 1, true))
    s = errors.redact("GET http://user:SECRET2@127.0.0.1:1/jobs/v2/x failed")
    assert.equal("GET http://<redacted>@127.0.0.1:1/jobs/v2/x failed", s)
    local prose = "the SharedAccessSignature expired at 2026-01-01T00:00:00Z; create a new one"
    assert.equal(prose, errors.redact(prose))
  end)
end)

describe("retries", function()
  it("retries 503 with exponential backoff and succeeds", function()
    local jobs, rec, clock = make({ { status = 503 }, { status = 503 }, JOB })
    local job = assert(jobs:getJob("job01"))
    assert.equal("running", job.status)
    assert.equal(3, #rec.requests)
    assert.same({ 1, 2 }, clock.sleeps)
    assert.are_not.equal(rec.requests[1].headers["request-id"], rec.requests[2].headers["request-id"])
  end)

  it("applies jitter from the injected random source", function()
    local jobs, _, clock = make({ { status = 500 }, JOB }, { random = function() return 1 end })
    assert(jobs:getJob("job01"))
    assert.same({ 0.5 }, clock.sleeps)
  end)

  it("waits at least the hub's throttling delay on 429 and honours Retry-After", function()
    local jobs, _, clock = make({
      { status = 429, body = '{"Message":"ErrorCode:ThrottlingMaxActiveJobCountExceeded;429"}' },
      { status = 429, headers = { ["Retry-After"] = "7" } },
      JOB,
    })
    assert(jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" }))
    assert.equal(2, #clock.sleeps)
    assert.is_true(clock.sleeps[1] >= 5)
    assert.equal(7, clock.sleeps[2])
  end)

  it("honours Retry-After as an HTTP-date and ignores one it cannot read", function()
    -- the fake clock's wall time is 1699996400 (2023-11-14T21:13:20Z) plus elapsed time
    local jobs, _, clock = make({ { status = 503, headers = { ["Retry-After"] = "Tue, 14 Nov 2023 21:13:32 GMT" } },
      { status = 503, headers = { ["Retry-After"] = "in a while" } }, JOB })
    assert(jobs:getJob("job01"))
    assert.same({ 12, 2 }, clock.sleeps) -- then the ordinary backoff for the second attempt
  end)

  it("carries the answer's Retry-After on the error, in seconds", function()
    local jobs = make({ { status = 429, headers = { ["Retry-After"] = "42" } } }, { retry = false })
    local _, err = jobs:getJob("job01")
    assert.equal(42, err.retryAfter)
  end)

  it("retries a 2xx answer that is not JSON, as a lost answer", function()
    local jobs, rec = make({ { status = 200, body = "{\"jobId\": \"job0" }, JOB })
    assert.equal("running", assert(jobs:getJob("job01")).status)
    assert.equal(2, #rec.requests)
    jobs = make({ { status = 200, headers = { ["content-type"] = "text/html" }, body = "<html>portal</html>" } },
      { retry = false })
    local _, err = jobs:getJob("job01")
    assert.equal("protocol", err.kind)
    assert.equal("InvalidResponse", err.code)
    assert.equal(200, err.status)
    assert.is_true(err.retryable)
    assert.matches("not valid JSON .*an HTML page", err.message)
  end)

  it("retries an answer cut short, a protocol error", function()
    local cut = { err = { kind = "protocol", code = "CURLE_PARTIAL_FILE",
      message = "the answer was cut short: transfer closed with 40 bytes remaining to read" } }
    local jobs, rec = make({ cut, JOB })
    assert(jobs:getJob("job01"))
    assert.equal(2, #rec.requests)
    jobs = make({ cut, cut }, { retry = { maxAttempts = 2 } })
    local _, err = jobs:getJob("job01")
    assert.equal("protocol", err.kind)
    assert.equal(2, err.attempts)
  end)

  it("retries network errors and gives up after maxAttempts", function()
    local jobs, rec = make({ NET, NET, NET }, { retry = { maxAttempts = 3 } })
    local _, err = jobs:getJob("job01")
    assert.equal("network", err.kind)
    assert.equal("CURLE_COULDNT_CONNECT", err.code)
    assert.equal(3, err.attempts)
    assert.equal(3, #rec.requests)
    assert.matches("after 3 attempts", tostring(err), 1, true)
  end)

  it("does not retry client errors or TLS failures", function()
    local jobs, rec = make({ { status = 400 }, JOB })
    assert.is_nil(jobs:getJob("job01"))
    assert.equal(1, #rec.requests)
    jobs, rec = make({ { err = { kind = "tls", code = "CURLE_PEER_FAILED_VERIFICATION", message = "bad cert" } }, JOB })
    local _, err = jobs:getJob("job01")
    assert.equal("tls", err.kind)
    assert.equal(1, #rec.requests)
  end)

  it("stops at the retry deadline", function()
    local jobs, rec = make({ { status = 503 }, { status = 503 }, { status = 503 }, JOB },
      { retry = { deadline = 2.5, maxAttempts = 10 } })
    local _, err = jobs:getJob("job01")
    assert.equal(503, err.status)
    assert.equal(2, #rec.requests) -- 1 s, then 2 s would pass the 2.5 s deadline
  end)

  it("never retries when retry = false", function()
    local jobs, rec = make({ { status = 503 }, JOB }, { retry = false })
    assert.is_nil(jobs:getJob("job01"))
    assert.equal(1, #rec.requests)
  end)

  it("reports each retry through onRetry", function()
    local seen = {}
    local jobs = make({ { status = 503 }, JOB }, { onRetry = function(info) seen[#seen + 1] = info end })
    assert(jobs:getJob("job01"))
    assert.equal(1, #seen)
    assert.equal("getJob", seen[1].operation)
    assert.equal(1, seen[1].delay)
    assert.equal(503, seen[1].error.status)
  end)
end)

describe("the rollout's job creation", function()
  local LIMIT = { status = 429, headers = { ["iothub-errorcode"] = "ThrottlingMaxActiveJobCountExceeded" },
    body = '{"errorCode":429004,"message":"too many active jobs"}' }

  it("returns the hub's active-job limit (429004) at once and retries other failures by the client's policy", function()
    local jobs, rec, clock = make({ { status = 503 }, LIMIT })
    local job, err = jobs:_schedule("scheduleDeviceMethod", "job01", "*", { methodName = "m" }, nil, nil,
      { activeJobLimitFinal = true })
    assert.is_nil(job)
    assert.equal(429004, err.errorCode)
    assert.is_true(err.retryable)
    assert.equal(2, #rec.requests)
    assert.same({ 1 }, clock.sleeps)
  end)

  it("waits for a free slot as long as the client's throttling policy says, Retry-After first", function()
    local jobs = make({})
    local err = errors.new({ kind = "service", status = 429, errorCode = 429004, retryable = true })
    assert.equal(10, jobs.pipeline:retry_delay(err, 1))
    err.retryAfter = 3
    assert.equal(3, jobs.pipeline:retry_delay(err, 1))
  end)
end)

describe("idempotent job creation", function()
  local CREATED = { status = 200, body = { jobId = "job01", type = "scheduleDeviceMethod", status = "queued",
    queryCondition = "*", startTime = "2023-11-14T21:13:20.0000000Z", cloudToDeviceMethod = { methodName = "m" } } }
  local CONFLICT = { status = 409, headers = { ["iothub-errorcode"] = "JobAlreadyExists" },
    body = '{"Message":"ErrorCode:JobAlreadyExists;job exists"}' }

  it("reads the job back when a retried PUT meets its own job (409 after a lost response)", function()
    local jobs, rec = make({ NET, CONFLICT, CREATED })
    local job, err = jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" })
    assert.is_truthy(job, tostring(err))
    assert.equal("job01", job.jobId)
    assert.same({ "PUT", "PUT", "GET" }, { rec.requests[1].method, rec.requests[2].method, rec.requests[3].method })
  end)

  it("reports a real conflict when the existing job is a different one", function()
    local other = { status = 200, body = { jobId = "job01", type = "scheduleUpdateTwin", status = "completed",
      queryCondition = "*" } }
    local jobs = make({ { status = 503 }, CONFLICT, other })
    local job, err = jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" })
    assert.is_nil(job)
    assert.equal(409, err.status)
    assert.equal("JobAlreadyExists", err.code)
  end)

  it("reports a first-attempt 409 for someone else's job as a conflict", function()
    local older = { status = 200, body = { jobId = "job01", type = "scheduleDeviceMethod", status = "completed",
      queryCondition = "*", startTime = "2020-01-06T21:44:00.8884134Z", cloudToDeviceMethod = { methodName = "m" } } }
    local jobs, rec = make({ CONFLICT, older })
    local _, err = jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" })
    assert.equal(409, err.status)
    assert.matches("must be unique", err.message)
    assert.equal(2, #rec.requests)
  end)

  it("resolves a PUT whose 2xx answer was unreadable through the 409 read-back", function()
    local jobs, rec = make({ { status = 200, body = "garbage" }, CONFLICT, CREATED })
    local job = assert(jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" }))
    assert.equal("queued", job.status)
    assert.same({ "PUT", "PUT", "GET" }, { rec.requests[1].method, rec.requests[2].method, rec.requests[3].method })
  end)

  it("accepts a first-attempt 409 for its own job (libcurl resent after a dropped connection)", function()
    local jobs, rec = make({ CONFLICT, CREATED })
    local job = assert(jobs:scheduleDeviceMethod("job01", "*", { methodName = "m" }))
    assert.equal("queued", job.status)
    assert.equal("GET", rec.requests[2].method)
  end)
end)

describe("credentials", function()
  it("caches the SAS token and renews it before expiry", function()
    local jobs, rec, clock = make({ JOB, JOB, JOB })
    assert(jobs:getJob("job01"))
    clock:advance(10)
    assert(jobs:getJob("job01"))
    assert.equal(rec.requests[1].headers.authorization, rec.requests[2].headers.authorization)
    clock:advance(3300) -- within five minutes of expiry
    assert(jobs:getJob("job01"))
    local se = rec.requests[3].headers.authorization:match("se=(%d+)")
    assert.equal(1700000000 + 3310, tonumber(se))
  end)

  it("uses a SharedAccessSignature connection string until it expires", function()
    local token = "SharedAccessSignature sr=myhub.azure-devices.net&sig=abc%3D&se=1700000100&skn=service"
    local clock = FakeClock.new(1700000000)
    local rec = Recorder.new({ JOB })
    local jobs = assert(iothub.JobClient.fromConnectionString("HostName=myhub.azure-devices.net;SharedAccessSignature=" .. token,
      { transport = rec, clock = clock, sleep = clock.sleep }))
    assert(jobs:getJob("job01"))
    assert.equal(token, rec:last().headers.authorization)
    clock:advance(200)
    local _, err = jobs:getJob("job01")
    assert.equal("auth", err.kind)
    assert.equal("TokenExpired", err.code)
    assert.equal(1, #rec.requests)
    assert.is_nil(tostring(err):find("abc", 1, true))
  end)

  it("accepts a bearer-token callback and refreshes it near expiry", function()
    local calls = 0
    local clock = FakeClock.new(1700000000)
    local rec = Recorder.new({ JOB, JOB, JOB })
    local jobs = assert(iothub.JobClient.fromTokenCredential("myhub.azure-devices.net", function()
      calls = calls + 1
      return "tok" .. calls, clock.time() + 3600
    end, { transport = rec, clock = clock, sleep = clock.sleep }))
    assert(jobs:getJob("job01"))
    assert(jobs:getJob("job01"))
    assert.equal("Bearer tok1", rec.requests[2].headers.authorization)
    clock:advance(3400)
    assert(jobs:getJob("job01"))
    assert.equal("Bearer tok2", rec.requests[3].headers.authorization)
    assert.equal(2, calls)
  end)

  it("reports a failing token callback as an auth error without sending", function()
    local rec = Recorder.new({})
    local jobs = assert(iothub.JobClient.fromTokenCredential("h.azure-devices.net", function() return nil, "no login" end,
      { transport = rec }))
    local _, err = jobs:getJob("job01")
    assert.equal("auth", err.kind)
    assert.matches("no login", err.message)
    assert.equal(0, #rec.requests)
  end)

  it("names the bad part of a connection string and never echoes the key", function()
    local secret = "c2VjcmV0c2VjcmV0c2VjcmV0"
    local cases = {
      "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner",
      "SharedAccessKeyName=iothubowner;SharedAccessKey=" .. secret,
      "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. secret .. "!!",
      "HostName=h.azure-devices.net;DeviceId=d1;SharedAccessKey=" .. secret,
      "HostName=h.azure-devices.net;" .. secret,
    }
    for _, cs in ipairs(cases) do
      local client, err = iothub.JobClient.fromConnectionString(cs)
      assert.is_nil(client)
      assert.equal("InvalidConnectionString", err.code)
      assert.is_nil(tostring(err):find(secret, 1, true), tostring(err))
    end
  end)
end)
