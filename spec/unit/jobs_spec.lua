-- Every JobClient operation's exact request, its validation, and its results, against a
-- recording transport and an injected clock.
local iothub = require "iothub"
local support = require "support.client"
local json = require "iothub.json"

local HOST = "myhub.azure-devices.net"
local KEY = "cGFzc3dvcmQ=" -- base64("password"), the reference's test key
local CS = "HostName=" .. HOST .. ";SharedAccessKeyName=iothubowner;SharedAccessKey=" .. KEY
-- With the clock at 1700000000 - 3600 a fresh token expires at 1700000000: the reference's
-- worked example, so the whole header is a known answer.
local EXPECTED_AUTH = "SharedAccessSignature sr=myhub.azure-devices.net" ..
  "&sig=QSsTq4hIq8YzaKkHvHYM34vUvXN2XD%2FX%2Byr4pyjF%2ByY%3D&se=1700000000&skn=iothubowner"
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- With the clock at 1700000000 - 3600 a fresh token expires at 1700000000 (see EXPECTED_AUTH).
local function make(script, opts)
  return support.make(iothub.JobClient, script, opts, 1700000000 - 3600)
end

local function job_body(fields)
  local job = { jobId = "job01", type = "scheduleDeviceMethod", status = "queued" }
  for k, v in pairs(fields or {}) do job[k] = v end
  return { status = 200, headers = { ["Content-Type"] = "application/json; charset=utf-8" }, body = job }
end

