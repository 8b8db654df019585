-- Client CPU time per getJob over keep-alive HTTPS to a local server, and peak RSS.
-- Prints figures; it asserts nothing (targets: <= 100 us CPU per call, peak RSS < 10 MB
-- for 2,000 calls). Run: make bench   (or lua5.4 bench/getjob.lua [calls])
package.path = "bench/?.lua;" .. package.path
local common = require "common"
local core = common.core

local calls = tonumber(arg and arg[1]) or 2000
common.run(function(srv, client_for)
  local jobs = client_for(srv.https_url, { caFile = srv.ca_file })
  for _ = 1, 20 do assert(jobs:getJob("warmup")) end -- TLS handshake and first token outside the timing
  local cpu0, wall0 = core.cputime(), core.monotime()
  for i = 1, calls do
    local job = jobs:getJob("bench-job")
    if not job or job.status ~= "completed" then error("call " .. i .. " failed") end
  end
  local cpu, wall = core.cputime() - cpu0, core.monotime() - wall0
  local connects = jobs.pipeline:transport():stats().connects
  print(("interpreter        %s"):format(common.interpreter))
  print(("calls              %d (keep-alive HTTPS, new connections on the last call: %d)"):format(calls, connects))
  print(("client CPU / call  %.1f us"):format(cpu / calls * 1e6))
  print(("wall time / call   %.1f us"):format(wall / calls * 1e6))
  print(("peak RSS           %.1f MB"):format(core.maxrss() / 1024))
end)
