-- Durable state for a kept --dir: the registry (identities and twins), the jobs with their
-- device rows, and the clock offset, in an SQLite database (DIR/state/hub.db, WAL mode,
-- through Debian's lua-sql-sqlite3). The emulator serves from memory; the database is written
-- through: every change is marked here as it happens and the marks are committed in one
-- transaction
--   * before any response is sent (emulator/http.lua), so nothing a client was told or shown
--     can be lost by a crash, whatever the request;
--   * by the job engine after each batch of device rows, before it lets requests in (an
--     unpaced job sizes its batches so that their work and commit take about 20 ms), so a
--     running job's progress is kept without a commit per device;
--   * a second after a change made outside both (simulated devices reporting, timers);
--   * when the worker exits.
-- A commit writes each changed device's record and each changed device row as it is at that
-- moment, so several changes to one device cost one write. synchronous=NORMAL: a commit is
-- in the operating system's hands when it returns (a kill -9 or a crash of nginx loses
-- nothing committed); a power cut can lose the last commits, never the database. Folding
-- the log into hub.db (a checkpoint, with the fsyncs) runs in nginx's thread pool.
--
-- State is loaded in init_by_lua (the nginx master, so a bad database stops the start with a
-- message) and the connection is closed before nginx forks. The worker opens its own and, if
-- the database moved on since the master loaded it (a worker that crashed and was respawned),
-- loads it again: the master's memory is the start-up state, never served after a crash.
--
-- Tables: meta (schema, generation = commits so far, clockOffset); devices (rowid = creation
-- order, id, identity = registry.identity_record as JSON); twins (id, twin =
-- registry.twin_record: apart, as twins change far more often); jobs (seq = creation order, id, head =
-- jobs.job_record as JSON, targets = the device ids of its rows, in order); job_rows (job,
-- device, row = jobs.row_record as JSON) for the rows that differ from their job's untouched
-- state. Records go in as one JSON array per statement, unpacked by SQLite's json_each: one
-- string to build and escape per 500 records, whatever the interpreter (luasql has no
-- prepared statements; bench/store_sql.lua measures this against them).
local util = require "emulator.util"
local registry = require "emulator.registry"
local jobs = require "emulator.jobs"

local M = {}

local SCHEMA = "iothub-emulator-state/1"
local FILE = "hub.db"
local LEGACY = { { name = "registry", file = "registry.json" }, { name = "jobs", file = "jobs.json" } }
local BATCH = 500        -- records per statement
local LOAD_CHUNK = 2000  -- devices per query when loading

local settings = {
  background = 1,    -- seconds before changes made outside a request or a job are committed
  retry = 1,         -- seconds before a failed background commit is tried again
  slow = 0.05,       -- a commit taking longer is logged (bench/emulator_persist.lua shows them)
  checkpoint = 8 * 1024 * 1024, -- bytes of records written before the log is folded into the file
}
-- The worker-thread pool emulator/conf.lua declares when state is kept (emulator/checkpoint.lua).
M.THREAD_POOL = "iothub_store"

local state_dir, db_path -- nil: nothing is kept (a temporary --dir, or --in-memory)
local sqlite_env, conn
local started = false    -- in the worker, with timers
local written = 0        -- bytes of records since the last checkpoint
local checkpointing = false
local generation         -- the database's commit count that memory matches
local clock_stored       -- the clock offset the database has

-- What changed since the last commit.
local pending = false
-- devices: identities in order of change (id -> its latest index), ids to delete first, twins
local dev_ids, dev_pos, dev_reinsert, twin_ids = {}, {}, {}, {}
local all_devices = false -- rewrite every device
local head_list, heads = {}, {}                   -- jobs whose own fields changed, in order
local rows_of = {}                                -- job -> { list = rows, set = row -> true }
local all_jobs = false                            -- rewrite every job and row
-- What the database holds (weak: gone with the objects).
local stored = setmetatable({}, { __mode = "k" })         -- rows with a job_rows record
local targets_stored = setmetatable({}, { __mode = "k" }) -- job -> the row list whose targets are saved

