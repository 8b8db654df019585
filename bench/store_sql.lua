-- Is string-built SQL fast enough for the emulator's state store? luasql (Debian's
-- lua-sql-sqlite3) has no prepared statements, so emulator/store.lua sends each batch of
-- records as one JSON array literal that SQLite unpacks with json_each. This measures, for
-- twin records from the emulator's registry (about 320 bytes of JSON each), in µs per record:
--   * json_each batches, as the store writes them (500 records a statement), and the part
--     of that spent encoding the records, which any way of storing them pays;
--   * one INSERT per record with its own escaped literal, the obvious alternative (under
--     LuaJIT each literal is a new long string to intern; capped at 10,000 records);
--   * the floor: the same upserts through prepared statements in C (bench/sqlite_floor.c,
--     needs libsqlite3-dev; skipped without it);
-- each as a first insert and as an update of every record, 1,000 records a transaction;
-- then the latency of a one-record commit with synchronous=NORMAL (the store's) and FULL.
-- Not a timed test. Run from the repository root:
--   lua5.4 bench/store_sql.lua [records=100000]      (or luajit bench/store_sql.lua)
package.path = "./?.lua;lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local core = require "iothub.core"
local shell = require "support.shell"
local registry = require "emulator.registry"
local util = require "emulator.util"

local count = tonumber(arg and arg[1]) or 100000
local PER_TX, BATCH, SINGLE_MAX = 1000, 500, 10000

local tmp = shell.temp_dir("iothub-store-sql")
local env = require("luasql.sqlite3").sqlite3()

local function open(name, sync)
  local path = tmp .. "/" .. name .. ".db"
  local conn = assert(env:connect(path))
  for _, p in ipairs({ "PRAGMA journal_mode = WAL", "PRAGMA synchronous = " .. (sync or "NORMAL") }) do
    local cur = assert(conn:execute(p))
    if type(cur) == "userdata" then cur:close() end
  end
  assert(conn:execute("CREATE TABLE twins(id TEXT PRIMARY KEY, twin TEXT NOT NULL) WITHOUT ROWID"))
  return conn
end

local function lit(s)
  if s:find("'", 1, true) then s = s:gsub("'", "''") end
  return "'" .. s .. "'"
end

for i = 1, count do
  assert(registry.add({ id = ("sim-%06d"):format(i), tags = { fleet = "bench", building = tostring(i % 10) } }))
end
local devices = registry.list()
-- pass 1 inserts the twins as they are, pass 2 updates them after a patch, as a job would
local function records(pass, n)
  local out = {}
  for i = 1, n do
    local dev = devices[i]
    if pass == 2 then assert(registry.update_twin(dev.id, { tags = { spec = "bench" } }, "*")) end
    out[i] = registry.twin_record(dev)
  end
  return out
end

-- Runs write(conn, records, from, to) over the records in transactions of PER_TX; µs per record.
local function timed(conn, recs, step, write)
  local t0 = core.monotime()
  for i = 1, #recs, PER_TX do
    assert(conn:execute("BEGIN"))
    for k = i, math.min(#recs, i + PER_TX - 1), step do write(conn, recs, k, math.min(#recs, k + step - 1, i + PER_TX - 1)) end
    assert(conn:execute("COMMIT"))
  end
  return (core.monotime() - t0) / #recs * 1e6
end

local function json_each(conn, recs, from, to)
  local batch = {}
  for k = from, to do batch[#batch + 1] = recs[k] end
  assert(conn:execute("INSERT INTO twins(id, twin) SELECT value->>'deviceId', value FROM json_each("
    .. lit(assert(util.json_encode(util.array(batch)))) .. ") WHERE true ON CONFLICT(id) DO UPDATE SET twin = excluded.twin"))
end

local function single(conn, recs, k)
  local r = recs[k]
  assert(conn:execute("INSERT INTO twins(id, twin) VALUES (" .. lit(r.deviceId) .. ", " .. lit(assert(util.json_encode(r)))
    .. ") ON CONFLICT(id) DO UPDATE SET twin = excluded.twin"))
end

print(("%s, %d twin records, %d per transaction"):format(jit and jit.version or _VERSION, count, PER_TX))
local by_pass = { records(1, count) }
local bytes = 0
for _, r in ipairs(by_pass[1]) do bytes = bytes + #util.json_encode(r) end
by_pass[2] = records(2, count)
print(("record size %.0f bytes of JSON on average"):format(bytes / count))

local ok, err = pcall(function()
  local a, b = open("json_each"), open("single")
  local n_single = math.min(count, SINGLE_MAX)
  local single_recs = {}
  for pass = 1, 2 do
    local sub = {}
    for i = 1, n_single do sub[i] = by_pass[pass][i] end
    single_recs[pass] = sub
  end
  local je = { timed(a, by_pass[1], BATCH, json_each), timed(a, by_pass[2], BATCH, json_each) }
  local one = { timed(b, single_recs[1], 1, single), timed(b, single_recs[2], 1, single) }
  local t0 = core.monotime()
  for i = 1, count, BATCH do
    local batch = {}
    for k = i, math.min(count, i + BATCH - 1) do batch[#batch + 1] = by_pass[2][k] end
    lit(assert(util.json_encode(util.array(batch))))
  end
  local encode = (core.monotime() - t0) / count * 1e6
  print(("json_each, %d a statement     insert %6.1f   update %6.1f  µs/record (encoding them: %.1f)")
    :format(BATCH, je[1], je[2], encode))
  print(("one INSERT per record (%d)  insert %6.1f   update %6.1f  µs/record"):format(n_single, one[1], one[2]))
  a:close()
  b:close()

  -- the floor: prepared statements in C over the same records (the update pass's text)
  local exe = tmp .. "/sqlite_floor"
  local built, out = shell.run("cc -O2 -o " .. shell.quote(exe) .. " bench/sqlite_floor.c -lsqlite3")
  if built then
    local lines = {}
    for i, r in ipairs(by_pass[2]) do lines[i] = r.deviceId .. "\t" .. util.json_encode(r) end
    shell.write_file(tmp .. "/records.txt", table.concat(lines, "\n") .. "\n")
    local ran, res = shell.run(shell.quote(exe) .. " " .. shell.quote(tmp .. "/floor.db") .. " "
      .. shell.quote(tmp .. "/records.txt") .. " " .. PER_TX)
    local ins, upd = res:match("^([%d.]+) ([%d.]+)")
    assert(ran and ins, res)
    print(("prepared statements (C floor) insert %6.1f   update %6.1f  µs/record (the JSON text given, not encoded)")
      :format(tonumber(ins), tonumber(upd)))
  else
    print("prepared statements (C floor) skipped: cannot build bench/sqlite_floor.c (apt-get install libsqlite3-dev): "
      .. out:match("^[^\n]*"))
  end

  -- one small commit: what a request that changed one twin pays
  for _, sync in ipairs({ "NORMAL", "FULL" }) do
    local conn = open("sync_" .. sync, sync)
    local lat = {}
    for i = 1, 300 do
      local c0 = core.monotime()
      assert(conn:execute("BEGIN"))
      json_each(conn, by_pass[2], i, i)
      assert(conn:execute("COMMIT"))
      lat[i] = core.monotime() - c0
    end
    table.sort(lat)
    print(("one-record commit, synchronous=%-6s median %.2f ms   p99 %.2f ms   max %.2f ms"):format(sync,
      lat[150] * 1e3, lat[297] * 1e3, lat[300] * 1e3))
    conn:close()
  end
end)
env:close()
shell.run("rm -rf " .. shell.quote(tmp))
if not ok then error(err, 0) end
