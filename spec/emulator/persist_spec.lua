-- Persistence with a kept --dir (DIR/state/hub.db, SQLite): registry, twins, jobs and the
-- clock survive a stop/start; a job running at shutdown resumes; each change is in the
-- database, for another reader too, before the emulator answers; the JSON state files of
-- earlier versions are imported once; a broken database or state file stops the start with
-- a message naming it; --in-memory keeps nothing. Crashes: spec/emulator/crash_spec.lua.
--   busted --lua=lua5.4 spec/emulator/persist_spec.lua
--   busted --lua=luajit -r luajit spec/emulator/persist_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"
local job = E.job

local DEVICES = 7

-- Rows of a query on the state database, through a connection of its own (the emulator may
-- be running: WAL lets a reader see every committed change).
local function db_rows(dir, sql)
  local path = dir .. "/state/hub.db"
  assert(shell.read_file(path), "no " .. path)
  local env = require("luasql.sqlite3").sqlite3()
  local conn = assert(env:connect(path))
  local cur = assert(conn:execute(sql))
  local out = {}
  local row = cur:fetch({}, "n")
  while row do
    out[#out + 1] = row
    row = cur:fetch({}, "n")
  end
  cur:close()
  conn:close()
  env:close()
  return out
end

local function saved_job(dir, id)
  local rows = db_rows(dir, "SELECT head FROM jobs WHERE id = '" .. id .. "'")
  return rows[1] and assert(core.json_decode(rows[1][1]))
end

-- The saved device rows of a job that differ from its untouched state, by device id.
local function saved_rows(dir, id)
  local out = {}
  for _, r in ipairs(db_rows(dir, "SELECT device, row FROM job_rows WHERE job = '" .. id .. "'")) do
    out[r[1]] = assert(core.json_decode(r[2]))
  end
  return out
end

-- A device's saved identity with its twin under "twin".
local function saved_device(dir, id)
  local rows = db_rows(dir, "SELECT identity, twin FROM devices JOIN twins USING (id) WHERE id = '" .. id .. "'")
  if not rows[1] then return nil end
  local dev = assert(core.json_decode(rows[1][1]))
  dev.twin = assert(core.json_decode(rows[1][2]))
  return dev
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
    assert.equal("hub.db\n", files) -- the write-ahead log is folded in at a clean stop
    assert.equal("completed", saved_job(emu.dir, "done").status)

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
    assert.equal("running", saved_job(emu.dir, "mid").status)
    local finished_before = {}
    for id, r in pairs(saved_rows(emu.dir, "mid")) do
      if r[2] == "completed" then finished_before[id] = r[4] end -- endTimeUtc
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

  it("has each change in the database before it answers, and job progress before it shows", function()
    emu = E.start()
    local status, twin = emu:api("PATCH", "/twins/door-002", { tags = { floor = 3 } }, { ["If-Match"] = "*" })
    assert.equal(200, status)
    local dev = saved_device(emu.dir, "door-002")
    assert.equal(3, dev.twin.tags.floor)
    assert.equal(twin.version, dev.twin.version)
    assert.equal(200, (emu:api("PUT", "/devices/quick", { deviceId = "quick" })))
    assert.truthy(saved_device(emu.dir, "quick"))
    assert.equal(204, (emu:api("DELETE", "/devices/quick")))
    assert.is_nil(saved_device(emu.dir, "quick"))

    emu:control("PATCH", "/_emulator/config", { jobRate = 5 })
    assert.equal(200, (emu:api("PUT", "/jobs/v2/busy", job("busy"))))
    local polls, seen_running = 0, false
    local deadline = core.monotime() + 10
    repeat
      local _, j = emu:api("GET", "/jobs/v2/busy")
      local saved = saved_job(emu.dir, "busy")
      assert.truthy(saved, "a job the emulator acknowledged is not in the database")
      local done = 0
      for _, r in pairs(saved_rows(emu.dir, "busy")) do
        if r[2] == "completed" then done = done + 1 end
      end
      assert.is_true(done >= j.deviceJobStatistics.succeededCount,
        done .. " completed rows saved, " .. j.deviceJobStatistics.succeededCount .. " shown")
      if j.status == "running" then seen_running = true end
      polls = polls + 1
      E.sleep(0.02)
    until j.status == "completed" or core.monotime() > deadline
    assert.is_true(seen_running and polls > 5)
    assert.equal("completed", saved_job(emu.dir, "busy").status)
    -- an explicit save folds the write-ahead log into hub.db
    local body
    status, body = emu:control("POST", "/_emulator/state/save")
    assert.equal(200, status)
    assert.equal(emu.dir .. "/state", body.stateDir)
    assert.same({ "registry", "jobs" }, body.saved)
    assert.equal("", shell.read_file(emu.dir .. "/state/hub.db-wal") or "")
    -- a reset is saved too: a restart after it starts from the devices file alone
    emu:control("POST", "/_emulator/reset")
    assert.is_nil(saved_job(emu.dir, "busy"))
    assert.equal(0, emu:stop())
    emu:start()
    assert.equal(404, (emu:api("GET", "/jobs/v2/busy")))
    local _, door = emu:api("GET", "/twins/door-002")
    assert.is_nil(door.tags.floor)
  end)

  it("does not start on a broken database or state file, and says which file and what to do", function()
    emu = E.start()
    assert.equal(0, emu:stop())
    local dir = emu.dir
    local db = dir .. "/state/hub.db"
    shell.write_file(db, "this is not a database, it only has the name of one\n" .. ("x"):rep(4096))
    local ok, err = pcall(E.start, { dir = dir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("state database " .. db .. " cannot be opened", 1, true), err)
    assert.truthy(tostring(err):find("move it away", 1, true))
    os.remove(db)
    -- the JSON state files of an earlier version, into a new database
    shell.write_file(dir .. "/state/jobs.json", '{"format":"iothub-emulator-jobs/1","jobs":[{"jobId":')
    ok, err = pcall(E.start, { dir = dir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("state file " .. dir .. "/state/jobs.json is not valid JSON", 1, true), err)
    assert.truthy(tostring(err):find("move it away", 1, true))
    assert.is_nil(shell.read_file(db), "a database was left that would skip the import next time")
    shell.write_file(dir .. "/state/jobs.json", '{"format":"something-else"}')
    ok, err = pcall(E.start, { dir = dir })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("not a jobs state file", 1, true), err)
    os.remove(dir .. "/state/jobs.json")
    emu:start() -- without the file it starts fine
    assert.equal(200, (emu:api("GET", "/twins/myDeviceId")))
  end)

  it("imports the JSON state files of an earlier version once", function()
    emu = E.new()
    emu.tmp = shell.temp_dir("iothub-emu-spec")
    emu.dir = emu.tmp .. "/dir"
    emu.easy = assert(require("iothub.curl").easy({}))
    assert(shell.run("mkdir -p " .. shell.quote(emu.dir .. "/state")))
    local key = core.base64_encode(("k"):rep(32))
    shell.write_file(emu.dir .. "/state/registry.json", assert(core.json_encode({
      format = "iothub-emulator-registry/1",
      devices = core.json_array({ {
        deviceId = "legacy-dev", generationId = "638000000000000000", etag = "MTIzNDU2Nzg=", status = "enabled",
        authentication = { type = "sas", primaryKey = key, secondaryKey = key },
        twin = { tags = { from = "json" }, desired = { mode = "old" }, reported = {}, desiredMetadata = {},
          reportedMetadata = {}, desiredVersion = 3, reportedVersion = 1, version = 5, etagNumber = 6 },
      } }),
    })))
    local z, nz = "2026-01-02T03:04:05.0000000Z", "2026-01-02T03:04:05.0000000"
    shell.write_file(emu.dir .. "/state/jobs.json", assert(core.json_encode({
      format = "iothub-emulator-jobs/1", clockOffset = 0,
      jobs = core.json_array({ {
        jobId = "old-job", type = "scheduleUpdateTwin", status = "completed", queryCondition = "*",
        start = 1767323045, ttl = 3600, created = 1767323045, started = 1767323045, finished = 1767323046,
        updateTwin = { etag = "*", tags = { from = "job" } }, resolved = true,
        rows = core.json_array({ core.json_array({ "legacy-dev", "completed", nz, nz, z, z, core.null, core.null, core.null }) }),
      } }),
    })))
    emu:start()
    assert.truthy(emu:output():find("imported registry, jobs from the JSON state files", 1, true), emu:output())
    local function check()
      local status, twin = emu:api("GET", "/twins/legacy-dev")
      assert.equal(200, status)
      assert.equal("json", twin.tags.from)
      assert.equal(3, twin.properties.desired["$version"])
      assert.equal(5, twin.version)
      local _, dev = emu:api("GET", "/devices/legacy-dev")
      assert.equal(key, dev.authentication.symmetricKey.primaryKey)
      local _, j = emu:api("GET", "/jobs/v2/old-job")
      assert.equal("completed", j.status)
      assert.equal(1, j.deviceJobStatistics.succeededCount)
      assert.equal(nz, emu:rows("old-job")["legacy-dev"].endTimeUtc)
      assert.equal(200, (emu:api("GET", "/twins/myDeviceId"))) -- the devices file's too
    end
    check()
    assert.equal(0, emu:stop())
    local files = select(2, shell.run("ls " .. shell.quote(emu.dir .. "/state")))
    assert.equal("hub.db\njobs.json.imported\nregistry.json.imported\n", files)
    emu:start()
    assert.is_nil(emu:output():find("imported", 1, true))
    check()
  end)

  it("keeps nothing with --in-memory", function()
    emu = E.start()
    assert.equal(200, (emu:api("PUT", "/jobs/v2/kept", job("kept"))))
    assert.equal(0, emu:stop())
    emu.opts.args = { "--in-memory" }
    os.remove(emu.dir .. "/state/hub.db")
    emu:start()
    assert.is_nil(emu:output():find("\nstate ", 1, true))
    assert.equal(404, (emu:api("GET", "/jobs/v2/kept")))
    assert.equal(200, (emu:api("PUT", "/devices/not-kept", { deviceId = "not-kept" })))
    assert.is_nil(shell.read_file(emu.dir .. "/state/hub.db"))
    local _, body = emu:control("POST", "/_emulator/state/save")
    assert.equal(core.null, body.stateDir)
  end)
end)
