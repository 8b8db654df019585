-- How long the emulator's state commits hold up requests: a simulated fleet with a kept
-- --dir (state in DIR/state/hub.db), GET /_emulator/health every 10 ms while (1) nothing
-- happens, (2) one twin change is committed, (3) a twin-update job over the whole fleet runs
-- (its rows and twins committed batch by batch) until it completes, and (4) that job's
-- twins are patched again by a second job that is cancelled part-way. Prints the longest
-- request latency (the stall), the 99th percentile and the median of each phase, and the
-- commits nginx logged as slow (over 50 ms) meanwhile; then the stop (last commit) and a
-- restart that loads the fleet from the database. "memory" runs with --in-memory (nothing
-- kept), for the stalls the job causes by itself. Not a timed test: figures vary with the
-- load. Run from the repository root (the client is light; nginx runs on LuaJIT):
--   lua5.4 bench/emulator_persist.lua [devices=100000] [memory]
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"

local count = tonumber(arg and arg[1]) or 100000
local in_memory = arg and arg[2] == "memory"
local POLL = 0.01

local tmp = shell.temp_dir("iothub-emu-persist")
local devices = tmp .. "/fleet.lua"
shell.write_file(devices, ([[
-- %d simulated devices, written by bench/emulator_persist.lua
return { fleets = { {
  count = %d, id = "sim-%%06d",
  tags = function(i) return { fleet = "persist", building = tostring(i %% 10) } end,
} } }
]]):format(count, count))

local function error_log(emu)
  return shell.read_file(emu.dir .. "/logs/error.log") or ""
end

-- "state committed in ..." lines nginx logged after byte `from` (and the JSON store's "state
-- <kind> saved in ..." of earlier versions, so the same script measures both).
local function commits_since(emu, from)
  local out = {}
  for line in error_log(emu):sub(from + 1):gmatch("[^\n]+") do
    local what = line:match("(state [%a ]+ in .-),? client:") or line:match("(state [%a ]+ in .-),? context:")
      or line:match("(state %a+ saved in .*)") or line:match("(state committed in .*)")
    if what then out[#out + 1] = what end
  end
  return out
end

local function millis(line)
  local n, unit = line:match(" in ([%d.]+) (m?s)")
  return (tonumber(n) or 0) * (unit == "s" and 1000 or 1)
end

-- Polls the health route every POLL seconds until done() says so (checked between polls) or
-- `limit` seconds pass; returns the latencies in seconds, sorted, and whether done() held.
local function poll(emu, limit, done)
  local lat = {}
  local deadline = core.monotime() + limit
  local finished
  repeat
    local t0 = core.monotime()
    local status = emu:control("GET", "/_emulator/health")
    lat[#lat + 1] = core.monotime() - t0
    assert(status == 200, "GET /_emulator/health -> " .. tostring(status))
    finished = done()
    if not finished then core.sleep(POLL) end
  until finished or core.monotime() > deadline
  table.sort(lat)
  return lat, finished
end

local function report(name, lat, commits)
  local p99 = lat[math.max(1, math.ceil(#lat * 0.99))]
  print(("%-30s max %7.1f ms   p99 %6.1f ms   median %5.2f ms   (%d polls)"):format(
    name, lat[#lat] * 1e3, p99 * 1e3, lat[math.ceil(#lat / 2)] * 1e3, #lat))
  local longest = {}
  for _, c in ipairs(commits) do longest[#longest + 1] = c end
  table.sort(longest, function(a, b) return millis(a) > millis(b) end)
  if #longest > 0 then
    print(("    %d slow commit(s) or save(s); the longest: %s"):format(#longest,
      table.concat(longest, "; ", 1, math.min(3, #longest))))
  end
end

-- Runs a twin job over the fleet, polling meanwhile, until it completes or cancel_at
-- (succeeded rows) is reached and it is cancelled. Returns the latencies and the job.
local function run_job(emu, id, tags, cancel_at)
  emu:control("PATCH", "/_emulator/config", { jobRate = 0 })
  local body = E.job(id, { queryCondition = "tags.fleet = 'persist'", updateTwin = { etag = "*", tags = tags } })
  assert(emu:api("PUT", "/jobs/v2/" .. id, body) == 200)
  local job = { status = "queued" }
  local polls = 0
  local lat = poll(emu, 300, function()
    polls = polls + 1
    if polls % 5 == 0 then
      job = select(2, emu:api("GET", "/jobs/v2/" .. id))
      assert(job.status ~= "failed", "the job failed")
      if cancel_at and job.deviceJobStatistics.succeededCount >= cancel_at and job.status == "running" then
        local t0 = core.monotime()
        job = select(2, emu:api("POST", "/jobs/v2/" .. id .. "/cancel"))
        print(("    cancelled after %d rows; POST cancel took %.1f ms"):format(job.deviceJobStatistics.succeededCount,
          (core.monotime() - t0) * 1e3))
      end
    end
    return job.status == "completed" or job.status == "cancelled"
  end)
  return lat, job
end

print(("%d devices, health polled every %d ms; nginx runs LuaJIT%s"):format(count, POLL * 1e3,
  in_memory and "; --in-memory (nothing kept)" or ""))
local emu
local ok, err = pcall(function()
  local t0 = core.monotime()
  local args = in_memory and { "--in-memory" } or nil
  emu = E.start({ devices = devices, ready_timeout = 180, dir = tmp .. "/dir", args = args })
  print(("emulator start (fresh dir)     %.2f s"):format(core.monotime() - t0))

  local from = #error_log(emu)
  report("idle", (poll(emu, 1, function() return false end)), {})

  assert(emu:api("PATCH", "/twins/sim-000001", { tags = { touched = true } }, { ["If-Match"] = "*" }) == 200)
  report("one twin change, then 1 s", (poll(emu, 1, function() return false end)), commits_since(emu, from))

  from = #error_log(emu)
  t0 = core.monotime()
  local lat, job = run_job(emu, "persist-job", { pass = 1 })
  assert(job.status == "completed", "the job is still " .. job.status)
  report(("twin job, %.1f s to complete"):format(core.monotime() - t0), lat, commits_since(emu, from))

  from = #error_log(emu)
  lat = run_job(emu, "cancel-job", { pass = 2 }, math.floor(count / 4))
  report("second job, cancelled at 1/4", lat, commits_since(emu, from))

  t0 = core.monotime()
  local rc = emu:stop()
  local size = ""
  if not in_memory then
    local f = io.open(emu.dir .. "/state/hub.db", "rb")
    size = ("; hub.db %.1f MB"):format(f and f:seek("end") / 1e6 or 0)
    if f then f:close() end
  end
  print(("stop (last commit)             %.2f s   (exit %s%s)"):format(core.monotime() - t0, tostring(rc), size))
  if not in_memory then
    t0 = core.monotime()
    emu:start()
    print(("restart (fleet from hub.db)    %.2f s"):format(core.monotime() - t0))
    local _, j = emu:api("GET", "/jobs/v2/cancel-job")
    assert(j.status == "cancelled", "cancel-job is " .. tostring(j.status) .. " after the restart")
    emu:stop()
  end
end)
if emu then emu:cleanup() end
shell.run("rm -rf " .. shell.quote(tmp))
if not ok then error(err, 0) end
