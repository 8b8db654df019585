-- Wall time to monitor 1 job versus 100 jobs concurrently in one Scheduler (each job needs
-- three polls, each answered after 50 ms by the local server). Prints figures only.
-- Run: make bench   (or lua5.4 bench/monitors.lua [jobs])
package.path = "bench/?.lua;" .. package.path
local common = require "common"
local core, iothub = common.core, common.iothub

local count = tonumber(arg and arg[1]) or 100
common.run(function(srv, client_for)
  local jobs = client_for(srv.http_url)
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
  print(("interpreter       %s"):format(common.interpreter))
  print(("1 monitor         %.3f s"):format(one))
  print(("%d monitors     %.3f s (%.2fx one), server max in flight %d"):format(count, many, many / one,
    srv:stats().maxInflight))
end)
