-- iothub.buildJobRequest: the body a schedule call PUTs, built without a client, and the
-- field it names when a request is refused.
local iothub = require "iothub"
local support = require "support.client"
local job_request = require "iothub.job_request"

local START = "2030-01-02T03:04:05Z"

local function accepted(req)
  return { status = 200, headers = { ["Content-Type"] = "application/json" },
    body = { jobId = "j", type = req.body:match('"type":"(%w+)"'), status = "queued" } }
end

local function client()
  return support.make(iothub.JobClient, { accepted }, nil, 1700000000)
end

describe("iothub.buildJobRequest", function()
  it("returns exactly the body scheduleDeviceMethod sends", function()
    local params = { methodName = "lockDoor", payload = { force = true, code = 1234 }, responseTimeoutInSeconds = 30 }
    local body = assert(iothub.buildJobRequest("method", "lock-1", "tags.building = '43'", params, START, 600))
    local jobs, rec = client()
    assert(jobs:scheduleDeviceMethod("lock-1", "tags.building = '43'", params, START, 600))
    assert.equal(rec.requests[1].body, body)
    assert.equal("/jobs/v2/lock-1", rec.requests[1].path)
  end)

  it("returns exactly the body scheduleTwinUpdate sends, with the normalised patch", function()
    local patch = { properties = { desired = { fw = "2.0" } }, tags = { ring = "canary" } }
    local body, normalised = iothub.buildJobRequest("twin", "fw-1", "tags.ring = 'canary'", patch, START)
    assert.is_string(body)
    assert.equal("*", normalised.etag)
    local jobs, rec = client()
    assert(jobs:scheduleTwinUpdate("fw-1", "tags.ring = 'canary'", patch, START))
    assert.equal(rec.requests[1].body, body)
  end)

  it("names the field at fault and sends nothing", function()
    local body, err = iothub.buildJobRequest("method", "j1", "*", { methodName = "has space" })
    assert.is_nil(body)
    assert.equal("methodParams.methodName", err.field)
    assert.matches("methodName", tostring(err))
    body, err = iothub.buildJobRequest("twin", "j1", "", { properties = { desired = { a = 1 } } })
    assert.is_nil(body)
    assert.equal("queryCondition", err.field)
    body, err = iothub.buildJobRequest("method", "j1", "*", { methodName = "m" }, "yesterday")
    assert.is_nil(body)
    assert.equal("startTime", err.field)
  end)

  it("raises for a kind that is neither method nor twin", function()
    assert.has_error(function() iothub.buildJobRequest("reboot", "j1", "*", {}) end)
  end)

  it("encodes a job id in the path text a plan prints", function()
    assert.equal("/jobs/v2/a%2Fb%20c", job_request.path_text("a/b c"))
    assert.equal("/jobs/v2/a%2Fb/cancel", job_request.path_text("a/b", true))
  end)
end)