describe("JobClient requests", function()
  it("schedules a device method job exactly as the devguide's worked example", function()
    local jobs, rec = make({ job_body() })
    local job = assert(jobs:scheduleDeviceMethod("job01", "*",
      { methodName = "testMethod", payload = {}, responseTimeoutInSeconds = 30 },
      "2019-05-04T15:53:00.077Z", 20))
    assert.equal("queued", job.status)
    local req = rec:last()
    assert.equal("PUT", req.method)
    assert.equal("https://myhub.azure-devices.net/jobs/v2/job01?api-version=2021-04-12", req.url)
    assert.equal('{"jobId":"job01","type":"scheduleDeviceMethod","cloudToDeviceMethod":' ..
      '{"methodName":"testMethod","payload":{},"responseTimeoutInSeconds":30},"queryCondition":"*",' ..
      '"startTime":"2019-05-04T15:53:00.077Z","maxExecutionTimeInSeconds":20}', req.body)
    assert.equal(EXPECTED_AUTH, req.headers.authorization)
    assert.equal("application/json; charset=utf-8", req.headers["content-type"])
    assert.equal("application/json", req.headers.accept)
    assert.matches("^iothub%-jobs%-lua/", req.headers["user-agent"])
    assert.matches(UUID, req.headers["request-id"])
  end)

  it("fills the Node SDK's defaults: payload null, 30 s response timeout, start now, 3600 s", function()
    local jobs, rec, clock = make({ job_body() })
    assert(jobs:scheduleDeviceMethod("job01", "deviceId IN ['d1','d2']", { methodName = "lockDoor" }))
    local body = json.decode(rec:last().body)
    assert.equal(json.null, body.cloudToDeviceMethod.payload)
    assert.equal(30, body.cloudToDeviceMethod.responseTimeoutInSeconds)
    assert.equal(3600, body.maxExecutionTimeInSeconds)
    assert.equal(require("iothub.core").format_time(clock.time()), body.startTime)
    assert.matches('"payload":null', rec:last().body, 1, true)
    assert.is_nil(body.cloudToDeviceMethod.connectTimeoutInSeconds)
  end)

  it("accepts epoch seconds as startTime and sends UTC with Z", function()
    local jobs, rec = make({ job_body() })
    assert(jobs:scheduleDeviceMethod("job01", "*", { methodName = "m", connectTimeoutInSeconds = 10 }, 1556985180.077))
    local body = json.decode(rec:last().body)
    assert.equal("2019-05-04T15:53:00.077Z", body.startTime)
    assert.equal(10, body.cloudToDeviceMethod.connectTimeoutInSeconds)
  end)

  it("maps the 2016 tutorial's timeoutInSeconds to responseTimeoutInSeconds", function()
    local jobs, rec = make({ job_body() })
    assert(jobs:scheduleDeviceMethod("job01", "*", { methodName = "lockDoor", payload = json.null, timeoutInSeconds = 45 }))
    assert.equal(45, json.decode(rec:last().body).cloudToDeviceMethod.responseTimeoutInSeconds)
  end)

  it("moves the 2016 tutorial's top-level desired under properties and keeps etag '*'", function()
    local jobs, rec = make({ job_body({ type = "scheduleUpdateTwin" }) })
    assert(jobs:scheduleTwinUpdate("job02", "deviceId = 'test-device'",
      { etag = "*", desired = { building = "43", floor = 3 } }, "2019-05-08T12:19:56.868Z", 20))
    assert.equal('{"jobId":"job02","type":"scheduleUpdateTwin","updateTwin":{"etag":"*","properties":' ..
      '{"desired":{"building":"43","floor":3}}},"queryCondition":"deviceId = \'test-device\'",' ..
      '"startTime":"2019-05-08T12:19:56.868Z","maxExecutionTimeInSeconds":20}', rec:last().body)
  end)

  it("adds etag '*' to twin patches that lack it and passes tags through", function()
    local jobs, rec = make({ job_body({ type = "scheduleUpdateTwin" }) })
    assert(jobs:scheduleTwinUpdate("job02", "*", { tags = { key = "value" } }))
    local body = json.decode(rec:last().body)
    assert.same({ etag = "*", tags = { key = "value" } }, body.updateTwin)
  end)

  it("gets a job with a bodiless GET and returns integer statistics", function()
    local jobs, rec = make({ job_body({ status = "completed",
      deviceJobStatistics = { deviceCount = 3, failedCount = 0, succeededCount = 3, runningCount = 0, pendingCount = 0 } }) })
    local job = assert(jobs:getJob("job01"))
    local req = rec:last()
    assert.equal("GET", req.method)
    assert.equal("/jobs/v2/job01", req.path)
    assert.equal("api-version=2021-04-12", req.query)
    assert.is_nil(req.body)
    assert.is_nil(req.headers["content-type"])
    assert.equal(3, job.deviceJobStatistics.deviceCount)
    if math.type then
      assert.equal("integer", math.type(job.deviceJobStatistics.deviceCount))
      assert.equal("3", tostring(job.deviceJobStatistics.deviceCount))
    end
  end)

  it("reads a job the hub calls 'unknown' as not found", function()
    local jobs = make({ { status = 200, body = { jobId = "nope", type = "unknown", status = "unknown" } } })
    local job, err = jobs:getJob("nope")
    assert.is_nil(job)
    assert.equal(404, err.status)
    assert.equal("JobNotFound", err.code)
    assert.equal(404002, err.errorCode)
    assert.is_false(err.retryable)
  end)

  it("cancels with a bodiless POST to /cancel", function()
    local jobs, rec = make({ job_body({ status = "cancelled" }) })
    local job = assert(jobs:cancelJob("job01"))
    assert.equal("cancelled", job.status)
    local req = rec:last()
    assert.equal("POST", req.method)
    assert.equal("/jobs/v2/job01/cancel", req.path)
    assert.is_nil(req.body)
  end)

  it("lists jobs across pages with the continuation header and the same filters", function()
    local jobs, rec = make({
      { status = 200, headers = { ["x-ms-continuation"] = "tok1", ["x-ms-item-type"] = "JobResponse" },
        body = json.array({ { jobId = "a" }, { jobId = "b" } }) },
      { status = 200, headers = { ["x-ms-continuation"] = "tok2" }, body = json.array() },
      { status = 200, body = json.array({ { jobId = "c" } }) },
    })
    local ids = {}
    for job, err in jobs:queryJobs({ type = "scheduleDeviceMethod", status = "running", pageSize = 2 }) do
      assert.is_truthy(job, tostring(err))
      ids[#ids + 1] = job.jobId
    end
    assert.same({ "a", "b", "c" }, ids)
    assert.equal(3, #rec.requests)
    for i, req in ipairs(rec.requests) do
      assert.equal("GET", req.method)
      assert.equal("/jobs/v2/query", req.path)
      assert.equal("api-version=2021-04-12&jobStatus=running&jobType=scheduleDeviceMethod", req.query)
      assert.equal("2", req.headers["x-ms-max-item-count"])
      assert.equal(({ nil, "tok1", "tok2" })[i], req.headers["x-ms-continuation"])
    end
  end)

  it("omits filters and page size that were not given", function()
    local jobs, rec = make({ { status = 200, body = json.array() } })
    assert.same({}, jobs:queryJobs():all())
    assert.equal("api-version=2021-04-12", rec:last().query)
    assert.is_nil(rec:last().headers["x-ms-max-item-count"])
  end)

  it("streams device job rows from devices/query", function()
    local jobs, rec = make({
      { status = 200, headers = { ["x-ms-continuation"] = "c1" },
        body = json.array({ { deviceId = "d1", jobId = "job01", status = "completed",
          outcome = { deviceMethodResponse = { status = 200, payload = json.null } } } }) },
      { status = 200, body = json.array({ { deviceId = "d2", jobId = "job01", status = "failed",
        error = { code = "DeviceNotOnline", description = "Timed out waiting for device to connect" } } }) },
    })
    local rows = assert(jobs:deviceJobs("job01", { pageSize = 1 }):all())
    assert.equal(2, #rows)
    assert.equal(200, rows[1].outcome.deviceMethodResponse.status)
    assert.equal("DeviceNotOnline", rows[2].error.code)
    local req = rec.requests[1]
    assert.equal("POST", req.method)
    assert.equal("/devices/query", req.path)
    assert.equal('{"query":"SELECT * FROM devices.jobs WHERE devices.jobs.jobId = \'job01\'"}', req.body)
    assert.equal("application/json; charset=utf-8", req.headers["content-type"])
    assert.equal("c1", rec.requests[2].headers["x-ms-continuation"])
    assert.equal(req.body, rec.requests[2].body)
  end)

  it("filters device rows by status with the device-level spelling", function()
    local jobs, rec = make({ { status = 200, body = json.array() } })
    assert(jobs:deviceJobs("job01", { status = "canceled" }):all())
    assert.matches("AND devices.jobs.status = 'canceled'", rec:last().body, 1, true)
    local _, err = jobs:deviceJobs("job01", { status = "cancelled" }):all()
    assert.matches("canceled", err.message)
  end)

  it("overrides the endpoint while the SAS still signs HostName", function()
    local jobs, rec = make({ job_body() }, { endpoint = "http://127.0.0.1:8080/" })
    assert(jobs:getJob("job01"))
    assert.equal("http://127.0.0.1:8080/jobs/v2/job01?api-version=2021-04-12", rec:last().url)
    assert.equal(EXPECTED_AUTH, rec:last().headers.authorization)
  end)

  it("sends a configured api-version", function()
    local jobs, rec = make({ job_body() }, { apiVersion = "2024-03-31" })
    assert(jobs:getJob("job01"))
    assert.equal("api-version=2024-03-31", rec:last().query)
  end)
end)

describe("JobClient validation before any I/O", function()
  local function refused(call, pattern)
    local jobs, rec = make({})
    local result, err = call(jobs)
    assert.is_nil(result)
    assert.equal("invalid_argument", err.kind)
    if pattern then assert.matches(pattern, err.message) end
    assert.equal(0, #rec.requests)
    return err
  end
  local M = { methodName = "m" }

  it("refuses bad job ids", function()
    refused(function(j) return j:scheduleDeviceMethod("my job", "*", M) end, "not allowed")
    refused(function(j) return j:scheduleDeviceMethod(("a"):rep(65), "*", M) end, "64")
    refused(function(j) return j:getJob("") end)
    refused(function(j) return j:cancelJob("a/b") end)
  end)

  it("refuses a full SELECT and hints at the WHERE clause", function()
    local err = refused(function(j)
      return j:scheduleDeviceMethod("j1", "SELECT * FROM devices WHERE tags.building = '43'", M)
    end)
    assert.matches("tags.building = '43'", err.message, 1, true)
  end)

  it("refuses empty and over-long conditions", function()
    refused(function(j) return j:scheduleDeviceMethod("j1", "", M) end)
    refused(function(j) return j:scheduleDeviceMethod("j1", "deviceId = '" .. ("x"):rep(8200) .. "'", M) end, "8192")
  end)

  it("refuses method timeouts out of range and oversize payloads", function()
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", { methodName = "m", responseTimeoutInSeconds = 4 }) end, "5 and 300")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", { methodName = "m", responseTimeoutInSeconds = 301 }) end, "5 and 300")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", { methodName = "m", connectTimeoutInSeconds = 301 }) end, "0 and 300")
    refused(function(j)
      return j:scheduleDeviceMethod("j1", "*", { methodName = "m", payload = { blob = ("x"):rep(131072) } })
    end, "128 KB")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", { methodName = "" }) end, "methodName")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", { methodName = "m", responseTimeout = 5 }) end, "unknown field")
  end)

  it("refuses twin patches the hub would reject", function()
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { etag = "AAAA", tags = { a = "1" } }) end, "'%*'")
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { properties = { desired = { ["floor no"] = 3 } } }) end, "floor no")
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { properties = { reported = { a = 1 } } }) end, "reported")
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { tags = { ["a$b"] = 1 } }) end)
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { etag = "*" }) end, "nothing")
    refused(function(j) return j:scheduleTwinUpdate("j1", "*", { desired = { a = 1 }, properties = {} }) end)
  end)

  it("refuses bad start times and execution limits", function()
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", M, "2023-02-30T00:00:00Z") end, "startTime")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", M, nil, 0) end, "maxExecutionTimeInSeconds")
    refused(function(j) return j:scheduleDeviceMethod("j1", "*", M, nil, 1.5) end, "maxExecutionTimeInSeconds")
  end)

  it("refuses unknown list filters with the right spelling hint", function()
    local jobs, rec = make({})
    local item, err = jobs:queryJobs({ status = "canceled" })()
    assert.is_false(item)
    assert.matches("cancelled", err.message)
    assert.equal(0, #rec.requests)
  end)

  it("raises on misuse (wrong argument types)", function()
    local jobs = make({})
    assert.has_error(function() jobs:getJob(42) end)
    assert.has_error(function() jobs:scheduleDeviceMethod("j1", "*", "lockDoor") end)
    assert.has_error(function() jobs:scheduleDeviceMethod("j1", 7, M) end)
    assert.has_error(function() iothub.JobClient.fromConnectionString(CS, { caFlie = "x" }) end, nil)
    assert.has_error(function() iothub.JobClient.fromConnectionString(CS, { timeout = "10" }) end)
  end)
end)

describe("numbers", function()
  it("sends 64-bit integers exactly under Lua 5.4 and refuses ambiguous floats", function()
    local jobs, rec = make({ job_body() })
    if math.type then
      assert(jobs:scheduleDeviceMethod("j1", "*", { methodName = "m", payload = { big = 9007199254740993 } }))
      assert.matches('"big":9007199254740993', rec:last().body, 1, true)
    end
    local _, err = jobs:scheduleDeviceMethod("j1", "*", { methodName = "m", payload = { big = 2^53 + 2.0 } })
    assert.equal("invalid_argument", err.kind)
    assert.matches("2^53", err.message, 1, true)
  end)
end)
