-- Persistence with a kept --dir: registry, twins, jobs and the clock survive a stop/start;
-- a job running at shutdown resumes; state files are replaced atomically; a broken state
-- file stops the start with a message naming it; --in-memory keeps nothing. In process,
-- with a stand-in for nginx's API: a save from a timer is written in slices and renamed at
-- the end, and the shutdown's synchronous write replaces a save that is still paused.
--   busted --lua=lua5.4 spec/emulator_persist_spec.lua
--   busted --lua=luajit -r luajit spec/emulator_persist_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"
local job = E.job

local DEVICES = 7

local function read_state(dir, name)
  local data = shell.read_file(dir .. "/state/" .. name .. ".json")
  assert(data, "no " .. name .. ".json")
  return assert(core.json_decode(data))
end

local function find_job(state, id)
  for _, j in ipairs(state.jobs) do
    if j.jobId == id then return j end
  end
end

describe("emulator persistence", function()
  local emu

  after_each(function()
    if emu then emu:cleanup() end
    emu = nil
  end)

  it("keeps devices, twins, jobs and the clock across a restart", function()
    emu = E.start()
    assert.truthy(emu:output():find("\nstate " .. emu.dir .. "/state\n", 1, true))
    assert.equal(200, (emu:api("PUT", "/devices/rest-dev", { deviceId = "rest-dev" })))
    assert.equal(200, (emu:api("PATCH", "/twins/door-001", { tags = { color = "blue" },
      properties = { desired = { mode = "eco" } } }, { ["If-Match"] = "*" })))
    emu:control("PATCH", "/_emulator/config", { jobRate = 0 })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/done", job("done"))))
    local done = emu:wait_job("done", "completed")
    local rows_before = emu:rows("done")
    local start = os.time() + 86400
    assert.equal(200, (emu:api("PUT", "/jobs/v2/later", job("later", { startTime = E.iso(start) }))))
    emu:wait_job("later", "scheduled")
    emu:control("POST", "/_emulator/clock", { advanceSeconds = 60 })
    local _, twin_before = emu:api("GET", "/twins/door-001")

    assert.equal(0, emu:stop())
    local files = select(2, shell.run("ls " .. shell.quote(emu.dir .. "/state")))
    assert.equal("jobs.json\nregistry.json\n", files) -- and no temp files left
    assert.equal("completed", find_job(read_state(emu.dir, "jobs"), "done").status)

    emu:start()
    assert.truthy(emu:output():find("state restored from", 1, true))
    assert.equal(200, (emu:api("GET", "/devices/rest-dev")))
    local _, twin = emu:api("GET", "/twins/door-001")
    assert.equal("blue", twin.tags.color)
    assert.equal("eco", twin.properties.desired.mode)
    assert.equal(twin_before.etag, twin.etag)
    assert.equal(twin_before.properties.desired["$version"], twin.properties.desired["$version"])
    local _, again = emu:api("GET", "/jobs/v2/done")
    assert.same(done, again)
    assert.same(rows_before, emu:rows("done"))
    local _, clock = emu:control("GET", "/_emulator/clock")
    assert.is_true(math.abs(clock.offsetSeconds - 60) < 1)
    assert.equal("scheduled", (select(2, emu:api("GET", "/jobs/v2/later"))).status)
    emu:control("POST", "/_emulator/clock", { to = E.iso(start) })
    assert.equal(DEVICES + 1, emu:wait_job("later", "completed").deviceJobStatistics.deviceCount) -- + rest-dev
    -- the method simulation is still attached to the restored devices
    local status, res = emu:api("POST", "/twins/myDeviceId/methods", { methodName = "lockDoor" })
    assert.equal(200, status)
    assert.equal(200, res.status)
  end)

  it("resumes a job that was running at shutdown with its unfinished rows", function()
    emu = E.start()
    emu:control("PATCH", "/_emulator/config", { jobRate = 3 })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/mid", job("mid"))))
    emu:wait_job("mid", "running")
    local deadline = core.monotime() + 5
    repeat E.sleep(0.05) until core.monotime() > deadline
      or (select(2, emu:api("GET", "/jobs/v2/mid"))).deviceJobStatistics.succeededCount >= 2
    assert.equal(0, emu:stop())
    local saved = find_job(read_state(emu.dir, "jobs"), "mid")
    assert.equal("running", saved.status)
    local finished_before = {}
    for _, r in ipairs(saved.rows) do
      if r[2] == "completed" then finished_before[r[1]] = r[4] end -- endTimeUtc
    end
    local n_before = 0
    for _ in pairs(finished_before) do n_before = n_before + 1 end
    assert.is_true(n_before >= 2 and n_before < DEVICES, n_before .. " rows done at shutdown")

    emu:start()
    assert.truthy(emu:output():find("job mid resumed after a restart", 1, true))
    local done = emu:wait_job("mid", "completed")
    assert.equal(DEVICES, done.deviceJobStatistics.succeededCount)
    for id, r in pairs(emu:rows("mid")) do
      assert.equal("completed", r.status)
      if finished_before[id] then assert.equal(finished_before[id], r.endTimeUtc) end -- not run twice
    end
  end)

  it("replaces state files atomically on a short debounce while a job runs", function()
    emu = E.start()
    emu:control("PATCH", "/_emulator/config", { jobRate = 5 })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/busy", job("busy"))))
    local reads, seen_running = 0, false
    local deadline = core.monotime() + 5
    repeat
      local data = shell.read_file(emu.dir .. "/state/jobs.json")
      if data then
        local state = core.json_decode(data)
        assert.is_table(state, "a state file that does not decode was visible")
        reads = reads + 1
        local j = find_job(state, "busy")
        if j and j.status == "running" then seen_running = true end
        if j and j.status == "completed" then break end
      end
      E.sleep(0.02)
    until core.monotime() > deadline
    assert.is_true(reads > 5)
    assert.is_true(seen_running, "the running job was never written before it completed")
    assert.equal("completed", find_job(read_state(emu.dir, "jobs"), "busy").status)
    -- an explicit save writes everything now
    local status, body = emu:control("POST", "/_emulator/state/save")
    assert.equal(200, status)
    assert.equal(emu.dir .. "/state", body.stateDir)
    assert.same({ "registry", "jobs" }, body.saved)
    -- a reset is saved too: a restart after it starts from the devices file alone
    emu:control("POST", "/_emulator/reset")
    assert.equal(0, emu:stop())
    assert.same({}, read_state(emu.dir, "jobs").jobs)
    emu:start()
    assert.equal(404, (emu:api("GET", "/jobs/v2/busy")))
  end)

  it("does not start on a broken state file, and says which file and what to do", function()
    emu = E.start()
    assert.equal(0, emu:stop())
    local dir = emu.dir
    shell.write_file(dir .. "/state/jobs.json", '{"format":"iothub-emulator-jobs/1","jobs":[{"jobId":')
    local ok, err = pcall(E.start, { dir = dir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("state file " .. dir .. "/state/jobs.json is not valid JSON", 1, true), err)
    assert.truthy(tostring(err):find("move it away", 1, true))
    shell.write_file(dir .. "/state/jobs.json", '{"format":"something-else"}')
    ok, err = pcall(E.start, { dir = dir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("not a jobs state file", 1, true), err)
    os.remove(dir .. "/state/jobs.json")
    emu:start() -- without the file it starts fine
    assert.equal(200, (emu:api("GET", "/twins/myDeviceId")))
  end)

  it("keeps nothing with --in-memory", function()
    emu = E.start()
    assert.equal(200, (emu:api("PUT", "/jobs/v2/kept", job("kept"))))
    assert.equal(0, emu:stop())
    emu.opts.args = { "--in-memory" }
    emu:start()
    assert.is_nil(emu:output():find("\nstate ", 1, true))
    assert.equal(404, (emu:api("GET", "/jobs/v2/kept")))
    local _, body = emu:control("POST", "/_emulator/state/save")
    assert.equal(core.null, body.stateDir)
  end)
end)

describe("emulator state store (in process)", function()
  local registry = require "emulator.registry"
  local store, dir, phase, pauses

  -- The parts of nginx's API the store uses; a pause yields to the test's coroutine.
  local function fake_ngx()
    return {
      get_phase = function() return phase end,
      sleep = function() pauses = pauses + 1; coroutine.yield("paused") end,
      log = function() end, NOTICE = 6, ERR = 4,
      worker = { exiting = function() return false end },
    }
  end

  local function devices_in(path)
    local t = assert(core.json_decode(assert(shell.read_file(path))))
    local ids = {}
    for _, d in ipairs(t.devices) do ids[#ids + 1] = d.deviceId end
    return ids, t
  end

  before_each(function()
    dir = shell.temp_dir("iothub-store-spec")
    package.loaded["emulator.store"] = nil
    store = require "emulator.store"
    store.configure(dir, { slice = 0 }) -- pause after every batch
    store.register("registry", registry.export_state, registry.import_state)
    registry.reset()
    for i = 1, 200 do assert(registry.add({ id = ("dev-%03d"):format(i), tags = { n = i } })) end
    phase, pauses = "timer", 0
    _G.ngx = fake_ngx()
  end)

  after_each(function()
    _G.ngx = nil
    registry.reset()
    package.loaded["emulator.store"] = nil
    shell.run("rm -rf " .. shell.quote(dir))
  end)

  it("writes in slices, keeps the old file until the end, and saves each device as it is when written", function()
    local path = dir .. "/registry.json"
    shell.write_file(path, '{"format":"iothub-emulator-registry/1","devices":[]}')
    local save = coroutine.wrap(function() return store.flush(true) end)
    assert.equal("paused", save()) -- the header is written; no device yet
    assert.same({}, (devices_in(path)))
    -- changes between slices: a deleted device is left out, a changed twin saved as it is now
    assert(registry.delete_device("dev-200"))
    assert(registry.update_twin("dev-150", { tags = { n = "changed" } }))
    assert.equal("paused", save())
    registry.add({ id = "dev-late" }) -- after the listing: left to the next save
    local result
    repeat result = save() until result ~= "paused"
    assert.same({ "registry" }, result)
    assert.is_true(pauses > 3, pauses .. " pauses") -- 199 devices in batches of 64
    local ids, t = devices_in(path)
    assert.equal(199, #ids)
    assert.equal("dev-001", ids[1])
    assert.equal("dev-199", ids[199])
    assert.equal("changed", t.devices[150].twin.tags.n)
    assert.is_nil(shell.read_file(path .. ".tmp"))
    -- the streamed file is the table export, and imports
    registry.delete_device("dev-late")
    assert.same(core.json_decode(core.json_encode(registry.export_state())), t)
    assert(registry.import_state(t))
    assert.equal(199, #registry.list())
  end)

  it("the shutdown's synchronous write replaces a save paused in a timer", function()
    local path = dir .. "/registry.json"
    local save = coroutine.wrap(function() return store.flush(true) end)
    assert.equal("paused", save())
    assert.equal("paused", save())
    assert(registry.delete_device("dev-001"))
    phase = "exit_worker" -- cannot yield: one synchronous write
    local n = pauses
    store.stop()
    assert.equal(n, pauses)
    assert.equal(199, #devices_in(path))
    -- the superseded save ends at its next pause and leaves the new file alone
    local before = shell.read_file(path)
    local result = save()
    assert.same({ "registry" }, result)
    assert.equal(before, shell.read_file(path))
    assert.is_nil(shell.read_file(path .. ".tmp"))
  end)
end)
