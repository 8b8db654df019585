-- Client CPU time per getJob over keep-alive HTTPS to a local server, and peak RSS.
-- Prints figures; it asserts nothing (targets: <= 100 us CPU per call, peak RSS < 10 MB for
-- 2,000 calls). The machine's 2 cores are shared, so single runs vary up to 2x: each round
-- times `calls` getJobs, then the curl command line and a minimal C program with the same
-- libcurl (bench/libcurl_floor.c) making the same request, and the figures are medians
-- over the rounds. CPU is the client process's own (getrusage), never the server's.
-- Run: make bench   (or lua5.4 bench/getjob.lua [calls [rounds]])
package.path = "bench/?.lua;" .. package.path
local common = require "common"
local core = common.core

local calls = tonumber(arg and arg[1]) or 2000
local rounds = tonumber(arg and arg[2]) or 5

local function mb(kb) return ("%.1f MB"):format(kb / 1024) end

common.run(function(srv, client_for)
  local jobs = client_for(srv.https_url, { caFile = srv.ca_file })
  for _ = 1, 20 do assert(jobs:getJob("warmup")) end -- TLS handshake and first token outside the timing
  local transport = jobs.pipeline:transport()
  local port = transport:stats().localPort

  -- The request the comparisons make: getJob's URL and headers.
  local cfg = jobs.pipeline.cfg
  local url = srv.https_url .. "/sim/jobs/v2/bench-job?api-version=" .. cfg.apiVersion
  local headers = { "Authorization: " .. assert(cfg.credential:authorization(cfg.clock.time())),
    "Request-Id: " .. core.uuid4(), "User-Agent: " .. cfg.userAgent, "Accept: application/json" }
  local floor, remove_floor = common.libcurl_floor()
  if not floor then print("(no libcurl C comparison: " .. tostring(remove_floor) .. ")") end

  local ours, user, sys, wall, cli, c_us, c_user, c_sys = {}, {}, {}, {}, {}, {}, {}, {}
  local rss_first, c_peak, c_loaded, cli_err
  for round = 1, rounds do
    local u0, s0 = common.user_sys()
    local cpu0, wall0 = core.cputime(), core.monotime()
    for i = 1, calls do
      local job = jobs:getJob("bench-job")
      if not job or job.status ~= "completed" then error("call " .. i .. " failed") end
    end
    local cpu, elapsed = core.cputime() - cpu0, core.monotime() - wall0
    local u1, s1 = common.user_sys()
    ours[round], wall[round] = cpu / calls * 1e6, elapsed / calls * 1e6
    if u0 and u1 then user[round], sys[round] = (u1 - u0) / calls * 1e6, (s1 - s0) / calls * 1e6 end
    if round == 1 then rss_first = core.maxrss() end

    local us, err = common.curl_cli_us(url, headers, srv.ca_file, calls)
    cli[#cli + 1], cli_err = us, err
    if floor then
      local c = floor(url, headers, srv.ca_file, calls)
      if c then
        c_us[#c_us + 1], c_user[#c_user + 1], c_sys[#c_sys + 1] = c.us, c.user, c.sys
        c_peak, c_loaded = math.max(c_peak or 0, c.peak_kb), c.loaded_kb
      end
    end
  end
  if remove_floor and floor then remove_floor() end
  local stats = transport:stats()
  local one_connection = stats.connects == 0 and stats.localPort == port

  print(("interpreter          %s"):format(common.interpreter))
  print(("calls                %d rounds of %d getJob (keep-alive HTTPS; one connection throughout: %s)")
    :format(rounds, calls, one_connection and "yes" or "NO"))
  print(("client CPU / call    %s"):format(common.format_us(ours)))
  if #user == rounds then
    print(("  user + system      %.0f + %.0f us (medians; 10 ms clock ticks)")
      :format((common.summary(user)), (common.summary(sys))))
  end
  print(("wall time / call     %s"):format(common.format_us(wall)))
  if #cli > 0 then
    print(("curl CLI / request   %s  (same request, one keep-alive process, same rounds)")
      :format(common.format_us(cli)))
  else
    print("curl CLI / request   (not measured: " .. tostring(cli_err) .. ")")
  end
  if #c_us > 0 then
    print(("libcurl C / request  %s  (bench/libcurl_floor.c: same libcurl, options and request)")
      :format(common.format_us(c_us)))
    print(("  user + system      %.0f + %.0f us (medians)"):format((common.summary(c_user)), (common.summary(c_sys))))
  end
  print(("peak RSS             %s after %d calls, %s after %d (target < 10 MB)")
    :format(mb(rss_first), calls, mb(core.maxrss()), calls * rounds))
  if c_peak then
    print(("  libcurl C program  %s peak; %s already at start (libcurl and its libraries mapped)")
      :format(mb(c_peak), mb(c_loaded)))
  end
  local groups, total = common.rss_breakdown()
  if groups then
    local parts = {}
    for _, g in ipairs(groups) do
      if g.kb >= 100 then parts[#parts + 1] = ("%s %s"):format(g.name, mb(g.kb)) end
    end
    print(("  resident now       %s: %s"):format(mb(total), table.concat(parts, ", ")))
  end
end)