local function clear_pending()
  pending = false
  dev_ids, dev_pos, dev_reinsert, twin_ids, all_devices = {}, {}, {}, {}, false
  head_list, heads, rows_of, all_jobs = {}, {}, {}, false
end

---------------------------------------------------------------------------
-- SQL

-- A string literal. JSON texts from the core encoder have no raw NUL (it escapes control
-- characters), and neither do device or job ids; anything else is refused, not truncated.
local function lit(s)
  if s:find("\0", 1, true) then error("a NUL byte in a value for the state database", 0) end
  if s:find("'", 1, true) then s = s:gsub("'", "''") end -- rare in JSON; gsub costs 10 ns a byte
  return "'" .. s .. "'"
end

local function json_lit(v)
  local text, err = util.json_encode(v)
  if not text then error("cannot encode the state: " .. tostring(err), 0) end
  return lit(text)
end

-- Runs a statement; rows it returns (some PRAGMAs answer with one) are dropped.
local function exec(sql)
  local res, err = conn:execute(sql)
  if not res then error(err, 0) end
  if type(res) == "userdata" then res:close() end
end

-- The first three values of a query's first row (nil when it has no row).
local function first_row(sql)
  local cur, err = conn:execute(sql)
  if not cur then error(err, 0) end
  if type(cur) ~= "userdata" then return nil end
  local row = cur:fetch({}, "n")
  cur:close()
  if not row then return nil end
  return row[1], row[2], row[3]
end

local unpack = table.unpack or unpack -- luacheck: ignore 143 (5.4 has table.unpack, LuaJIT unpack)

