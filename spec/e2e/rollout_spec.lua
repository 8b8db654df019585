-- iothub.rollout: splitting long device lists, staged rollouts with gates, resuming by
-- deterministic ids. The pure parts offline; the rest against a real bin/iothub-emulator
-- (a fleet written by this spec, --max-active-jobs 2 so 429004 really happens).
--   busted --lua=lua5.4 spec/e2e/rollout_spec.lua
local core = require "iothub.core"
local Rollout = require "iothub.rollout"
local definitions = require "iothub.definitions"
local connection = require "iothub.cli.connection"
local emulator_process = require "support.emulator_process"

local function load(src)
  local defs, problems = definitions.load_string(src, "spec.lua")
  assert(defs, problems and definitions.format(problems))
  return defs
end

describe("rollout (offline)", function()
  it("quotes ids for a condition, escaping quotes", function()
    assert.equal("deviceId IN ['a','b\\'c']", Rollout.condition_for({ "a", "b'c" }))
  end)

  it("splits a long device list into conditions within the limit, keeping every id once and in order", function()
    local ids = {}
    for i = 1, 1500 do ids[i] = ("device-%05d"):format(i) end
    local chunks = Rollout.chunk(ids, 8192)
    assert.equal(3, #chunks)
    local seen = 0
    for _, chunk in ipairs(chunks) do
      local condition = Rollout.condition_for(chunk)
      assert.is_true(#condition <= 8192)
      assert.is_true(core.check_query_condition(condition))
      for _, id in ipairs(chunk) do
        seen = seen + 1
        assert.equal(ids[seen], id)
      end
    end
    assert.equal(1500, seen)
    -- a chunk is as full as it can be: one more id would not fit
    local first = {}
    for i, id in ipairs(chunks[1]) do first[i] = id end
    first[#first + 1] = chunks[2][1]
    assert.is_true(#Rollout.condition_for(first) > 8192)
  end)

  it("orders targets by a stable hash, the same on every run and independent of input order", function()
    local ids = {}
    for i = 1, 50 do ids[i] = "d" .. i end
    local a = Rollout.order("lock", ids)
    local reversed = {}
    for i = #ids, 1, -1 do reversed[#reversed + 1] = ids[i] end
    assert.same(a, Rollout.order("lock", reversed))
    assert.are_not.same(ids, a) -- spread, not id order
    local set = {}
    for _, id in ipairs(a) do set[id] = true end
    for _, id in ipairs(ids) do assert.is_true(set[id]) end
    assert.are_not.same(a, Rollout.order("another-job", ids))
  end)

  it("splits stages by cumulative count and percent", function()
    local ordered = {}
    for i = 1, 10 do ordered[i] = "d" .. i end
    local splits, uncovered = Rollout.split({ { count = 1 }, { percent = 25 }, { percent = 25.5 }, { count = 7 } }, ordered)
    assert.same({ "d1" }, splits[1].ids)
    assert.same({ "d2", "d3" }, splits[2].ids)      -- ceil(2.5) = 3 in all
    assert.same({}, splits[3].ids)                  -- ceil(2.55) = 3: nothing new
    assert.same({ "d4", "d5", "d6", "d7" }, splits[4].ids)
    assert.equal(3, uncovered)
  end)

  it("derives job ids from the name, content hash, stage and chunk, within 64 characters", function()
    local defs = load([[
      job "a-name-that-is-exactly-forty-characters" { method = "m", devices = { "x" },
        stages = { { count = 1 }, { percent = 100 } } }
      job "q" { method = "m", query = "*" }
    ]])
    local staged, plain = defs.jobs[1], defs.jobs[2]
    local id = Rollout.job_id(staged, 20, 999)
    assert.equal(staged.name .. "-" .. staged.hash .. "-s20-c999", id)
    assert.is_true(#id <= 64)
    assert.is_true(core.check_job_id(id))
    assert.equal("q-" .. plain.hash, Rollout.job_id(plain, 1, 1))
  end)

  it("checks gates: minimum success ratio and maximum failures, saying why", function()
    local totals = { deviceCount = 10, succeededCount = 8, failedCount = 2 }
    assert.is_true((Rollout.check_gate(nil, totals)))
    assert.is_true((Rollout.check_gate({ minSuccessRatio = 0.8, maxFailures = 2 }, totals)))
    local ok, why = Rollout.check_gate({ minSuccessRatio = 0.9 }, totals)
    assert.is_false(ok)
    assert.matches("8 of 10 device%(s%) succeeded %(80.0%%%), below minSuccessRatio 0.9", why)
    ok, why = Rollout.check_gate({ maxFailures = 1 }, totals)
    assert.is_false(ok)
    assert.matches("2 device%(s%) failed, more than maxFailures 1", why)
  end)

  it("plans with a recording transport: reads only, COUNT() with a fallback to counting rows", function()
    local support = require "support.client"
    local iothub = support.iothub
    local jobs, rec = support.make(iothub.JobClient, {
      -- COUNT() refused (as the emulator does without aggregates), then rows counted
      { status = 400, body = { Message = "ErrorCode:ArgumentInvalid;The query is invalid" } },
      { status = 400, body = { Message = "ErrorCode:ArgumentInvalid;no projections" } },
      { status = 200, body = { { deviceId = "a" }, { deviceId = "b" } } },
      { status = 404, body = { Message = "ErrorCode:JobNotFound;no such job" } },
    })
    local registry = support.make(iothub.Registry, nil, { transport = rec })
    local r = Rollout.new({ jobs = jobs, registry = registry })
    local plan = assert(r:plan(load([[job "lock" { method = "lockDoor", query = "tags.x = 1", ttl = 60 }]])))
    local req = plan.jobs[1].stages[1].requests[1]
    assert.equal(2, req.devices)
    assert.equal("PUT", req.method)
    assert.equal("/jobs/v2/" .. req.jobId, req.path)
    local body = core.json_decode(req.body)
    assert.equal("tags.x = 1", body.queryCondition)
    assert.equal(60, body.maxExecutionTimeInSeconds)
    local methods = {}
    for _, sent in ipairs(rec.requests) do methods[#methods + 1] = sent.method .. " " .. sent.path end
    assert.same({ "POST /devices/query", "POST /devices/query", "POST /devices/query", "GET /jobs/v2/" .. req.jobId },
      methods)
    assert.matches("SELECT COUNT%(%) AS n FROM devices WHERE tags.x = 1", rec.requests[1].body)
    assert.matches("SELECT deviceId FROM devices WHERE tags.x = 1", rec.requests[2].body)
    assert.matches("SELECT %* FROM devices WHERE tags.x = 1", rec.requests[3].body)
  end)
end)

describe("rollout counting within the hub's query limit (offline)", function()
  local support = require "support.client"
  local iothub = support.iothub

  -- A hub that refuses queries over the limit, as the service does, and answers COUNT() with
  -- the number of ids in the IN list; every job GET is 404.
  local function strict_hub()
    local queries = {}
    local function answer(req)
      if req.method == "GET" then return { status = 404, body = { Message = "ErrorCode:JobNotFound;no such job" } } end
      local query = core.json_decode(req.body).query
      queries[#queries + 1] = query
      if #query > core.query_max_length then
        return { status = 400, body = { Message = "ErrorCode:ArgumentInvalid;the query is " .. #query .. " characters long" } }
      end
      local n = 0
      for _ in query:gmatch("'[^']*'") do n = n + 1 end
      return { status = 200, body = { { n = n } } }
    end
    local script = {}
    for i = 1, 200 do script[i] = answer end
    local jobs, rec = support.make(iothub.JobClient, script)
    local registry = support.make(iothub.Registry, nil, { transport = rec })
    return Rollout.new({ jobs = jobs, registry = registry }), queries, rec
  end

  it("counts a device list whose chunks fill the condition limit in parts whose query fits", function()
    local r, queries = strict_hub()
    local plan = assert(r:plan(load([[job "long" { method = "m", devices = ids("a-rather-long-device-identifier-%04d", 1, 900) }]])))
    local requests = plan.jobs[1].stages[1].requests
    assert.is_true(#requests >= 3)
    local full = false
    for _, req in ipairs(requests) do
      assert.equal(req.listed, req.devices)
      full = full or #req.condition > Rollout.MAX_COUNTED_CONDITION_LENGTH
    end
    assert.is_true(full, "a chunk too long to count in one query")
    assert.equal(900, plan.jobs[1].devices)
    for _, q in ipairs(queries) do assert.is_true(#q <= core.query_max_length, #q .. " characters") end
  end)

  it("shows a query target too long to count as uncounted, and sends no query for it", function()
    local r, queries, rec = strict_hub()
    local quoted = {}
    for i = 1, 908 do quoted[i] = ("'d%05d'"):format(i) end
    local query = "deviceId IN [" .. table.concat(quoted, ",") .. "]" -- 8185 characters: a job takes it
    assert.is_true(#query <= 8192 and #query > Rollout.MAX_COUNTED_CONDITION_LENGTH)
    local plan = assert(r:plan(load('job "q" { method = "m", query = "' .. query .. '" }')))
    local req = plan.jobs[1].stages[1].requests[1]
    assert.is_nil(req.devices)
    assert.is_nil(plan.jobs[1].devices)
    assert.matches("would be %d+ characters long; IoT Hub accepts at most 8192", req.uncounted)
    assert.equal(0, #queries)
    assert.equal(1, #rec.requests) -- the job GET only
  end)
end)

describe("rollout against the emulator", function()
  local clients

  -- A fleet for this spec: 1500 "dev-" devices (long lists), 40 good and 10 failing devices.
  local DEVICES = [[
local function ok() return 200, { ok = true } end
local function broken() error("broken on purpose") end
return { fleets = {
  { count = 1500, id = "dev-%04d", tags = { site = "big" }, methods = { ping = ok } },
  { count = 40, id = "good-%02d", tags = { site = "mixed" }, methods = { ping = ok } },
  { count = 10, id = "bad-%02d", tags = { site = "mixed" }, methods = { ping = broken } },
} }
]]

  -- --max-active-jobs 2 so the third job of a split list meets 429004
  local emu = emulator_process.shared({ devices_source = DEVICES, args = { "--job-rate", "1000", "--max-active-jobs", "2" },
    ready_timeout = 15 })

  -- Job PUTs the emulator served, by job id (from its access log).
  local function puts()
    local out = {}
    for id, status in emu:access_log():gmatch('"PUT /jobs/v2/([^?" ]+)[^"]*" (%d+)') do
      out[id] = out[id] or {}
      table.insert(out[id], tonumber(status))
    end
    return out
  end

  local function rollout(extra)
    local events = {}
    local opts = { jobs = clients.jobs, registry = clients.registry, interval = 0.2,
      tick = 0.2, onEvent = function(text) events[#events + 1] = text end }
    for k, v in pairs(extra or {}) do opts[k] = v end
    return Rollout.new(opts), events
  end

  lazy_setup(function()
    clients = assert(connection.clients(assert(connection.emulator(emu.dir))))
  end)

  it("runs a 1,500-device list as several jobs within the hub's job limit, as one aggregated progress", function()
    local views = {}
    local r, events = rollout({ onProgress = function(view) views[#views + 1] = view end })
    local defs = load([[job "big" { method = "ping", devices = ids("dev-%04d", 1, 1500), ttl = 300 }]])
    local result = assert(r:run(defs))
    assert.equal("succeeded", result.status)
    local stage = result.jobs[1].stages[1]
    assert.equal(3, #stage.jobs) -- 1500 ids of 10 characters do not fit one 8 KB condition
    assert.equal(1500, stage.totals.deviceCount)
    assert.equal(1500, stage.totals.succeededCount)
    local put = puts()
    for c = 1, 3 do
      local id = Rollout.job_id(defs.jobs[1], 1, c)
      assert.equal("completed", stage.jobs[c].status)
      assert.is_true(#stage.jobs[c].queryCondition <= 8192)
      -- created once; a 429004 (two jobs already active) was waited out, not retried blindly
      local created = 0
      for _, status in ipairs(put[id]) do if status == 200 then created = created + 1 end end
      assert.equal(1, created)
    end
    local throttled = false
    for _, e in ipairs(events) do if e:find("429004", 1, true) then throttled = true end end
    assert.is_true(throttled, "the third job met the hub's limit of 2: " .. table.concat(events, "\n"))
    -- one view for all three jobs
    local last = views[#views]
    assert.equal(3, last.jobs)
    assert.equal(1500, last.succeededCount)
    assert.equal("completed", last.status)
  end)

  it("plans a split device list: every chunk counted within the hub's query limit", function()
    local defs = load([[
      local targets = ids("dev-%04d", 1, 1500)
      for i = 1, 20 do targets[#targets + 1] = ("missing-%02d"):format(i) end
      job "big-plan" { method = "ping", devices = targets }
    ]])
    local plan = assert(rollout():plan(defs))
    local requests = plan.jobs[1].stages[1].requests
    assert.equal(3, #requests)
    assert.is_true(#requests[1].condition > Rollout.MAX_COUNTED_CONDITION_LENGTH)
    assert.equal(1500, plan.jobs[1].devices)
    local listed = 0
    for _, req in ipairs(requests) do listed = listed + req.listed end
    assert.equal(1520, listed)
  end)

  it("rolls out in stages; each gate holds before the next stage, in the planned order", function()
    local defs = load([[
      job "staged-ok" { method = "ping", query = "STARTSWITH(deviceId, 'good-')",
        stages = { { count = 2, gate = { minSuccessRatio = 1 } }, { percent = 50, gate = { maxFailures = 0 } },
                   { percent = 100 } } }
    ]])
    local r = rollout()
    local plan = assert(r:plan(defs))
    local result = assert(r:run(defs))
    assert.equal("succeeded", result.status)
    local stages = result.jobs[1].stages
    assert.equal(3, #stages)
    assert.same({ 2, 18, 20 }, { stages[1].totals.deviceCount, stages[2].totals.deviceCount, stages[3].totals.deviceCount })
    for k = 1, 3 do
      assert.is_true(stages[k].gateResult.passed)
      -- the devices each stage ran on are the ones the plan showed
      assert.equal(plan.jobs[1].stages[k].requests[1].condition, stages[k].jobs[1].queryCondition)
      -- and a stage's job was created only after the previous one finished
      if k > 1 then
        assert.is_true(core.parse_time(stages[k].jobs[1].createdTime) >= core.parse_time(stages[k - 1].jobs[1].endTime) - 0.001)
      end
    end
  end)

  it("stops at a failed gate, says why, and never creates the later stages", function()
    local defs = load([[
      job "staged-bad" { method = "ping", devices = ids("bad-%02d", 1, 10),
        stages = { { count = 3, gate = { maxFailures = 0 } }, { percent = 100 } } }
    ]])
    local result = assert(rollout():run(defs))
    assert.equal("gate_failed", result.status)
    assert.matches("stage 1 gate failed: 3 device%(s%) failed, more than maxFailures 0", result.reason)
    assert.matches("%(stage 2 not started%)", result.reason)
    local _, err = clients.jobs:getJob(Rollout.job_id(defs.jobs[1], 2, 1))
    assert.equal("JobNotFound", err.code)
  end)

  it("applies minSuccessRatio to the stage's own devices, chosen deterministically", function()
    local defs = load([[
      job "ratio" { method = "ping", devices = { "good-01", "good-02", "good-03", "good-04", "bad-01", "bad-02" },
        stages = { { percent = 50, gate = { minSuccessRatio = 0.99 } }, { percent = 100 } } }
    ]])
    -- The stage's devices are the first half of the stable order: bad-01, good-01, good-03.
    local order = Rollout.order("ratio", defs.jobs[1].devices)
    assert.same({ "bad-01", "good-01", "good-03" }, { order[1], order[2], order[3] })
    local result = assert(rollout():run(defs))
    assert.equal("gate_failed", result.status)
    assert.matches("2 of 3 device%(s%) succeeded %(66.7%%%), below minSuccessRatio 0.99", result.reason)
  end)

  it("stops when a stage's job is cancelled", function()
    local defs = load([[
      job "cancelled" { method = "ping", devices = { "good-05", "good-06" }, start = "+1h",
        stages = { { count = 1 }, { percent = 100 } } }
    ]])
    local r
    r = rollout({ onEvent = function(text)
      local id = text:match("^created job (%S+)")
      if id then assert(clients.jobs:cancelJob(id)) end
    end })
    local result = assert(r:run(defs))
    assert.equal("job_failed", result.status)
    assert.matches("cancelled", result.reason)
    local _, err = clients.jobs:getJob(Rollout.job_id(defs.jobs[1], 2, 1))
    assert.equal("JobNotFound", err.code)
  end)

  it("resumes after an interruption: adopts the jobs already created, never creates one twice", function()
    local defs = load([[
      job "resume" { method = "ping", query = "STARTSWITH(deviceId, 'good-1')",
        stages = { { count = 2 }, { count = 5 }, { percent = 100 } } }
    ]])
    local s2 = Rollout.job_id(defs.jobs[1], 2, 1)
    local r1 = rollout({ onEvent = function(text)
      if text == "created job " .. s2 .. " (queued)" then error("interrupted!") end
    end })
    local ok, err = pcall(r1.run, r1, defs)
    assert.is_false(ok)
    assert.matches("interrupted!", err)
    assert.same({ s2 }, r1:unfinished())

    local r2, events = rollout()
    local result = assert(r2:run(defs))
    assert.equal("succeeded", result.status)
    local text = table.concat(events, "\n")
    assert.matches("adopted existing job " .. Rollout.job_id(defs.jobs[1], 1, 1):gsub("%-", "%%-"), text)
    assert.matches("adopted existing job " .. s2:gsub("%-", "%%-"), text)
    assert.matches("created job " .. Rollout.job_id(defs.jobs[1], 3, 1):gsub("%-", "%%-"), text)
    local put = puts()
    for k = 1, 3 do assert.same({ 200 }, put[Rollout.job_id(defs.jobs[1], k, 1)]) end
    assert.equal(10, result.jobs[1].stages[1].totals.deviceCount + result.jobs[1].stages[2].totals.deviceCount
      + result.jobs[1].stages[3].totals.deviceCount)
  end)

  it("returns a timeout error when a job outlasts the watch timeout", function()
    local defs = load([[job "later" { method = "ping", devices = { "good-20" }, start = "+1h" }]])
    local r = rollout({ timeout = 0.5 })
    local result, err = r:run(defs)
    assert.is_nil(result)
    assert.equal("timeout", err.kind)
    assert.same({ Rollout.job_id(defs.jobs[1], 1, 1) }, r:unfinished())
    assert(clients.jobs:cancelJob(Rollout.job_id(defs.jobs[1], 1, 1)))
  end)
end)
