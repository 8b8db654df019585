-- Client CPU time per getJob over keep-alive HTTPS to a local server, and peak RSS.
-- Prints figures; it asserts nothing (targets: <= 100 us CPU per call, peak RSS < 10 MB
-- for 2,000 calls). Run: make bench   (or lua5.4 bench/getjob.lua [calls])
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
local build = jit and "build/luajit/?.so;" or "build/5.4/?.so;"
package.cpath = build .. package.cpath

local core = require "iothub.core"
local server = require "support.server"
local iothub = require "iothub"

local calls = tonumber(arg and arg[1]) or 2000
local srv = server.start()
local ok, err = pcall(function()
  local jobs = assert(iothub.JobClient.fromConnectionString(
    "HostName=bench.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=",
    { endpoint = srv.https_url .. "/sim", caFile = srv.ca_file }))
  for _ = 1, 20 do assert(jobs:getJob("warmup")) end -- TLS handshake and first token outside the timing
  local cpu0, wall0 = core.cputime(), core.monotime()
  for i = 1, calls do
    local job = jobs:getJob("bench-job")
    if not job or job.status ~= "completed" then error("call " .. i .. " failed") end
  end
  local cpu, wall = core.cputime() - cpu0, core.monotime() - wall0
  local connects = jobs.pipeline:transport():stats().connects
  print(("interpreter        %s"):format(jit and jit.version or _VERSION))
  print(("calls              %d (keep-alive HTTPS, new connections on the last call: %d)"):format(calls, connects))
  print(("client CPU / call  %.1f us"):format(cpu / calls * 1e6))
  print(("wall time / call   %.1f us"):format(wall / calls * 1e6))
  print(("peak RSS           %.1f MB"):format(core.maxrss() / 1024))
end)
srv:stop()
if not ok then error(err, 0) end