-- Runs `statement(json array literal)` for records in batches of BATCH.
local function in_batches(records, statement)
  for i = 1, #records, BATCH do
    local batch = {}
    for k = i, math.min(#records, i + BATCH - 1) do batch[#batch + 1] = records[k] end
    local array = json_lit(util.array(batch))
    written = written + #array
    exec(statement(array))
  end
end

local function upsert_identities(records)
  in_batches(records, function(array)
    return "INSERT INTO devices(id, identity) SELECT value->>'deviceId', value FROM json_each(" .. array
      .. ") WHERE true ON CONFLICT(id) DO UPDATE SET identity = excluded.identity"
  end)
end

local function upsert_twins(records)
  in_batches(records, function(array)
    return "INSERT INTO twins(id, twin) SELECT value->>'deviceId', value FROM json_each(" .. array
      .. ") WHERE true ON CONFLICT(id) DO UPDATE SET twin = excluded.twin"
  end)
end

local function upsert_heads(records)
  in_batches(records, function(array)
    return "INSERT INTO jobs(id, head) SELECT value->>'jobId', value FROM json_each(" .. array
      .. ") WHERE true ON CONFLICT(id) DO UPDATE SET head = excluded.head"
  end)
end

local function upsert_rows(job_id, records)
  local id = lit(job_id)
  in_batches(records, function(array)
    return "INSERT INTO job_rows(job, device, row) SELECT " .. id .. ", value->>0, value FROM json_each(" .. array
      .. ") WHERE true ON CONFLICT(job, device) DO UPDATE SET row = excluded.row"
  end)
end

local function save_targets(job)
  local ids = {}
  for i, row in ipairs(job.rows) do ids[i] = row.deviceId end
  exec("UPDATE jobs SET targets = " .. json_lit(util.array(ids)) .. " WHERE id = " .. lit(job.id))
end

---------------------------------------------------------------------------
-- Commit

-- The rows of a job that need a record: those that differ from the job's untouched state,
-- and those with a record already (it must follow). Marks go to `after`.
local function row_records(job, rows, after, full)
  local records = {}
  for _, row in ipairs(rows) do
    if (stored[row] and not full) or not jobs.row_is_untouched(job, row) then
      records[#records + 1] = jobs.row_record(row)
      after[#after + 1] = row
    end
  end
  return records
end

-- Returns how many devices it wrote (identity, twin or both).
local function write_devices()
  local identities, twins = {}, {}
  if all_devices then
    exec("DELETE FROM devices")
    exec("DELETE FROM twins")
    for i, dev in ipairs(registry.list()) do
      identities[i], twins[i] = registry.identity_record(dev), registry.twin_record(dev)
    end
  else
    local gone = {}
    for id in pairs(dev_reinsert) do gone[#gone + 1] = id end
    for _, t in ipairs({ "devices", "twins" }) do
      in_batches(gone, function(array) return "DELETE FROM " .. t .. " WHERE id IN (SELECT value FROM json_each(" .. array .. "))" end)
    end
    for i, id in ipairs(dev_ids) do
      local dev = dev_pos[id] == i and registry.get(id)
      if dev then identities[#identities + 1] = registry.identity_record(dev) end
    end
    for id in pairs(twin_ids) do
      local dev = registry.get(id)
      if dev then twins[#twins + 1] = registry.twin_record(dev) end
    end
  end
  upsert_identities(identities)
  upsert_twins(twins)
  return math.max(#identities, #twins)
end

-- Returns the rows given a record (stored from now on) and the jobs whose targets were saved.
local function write_jobs()
  local now_stored, with_targets = {}, {}
  local list = all_jobs and jobs.jobs_in_order() or head_list
  if all_jobs then
    exec("DELETE FROM job_rows")
    exec("DELETE FROM jobs")
  end
  local records = {}
  for i, job in ipairs(list) do records[i] = jobs.job_record(job) end
  upsert_heads(records)
  for _, job in ipairs(list) do
    if job.resolved and (all_jobs or targets_stored[job] ~= job.rows) then
      save_targets(job)
      with_targets[#with_targets + 1] = job
    end
  end
  if all_jobs then
    for _, job in ipairs(list) do upsert_rows(job.id, row_records(job, job.rows, now_stored, true)) end
  else
    for job, changed in pairs(rows_of) do upsert_rows(job.id, row_records(job, changed.list, now_stored, false)) end
  end
  return now_stored, with_targets
end

local function write_pending()
  local t0 = util.core.monotime()
  exec("BEGIN IMMEDIATE")
  local n_devices = write_devices()
  local t1 = util.core.monotime()
  local now_stored, with_targets = write_jobs()
  local t2 = util.core.monotime()
  local clock = util.clock_offset()
  if clock ~= clock_stored then
    exec("UPDATE meta SET value = " .. string.format("%.17g", clock) .. " WHERE key = 'clockOffset'")
  end
  exec("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
  exec("COMMIT")
  local took = util.core.monotime() - t0
  if took > settings.slow and ngx then
    ngx.log(ngx.NOTICE, string.format("state committed in %.0f ms: %d device(s) in %.0f ms, %d row(s) in %.0f ms, "
      .. "commit %.0f ms", took * 1e3, n_devices, (t1 - t0) * 1e3, #now_stored, (t2 - t1) * 1e3, (t0 + took - t2) * 1e3))
  end
  return now_stored, with_targets, clock
end

local arm

-- SQLite would fold the log into the file inside a commit (a copy and two fsyncs on the event
-- loop); the worker has it done in a thread instead, once enough was written, or between
-- requests from a timer where nginx has no thread pool. A checkpoint copies what was
-- committed when it began; it goes again until the log is all in the file, since only then
-- does the next commit write the log from its start (and cut it to journal_size_limit).
local inline_why -- why checkpoints run on the event loop, once logged

-- Returns the frames in the log and those in the file, or nil.
local function checkpoint_once()
  local in_thread = ngx.run_worker_thread -- luacheck: ignore 143 (lua-nginx-module 0.10.21+)
  local called, ran, ok, frames, copied = pcall(in_thread, M.THREAD_POOL, "emulator.checkpoint", "run", db_path)
  if called and ran and ok then return frames, copied end
  if not inline_why then
    inline_why = tostring(not called and ran or not ran and ok or frames)
    ngx.log(ngx.NOTICE, "state checkpoints run in the worker, not in a thread: ", inline_why)
  end
  if not conn then return nil end
  local done, _, log_frames, log_copied = pcall(first_row, "PRAGMA wal_checkpoint(PASSIVE)")
  if done then return tonumber(log_frames), tonumber(log_copied) end
end

local idle_armed = false

-- After a commit: a checkpoint once settings.checkpoint bytes were written, and one when
-- commits pause for a second with less (so the log starts over before the next burst).
local function checkpoint_soon(idle)
  if not started or written == 0 then return end
  if not idle and not checkpointing and written < settings.checkpoint then
    if not idle_armed then
      idle_armed = ngx.timer.at(1, function(premature)
        idle_armed = false
        if not premature then checkpoint_soon(true) end
      end) and true
    end
    return
  end
  if checkpointing then return end
  checkpointing, written = true, 0
  local ok, err = ngx.timer.at(0.001, function(premature)
    for _ = 1, 100 do
      if premature or ngx.worker.exiting() then break end
      local frames, copied = checkpoint_once()
      if not frames or copied >= frames then break end
      ngx.sleep(0.2)
    end
    checkpointing = false
  end)
  if not ok then
    checkpointing = false
    ngx.log(ngx.ERR, "cannot arm the state checkpoint: ", err)
  end
end

-- Commits every change marked so far in one transaction. Returns true, or nil and a message
-- (the marks stay and the next commit tries again).
function M.commit()
  if not pending or not conn then return true end
  local ok, now_stored, with_targets, clock = pcall(write_pending)
  if not ok then
    conn:execute("ROLLBACK")
    local err = "cannot save the state to " .. db_path .. ": " .. tostring(now_stored)
    if ngx then ngx.log(ngx.ERR, err) end
    if started then arm(settings.retry) end
    return nil, err
  end
  if all_jobs then stored = setmetatable({}, { __mode = "k" }) end
  for _, row in ipairs(now_stored) do stored[row] = true end
  for _, job in ipairs(with_targets) do targets_stored[job] = job.rows end
  clock_stored = clock
  generation = generation + 1
  clear_pending()
  checkpoint_soon()
  return true
end

-- Commits what changed outside a request a moment later (one timer at a time).
local armed = false
function arm(delay)
  if armed or not started or ngx.worker.exiting() then return end
  armed = true
  local ok, err = ngx.timer.at(delay or settings.background, function(premature)
    armed = false
    if not premature then M.commit() end -- at exit, exit_worker commits
  end)
  if not ok then
    armed = false
    ngx.log(ngx.ERR, "cannot arm the state writer: ", err)
  end
end

local function mark()
  pending = true
  if started and not armed then arm() end
end

-- registry.on_change: which part of a device an event changes (reported properties come
-- with lastActivityTime, in the identity).
local PARTS = { create = "both", delete = "both", reported = "both", twin = "twin", update = "identity",
  connection = "identity" }

local function device_changed(event, id)
  local part = PARTS[event] or "both"
  if event == "delete" then dev_reinsert[id] = true end -- a device made again later goes last
  if part ~= "twin" and (event == "create" or not dev_pos[id]) then
    local n = #dev_ids + 1
    dev_ids[n], dev_pos[id] = id, n
  end
  if part ~= "identity" then twin_ids[id] = true end
  mark()
end

-- jobs.on_change
local function job_changed(job, row)
  if not job then
    all_jobs = true
  elseif row then
    local changed = rows_of[job]
    if not changed then
      changed = { list = {}, set = {} }
      rows_of[job] = changed
    end
    if not changed.set[row] then
      changed.set[row] = true
      changed.list[#changed.list + 1] = row
    end
  elseif not heads[job] then
    heads[job] = true
    head_list[#head_list + 1] = job
  end
  mark()
end

---------------------------------------------------------------------------
-- Opening and loading

local function close()
  if conn then conn:close() end
  if sqlite_env then sqlite_env:close() end
  conn, sqlite_env = nil, nil
end

local function fail(what, err)
  close()
  error("state database " .. db_path .. " " .. what .. " (" .. (tostring(err):gsub("^LuaSQL: ", ""))
    .. "); move it away to start without it", 0)
end

-- Opens the database, creating its tables if it is new. Returns true when it holds nothing
-- yet: new, or made by a start that ended before its first commit.
local function open()
  local ok, driver = pcall(require, "luasql.sqlite3")
  if not ok then
    error("keeping state in --dir needs SQLite for Lua (Debian: apt-get install lua-sql-sqlite3): "
      .. tostring(driver):match("^[^\n]*"), 0)
  end
  sqlite_env = driver.sqlite3()
  local err
  conn, err = sqlite_env:connect(db_path)
  if not conn then fail("cannot be opened", err) end
  local mode
  ok, mode = pcall(first_row, "PRAGMA journal_mode = WAL")
  if not ok then fail("cannot be opened", mode) end
  if mode ~= "wal" then fail("cannot be opened", "journal_mode is " .. tostring(mode) .. ", not wal") end
  exec("PRAGMA synchronous = NORMAL")
  exec("PRAGMA busy_timeout = 5000")
  exec("PRAGMA wal_autocheckpoint = 0") -- checkpoint_soon; closing the last connection folds in the rest
  exec("PRAGMA journal_size_limit = " .. 4 * settings.checkpoint) -- a log that grew is cut back after a checkpoint
  local has_meta = first_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
  if tonumber(has_meta) == 0 then
    exec("BEGIN IMMEDIATE")
    exec("CREATE TABLE meta(key TEXT PRIMARY KEY, value)")
    exec("CREATE TABLE devices(id TEXT NOT NULL UNIQUE, identity TEXT NOT NULL)")
    exec("CREATE TABLE twins(id TEXT PRIMARY KEY, twin TEXT NOT NULL) WITHOUT ROWID")
    exec("CREATE TABLE jobs(seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, head TEXT NOT NULL, targets TEXT)")
    exec("CREATE TABLE job_rows(job TEXT NOT NULL, device TEXT NOT NULL, row TEXT NOT NULL, "
      .. "PRIMARY KEY(job, device)) WITHOUT ROWID")
    exec("INSERT INTO meta(key, value) VALUES ('schema', " .. lit(SCHEMA) .. "), ('generation', 0), ('clockOffset', 0)")
    exec("COMMIT")
    return true
  end
  local schema = first_row("SELECT value FROM meta WHERE key = 'schema'")
  if schema ~= SCHEMA then
    fail("is not one this emulator can read", "schema " .. tostring(schema) .. ", expected " .. SCHEMA)
  end
  return tonumber(first_row("SELECT value FROM meta WHERE key = 'generation'")) == 0
end

local function decode(text, what)
  local v, err = util.json_decode(text)
  if v == nil then error(what .. " is not valid JSON: " .. tostring(err), 0) end
  return v
end

-- Every device's identity with its twin, in creation order.
local function load_devices()
  local list, last = {}, 0
  while true do
    local top, text = first_row("SELECT max(r), '[' || group_concat('[' || r || ',' || identity || ',' || "
      .. "coalesce(twin, 'null') || ']', ',') || ']' FROM (SELECT d.rowid AS r, identity, twin FROM devices d "
      .. "LEFT JOIN twins t ON t.id = d.id WHERE d.rowid > " .. last .. " ORDER BY d.rowid LIMIT " .. LOAD_CHUNK .. ")")
    if not top then break end
    local chunk = decode(text, "a device record")
    table.sort(chunk, function(a, b) return a[1] < b[1] end)
    for _, t in ipairs(chunk) do
      t[2].twin = t[3] -- null: no twin, which import_state refuses naming the device
      list[#list + 1] = t[2]
    end
    last = math.floor(tonumber(top))
  end
  return list
end

-- Every job record with its rows rebuilt (targets in order, each from its row record or the
-- untouched state), and per job the saved row records by device id.
local function load_jobs()
  local list, saved = {}, {}
  local cur = assert(conn:execute("SELECT id, head, targets FROM jobs ORDER BY seq"))
  local heads_read = {}
  local row = cur:fetch({}, "n")
  while row do
    heads_read[#heads_read + 1] = { row[1], row[2], row[3] }
    row = cur:fetch({}, "n")
  end
  cur:close()
  for _, h in ipairs(heads_read) do
    local id = h[1]
    local t = decode(h[2], "job '" .. id .. "'")
    local by_device = {}
    local text = first_row("SELECT '[' || group_concat(row, ',') || ']' FROM job_rows WHERE job = " .. lit(id))
    for _, r in ipairs(text and decode(text, "the rows of job '" .. id .. "'") or {}) do by_device[r[1]] = r end
    local rows = {}
    if h[3] then
      local u = t.untouched
      for i, device in ipairs(decode(h[3], "the targets of job '" .. id .. "'")) do
        local r = by_device[device]
        if not r then
          if type(u) ~= "table" then error("job '" .. id .. "': no row for device '" .. tostring(device) .. "'", 0) end
          r = util.array({ device, unpack(u, 1, 8) })
        end
        rows[i] = r
      end
    end
    t.rows = util.array(rows)
    list[#list + 1] = t
    saved[id] = by_device
  end
  return list, saved
end

-- Loads the database into memory: registry.import_state and jobs.import_state, then marks
-- what memory has and the database not (devices from the devices file that are new, rows
-- of a running job that will run again). again: a reload in the worker, where every device
-- still there is in the database (the master committed the devices file's new ones).
local function load(again)
  local devices = load_devices()
  local ok, err = registry.import_state({ format = registry.STATE_FORMAT, devices = util.array(devices) }, again)
  if not ok then error(err, 0) end
  local job_list, saved = load_jobs()
  local clock = tonumber(first_row("SELECT value FROM meta WHERE key = 'clockOffset'")) or 0
  ok, err = jobs.import_state({ format = jobs.STATE_FORMAT, clockOffset = clock, jobs = util.array(job_list) })
  if not ok then error(err, 0) end
  generation = math.floor(tonumber(first_row("SELECT value FROM meta WHERE key = 'generation'")) or 0)
  clock_stored = clock
  clear_pending()
  stored = setmetatable({}, { __mode = "k" })
  local known = {}
  for _, d in ipairs(devices) do known[d.deviceId] = true end
  for _, dev in ipairs(registry.list()) do
    if not known[dev.id] then device_changed("create", dev.id) end
  end
  for _, job in ipairs(jobs.jobs_in_order()) do
    local by_device = saved[job.id]
    if job.resolved then targets_stored[job] = job.rows end
    for _, row in ipairs(job.rows) do
      local r = by_device[row.deviceId]
      if r then
        stored[row] = true
        if r[2] ~= row.status then job_changed(job, row) end
      end
    end
  end
  return #devices, #job_list
end

-- The JSON state files of earlier versions, imported into a new database once (then renamed
-- to *.imported). Returns the names imported.
local function import_legacy()
  local imported = {}
  for _, kind in ipairs(LEGACY) do
    local path = state_dir .. "/" .. kind.file
    os.remove(path .. ".tmp") -- left by a write that never completed; the file itself is intact
    local f = io.open(path, "rb")
    if f then
      local data = f:read("*a")
      f:close()
      local t, err = util.json_decode(data)
      if t == nil then
        error("state file " .. path .. " is not valid JSON (" .. tostring(err) .. "); move it away to start without it", 0)
      end
      local ok, ierr = (kind.name == "registry" and registry or jobs).import_state(t)
      if not ok then
        error("state file " .. path .. ": " .. tostring(ierr) .. "; move it away to start without it", 0)
      end
      imported[#imported + 1] = kind.name
    end
  end
  if #imported > 0 then
    all_devices, all_jobs = true, true
    mark()
  end
  return imported
end

---------------------------------------------------------------------------
-- Life cycle

-- init_by_lua: dir = the state directory, or nil/"" to keep nothing. Opens (or creates) the
-- database, imports old JSON state files into a new one, loads it, commits what the devices
-- file added, and closes it again before nginx forks. Returns a line for the log saying
-- what was restored, or nil; raises an error naming the file and what to do when the state
-- cannot be read (nginx does not start).
function M.init(dir)
  state_dir = (dir ~= "" and dir) or nil
  if not state_dir then return nil end
  db_path = state_dir .. "/" .. FILE
  registry.on_change = device_changed
  jobs.on_change = job_changed
  jobs.commit = M.commit
  local t0 = util.core.monotime()
  local new = open()
  local ok, res = pcall(function()
    if new then
      generation, clock_stored = 0, 0
      local imported = import_legacy()
      -- devices from the devices file: with a new database, all of them are new
      for _, dev in ipairs(registry.list()) do device_changed("create", dev.id) end
      if #imported > 0 then return "imported " .. table.concat(imported, ", ") .. " from the JSON state files" end
      return nil
    end
    local n_devices, n_jobs = load()
    if n_devices + n_jobs == 0 then return nil end
    return string.format("%d device(s), %d job(s) loaded in %.1f s", n_devices, n_jobs, util.core.monotime() - t0)
  end)
  local committed, err
  if not ok then
    err = tostring(res):find("^state ") and res
      or ("state database " .. db_path .. ": " .. tostring(res) .. "; move it away to start without it")
  elseif new then
    -- A new database's first commit (a whole fleet, perhaps) goes straight into the file: a
    -- rollback journal has nothing to save for pages that did not exist, while the log
    -- would take it all and copy it again at close.
    local switched, why = pcall(exec, "PRAGMA journal_mode = DELETE")
    if switched then committed, err = M.commit() else err = why end
    if committed then
      switched, why = pcall(first_row, "PRAGMA journal_mode = WAL")
      if not switched then committed, err = nil, why end
    end
  else
    committed, err = M.commit()
  end
  if not committed then
    close()
    -- a database made just now holds nothing yet: gone, the next start tries the import again
    if new then
      for _, suffix in ipairs({ "", "-wal", "-shm", "-journal" }) do os.remove(db_path .. suffix) end
    end
    error(err, 0)
  end
  if new then
    for _, kind in ipairs(LEGACY) do
      local path = state_dir .. "/" .. kind.file
      os.rename(path, path .. ".imported") -- fails harmlessly when there is none
    end
  end
  close() -- a connection must not cross fork(); the worker opens its own
  return res
end

-- init_worker: opens the worker's connection and, when the database has commits that memory
-- lacks (this worker replaces one that crashed), loads it again. Returns a log line when it
-- reloaded; raises when it cannot.
function M.start()
  local reloaded
  if state_dir then
    open()
    local now = math.floor(tonumber(first_row("SELECT value FROM meta WHERE key = 'generation'")) or 0)
    if now ~= generation then
      local n_devices, n_jobs = load(true)
      reloaded = string.format("worker restarted: state reloaded from %s (%d device(s), %d job(s))", db_path,
        n_devices, n_jobs)
    end
  end
  started = true
  if pending then arm() end
  return reloaded
end

-- exit_worker: the last commit.
function M.stop()
  if not conn then return end
  local ok, err = M.commit()
  if not ok then ngx.log(ngx.ERR, err) end
  close()
end

function M.dir()
  return state_dir
end

-- Commits now and checkpoints the write-ahead log into the database file (for a copy of
-- hub.db alone). Returns the kinds kept ({} without a state dir), or nil, message.
function M.flush()
  if not conn then return {} end
  local ok, err = M.commit()
  if not ok then return nil, err end
  local res, cerr = conn:execute("PRAGMA wal_checkpoint(TRUNCATE)")
  if not res then return nil, "cannot checkpoint " .. db_path .. ": " .. tostring(cerr) end
  if type(res) == "userdata" then res:close() end
  return { "registry", "jobs" }
end

-- Something changed that the per-item hooks do not report: "registry" rewrites every
-- device at the next commit (a reset); "jobs" (the clock moved) commits the clock offset,
-- which every commit compares anyway.
function M.mark(name)
  if not state_dir then return end
  if name == "registry" then all_devices = true end
  mark()
end

return M
