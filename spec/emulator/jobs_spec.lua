-- The emulator's job engine end to end: lifecycle, device rows and live statistics, pacing,
-- maxExecutionTimeInSeconds, connect timeouts, cancel, validation and error envelopes,
-- listing with filters and paging, tiers and 429004, and our Lua client against it.
--   busted --lua=lua5.4 spec/emulator/jobs_spec.lua
local core = require "iothub.core"
local iothub = require "iothub"
local shell = require "support.shell"
local E = require "support.emulator_process"
local inner_error, job, sleep = E.inner_error, E.job, E.sleep

local END_OF_TIME = "9999-12-31T23:59:59.9999999Z" -- endTime of unfinished jobs
local DEVICES = 7 -- examples/devices.lua: myDeviceId, door-basement (offline), door-001..005

describe("emulator job engine", function()
  local emu = E.shared({ temp_dir = true, args = { "--tier", "s3" }, reset_each = true })

  local function set_config(t)
    local status, body = emu:control("PATCH", "/_emulator/config", t)
    assert.equal(200, status, body and body.Message)
  end

  local function put(id, over)
    local status, body, h = emu:api("PUT", "/jobs/v2/" .. id, job(id, over))
    return status, body, h
  end

  it("goes queued -> running -> completed, with rows and statistics counted live", function()
    set_config({ jobRate = 10 })
    local status, created = put("live")
    assert.equal(200, status)
    assert.equal("queued", created.status)
    assert.equal(END_OF_TIME, created.endTime)
    assert.same({ deviceCount = 0, failedCount = 0, succeededCount = 0, runningCount = 0, pendingCount = 0 },
      created.deviceJobStatistics)
    emu:wait_job("live", "running")
    local mid
    local deadline = core.monotime() + 5
    repeat -- catch it part-way: some rows done, some still pending
      mid = select(2, emu:api("GET", "/jobs/v2/live"))
      local s = mid.deviceJobStatistics
      if s.succeededCount > 0 and s.pendingCount > 0 then break end
      sleep(0.03)
    until core.monotime() > deadline
    local s = mid.deviceJobStatistics
    assert.equal(DEVICES, s.deviceCount)
    assert.is_true(s.succeededCount > 0 and s.pendingCount > 0, "never saw the job part-way")
    assert.equal(s.deviceCount, s.succeededCount + s.pendingCount + s.runningCount + s.failedCount)
    local rows = emu:rows("live")
    local seen = {}
    for _, r in pairs(rows) do seen[r.status] = true end
    assert.is_true(seen.pending and seen.completed)

    local done = emu:wait_job("live", "completed")
    assert.same({ deviceCount = DEVICES, failedCount = 0, succeededCount = DEVICES, runningCount = 0, pendingCount = 0 },
      done.deviceJobStatistics)
    assert.truthy(done.endTime:match("^%d%d%d%d%-.*Z$"))
    assert.not_equal(END_OF_TIME, done.endTime)
    local row = emu:rows("live")["door-001"]
    assert.equal("live", row.jobId)
    assert.equal("scheduleUpdateTwin", row.jobType)
    assert.equal("completed", row.status)
    assert.equal(core.null, row.outcome.deviceMethodResponse)
    assert.is_nil(row.error)
    assert.truthy(row.startTimeUtc:match("^%d%d%d%d%-%d%d%-%d%dT[%d:.]+$")) -- no zone, as the docs show
    assert.truthy(row.endTimeUtc:match("^%d%d%d%d%-%d%d%-%d%dT[%d:.]+$"))
    assert.truthy(row.createdDateTimeUtc:match("%.%d%d%d%d%d%d%dZ$"))
    assert.truthy(row.lastUpdatedDateTimeUtc:match("Z$"))
    assert.equal("live", (select(2, emu:api("GET", "/twins/door-001"))).tags.spec)
  end)

  it("paces device operations at the configured rate, or not at all with 0", function()
    set_config({ jobRate = 10 })
    put("paced")
    emu:wait_job("paced", "completed")
    local first, last = math.huge, 0
    for _, r in pairs(emu:rows("paced")) do
      local t = core.parse_time(r.endTimeUtc .. "Z")
      first, last = math.min(first, t), math.max(last, t)
    end
    assert.is_true(last - first >= (DEVICES - 1) / 10 - 0.05, "rows spread over " .. (last - first) .. " s")
    set_config({ jobRate = 0 })
    put("unpaced")
    local t0 = core.monotime()
    emu:wait_job("unpaced", "completed")
    assert.is_true(core.monotime() - t0 < 1.5)
  end)

  it("starts a job with a future startTime as scheduled, and only then resolves targets", function()
    local start = os.time() + 3600
    put("later", { startTime = E.iso(start), queryCondition = "tags.location.floor = 1" })
    local sched = emu:wait_job("later", "scheduled")
    assert.equal(0, sched.deviceJobStatistics.deviceCount)
    assert.same({}, emu:rows("later"))
    -- a device that matches only after scheduling is still targeted: resolution happens at start
    emu:api("PATCH", "/twins/door-003", { tags = { location = { floor = 1 } } }, { ["If-Match"] = "*" })
    emu:control("POST", "/_emulator/clock", { to = E.iso(start) })
    local done = emu:wait_job("later", "completed")
    local rows = emu:rows("later")
    assert.equal(3, done.deviceJobStatistics.deviceCount) -- door-001, door-003, door-004
    assert.truthy(rows["door-003"] and rows["door-001"] and rows["door-004"])
  end)

  it("records method responses and per-device errors", function()
    put("methods", { type = "scheduleDeviceMethod", updateTwin = false,
      cloudToDeviceMethod = { methodName = "lockDoor", payload = core.null, responseTimeoutInSeconds = 30 },
      queryCondition = "deviceId IN ['myDeviceId', 'door-basement', 'door-002']" })
    local done = emu:wait_job("methods", "completed")
    assert.equal(3, done.deviceJobStatistics.deviceCount)
    assert.equal(2, done.deviceJobStatistics.succeededCount)
    assert.equal(1, done.deviceJobStatistics.failedCount)
    assert.equal("lockDoor", done.cloudToDeviceMethod.methodName)
    local rows = emu:rows("methods")
    assert.same({ status = 200, payload = { locked = true } }, rows.myDeviceId.outcome.deviceMethodResponse)
    assert.equal("scheduleDeviceMethod", rows.myDeviceId.jobType)
    local failed = rows["door-basement"]
    assert.equal("failed", failed.status)
    assert.equal("DeviceNotOnline", failed.error.code)
    assert.is_string(failed.error.description)
    assert.equal(core.null, failed.outcome.deviceMethodResponse)
  end)

  it("waits connectTimeoutInSeconds for an offline device (row scheduled), then invokes it", function()
    emu:control("POST", "/_emulator/devices/door-003/connection", { connected = false })
    put("connect", { type = "scheduleDeviceMethod", updateTwin = false,
      cloudToDeviceMethod = { methodName = "lockDoor", connectTimeoutInSeconds = 60 },
      queryCondition = "deviceId = 'door-003'" })
    emu:wait_job("connect", "running")
    local deadline = core.monotime() + 5
    local row
    repeat
      row = emu:rows("connect")["door-003"]
      if row and row.status == "scheduled" then break end
      sleep(0.05)
    until core.monotime() > deadline
    assert.equal("scheduled", row.status)
    local running = select(2, emu:api("GET", "/jobs/v2/connect"))
    assert.equal(1, running.deviceJobStatistics.pendingCount)
    emu:control("POST", "/_emulator/devices/door-003/connection", { connected = true })
    emu:wait_job("connect", "completed")
    row = emu:rows("connect")["door-003"]
    assert.equal("completed", row.status)
    assert.equal(200, row.outcome.deviceMethodResponse.status)
  end)

  it("fails the devices not reached when maxExecutionTimeInSeconds passes", function()
    set_config({ jobRate = 2 })
    put("ttl", { maxExecutionTimeInSeconds = 600 })
    emu:wait_job("ttl", "running")
    sleep(0.3)
    emu:control("POST", "/_emulator/clock", { advanceSeconds = 601 })
    local done = emu:wait_job("ttl", "completed")
    local s = done.deviceJobStatistics
    assert.equal(DEVICES, s.deviceCount)
    assert.is_true(s.failedCount >= 3, "failed " .. s.failedCount)
    assert.equal(DEVICES, s.failedCount + s.succeededCount)
    local expired = 0
    for _, r in pairs(emu:rows("ttl")) do
      if r.status == "failed" then
        assert.equal("JobExecutionTimeExpired", r.error.code)
        expired = expired + 1
      end
    end
    assert.equal(s.failedCount, expired)
  end)

  it("cancels a running job: unreached rows become canceled", function()
    set_config({ jobRate = 2 })
    put("stop-me")
    emu:wait_job("stop-me", "running")
    sleep(0.2)
    local status, cancelled = emu:api("POST", "/jobs/v2/stop-me/cancel")
    assert.equal(200, status)
    assert.equal("cancelled", cancelled.status)
    local rows = emu:rows("stop-me")
    local canceled = 0
    for _, r in pairs(rows) do
      if r.status == "canceled" then canceled = canceled + 1 end
    end
    assert.is_true(canceled >= 3)
    assert.equal(canceled, DEVICES - cancelled.deviceJobStatistics.succeededCount
      - cancelled.deviceJobStatistics.failedCount)
    sleep(0.6)
    local again = select(2, emu:api("POST", "/jobs/v2/stop-me/cancel"))
    assert.equal("cancelled", again.status)
    assert.equal(cancelled.endTime, again.endTime)
    assert.same(cancelled.deviceJobStatistics, again.deviceJobStatistics) -- nothing ran after the cancel
    -- a finished job comes back unchanged
    set_config({ jobRate = 0 })
    put("finished")
    local done = emu:wait_job("finished", "completed")
    local s2, same = emu:api("POST", "/jobs/v2/finished/cancel")
    assert.equal(200, s2)
    assert.equal("completed", same.status)
    assert.equal(done.endTime, same.endTime)
  end)

  it("fails a job whose queryCondition does not parse, with failureReason and statusMessage", function()
    put("bad-sql", { queryCondition = "tags.x = = 1" })
    local failed = emu:wait_job("bad-sql", "failed")
    assert.is_string(failed.failureReason)
    assert.equal(failed.failureReason, failed.statusMessage)
    assert.not_equal(END_OF_TIME, failed.endTime)
  end)

  describe("requests the hub refuses", function()
    -- assert_error(want_status, name, code, <the call's status, body, headers>)
    local function assert_error(want_status, name, code, status, body, h)
      assert.equal(want_status, status)
      assert.equal(name, h["iothub-errorcode"])
      assert.equal("application/json; charset=utf-8", h["content-type"])
      local inner = inner_error(body)
      assert.equal(code, inner.errorCode)
      assert.is_string(inner.trackingId)
      assert.is_string(inner.timestampUtc)
      return inner
    end

    it("requires etag '*' on twin jobs (412)", function()
      assert_error(412, "PreconditionFailed", 412001, put("no-etag", { updateTwin = { tags = { a = 1 } } }))
      assert_error(412, "PreconditionFailed", 412001,
        put("etag", { updateTwin = { etag = "AAAAAAAAAAE=", tags = { a = 1 } } }))
      assert_error(400, "ArgumentInvalid", 400004, put("flat", { updateTwin = { etag = "*", desired = { a = 1 } } }))
    end)

    it("answers 409 to a duplicate jobId, 400 to bad fields and 404 to unknown jobs", function()
      assert.equal(200, (put("dup")))
      assert_error(409, "JobAlreadyExists", 409000, put("dup"))
      assert_error(400, "GenericBadRequest", 400000, put("t", { type = "scheduleDirectMethod" }))
      assert_error(400, "ArgumentInvalid", 400004, emu:api("PUT", "/jobs/v2/t", job("other")))
      assert_error(400, "ArgumentInvalid", 400004, put("t", { startTime = "soon" }))
      assert_error(400, "ArgumentInvalid", 400004, put("t", { maxExecutionTimeInSeconds = 0 }))
      assert_error(400, "ArgumentInvalid", 400004, put("t", { queryCondition = " " }))
      assert_error(400, "ArgumentInvalid", 400004, put("t", { type = "scheduleDeviceMethod" }))
      assert_error(400, "ArgumentInvalid", 400004, put("t", { type = "scheduleDeviceMethod",
        cloudToDeviceMethod = { methodName = "x", responseTimeoutInSeconds = 301 } }))
      assert_error(412, "PreconditionFailed", 412001, put("t", { queryCondition = string.rep("a", 8193) }))
      assert_error(404, "JobNotFound", 404002, emu:api("GET", "/jobs/v2/nope"))
      assert_error(404, "JobNotFound", 404002, emu:api("POST", "/jobs/v2/nope/cancel"))
    end)

    it("caps active jobs by tier with 429 ThrottlingMaxActiveJobCountExceeded (429004)", function()
      local _, cfg = emu:control("GET", "/_emulator/config")
      assert.equal("S3", cfg.tier) -- from --tier s3
      assert.equal(10, cfg.maxActiveJobs)
      local future = E.iso(os.time() + 86400)
      for i = 1, 10 do assert.equal(200, (put("s3-" .. i, { startTime = future }))) end
      local inner = assert_error(429, "ThrottlingMaxActiveJobCountExceeded", 429004,
        put("s3-11", { startTime = future }))
      assert.truthy(inner.message:find("10", 1, true))
      assert.equal(200, (emu:api("POST", "/jobs/v2/s3-1/cancel")))
      assert.equal(200, (put("s3-11", { startTime = future })))

      emu:control("POST", "/_emulator/reset")
      set_config({ tier = "S1" })
      assert.equal(200, (put("s1-a", { startTime = future })))
      assert_error(429, "ThrottlingMaxActiveJobCountExceeded", 429004, put("s1-b"))
      emu:api("POST", "/jobs/v2/s1-a/cancel")
      assert.equal(200, (put("s1-b")))
      emu:wait_job("s1-b", "completed") -- finished jobs do not count
      assert.equal(200, (put("s1-c")))

      emu:control("POST", "/_emulator/reset")
      set_config({ tier = "S2" })
      for i = 1, 5 do assert.equal(200, (put("s2-" .. i, { startTime = future }))) end
      assert.equal(429, (put("s2-6", { startTime = future })))
    end)

    it("the launcher refuses an unknown tier", function()
      local ok, out, rc = shell.run(shell.quote(E.ROOT .. "/bin/iothub-emulator") .. " --tier S9 --http-port 1")
      assert.is_false(ok)
      assert.equal(2, rc)
      assert.truthy(out:find("bad --tier 'S9'", 1, true))
    end)
  end)

  it("lists jobs in creation order with case-insensitive type/status filters and paging", function()
    set_config({ jobRate = 0 })
    -- a refused PUT would otherwise surface later as a confusing 404 while waiting
    assert.equal(200, (put("l-twin")))
    assert.equal(200, (put("l-method", { type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
      queryCondition = "deviceId = 'myDeviceId'" })))
    assert.equal(200, (put("l-later", { startTime = E.iso(os.time() + 86400) })))
    emu:wait_job("l-twin", "completed")
    emu:wait_job("l-method", "completed")
    emu:wait_job("l-later", "scheduled")
    local function ids(path, page)
      local out, continuation, pages = {}, nil, 0
      repeat
        local status, list, h = emu:api("GET", path, nil,
          { ["x-ms-max-item-count"] = page and tostring(page) or false, ["x-ms-continuation"] = continuation or false })
        assert.equal(200, status)
        assert.equal("JobResponse", h["x-ms-item-type"])
        for _, j in ipairs(list) do out[#out + 1] = j.jobId end
        continuation = h["x-ms-continuation"]
        pages = pages + 1
      until not continuation
      return table.concat(out, ","), pages
    end
    assert.equal("l-twin,l-method,l-later", (ids("/jobs/v2/query")))
    local all, pages = ids("/jobs/v2/query", 2)
    assert.equal("l-twin,l-method,l-later", all)
    assert.equal(2, pages)
    assert.equal("l-method", (ids("/jobs/v2/query?jobType=ScheduleDeviceMethod")))
    assert.equal("l-twin,l-method", (ids("/jobs/v2/query?jobStatus=Completed")))
    assert.equal("l-later", (ids("/jobs/v2/query?jobStatus=scheduled&jobType=scheduleUpdateTwin")))
    assert.equal("", (ids("/jobs/v2/query?jobStatus=running")))
  end)

  it("serves our Lua client: schedule, monitor and page the device rows", function()
    local _, cs = emu:output():match("(IOTHUB_CONNECTION_STRING=)([^\n]+)")
    local jobs = assert(iothub.JobClient.fromConnectionString(cs, { endpoint = emu.base, proxy = "" }))
    local created = assert(jobs:scheduleTwinUpdate("client-job", "tags.location.building = '43'",
      { tags = { wave = 1 }, properties = { desired = { mode = "eco" } } }))
    assert.equal("client-job", created.jobId)
    local final = assert(jobs:monitorJob("client-job", { interval = 0.05, maxInterval = 0.1, timeout = 15 }))
    assert.equal("completed", final.status)
    local n = 0
    for row, err in jobs:deviceJobs("client-job", { pageSize = 2 }) do
      assert(row, err)
      assert.equal("completed", row.status)
      n = n + 1
    end
    assert.equal(final.deviceJobStatistics.deviceCount, n)
    assert.equal(DEVICES, n)
  end)
end)
