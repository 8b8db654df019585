-- End-to-end checks of the local IoT Hub emulator: starts bin/iothub-emulator with
-- examples/devices.lua on free ports (HTTP and HTTPS) and talks to it over real HTTP.
--   busted --lua=lua5.4 spec/emulator/service_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"
local token, inner_error, iso, sleep = E.token, E.inner_error, E.iso, E.sleep
local read_file, alive = shell.read_file, shell.alive
local V = E.API_VERSION

describe("iothub-emulator", function()
  local emu = E.shared({ https = true, ready_timeout = 15 })

  it("prints the connection string, endpoints and CA", function()
    local out = emu:output()
    assert.truthy(out:find("IOTHUB_CONNECTION_STRING=HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey="
      .. E.KEY .. "\n", 1, true))
    assert.truthy(out:find("endpoint http://127.0.0.1:" .. emu.http_port .. "\n", 1, true))
    assert.truthy(out:find("endpoint https://localhost:" .. emu.https_port .. "\n", 1, true))
    local ca = out:match("\nca ([^\n]+)\n")
    assert.truthy(ca and read_file(ca), "ca file")
    emu.ca = ca
  end)

  it("serves HTTPS with a certificate from its private CA", function()
    local status, body = emu:request("GET", "/twins/myDeviceId?" .. V, nil, nil,
      { base = "https://localhost:" .. emu.https_port, ca_file = emu.ca, fresh = true })
    assert.equal(200, status)
    assert.equal("myDeviceId", body.deviceId)
  end)

  describe("auth", function()
    local function assert_unauthorized(headers)
      local status, body, h = emu:request("GET", "/twins/myDeviceId?" .. V, nil, headers)
      assert.equal(401, status)
      assert.equal("IotHubUnauthorizedAccess", h["iothub-errorcode"])
      assert.equal("application/json; charset=utf-8", h["content-type"])
      local err = inner_error(body)
      assert.equal(401002, err.errorCode)
      assert.equal("Unauthorized", err.message)
      assert.is_string(err.trackingId)
      assert.is_string(err.timestampUtc)
    end

    it("rejects a bad signature with the hub's error envelope", function()
      assert_unauthorized({ Authorization = token({ key = core.base64_encode("wrong key, same length as ours!!") }) })
    end)

    it("rejects missing, expired, foreign-scope and unknown-policy tokens", function()
      assert_unauthorized({ Authorization = false })
      assert_unauthorized({ Authorization = token({ se = os.time() - 3600 }) })
      assert_unauthorized({ Authorization = token({ sr = "otherhub.azure-devices.net" }) })
      assert_unauthorized({ Authorization = token({ skn = "nosuchpolicy" }) })
      assert_unauthorized({ Authorization = token({ skn = "service" }) }) -- a real policy, but not this key
    end)

    it("accepts a valid token, also one scoped to a path under the host", function()
      assert.equal(200, (emu:api("GET", "/twins/myDeviceId")))
      assert.equal(200, (emu:api("GET", "/twins/myDeviceId", nil, { Authorization = token({ sr = "LOCALHOST/twins" }) })))
    end)

    it("requires api-version", function()
      local status, body, h = emu:request("GET", "/twins/myDeviceId")
      assert.equal(400, status)
      assert.equal("InvalidProtocolVersion", h["iothub-errorcode"])
      assert.equal(400001, inner_error(body).errorCode)
    end)
  end)

  describe("direct methods", function()
    it("runs the device's handler", function()
      local status, body = emu:api("POST", "/twins/myDeviceId/methods",
        { methodName = "lockDoor", payload = core.null, responseTimeoutInSeconds = 30 })
      assert.equal(200, status)
      assert.same({ status = 200, payload = { locked = true } }, body)
      sleep(0.3)
      assert.truthy(emu:output():find("[myDeviceId] Locking Door!", 1, true))
    end)

    it("answers 501 inside a 200 for a method the device does not handle", function()
      local status, body = emu:api("POST", "/twins/myDeviceId/methods", { methodName = "reboot" })
      assert.equal(200, status)
      assert.equal(501, body.status)
    end)

    it("maps unknown, offline devices and bad timeouts to the hub's errors", function()
      local status, body, h = emu:api("POST", "/twins/nosuch/methods", { methodName = "lockDoor" })
      assert.equal(404, status)
      assert.equal("DeviceNotFound", h["iothub-errorcode"])
      assert.equal(404001, inner_error(body).errorCode)
      status, body, h = emu:api("POST", "/twins/door-basement/methods", { methodName = "lockDoor" })
      assert.equal(404, status)
      assert.equal("DeviceNotOnline", h["iothub-errorcode"])
      assert.equal(404103, inner_error(body).errorCode)
      status, body = emu:api("POST", "/twins/myDeviceId/methods", { methodName = "lockDoor", responseTimeoutInSeconds = 301 })
      assert.equal(400, status)
      assert.equal(400004, inner_error(body).errorCode)
    end)
  end)

  describe("registry and twins", function()
    it("creates, conflicts on and deletes devices", function()
      local status, dev = emu:api("PUT", "/devices/spec-dev", { deviceId = "spec-dev" })
      assert.equal(200, status)
      assert.is_string(dev.authentication.symmetricKey.primaryKey)
      local s2, body = emu:api("PUT", "/devices/spec-dev", { deviceId = "spec-dev" })
      assert.equal(409, s2)
      assert.equal(409001, inner_error(body).errorCode)
      assert.equal(204, (emu:api("DELETE", "/devices/spec-dev", nil, { ["If-Match"] = '"*"' })))
      assert.equal(404, (emu:api("GET", "/devices/spec-dev")))
    end)

    it("merges twin patches, honours If-Match and bumps versions", function()
      local _, twin = emu:api("GET", "/twins/door-003")
      local status, patched = emu:api("PATCH", "/twins/door-003",
        { tags = { color = "red" }, properties = { desired = { mode = "eco" } } }, { ["If-Match"] = '"' .. twin.etag .. '"' })
      assert.equal(200, status)
      assert.equal("red", patched.tags.color)
      assert.equal("eco", patched.properties.desired.mode)
      assert.equal(twin.properties.desired["$version"] + 1, patched.properties.desired["$version"])
      assert.equal(twin.version + 1, patched.version)
      local s412, body = emu:api("PATCH", "/twins/door-003", { tags = { color = core.null } }, { ["If-Match"] = '"' .. twin.etag .. '"' })
      assert.equal(412, s412)
      assert.equal(412001, inner_error(body).errorCode)
      local _, cleared = emu:api("PATCH", "/twins/door-003", { tags = { color = core.null } }, { ["If-Match"] = "*" })
      assert.is_nil(cleared.tags.color)
    end)

    it("queries twins by tag", function()
      local status, rows, h = emu:api("POST", "/devices/query",
        { query = "SELECT * FROM devices WHERE tags.location.floor = 1 AND tags.location.building = '43'" })
      assert.equal(200, status)
      assert.equal("Twin", h["x-ms-item-type"])
      local ids = {}
      for _, r in ipairs(rows) do ids[#ids + 1] = r.deviceId end
      assert.same({ "door-001", "door-004" }, ids)
      local bad, body = emu:api("POST", "/devices/query", { query = "SELECT deviceId, COUNT() FROM devices" })
      assert.equal(400, bad)
      assert.truthy(inner_error(body).message:find("SELECT *", 1, true))
    end)
  end)

  describe("jobs", function()
    it("runs a method job on myDeviceId to completion with a 200 device row", function()
      local status, job = emu:api("PUT", "/jobs/v2/spec-method", {
        jobId = "spec-method", type = "scheduleDeviceMethod",
        cloudToDeviceMethod = { methodName = "lockDoor", payload = core.null, responseTimeoutInSeconds = 30 },
        queryCondition = "deviceId = 'myDeviceId'", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      assert.equal("queued", job.status)
      job = emu:wait_job("spec-method", "completed")
      assert.same({ deviceCount = 1, succeededCount = 1, failedCount = 0, runningCount = 0, pendingCount = 0 },
        job.deviceJobStatistics)
      local _, rows, h = emu:api("POST", "/devices/query",
        { query = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'spec-method'" })
      assert.equal("DeviceJob", h["x-ms-item-type"])
      assert.equal(1, #rows)
      assert.equal("myDeviceId", rows[1].deviceId)
      assert.equal("completed", rows[1].status)
      assert.equal("scheduleDeviceMethod", rows[1].jobType)
      assert.equal(200, rows[1].outcome.deviceMethodResponse.status)
      assert.same({ locked = true }, rows[1].outcome.deviceMethodResponse.payload)
    end)

    it("lands a twin job's desired properties", function()
      local status = emu:api("PUT", "/jobs/v2/spec-twin", {
        jobId = "spec-twin", type = "scheduleUpdateTwin",
        updateTwin = { etag = "*", properties = { desired = { building = "43", floor = 3 } } },
        queryCondition = "deviceId IN ['myDeviceId']", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      local job = emu:wait_job("spec-twin", "completed")
      assert.equal(1, job.deviceJobStatistics.succeededCount)
      local _, twin = emu:api("GET", "/twins/myDeviceId")
      assert.equal("43", twin.properties.desired.building)
      assert.equal(3, twin.properties.desired.floor)
      assert.equal(math.type and "integer" or "number", math.type and math.type(twin.properties.desired.floor) or "number")
    end)

    it("validates job requests", function()
      local base = { type = "scheduleUpdateTwin", updateTwin = { properties = { desired = { a = 1 } } },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 60 }
      -- A twin job must carry etag "*": the hub answers 412 PreconditionFailed (reference §3.6).
      local status, body = emu:api("PUT", "/jobs/v2/spec-bad", base)
      assert.equal(412, status)
      assert.equal(412001, inner_error(body).errorCode)
      base.updateTwin.etag = "*"
      base.type = "scheduleDirectMethod"
      local s2, _, h = emu:api("PUT", "/jobs/v2/spec-bad", base)
      assert.equal(400, s2)
      assert.equal("GenericBadRequest", h["iothub-errorcode"])
      local s3, _, h3 = emu:api("PUT", "/jobs/v2/spec-method", {
        jobId = "spec-method", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 60 })
      assert.equal(409, s3)
      assert.equal("JobAlreadyExists", h3["iothub-errorcode"])
      local s4, _, h4 = emu:api("GET", "/jobs/v2/no-such-job")
      assert.equal(404, s4)
      assert.equal("JobNotFound", h4["iothub-errorcode"])
    end)

    it("cancels a future job", function()
      local status = emu:api("PUT", "/jobs/v2/spec-future", {
        jobId = "spec-future", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time() + 6 * 86400), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      emu:wait_job("spec-future", "scheduled")
      local s2, job = emu:api("POST", "/jobs/v2/spec-future/cancel")
      assert.equal(200, s2)
      assert.equal("cancelled", job.status)
      assert.equal("cancelled", (select(2, emu:api("GET", "/jobs/v2/spec-future"))).status)
      local _, list, h = emu:api("GET", "/jobs/v2/query?jobStatus=Cancelled")
      assert.equal("JobResponse", h["x-ms-item-type"])
      assert.equal(1, #list)
      assert.equal("spec-future", list[1].jobId)
    end)

    it("pages devices.jobs rows with a continuation token", function()
      emu:api("PUT", "/jobs/v2/spec-all", {
        jobId = "spec-all", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      local job = emu:wait_job("spec-all", "completed")
      local total = job.deviceJobStatistics.deviceCount
      assert.is_true(total >= 7)
      assert.equal(1, job.deviceJobStatistics.failedCount) -- door-basement is offline
      local q = { query = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'spec-all'" }
      local seen, pages, continuation = {}, 0, nil
      repeat
        local status, rows, h = emu:api("POST", "/devices/query", q,
          { ["x-ms-max-item-count"] = "3", ["x-ms-continuation"] = continuation or false })
        assert.equal(200, status)
        assert.equal("DeviceJob", h["x-ms-item-type"])
        pages = pages + 1
        assert.is_true(#rows <= 3)
        for _, r in ipairs(rows) do
          assert.is_nil(seen[r.deviceId])
          seen[r.deviceId] = r
        end
        continuation = h["x-ms-continuation"]
        if continuation then assert.equal(3, #rows) end
      until not continuation or pages > 10
      assert.equal(math.ceil(total / 3), pages)
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.equal(total, n)
      assert.equal("failed", seen["door-basement"].status)
      assert.equal("DeviceNotOnline", seen["door-basement"].error.code)
    end)
  end)

  it("stops cleanly on SIGINT, exits 0 and leaves no nginx behind", function()
    local nginx_pid = tonumber(read_file(emu.dir .. "/nginx.pid") or "")
    assert.is_number(nginx_pid)
    assert.equal(0, emu:stop(E.INTERRUPT))
    assert.is_false(alive(nginx_pid))
    assert.truthy(emu:output():find("[hub]", 1, true))
  end)
end)
