-- The emulator's test controls under /_emulator/: auth, reset, the request log, fault
-- injection (status, delay, drop), the advanceable clock, run-time settings, device
-- connection and the state save. Starts the real launcher (no --dir: nothing persists).
--   busted --lua=lua5.4 spec/emulator/control_spec.lua
local core = require "iothub.core"
local E = require "support.emulator_process"
local inner_error, job, sleep = E.inner_error, E.job, E.sleep

describe("emulator control plane", function()
  local emu = E.shared({ temp_dir = true, reset_each = true })

  it("needs the same SAS auth as the hub API, but no api-version", function()
    local status, body, h = emu:request("GET", "/_emulator/clock", nil, { Authorization = false })
    assert.equal(401, status)
    assert.equal("IotHubUnauthorizedAccess", h["iothub-errorcode"])
    assert.equal(401002, inner_error(body).errorCode)
    local wrong = E.token({ key = core.base64_encode("wrong key, same length as ours!!") })
    assert.equal(401, (emu:request("GET", "/_emulator/clock", nil, { Authorization = wrong })))
    assert.equal(200, (emu:control("GET", "/_emulator/clock")))
    assert.equal(200, (emu:request("GET", "/_emulator/health", nil, { Authorization = false })))
  end)

  it("resets registry, twins, jobs, clock, faults and the log to the start state", function()
    assert.equal(200, (emu:api("PUT", "/devices/extra-dev", { deviceId = "extra-dev" })))
    assert.equal(200, (emu:api("PATCH", "/twins/door-001", { tags = { color = "red" } }, { ["If-Match"] = "*" })))
    assert.equal(200, (emu:api("PUT", "/jobs/v2/before-reset", job("before-reset"))))
    assert.equal(200, (emu:control("POST", "/_emulator/clock", { advanceSeconds = 86400 })))
    assert.equal(200, (emu:control("POST", "/_emulator/faults", { path = "*", status = 500, count = 5 })))

    local status, body = emu:control("POST", "/_emulator/reset")
    assert.equal(200, status)
    assert.same({ status = "ok" }, body)
    assert.equal(404, (emu:api("GET", "/devices/extra-dev")))
    assert.equal(404, (emu:api("GET", "/jobs/v2/before-reset")))
    local _, twin = emu:api("GET", "/twins/door-001")
    assert.is_nil(twin.tags.color)
    assert.equal("43", twin.tags.location.building) -- the devices file's fleet is back
    local _, clock = emu:control("GET", "/_emulator/clock")
    assert.equal(0, clock.offsetSeconds)
    local _, faults = emu:control("GET", "/_emulator/faults")
    assert.same({}, faults.faults)
    local _, log = emu:control("GET", "/_emulator/requests")
    assert.equal(3, #log.requests) -- only the three GETs above
  end)

  describe("request log", function()
    it("records hub API requests with route, status, duration and the client's Request-Id", function()
      local _, before = emu:control("GET", "/_emulator/requests")
      local mark = before.last
      emu:api("GET", "/twins/myDeviceId", nil, { ["Request-Id"] = "11111111-2222-4333-8444-555555555555" })
      emu:api("GET", "/jobs/v2/no-such-job")
      emu:request("GET", "/_emulator/health")
      local status, log = emu:control("GET", "/_emulator/requests?since=" .. mark)
      assert.equal(200, status)
      assert.equal(2, #log.requests) -- control and health routes are not recorded
      local a, b = log.requests[1], log.requests[2]
      assert.equal(mark + 1, a.seq)
      assert.equal("GET", a.method)
      assert.equal("/twins/myDeviceId", a.path)
      assert.equal("/twins/:id", a.route)
      assert.equal(200, a.status)
      assert.equal("11111111-2222-4333-8444-555555555555", a.requestId)
      assert.truthy(a.query:find("api-version=2021-04-12", 1, true))
      assert.is_number(a.durationMs)
      assert.truthy(a.time:match("^%d%d%d%d%-%d%d%-%d%dT"))
      assert.equal(404, b.status)
      assert.equal("/jobs/v2/:id", b.route)
      -- limit, then clearing
      local _, one = emu:control("GET", "/_emulator/requests?since=" .. mark .. "&limit=1")
      assert.equal(1, #one.requests)
      assert.equal(204, (emu:control("DELETE", "/_emulator/requests")))
      local _, cleared = emu:control("GET", "/_emulator/requests")
      assert.same({}, cleared.requests)
      assert.equal(400, (emu:control("GET", "/_emulator/requests?since=-1")))
    end)
  end)

  describe("faults", function()
    it("fails the next N matching requests with a status, the real envelope and Retry-After", function()
      local status, f = emu:control("POST", "/_emulator/faults",
        { method = "get", path = "/jobs/v2/{id}", status = 503, retryAfter = 2, count = 2 })
      assert.equal(200, status)
      assert.equal("GET", f.method)
      assert.equal("/jobs/v2/:id", f.path)
      assert.equal(2, f.remaining)
      assert.equal(200, (emu:api("PUT", "/jobs/v2/faulted", job("faulted")))) -- PUT: other method
      for _ = 1, 2 do
        local s, body, h = emu:api("GET", "/jobs/v2/faulted")
        assert.equal(503, s)
        assert.equal("ServiceUnavailable", h["iothub-errorcode"])
        assert.equal("2", h["retry-after"])
        assert.equal(503001, inner_error(body).errorCode)
      end
      assert.equal(200, (emu:api("GET", "/jobs/v2/faulted")))
      local _, log = emu:control("GET", "/_emulator/requests")
      local faulted = 0
      for _, r in ipairs(log.requests) do
        if r.fault == "status" then faulted = faulted + 1 end
      end
      assert.equal(2, faulted)
    end)

    it("takes an error name and message, and matches concrete paths and prefixes", function()
      emu:control("POST", "/_emulator/faults", { path = "/jobs/v2/*", method = "PUT", status = 429,
        errorCode = "ThrottlingMaxActiveJobCountExceeded", message = "busy" })
      local s, body, h = emu:api("PUT", "/jobs/v2/p1", job("p1"))
      assert.equal(429, s)
      assert.equal("ThrottlingMaxActiveJobCountExceeded", h["iothub-errorcode"])
      assert.same("busy", inner_error(body).message)
      assert.equal(429004, inner_error(body).errorCode)
      emu:control("POST", "/_emulator/faults", { path = "/twins/door-002", status = 500 })
      assert.equal(200, (emu:api("GET", "/twins/door-001")))
      assert.equal(500, (emu:api("GET", "/twins/door-002")))
      assert.equal(200, (emu:api("GET", "/twins/door-002")))
      emu:control("POST", "/_emulator/faults", { path = "*", status = 418 }) -- a status with no hub name
      local s418, b418, h418 = emu:api("GET", "/twins/door-003")
      assert.equal(418, s418)
      assert.equal(418000, inner_error(b418).errorCode)
      assert.equal("InjectedFault", h418["iothub-errorcode"])
    end)

    it("answers after a delay", function()
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", delay = 0.6 })
      local t0 = core.monotime()
      assert.equal(200, (emu:api("GET", "/twins/door-001")))
      assert.is_true(core.monotime() - t0 >= 0.55)
      t0 = core.monotime()
      assert.equal(200, (emu:api("GET", "/twins/door-001")))
      assert.is_true(core.monotime() - t0 < 0.5)
    end)

    it("drops the connection without an answer", function()
      emu:control("POST", "/_emulator/faults", { path = "/twins/door-004", drop = true, delay = 0.1 })
      local status, err = emu:api("GET", "/twins/door-004", nil, nil, { fresh = true })
      assert.is_nil(status)
      assert.is_string(err)
      assert.equal(200, (emu:api("GET", "/twins/door-004")))
      local _, log = emu:control("GET", "/_emulator/requests")
      local last = log.requests[#log.requests - 1]
      assert.equal("drop", last.fault)
      assert.equal(core.null, last.status)
    end)

    it("drops the answer after the hub acted", function()
      emu:control("POST", "/_emulator/faults", { path = "/devices/{id}", method = "PUT", drop = "response" })
      local status, err = emu:api("PUT", "/devices/lost-answer", { deviceId = "lost-answer" }, nil, { fresh = true })
      assert.is_nil(status)
      assert.matches("CURLE_GOT_NOTHING", err, 1, true)
      assert.equal(200, (emu:api("GET", "/devices/lost-answer"))) -- the hub did create it
      local _, log = emu:control("GET", "/_emulator/requests")
      assert.equal("drop-response", log.requests[1].fault)
      assert.equal(core.null, log.requests[1].status)
    end)

    it("cuts an answer short of its Content-Length, then closes the connection", function()
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", body = "truncated" })
      local status, err = emu:api("GET", "/twins/door-001", nil, nil, { fresh = true })
      assert.is_nil(status)
      assert.matches("CURLE_PARTIAL_FILE", err, 1, true)
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", status = 503, body = "truncated" })
      status, err = emu:api("GET", "/twins/door-001", nil, nil, { fresh = true })
      assert.is_nil(status)
      assert.matches("CURLE_PARTIAL_FILE", err, 1, true)
      -- an empty answer has nothing to cut: it goes out whole
      emu:control("POST", "/_emulator/faults", { path = "/devices/{id}", method = "DELETE", body = "truncated" })
      assert.equal(204, (emu:api("DELETE", "/devices/door-002", nil, { ["If-Match"] = "*" }, { fresh = true })))
      local _, log = emu:control("GET", "/_emulator/requests")
      assert.same({ "truncated", "truncated", "truncated" }, { log.requests[1].fault, log.requests[2].fault, log.requests[3].fault })
      assert.same({ 200, 503, 204 }, { log.requests[1].status, log.requests[2].status, log.requests[3].status })
    end)

    it("answers with a body that is not JSON, or a proxy's HTML page, echoing the Authorization header", function()
      local auth = E.token()
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", body = "garbage" })
      local s1, d1, h1, raw1 = emu:api("GET", "/twins/door-001", nil, { Authorization = auth })
      assert.equal(200, s1)
      assert.is_nil(d1)
      assert.matches("application/json", h1["content-type"], 1, true)
      assert.is_nil(core.json_decode(raw1))
      assert.truthy(raw1:find(auth, 1, true))
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", body = "garbage", status = 500 })
      local s2, _, _, raw2 = emu:api("GET", "/twins/door-001")
      assert.equal(500, s2)
      assert.is_nil(core.json_decode(raw2))
      emu:control("POST", "/_emulator/faults", { path = "/jobs/v2/*", status = 502, body = "html", retryAfter = 3 })
      local s3, _, h3, raw3 = emu:api("GET", "/jobs/v2/any")
      assert.equal(502, s3)
      assert.equal("text/html", h3["content-type"])
      assert.equal("3", h3["retry-after"])
      assert.matches("<title>502 Bad Gateway</title>", raw3, 1, true)
      assert.equal(200, (emu:api("GET", "/twins/door-001"))) -- the connection after it is a new one, and fine
    end)

    it("drips an answer out over the time asked, and sends Retry-After text as given", function()
      local date = "Wed, 21 Oct 2015 07:28:00 GMT"
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", drip = 0.6, status = 503, retryAfter = date })
      local t0 = core.monotime()
      local status, _, h = emu:api("GET", "/twins/door-001")
      assert.is_true(core.monotime() - t0 >= 0.55)
      assert.equal(503, status)
      assert.equal(date, h["retry-after"])
      emu:control("POST", "/_emulator/faults", { path = "/twins/{id}", drip = 0.3 })
      local s2, twin = emu:api("GET", "/twins/door-001")
      assert.equal(200, s2)
      assert.equal("door-001", twin.deviceId)
      local _, log = emu:control("GET", "/_emulator/requests")
      assert.equal("drip", log.requests[#log.requests].fault)
    end)

    it("lists, deletes and validates faults", function()
      local _, a = emu:control("POST", "/_emulator/faults", { path = "/twins/x", status = 500, count = 3 })
      emu:control("POST", "/_emulator/faults", { path = "/twins/y", status = 500 })
      local _, list = emu:control("GET", "/_emulator/faults")
      assert.equal(2, #list.faults)
      assert.equal(3, list.faults[1].remaining)
      assert.equal(204, (emu:control("DELETE", "/_emulator/faults/" .. a.id)))
      assert.equal(400, (emu:control("DELETE", "/_emulator/faults/" .. a.id)))
      local _, one = emu:control("GET", "/_emulator/faults")
      assert.equal(1, #one.faults)
      assert.equal(204, (emu:control("DELETE", "/_emulator/faults")))
      local _, none = emu:control("GET", "/_emulator/faults")
      assert.same({}, none.faults)
      local bad = {
        { path = "/twins/x" },                                -- no kind
        { status = 500 },                                     -- no path
        { path = "twins", status = 500 },                     -- not a path
        { path = "/twins/x", status = 200 },                  -- not an error status
        { path = "/twins/x", status = 500, drop = true },     -- both kinds of answer
        { path = "/twins/x", status = 500, count = 0 },
        { path = "/twins/x", delay = -1 },
        { path = "/twins/x", status = 500, errorCode = "NoSuchError" },
        { path = "/twins/x", status = 500, colour = "red" },  -- unknown field
        { path = "/_emulator/clock", status = 500 },          -- the controls themselves
        { path = "/twins/x", body = "binary" },               -- no such body fault
        { path = "/twins/x", body = "html" },                 -- a proxy's page needs a status
        { path = "/twins/x", drop = "maybe" },
        { path = "/twins/x", drop = "response", status = 503 },
        { path = "/twins/x", drop = true, body = "garbage" },
        { path = "/twins/x", drip = 1, drop = "request" },
        { path = "/twins/x", drip = -1 },
        { path = "/twins/x", drip = 301 },
        { path = "/twins/x", status = 503, retryAfter = "a\r\nSet-Cookie: x" }, -- header injection
        { path = "/twins/x", status = 503, retryAfter = -1 },
        { path = "/twins/x", retryAfter = 5 },                -- Retry-After needs a status
      }
      for _, f in ipairs(bad) do
        local s, body, h = emu:control("POST", "/_emulator/faults", f)
        assert.equal(400, s)
        assert.equal("ArgumentInvalid", h["iothub-errorcode"])
        assert.truthy(#inner_error(body).message > 20)
      end
    end)
  end)

  describe("clock", function()
    it("moves forward only and keeps accepting tokens signed with real time", function()
      local _, c0 = emu:control("GET", "/_emulator/clock")
      assert.equal(0, c0.offsetSeconds)
      local status, c1 = emu:control("POST", "/_emulator/clock", { advanceSeconds = 7 * 86400 })
      assert.equal(200, status)
      assert.equal(7 * 86400, c1.offsetSeconds)
      local now = core.parse_time(c1.now)
      local real = core.parse_time(c1.realNow)
      assert.is_true(math.abs(now - real - 7 * 86400) < 1)
      assert.equal(200, (emu:api("GET", "/twins/myDeviceId")))
      -- whole seconds on the wire: round up, and leave a second for the time between the calls
      local s2, c2 = emu:control("POST", "/_emulator/clock", { to = E.iso(math.ceil(now) + 3602) })
      assert.equal(200, s2)
      assert.is_true(c2.offsetSeconds > 7 * 86400 + 3600)
      assert.equal(400, (emu:control("POST", "/_emulator/clock", { advanceSeconds = -1 })))
      assert.equal(400, (emu:control("POST", "/_emulator/clock", { to = E.iso(os.time()) })))
      assert.equal(400, (emu:control("POST", "/_emulator/clock", { to = "yesterday" })))
      assert.equal(400, (emu:control("POST", "/_emulator/clock", {})))
      -- hub time stamps follow the clock
      local _, created = emu:api("PUT", "/jobs/v2/clocked", job("clocked"))
      assert.is_true(core.parse_time(created.createdTime) > os.time() + 7 * 86400)
    end)

    it("starts a scheduled job as soon as the clock passes its startTime", function()
      local start = os.time() + 86400
      assert.equal(200, (emu:api("PUT", "/jobs/v2/tomorrow", job("tomorrow", { startTime = E.iso(start) }))))
      emu:wait_job("tomorrow", "scheduled")
      sleep(0.3)
      local _, still = emu:api("GET", "/jobs/v2/tomorrow")
      assert.equal("scheduled", still.status)
      emu:control("POST", "/_emulator/clock", { advanceSeconds = 86400 - 1800 }) -- not yet
      sleep(0.2)
      assert.equal("scheduled", (select(2, emu:api("GET", "/jobs/v2/tomorrow"))).status)
      emu:control("POST", "/_emulator/clock", { to = E.iso(start + 1) })
      local done = emu:wait_job("tomorrow", "completed", 5)
      assert.equal(7, done.deviceJobStatistics.succeededCount)
      assert.is_true(core.parse_time(done.endTime) >= start)
    end)
  end)

  it("shows and changes the run-time settings", function()
    local status, cfg = emu:control("GET", "/_emulator/config")
    assert.equal(200, status)
    assert.equal(50, cfg.jobRate)
    assert.equal(0, cfg.maxActiveJobs)
    assert.equal(core.null, cfg.tier)
    assert.equal(core.null, cfg.stateDir)
    local s2, changed = emu:control("PATCH", "/_emulator/config", { jobRate = 200, tier = "s2" })
    assert.equal(200, s2)
    assert.equal(200, changed.jobRate)
    assert.equal("S2", changed.tier)
    assert.equal(5, changed.maxActiveJobs)
    local s3, _, h = emu:control("PATCH", "/_emulator/config", { tier = "S9" })
    assert.equal(400, s3)
    assert.equal("ArgumentInvalid", h["iothub-errorcode"])
    local s4, cleared = emu:control("PATCH", "/_emulator/config", { tier = core.null })
    assert.equal(200, s4)
    assert.equal(core.null, cleared.tier)
    assert.equal(0, cleared.maxActiveJobs)
    local s5, refused = emu:control("PATCH", "/_emulator/config", { tier = 2 })
    assert.equal(400, s5)
    assert.matches("tier must be a string", refused.Message, 1, true)
    assert.equal(400, (emu:control("PATCH", "/_emulator/config", { jobRate = -1 })))
    assert.equal(400, (emu:control("PATCH", "/_emulator/config", { speed = 1 })))
    emu:control("PATCH", "/_emulator/config", { jobRate = 50, maxActiveJobs = 0 })
  end)

  it("takes a simulated device offline and back online", function()
    local status, body = emu:control("POST", "/_emulator/devices/door-002/connection", { connected = false })
    assert.equal(200, status)
    assert.same({ deviceId = "door-002", connectionState = "Disconnected" }, body)
    local _, twin = emu:api("GET", "/twins/door-002")
    assert.equal("Disconnected", twin.connectionState)
    local s404, err = emu:api("POST", "/twins/door-002/methods", { methodName = "lockDoor" })
    assert.equal(404, s404)
    assert.equal(404103, inner_error(err).errorCode)
    local _, on = emu:control("POST", "/_emulator/devices/door-002/connection", { connected = true })
    assert.equal("Connected", on.connectionState)
    assert.equal("Connected", (select(2, emu:api("GET", "/twins/door-002"))).connectionState)
    assert.equal(404, (emu:control("POST", "/_emulator/devices/nosuch/connection", { connected = true })))
    assert.equal(400, (emu:control("POST", "/_emulator/devices/door-002/connection", { connected = "yes" })))
  end)

  it("saves nothing without a kept --dir", function()
    local status, body = emu:control("POST", "/_emulator/state/save")
    assert.equal(200, status)
    assert.equal(core.null, body.stateDir)
    assert.same({}, body.saved)
    assert.is_nil(emu:output():find("\nstate ", 1, true))
  end)
end)
