-- Every client operation against every fault the emulator can inject, as one table. Each cell
-- names the outcome the client must report, and how many requests the emulator's request log
-- must show; then the invariants: exactly one job (or device) created, none duplicated by a
-- retry, none lost, no false failure, never a Lua error, never a secret repeated.
-- Real launcher (nginx), real libcurl. Each fault hits the operation's request once, on a
-- fresh client (so on a fresh connection: libcurl's silent resend never hides it).
--   busted --lua=lua5.4 spec/e2e/fault_matrix_spec.lua
local core = require "iothub.core"
local iothub = require "iothub"
local E = require "support.emulator_process"

-- The faults (columns), as given to POST /_emulator/faults (path and method are the row's).
-- waits: the least the client must wait before its next attempt (the fault's Retry-After in
-- seconds); a retryAfter function gives the header's text and the wall time it names;
-- timeout: the client's request timeout for the column (default 5 s).
local FAULTS = {
  ["429"] = { status = 429 },                          -- ThrottlingException, no Retry-After
  ["429ra"] = { status = 429, retryAfter = 5, waits = 5 }, -- with Retry-After: 5
  ["429004"] = { status = 429, errorCode = "ThrottlingMaxActiveJobCountExceeded" },
  ["500"] = { status = 500 },
  ["503"] = { status = 503 },
  ["504"] = { status = 504 },
  drop = { drop = true },                              -- the request is lost before the hub acts
  lost = { drop = "response" },                        -- the hub acts, its answer is lost
  slow = { delay = 0.8, timeout = 0.4 },               -- answers past the client's timeout
  cut = { body = "truncated" },                        -- Content-Length promises more than comes
  junk = { body = "garbage" },                         -- the hub's status, a body that is not JSON
  junk503 = { status = 503, body = "garbage" },
  html502 = { status = 502, body = "html" },           -- a proxy's error page
  htmlra = { status = 503, body = "html",               -- ... with Retry-After as an HTTP-date 5 s ahead
    retryAfter = function()
      local at = os.time() + 5
      return os.date("!%a, %d %b %Y %H:%M:%S GMT", at), at
    end },
  drip = { drip = 0.3 },                               -- bytes trickle in, within the timeout
}

-- What each cell expects: `ok` or an error (below), then `:` and the number of times the
-- emulator saw the faulted request, `+1` for one read-back (a GET of the job or device) that
-- resolved a 409 after a lost answer. No other request may appear in the log.
local MATRIX = [[
                     429   429ra 429004   500   503   504   drop      lost      slow cut    junk      junk503 html502 htmlra  drip
scheduleDeviceMethod ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2+1    ok:2 ok:2+1 ok:2+1    ok:2    ok:2    ok:2    ok:1
scheduleTwinUpdate   ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2+1    ok:2 ok:2+1 ok:2+1    ok:2    ok:2    ok:2    ok:1
getJob               ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
cancelJob            ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
queryJobs            ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
deviceJobs           ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
monitorJob           ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
getTwin              ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
updateTwin           ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
invokeDeviceMethod   429:1 429:1 429004:1 500:1 503:1 504:1 nothing:1 nothing:1 ok:1 cut:1  notjson:1 503:1   proxy:1 proxy:1 ok:1
createDevice         ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2+1    ok:2 ok:2+1 ok:2+1    ok:2    ok:2    ok:2    ok:1
getDevice            ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:2   ok:2      ok:2    ok:2    ok:2    ok:1
deleteDevice         ok:2  ok:2  ok:2     ok:2  ok:2  ok:2  ok:2      ok:2      ok:2 ok:1   ok:1      ok:2    ok:2    ok:2    ok:1
]]

-- The errors a cell may expect: kind and code.
local ERRORS = {
  ["429"] = { "service", "ThrottlingException" },
  ["429004"] = { "service", "ThrottlingMaxActiveJobCountExceeded" },
  ["500"] = { "service", "ServerError" },
  ["503"] = { "service", "ServiceUnavailable" },
  ["504"] = { "service", "GatewayTimeout" },
  proxy = { "service", nil },                          -- a proxy's page carries no hub error code
  nothing = { "network", "CURLE_GOT_NOTHING" },        -- no answer at all
  cut = { "protocol", "CURLE_PARTIAL_FILE" },
  notjson = { "protocol", "InvalidResponse" },
}

-- Why some cells read as they do:
-- * invokeDeviceMethod is never retried (running a method again is the caller's call), so it
--   reports each failure after one attempt; a lost answer is a network error: the method may
--   have run. It is not slow past the timeout: it waits for the method's own timeouts (here
--   5 s + 10 s) whatever the client's timeout.
-- * A delete answers 204, which has no body to cut or replace: cut and junk are no faults to it.
-- * A lost, cut or unreadable answer to a create (job or device) means the hub did create it:
--   the retry meets 409 and the read-back finds the one asked for.

local function parse_matrix(text)
  local lines = {}
  for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
  local columns = {}
  for name in lines[1]:gmatch("%S+") do columns[#columns + 1] = name end
  local rows = {}
  for i = 2, #lines do
    local words = {}
    for w in lines[i]:gmatch("%S+") do words[#words + 1] = w end
    local op = table.remove(words, 1)
    assert(#words == #columns, op .. ": " .. #words .. " cells for " .. #columns .. " faults")
    local cells = {}
    for j, w in ipairs(words) do
      local outcome, n, extra = w:match("^(%w+):(%d+)%+?(%d*)$")
      assert(outcome and (outcome == "ok" or ERRORS[outcome]), op .. ": bad cell '" .. w .. "'")
      local e = ERRORS[outcome] or {}
      cells[columns[j]] = { text = w, ok = outcome == "ok", kind = e[1], code = e[2],
        n = tonumber(n), readbacks = tonumber(extra) or 0 }
    end
    rows[#rows + 1] = { op = op, cells = cells }
  end
  return columns, rows
end

local CS = "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. E.KEY

-- A clock for the client under test: waits of half a second or more (Retry-After) are
-- recorded and skipped instead of slept, so the client's now() runs ahead by what it skipped
-- (`awake` is the wall time the longest such wait ended at, as if slept); shorter ones
-- (backoff, the transport's polling) are slept for real.
local function skipping_clock()
  local c = { skipped = 0, longest = 0, awake = 0 }
  c.now = function() return core.monotime() + c.skipped end
  c.time = core.time
  c.sleep = function(seconds)
    if seconds >= 0.5 then
      c.longest = math.max(c.longest, seconds)
      c.awake = math.max(c.awake, core.time() + c.skipped + seconds)
      c.skipped = c.skipped + seconds
    else
      core.sleep(seconds)
    end
  end
  return c
end

local function client(class, emu, timeout, clock)
  return assert(iothub[class].fromConnectionString(CS, {
    endpoint = emu.base, proxy = "", timeout = timeout, clock = clock, sleep = clock.sleep,
    retry = { maxAttempts = 4, baseDelay = 0.01, maxDelay = 0.05, throttleDelay = 0.02, jitter = 0, deadline = 60 },
  }))
end

-- Setup helpers talk to the emulator directly (its own connection), never through the client
-- under test.
local function put_job(emu, id, over)
  local status, body = emu:api("PUT", "/jobs/v2/" .. id, E.job(id, over))
  assert(status == 200, "PUT job " .. id .. " -> " .. tostring(status))
  return body
end

local function all_jobs(emu)
  local status, list = emu:api("GET", "/jobs/v2/query", nil, { ["x-ms-max-item-count"] = "1000" })
  assert(status == 200)
  return list
end

local function jobs_with_id(emu, id)
  local n = 0
  for _, j in ipairs(all_jobs(emu)) do if j.jobId == id then n = n + 1 end end
  return n
end

local ONE_DEVICE = "deviceId = 'door-001'"

-- Exactly one job came of the call, it is the one asked for, and the call said so.
local function one_job(kind)
  return function(emu, cell, job, before)
    assert.equal(before + 1, #all_jobs(emu), "jobs created")
    assert.equal(1, jobs_with_id(emu, cell.id))
    local _, held = emu:api("GET", "/jobs/v2/" .. cell.id)
    assert.equal(kind, held.type)
    assert.equal(cell.id, job.jobId)
    assert.equal(ONE_DEVICE, job.queryCondition)
  end
end

local function count_jobs(emu) return #all_jobs(emu) end

-- The operations (rows): the request the fault hits (method, the route the request log names,
-- the concrete path), the read-back route, the call, and what must hold afterwards. `before`
-- is measured before the call (by `measure`, default none).
local ROWS = {
  scheduleDeviceMethod = {
    class = "JobClient", method = "PUT", route = "/jobs/v2/:id",
    path = function(c) return "/jobs/v2/" .. c.id end,
    readback = "GET /jobs/v2/:id", measure = count_jobs,
    run = function(jobs, c) return jobs:scheduleDeviceMethod(c.id, ONE_DEVICE, { methodName = "lockDoor" }) end,
    check = one_job("scheduleDeviceMethod"),
  },
  scheduleTwinUpdate = {
    class = "JobClient", method = "PUT", route = "/jobs/v2/:id",
    path = function(c) return "/jobs/v2/" .. c.id end,
    readback = "GET /jobs/v2/:id", measure = count_jobs,
    run = function(jobs, c) return jobs:scheduleTwinUpdate(c.id, ONE_DEVICE, { tags = { matrix = c.id } }) end,
    check = one_job("scheduleUpdateTwin"),
  },
  getJob = {
    class = "JobClient", method = "GET", route = "/jobs/v2/:id",
    path = function() return "/jobs/v2/fm-done" end, setup = "done_job",
    run = function(jobs) return jobs:getJob("fm-done") end,
    check = function(_, _, job) assert.equal("completed", job.status) end,
  },
  cancelJob = {
    class = "JobClient", method = "POST", route = "/jobs/v2/:id/cancel",
    path = function(c) return "/jobs/v2/" .. c.id .. "/cancel" end,
    prepare = function(emu, c) put_job(emu, c.id, { startTime = E.iso(os.time() + 86400), queryCondition = ONE_DEVICE }) end,
    run = function(jobs, c) return jobs:cancelJob(c.id) end,
    check = function(emu, c, job)
      assert.equal("cancelled", job.status)
      assert.equal("cancelled", (select(2, emu:api("GET", "/jobs/v2/" .. c.id))).status)
    end,
  },
  queryJobs = {
    class = "JobClient", method = "GET", route = "/jobs/v2/query",
    path = function() return "/jobs/v2/query" end, setup = "done_job",
    run = function(jobs) return jobs:queryJobs():all() end,
    check = function(_, _, list)
      assert.equal(1, #list)
      assert.equal("fm-done", list[1].jobId)
    end,
  },
  deviceJobs = {
    class = "JobClient", method = "POST", route = "/devices/query",
    path = function() return "/devices/query" end, setup = "done_job",
    run = function(jobs) return jobs:deviceJobs("fm-done"):all() end,
    check = function(_, _, rows)
      assert.equal(1, #rows)
      assert.equal("door-001", rows[1].deviceId)
      assert.equal("completed", rows[1].status)
    end,
  },
  monitorJob = {
    class = "JobClient", method = "GET", route = "/jobs/v2/:id",
    path = function() return "/jobs/v2/fm-done" end, setup = "done_job",
    run = function(jobs) return jobs:monitorJob("fm-done", { interval = 0.01, maxInterval = 0.05, timeout = 60 }) end,
    check = function(_, _, job) assert.equal("completed", job.status) end,
  },
  getTwin = {
    class = "Registry", method = "GET", route = "/twins/:id",
    path = function() return "/twins/door-001" end,
    run = function(reg) return reg:getTwin("door-001") end,
    check = function(_, _, twin) assert.equal("door-001", twin.deviceId) end,
  },
  updateTwin = {
    class = "Registry", method = "PATCH", route = "/twins/:id",
    path = function() return "/twins/door-002" end,
    run = function(reg, c) return reg:updateTwin("door-002", { tags = { matrix = c.id } }) end,
    check = function(emu, c, twin)
      assert.equal(c.id, twin.tags.matrix)
      assert.equal(c.id, (select(2, emu:api("GET", "/twins/door-002"))).tags.matrix)
    end,
  },
  invokeDeviceMethod = {
    class = "Registry", method = "POST", route = "/twins/:id/methods",
    path = function() return "/twins/myDeviceId/methods" end,
    run = function(reg) return reg:invokeDeviceMethod("myDeviceId", { methodName = "lockDoor", responseTimeoutInSeconds = 5 }) end,
    check = function(_, _, answer)
      assert.equal(200, answer.status)
      assert.is_true(answer.payload.locked)
    end,
  },
  createDevice = {
    class = "Registry", method = "PUT", route = "/devices/:id",
    path = function(c) return "/devices/" .. c.id end, readback = "GET /devices/:id",
    run = function(reg, c) return reg:create({ deviceId = c.id }) end,
    check = function(emu, c, device)
      local status, held = emu:api("GET", "/devices/" .. c.id)
      assert.equal(200, status)
      assert.equal(c.id, device.deviceId)
      -- the very device the hub holds: its generated keys, not another attempt's
      assert.equal(held.authentication.symmetricKey.primaryKey, device.authentication.symmetricKey.primaryKey)
      assert.equal(held.generationId, device.generationId)
    end,
  },
  getDevice = {
    class = "Registry", method = "GET", route = "/devices/:id",
    path = function() return "/devices/door-003" end,
    run = function(reg) return reg:get("door-003") end,
    check = function(_, _, device) assert.equal("door-003", device.deviceId) end,
  },
  deleteDevice = {
    class = "Registry", method = "DELETE", route = "/devices/:id",
    path = function(c) return "/devices/" .. c.id end,
    prepare = function(emu, c) assert.equal(200, (emu:api("PUT", "/devices/" .. c.id, { deviceId = c.id }))) end,
    run = function(reg, c) return reg:delete(c.id) end,
    check = function(emu, c, result)
      assert.is_true(result)
      assert.equal(404, (emu:api("GET", "/devices/" .. c.id)))
    end,
  },
}

-- Row setups, on a freshly reset emulator.
local SETUPS = {
  done_job = function(emu)
    put_job(emu, "fm-done", { queryCondition = ONE_DEVICE })
    emu:wait_job("fm-done", "completed")
  end,
}

local function log_mark(emu)
  local status, log = emu:control("GET", "/_emulator/requests?limit=1")
  assert(status == 200)
  return log.last
end

local function requests_since(emu, mark)
  local _, log = emu:control("GET", "/_emulator/requests?since=" .. mark)
  return log.requests
end

-- A request the emulator delayed finishes (and is logged) after the client gave up on it:
-- wait for its entry, so the count is the same on every run.
local function settle_delayed(emu, mark)
  for _ = 1, 100 do
    for _, r in ipairs(requests_since(emu, mark)) do
      if r.fault == "delay" then return end
    end
    E.sleep(0.05)
  end
  error("the delayed request never finished")
end

local function counts_text(counts)
  local keys = {}
  for k in pairs(counts) do keys[#keys + 1] = k end
  table.sort(keys)
  for i, k in ipairs(keys) do keys[i] = k .. " x" .. counts[k] end
  return table.concat(keys, ", ")
end

local columns, rows = parse_matrix(MATRIX)

-- The requests the emulator logged since mark, as "METHOD route xN" text.
local function logged(emu, mark)
  local counts = {}
  for _, r in ipairs(requests_since(emu, mark)) do
    local key = r.method .. " " .. r.route
    counts[key] = (counts[key] or 0) + 1
  end
  return counts_text(counts)
end

describe("fault matrix", function()
  local emu = E.shared({ temp_dir = true, args = { "--job-rate", "0" } })

  it("covers every fault the emulator injects and every operation", function()
    assert.equal(15, #columns)
    for _, name in ipairs(columns) do assert.is_table(FAULTS[name], name) end
    local n = 0
    for _ in pairs(FAULTS) do n = n + 1 end
    assert.equal(#columns, n)
    assert.equal(13, #rows)
    for _, row in ipairs(rows) do assert.is_table(ROWS[row.op], row.op) end
  end)

  for _, row in ipairs(rows) do
    local spec = ROWS[row.op]
    describe(row.op, function()
      lazy_setup(function()
        assert.equal(200, (emu:control("POST", "/_emulator/reset")))
        if spec.setup then SETUPS[spec.setup](emu) end
      end)

      for _, column in ipairs(columns) do
        local cell, fault = row.cells[column], FAULTS[column]
        it(("%s: %s"):format(column, cell.text), function()
          local c = { id = ("fm-%s-%s"):format(row.op, column):lower() }
          assert.equal(204, (emu:control("DELETE", "/_emulator/faults")))
          if spec.prepare then spec.prepare(emu, c) end
          local injected = { method = spec.method, path = spec.path(c), count = 1 }
          local retry_at
          for k, v in pairs(fault) do
            if type(v) == "function" then v, retry_at = v() end
            if k ~= "waits" and k ~= "timeout" then injected[k] = v end
          end
          local fstatus, fbody = emu:control("POST", "/_emulator/faults", injected)
          assert.equal(200, fstatus, fbody and fbody.Message)
          local before = spec.measure and spec.measure(emu)
          local clock = skipping_clock()
          local subject = client(spec.class, emu, fault.timeout or 5, clock)
          local mark = log_mark(emu)

          local ran, result, err = pcall(spec.run, subject, c)
          assert(ran, "a Lua error: " .. tostring(result))
          if fault.delay then settle_delayed(emu, mark) end

          -- the requests the emulator saw, and that the fault was used up
          local want = { [spec.method .. " " .. spec.route] = cell.n }
          if cell.readbacks > 0 then want[spec.readback] = cell.readbacks end
          assert.equal(counts_text(want), logged(emu, mark))
          local _, pending = emu:control("GET", "/_emulator/faults")
          assert.same({}, pending.faults)

          if cell.ok then
            assert(result ~= nil, "a false failure: " .. tostring(err))
            spec.check(emu, c, result, before)
            if fault.waits and cell.n > 1 then
              assert(clock.longest >= fault.waits, ("waited %g s, Retry-After asked %g s"):format(clock.longest, fault.waits))
            end
            if retry_at and cell.n > 1 then
              assert(clock.awake >= retry_at, ("retried at %.3f, Retry-After asked for %d"):format(clock.awake, retry_at))
            end
          else
            assert.is_nil(result)
            assert.equal(cell.kind, err.kind, tostring(err))
            assert.equal(cell.code, err.code, tostring(err))
            assert.equal(cell.n, err.attempts or 1)
            local text = tostring(err)
            assert.is_nil(text:find("sig=[^<]"), text)
            assert.is_nil(text:find(E.KEY, 1, true), text)
            assert.is_nil(text:find("\n", 1, true), text)
          end
          if spec.measure and not cell.ok then assert.equal(before, spec.measure(emu), "a job created on failure") end
        end)
      end
    end)
  end

  -- Why a monitor stopped, end to end: the job merely still running, or the hub failing until
  -- the deadline. Waits are skipped (see skipping_clock), so the poll counts are exact.
  describe("monitorJob at its deadline", function()
    lazy_setup(function()
      assert.equal(200, (emu:control("POST", "/_emulator/reset")))
      put_job(emu, "fm-tomorrow", { startTime = E.iso(os.time() + 86400), queryCondition = ONE_DEVICE })
      emu:wait_job("fm-tomorrow", "scheduled")
    end)
    before_each(function() assert.equal(204, (emu:control("DELETE", "/_emulator/faults"))) end)

    local function monitor(opts)
      local clock = skipping_clock()
      local jobs = client("JobClient", emu, 5, clock)
      local mark = log_mark(emu)
      local final, err = jobs:monitorJob("fm-tomorrow", opts)
      return final, err, logged(emu, mark), clock
    end

    it("says MonitorTimeout while the job was merely waiting to start", function()
      local final, err, log = monitor({ interval = 5, maxInterval = 10, timeout = 30 })
      assert.is_nil(final)
      assert.same({ "timeout", "MonitorTimeout" }, { err.kind, err.code })
      assert.equal("scheduled", err.job.status)
      assert.equal("GET /jobs/v2/:id x4", log) -- at 0, 10, 20 and 30 s
    end)

    it("says the hub was unavailable when every poll failed until the deadline, honouring Retry-After", function()
      emu:control("POST", "/_emulator/faults", { method = "GET", path = "/jobs/v2/fm-tomorrow", status = 503,
        retryAfter = 15, count = 50 })
      local final, err, log, clock = monitor({ interval = 5, maxInterval = 60, timeout = 30 })
      assert.is_nil(final)
      assert.same({ "unavailable", "HubUnavailable" }, { err.kind, err.code })
      assert.equal(503, err.lastError.status)
      assert.equal(15, err.lastError.retryAfter)
      assert.matches("hub unavailable: the hub kept failing until the monitor's 30 s timeout (3 polls in a row); " ..
        "last error: getJob 'fm-tomorrow' failed: HTTP 503 ServiceUnavailable (503001)", err.message, 1, true)
      assert.matches("the job was never read", err.message, 1, true)
      -- at 0 and 15 s (Retry-After, longer than the 10 s backoff), then 30 s (the 20 s backoff cut)
      assert.equal("GET /jobs/v2/:id x3", log)
      assert.is_true(clock.longest >= 15)
    end)

    it("stops at once when Retry-After asks to wait past the deadline", function()
      emu:control("POST", "/_emulator/faults", { method = "GET", path = "/jobs/v2/fm-tomorrow", status = 429,
        retryAfter = 600 })
      local final, err, log = monitor({ interval = 5, timeout = 60 })
      assert.is_nil(final)
      assert.same({ "unavailable", "HubUnavailable" }, { err.kind, err.code })
      assert.matches("asked to wait 600 s (Retry-After)", err.message, 1, true)
      assert.equal("GET /jobs/v2/:id x1", log)
    end)

    it("keeps watching through failures it gets past, and times out as still running", function()
      emu:control("POST", "/_emulator/faults", { method = "GET", path = "/jobs/v2/fm-tomorrow", body = "html",
        status = 502, count = 2 })
      local final, err, log = monitor({ interval = 5, maxInterval = 10, timeout = 30 })
      assert.is_nil(final)
      assert.same({ "timeout", "MonitorTimeout" }, { err.kind, err.code })
      assert.equal("GET /jobs/v2/:id x4", log) -- failed at 0 and 10 s, read at 20 and 30 s
    end)
  end)
end)
