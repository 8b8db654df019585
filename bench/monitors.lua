-- Wall time to monitor 1 job versus 100 jobs concurrently in one Scheduler (each job needs
-- three polls, each answered after 50 ms by the local server). Prints figures only.
-- Run: make bench   (or lua5.4 bench/monitors.lua [jobs])
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
local build = jit and "build/luajit/?.so;" or "build/5.4/?.so;"
package.cpath = build .. package.cpath

local core = require "iothub.core"
local server = require "support.server"
local iothub = require "iothub"

local count = tonumber(arg and arg[1]) or 100
local srv = server.start()
local ok, err = pcall(function()
  local jobs = assert(iothub.JobClient.fromConnectionString(
    "HostName=bench.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=",
    { endpoint = srv.http_url .. "/sim" }))
  local function run(n, tag)
    local sched = iothub.Scheduler.new()
    local tasks = {}
    for i = 1, n do
      tasks[i] = sched:spawn(function() return jobs:monitorJob("poll3-" .. tag .. i, { interval = 0.1 }) end)
    end
    local t0 = core.monotime()
    assert(sched:run())
    for i = 1, n do assert(tasks[i].results[1] and tasks[i].results[1].status == "completed") end
    return core.monotime() - t0
  end
  local one = run(1, "one-")
  local many = run(count, "many-")
  print(("interpreter       %s"):format(jit and jit.version or _VERSION))
  print(("1 monitor         %.3f s"):format(one))
  print(("%d monitors     %.3f s (%.2fx one), server max in flight %d"):format(count, many, many / one,
    srv:stats().maxInflight))
end)
srv:stop()
if not ok then error(err, 0) end
