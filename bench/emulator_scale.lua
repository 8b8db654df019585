-- Scale run of the local emulator: a 100,000-device simulated fleet, one twin-update job
-- over all of it (monitored with our Lua client), then every device row paged out through
-- jobs:deviceJobs. Prints each phase's time; the target is under 10 s for the job on the
-- 2-core development VM. Not a timed test: figures vary with the machine's load.
-- Run from the repository root:
--   lua5.4 bench/emulator_scale.lua [devices=100000] [jobRate=0 (unpaced)] [pageSize=1000] [persist]
-- "persist" runs with a kept --dir, so the state files are written while the job runs.
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local core = require "iothub.core"
local iothub = require "iothub"
local shell = require "support.shell"
local E = require "support.emulator_process"

local count = tonumber(arg and arg[1]) or 100000
local rate = tonumber(arg and arg[2]) or 0
local page_size = tonumber(arg and arg[3]) or 1000
local persist = arg and arg[4] == "persist"

local function phase(name, t0, extra)
  print(("%-34s %8.2f s%s"):format(name, core.monotime() - t0, extra or ""))
end

local ok, tmp = shell.run("mktemp -d /tmp/iothub-emu-bench.XXXXXX")
assert(ok, tmp)
tmp = tmp:gsub("%s+$", "")
local devices = tmp .. "/fleet.lua"
shell.write_file(devices, ([[
-- %d simulated devices in 10 buildings, written by bench/emulator_scale.lua
return { fleets = { {
  count = %d, id = "sim-%%06d",
  tags = function(i) return { fleet = "scale", building = tostring(i %% 10) } end,
} } }
]]):format(count, count))

print(("interpreter (client)               %s; %d devices, job rate %s, pages of %d%s"):format(
  jit and jit.version or _VERSION, count, rate == 0 and "unpaced" or tostring(rate), page_size,
  persist and ", state persisted" or ""))

local emu
local run_ok, run_err = pcall(function()
  local t0 = core.monotime()
  emu = E.start({ devices = devices, temp_dir = not persist, args = { "--job-rate", tostring(rate) }, ready_timeout = 120 })
  phase("emulator start (fleet loaded)", t0)

  local cs = emu:output():match("IOTHUB_CONNECTION_STRING=([^\n]+)")
  local jobs = assert(iothub.JobClient.fromConnectionString(cs, { endpoint = emu.base, proxy = "" }))
  local job_id = "scale-" .. core.uuid4()

  t0 = core.monotime()
  assert(jobs:scheduleTwinUpdate(job_id, "tags.fleet = 'scale'",
    { tags = { wave = 1 }, properties = { desired = { firmware = "2.0.1" } } }))
  local polls = 0
  local final = assert(jobs:monitorJob(job_id, { interval = 0.1, maxInterval = 0.1, timeout = 600,
    onProgress = function() polls = polls + 1 end }))
  local job_wall = core.monotime() - t0
  local s = final.deviceJobStatistics
  assert(final.status == "completed" and s.succeededCount == count,
    "job ended " .. final.status .. ": " .. iothub.JobClient.progressText(final))
  local server = core.parse_time(final.endTime) - core.parse_time(final.createdTime)
  phase("twin job, PUT to completed", t0, ("   (%d devices, %.0f rows/s; server %.2f s incl. 0.2 s queue; %d polls)")
    :format(s.deviceCount, count / job_wall, server, polls))

  t0 = core.monotime()
  local n = 0
  for row, err in jobs:deviceJobs(job_id, { pageSize = page_size }) do
    if not row then error(tostring(err)) end
    assert(row.status == "completed", row.deviceId .. " is " .. tostring(row.status))
    n = n + 1
  end
  assert(n == count, "paged " .. n .. " rows, expected " .. count)
  local page_wall = core.monotime() - t0
  phase("device rows paged out", t0, ("   (%d rows, %.0f rows/s, %d pages)"):format(n, n / page_wall,
    math.ceil(n / page_size)))

  local status, twin = emu:api("GET", "/twins/sim-" .. string.format("%06d", count))
  assert(status == 200 and twin.properties.desired.firmware == "2.0.1", "the last device's twin was not updated")
  print(("result                             %s; job %.2f s (target < 10 s)"):format(
    job_wall < 10 and "PASS" or "SLOW", job_wall))
end)
if emu then
  local t0 = core.monotime()
  local rc = emu:stop()
  if persist then
    phase("stop (final state write)", t0, ("   (exit %s; state files: %s)"):format(tostring(rc),
      (select(2, shell.run("du -sh " .. shell.quote(emu.dir .. "/state") .. " | cut -f1")):gsub("%s+$", ""))))
  end
  emu:cleanup()
end
shell.run("rm -rf " .. shell.quote(tmp))
if not run_ok then error(run_err, 0) end
