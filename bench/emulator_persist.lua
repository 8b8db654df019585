-- How long the emulator's state saves hold up requests: a simulated fleet with a kept --dir,
-- GET /_emulator/health every 10 ms while (1) one twin change makes the registry be saved,
-- and (2) a twin-update job over the whole fleet runs, and on until the registry it changed
-- is saved (a big kind is saved again only after ten times its last save's work).
-- Prints the longest request latency (the stall) and the 99th percentile in each phase, the
-- saves nginx logged meanwhile (wall time; the newer store adds the work time and slices),
-- and the shutdown's synchronous final write. "memory" runs the job with --in-memory (no
-- saves), for the stalls the job causes by itself. Not a timed test: figures vary with the
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

-- "state <kind> saved in ..." lines nginx logged after byte `from`.
local function saves_since(emu, from)
  local out = {}
  for line in error_log(emu):sub(from + 1):gmatch("[^\n]+") do
    local what = line:match("(state %a+ saved in .-),? context:") or line:match("(state %a+ saved in .*)")
    if what then out[#out + 1] = what end
  end
  return out
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

local function report(name, lat, saves)
  local p99 = lat[math.max(1, math.ceil(#lat * 0.99))]
  print(("%-30s max %7.1f ms   p99 %6.1f ms   median %5.2f ms   (%d polls)"):format(
    name, lat[#lat] * 1e3, p99 * 1e3, lat[math.ceil(#lat / 2)] * 1e3, #lat))
  for _, s in ipairs(saves) do print("    " .. s) end
end

print(("%d devices, health polled every %d ms; nginx runs LuaJIT%s"):format(count, POLL * 1e3,
  in_memory and "; --in-memory (nothing saved)" or ""))
local emu
local ok, err = pcall(function()
  local t0 = core.monotime()
  emu = E.start({ devices = devices, ready_timeout = 180, dir = tmp .. "/dir", args = in_memory and { "--in-memory" } or nil })
  print(("emulator start                 %.2f s"):format(core.monotime() - t0))

  local base = poll(emu, 1, function() return false end)
  report("idle (no save)", base, {})

  -- (1) one changed twin: the registry is saved 0.5 s later
  local from = #error_log(emu)
  assert(emu:api("PATCH", "/twins/sim-000001", { tags = { touched = true } }, { ["If-Match"] = "*" }) == 200)
  if not in_memory then
    local lat, saved = poll(emu, 60, function() return #saves_since(emu, from) > 0 end)
    assert(saved, "no registry save was logged within 60 s")
    report("registry save (idle fleet)", lat, saves_since(emu, from))
  end

  -- (2) a twin job over the whole fleet: rows and twins change while saves run
  from = #error_log(emu)
  local function registry_saved()
    for _, line in ipairs(saves_since(emu, from)) do
      if line:find("state registry", 1, true) then return true end
    end
  end
  emu:control("PATCH", "/_emulator/config", { jobRate = 0 })
  local body = E.job("persist-job", { queryCondition = "tags.fleet = 'persist'" })
  assert(emu:api("PUT", "/jobs/v2/persist-job", body) == 200)
  local status = "queued"
  local polls = 0
  local lat = poll(emu, 300, function()
    polls = polls + 1
    if polls % 10 == 0 then
      status = (select(2, emu:api("GET", "/jobs/v2/persist-job"))).status
      assert(status ~= "failed" and status ~= "cancelled", "the job ended " .. status)
    end
    return status == "completed"
  end)
  assert(status == "completed", "the job is still " .. status)
  report("twin job, until completed", lat, saves_since(emu, from))
  if not in_memory then
    local before = #saves_since(emu, from)
    lat = poll(emu, 120, registry_saved)
    local later = {}
    for i, line in ipairs(saves_since(emu, from)) do
      if i > before then later[#later + 1] = line end
    end
    report("then until the registry saved", lat, later)
  end

  from = #error_log(emu)
  t0 = core.monotime()
  local rc = emu:stop()
  local sizes = {}
  for _, name in ipairs(in_memory and {} or { "registry", "jobs" }) do
    local f = io.open(emu.dir .. "/state/" .. name .. ".json", "rb")
    sizes[#sizes + 1] = ("%s.json %.1f MB"):format(name, f and f:seek("end") / 1e6 or 0)
    if f then f:close() end
  end
  print(("stop (synchronous final write) %.2f s   (exit %s; %s)"):format(
    core.monotime() - t0, tostring(rc), table.concat(sizes, ", ")))
  for _, s in ipairs(saves_since(emu, from)) do print("    " .. s) end
end)
if emu then emu:cleanup() end
shell.run("rm -rf " .. shell.quote(tmp))
if not ok then error(err, 0) end
