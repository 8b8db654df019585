-- Nothing the emulator acknowledged is lost when nginx dies: with a kept --dir, kill -9 of
-- the master and the worker in the middle of a 10,000-device twin job, after a burst of
-- acknowledged changes, and a crash of the worker alone (the master respawns it), each
-- followed by a comparison with what the client was told before.
--   busted --lua=lua5.4 spec/emulator/crash_spec.lua
--   busted --lua=luajit -r luajit spec/emulator/crash_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"

local FLEET = 10000
local FLEET_SOURCE = ([[
return { fleets = { { count = %d, id = "sim-%%05d", tags = function(i) return { fleet = "crash", n = i } end } } }
]]):format(FLEET)

local function start(args)
  return E.start({ devices_source = FLEET_SOURCE, args = args, ready_timeout = 60 })
end

local function master_pid(emu)
  return assert(tonumber((shell.read_file(emu.dir .. "/nginx.pid") or ""):match("%d+")), "no nginx.pid")
end

-- The master's children (its worker), from /proc (no procps needed).
local function worker_pids(emu)
  local master = master_pid(emu)
  local out = shell.read_file("/proc/" .. master .. "/task/" .. master .. "/children") or ""
  local pids = {}
  for pid in out:gmatch("%d+") do pids[#pids + 1] = pid end
  return pids
end

-- kill -9 of the nginx master and its worker, stopped first so that neither runs on after the
-- other is gone; waits until the launcher has noticed.
local function kill_nginx(emu)
  local pids = table.concat(worker_pids(emu), " ") .. " " .. master_pid(emu)
  assert(shell.run("kill -STOP " .. pids))
  assert(shell.run("kill -KILL " .. pids))
  local deadline = core.monotime() + 10
  while not shell.read_file(emu.rc_file) and core.monotime() < deadline do shell.sleep(0.05) end
  assert(shell.read_file(emu.rc_file), "the launcher did not notice that nginx was killed")
  emu.pid = nil
end

local function get_job(emu, id)
  local status, job = emu:api("GET", "/jobs/v2/" .. id)
  assert.equal(200, status)
  return job
end

-- Waits until the job has at least n succeeded rows; returns the job.
local function wait_succeeded(emu, id, n)
  local deadline = core.monotime() + 30
  while true do
    local job = get_job(emu, id)
    if job.deviceJobStatistics.succeededCount >= n then return job end
    assert(core.monotime() < deadline, "job " .. id .. " did not reach " .. n .. " succeeded rows")
    shell.sleep(0.05)
  end
end

local function count(emu, where)
  local status, res = emu:api("POST", "/devices/query", { query = "SELECT COUNT() AS n FROM devices WHERE " .. where })
  assert.equal(200, status)
  return res[1].n
end

local function completed_rows(rows)
  local done, n = {}, 0
  for id, r in pairs(rows) do
    if r.status == "completed" then done[id], n = r, n + 1 end
  end
  return done, n
end

local function sum_counts(s)
  return s.succeededCount + s.failedCount + s.runningCount + s.pendingCount
end

describe("emulator crash safety (--dir)", function()
  local emu

  after_each(function()
    if emu then emu:cleanup() end
    emu = nil
  end)

  it("keeps every reported row of a 10,000-device job across kill -9 of master and worker, and finishes it", function()
    emu = start({ "--job-rate", "2000" })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/crash-a", E.job("crash-a"))))
    wait_succeeded(emu, "crash-a", 1000)
    local before = emu:rows("crash-a")
    local acked = get_job(emu, "crash-a")
    kill_nginx(emu)
    local done_before, n_before = completed_rows(before)
    assert.equal("running", acked.status, "the job ended before the kill: the spec tested nothing")
    assert.is_true(n_before >= 1000 and n_before <= acked.deviceJobStatistics.succeededCount)

    -- slowly, so the rows and the counts can be compared while it runs; then unpaced
    emu.opts.args = { "--job-rate", "1" }
    emu:start()
    local first = get_job(emu, "crash-a")
    local after = emu:rows("crash-a")
    local second = get_job(emu, "crash-a")
    for _, s in ipairs({ first.deviceJobStatistics, second.deviceJobStatistics }) do
      assert.equal(FLEET, s.deviceCount)
      assert.equal(FLEET, sum_counts(s))
    end
    assert.is_true(first.deviceJobStatistics.succeededCount >= acked.deviceJobStatistics.succeededCount,
      "acknowledged progress was lost")
    local _, n_after = completed_rows(after)
    assert.is_true(first.deviceJobStatistics.succeededCount <= n_after and n_after <= second.deviceJobStatistics.succeededCount)
    for id, r in pairs(done_before) do assert.same(r, after[id]) end

    emu:control("PATCH", "/_emulator/config", { jobRate = 0 })
    local finished = emu:wait_job("crash-a", "completed", 30)
    assert.equal(FLEET, finished.deviceJobStatistics.succeededCount)
    local final = emu:rows("crash-a")
    for id, r in pairs(done_before) do assert.same(r, final[id]) end -- not run again
    -- the patch reached every twin exactly once (twice would make version 3)
    assert.equal(FLEET, count(emu, "tags.spec = 'crash-a' AND version = 2"))
  end)

  it("keeps every acknowledged twin patch, device and job change across kill -9", function()
    emu = start({ "--job-rate", "2000" })
    local acked = {} -- deviceId -> the twin as the last acknowledged patch returned it
    local function patch(i, k)
      local id = ("sim-%05d"):format(i)
      local status, twin = emu:api("PATCH", "/twins/" .. id, { properties = { desired = { value = k } } }, { ["If-Match"] = "*" })
      assert.equal(200, status)
      acked[id] = twin
    end
    for k = 1, 150 do patch(k % 40 + 1, k) end
    local created = {}
    for k = 1, 20 do
      local id = "new-" .. k
      local status, dev = emu:api("PUT", "/devices/" .. id, { deviceId = id })
      assert.equal(200, status)
      created[id] = dev
    end
    for k = 1, 10 do assert.equal(204, (emu:api("DELETE", "/devices/new-" .. k))) end
    assert.equal(200, (emu:api("PUT", "/jobs/v2/later", E.job("later", { startTime = E.iso(os.time() + 86400) }))))
    -- a job over the fleet, patched alongside by the burst, cancelled part-way
    assert.equal(200, (emu:api("PUT", "/jobs/v2/cut", E.job("cut"))))
    wait_succeeded(emu, "cut", 500)
    for k = 151, 300 do patch(k % 40 + 1, k) end
    local status, cancelled = emu:api("POST", "/jobs/v2/cut/cancel")
    assert.equal(200, status)
    assert.equal("cancelled", cancelled.status)
    local rows_before = emu:rows("cut")
    for k = 301, 400 do patch(k % 40 + 1, k) end
    kill_nginx(emu)

    emu:start()
    for id, twin in pairs(acked) do
      local _, now = emu:api("GET", "/twins/" .. id)
      assert.equal(twin.properties.desired.value, now.properties.desired.value, id)
      assert.equal(twin.properties.desired["$version"], now.properties.desired["$version"], id)
      assert.equal(twin.etag, now.etag, id)
    end
    for k = 1, 20 do
      local id = "new-" .. k
      local st, dev = emu:api("GET", "/devices/" .. id)
      if k <= 10 then
        assert.equal(404, st, id .. " was deleted")
      else
        assert.equal(200, st, id)
        assert.equal(created[id].authentication.symmetricKey.primaryKey, dev.authentication.symmetricKey.primaryKey)
      end
    end
    assert.equal("scheduled", get_job(emu, "later").status)
    assert.same(cancelled, get_job(emu, "cut"))
    local rows_after = emu:rows("cut")
    assert.same(rows_before, rows_after)
    local _, n_done = completed_rows(rows_after)
    assert.equal(cancelled.deviceJobStatistics.succeededCount, n_done)
    assert.equal(n_done, count(emu, "tags.spec = 'cut'"))
  end)

  it("reloads the state in a worker the master respawned after it crashed, and the job goes on", function()
    emu = start({ "--job-rate", "2000" })
    assert.equal(200, (emu:api("PUT", "/devices/after-start", { deviceId = "after-start" })))
    assert.equal(204, (emu:api("DELETE", "/devices/sim-00002")))
    local _, twin = emu:api("PATCH", "/twins/sim-00003", { properties = { desired = { mode = "eco" } } }, { ["If-Match"] = "*" })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/crash-w", E.job("crash-w"))))
    wait_succeeded(emu, "crash-w", 1000)
    local before = emu:rows("crash-w")
    local acked = get_job(emu, "crash-w")
    local old = worker_pids(emu)
    assert.equal(1, #old)
    assert(shell.run("kill -KILL " .. old[1]))
    local deadline, new = core.monotime() + 20
    repeat
      shell.sleep(0.05)
      new = worker_pids(emu)[1]
    until (new and new ~= old[1] and emu:control("GET", "/_emulator/health") == 200) or core.monotime() > deadline
    assert.is_truthy(new and new ~= old[1], "no new worker")
    assert.truthy(emu:output():find("worker restarted: state reloaded", 1, true), emu:output())

    -- the master's memory is the start-up state: none of this would be there
    assert.equal(200, (emu:api("GET", "/devices/after-start")))
    assert.equal(404, (emu:api("GET", "/devices/sim-00002")))
    local _, now = emu:api("GET", "/twins/sim-00003")
    assert.equal("eco", now.properties.desired.mode)
    assert.equal(twin.properties.desired["$version"], now.properties.desired["$version"])
    local job = get_job(emu, "crash-w")
    assert.is_true(job.deviceJobStatistics.succeededCount >= acked.deviceJobStatistics.succeededCount)
    local after = emu:rows("crash-w")
    for id, r in pairs((completed_rows(before))) do assert.same(r, after[id]) end
    local finished = emu:wait_job("crash-w", "completed", 30)
    assert.equal(acked.deviceJobStatistics.deviceCount, finished.deviceJobStatistics.succeededCount)
    assert.equal(finished.deviceJobStatistics.succeededCount, count(emu, "tags.spec = 'crash-w'"))
    -- each twin patched once by the job: version 2, and 3 for the one patched before it
    assert.equal(1, count(emu, "tags.spec = 'crash-w' AND version > 2"))
    assert.equal(0, emu:stop()) -- the master kept running throughout
  end)
end)
