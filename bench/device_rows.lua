-- Streams device-job rows through deviceJobs and prints throughput and peak RSS as it goes,
-- to show memory stays flat (one page in memory at a time).
-- Run: make bench   (or lua5.4 bench/device_rows.lua [rows] [pageSize])
package.path = "bench/?.lua;" .. package.path
local common = require "common"
local core = common.core

local rows = tonumber(arg and arg[1]) or 1000000
local page_size = tonumber(arg and arg[2]) or 1000
common.run(function(srv, client_for)
  local jobs = client_for(srv.http_url)
  print(("interpreter   %s; %d rows, pages of %d"):format(common.interpreter, rows, page_size))
  local n, succeeded = 0, 0
  local wall0, cpu0 = core.monotime(), core.cputime()
  local step = math.max(1, math.floor(rows / 5))
  for row, e in jobs:deviceJobs("rows" .. rows, { pageSize = page_size }) do
    if not row then error(tostring(e)) end
    n = n + 1
    if row.outcome.deviceMethodResponse.status == 200 then succeeded = succeeded + 1 end
    if n % step == 0 then
      print(("  %8d rows   peak RSS %.1f MB"):format(n, core.maxrss() / 1024))
    end
  end
  local wall = core.monotime() - wall0
  assert(n == rows and succeeded == rows, "expected " .. rows .. " rows, got " .. n)
  print(("rows/s        %.0f (client CPU %.1f s, wall %.1f s)"):format(n / wall, core.cputime() - cpu0, wall))
  print(("peak RSS      %.1f MB"):format(core.maxrss() / 1024))
end)
