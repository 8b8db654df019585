-- Shared set-up for the benchmark scripts: module paths for the running interpreter, a local
-- nginx server (spec/support/server.lua), a client against it, a clean stop, and the
-- measuring helpers (medians, the curl command line and a minimal C libcurl program for
-- comparison in the same run, and where the resident memory is).
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local shell = require "support.shell"

local M = {
  core = require "iothub.core",
  iothub = require "iothub",
  interpreter = jit and jit.version or _VERSION,
}

--- Starts the server, calls body(srv, client_for), always stops the server; re-raises errors.
-- client_for(base_url, opts) makes a JobClient whose endpoint is the server's simulated hub.
function M.run(body)
  local srv = require("support.server").start()
  local ok, err = pcall(body, srv, function(base, opts)
    local o = { endpoint = base .. "/sim" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return assert(M.iothub.JobClient.fromConnectionString(
      "HostName=bench.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=", o))
  end)
  srv:stop()
  if not ok then error(err, 0) end
end

--- median, min, max of a list of numbers.
function M.summary(list)
  local t = {}
  for i, v in ipairs(list) do t[i] = v end
  table.sort(t)
  local n = #t
  local median = n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
  return median, t[1], t[n]
end

--- "median 98.1 us (min 90.2, max 130.5)" for a list of microsecond figures.
function M.format_us(list)
  return ("median %.1f us (min %.1f, max %.1f)"):format(M.summary(list))
end

--- User and system CPU seconds of this process from /proc (10 ms resolution), or nil.
function M.user_sys()
  local stat = shell.read_file("/proc/self/stat")
  local rest = stat and stat:match("%) (.*)$")
  if not rest then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  return tonumber(f[12]) / 100, tonumber(f[13]) / 100 -- utime, stime in clock ticks (USER_HZ)
end

local function private_dir()
  local ok, out = shell.run("mktemp -d /tmp/iothub-bench.XXXXXX")
  assert(ok, "mktemp failed: " .. out)
  return (out:gsub("%s+$", ""))
end

--- Client CPU per request of the curl command line making `calls` of the same request in one
-- process (one keep-alive connection), measured from the shell's children times; the
-- process start-up and TLS handshake are taken out by a second, 20-request run. Returns
-- microseconds per request, or nil, why.
function M.curl_cli_us(url, headers, ca_file, calls)
  local dir = private_dir()
  -- The URL list is written by the shell, not built in Lua: the bench's own garbage must not
  -- show up in the client's peak RSS.
  local function config(n)
    local lines = { "silent", "http1.1", "cacert = " .. ("%q"):format(ca_file) }
    for _, h in ipairs(headers) do lines[#lines + 1] = "header = " .. ("%q"):format(h) end
    local path = dir .. "/curl-" .. n .. ".conf"
    shell.write_file(path, table.concat(lines, "\n") .. "\n")
    assert(shell.run("yes " .. shell.quote("url = " .. ("%q"):format(url)) .. " | head -n " .. n
      .. " >> " .. shell.quote(path)))
    return path
  end
  local function children_cpu(n)
    -- bash's `times` prints the shell's own and then its children's user and system time
    local ok, out = shell.run("bash -c " .. shell.quote("curl -K " .. shell.quote(config(n)) .. " >/dev/null && times"))
    if not ok then return nil, out end
    local total
    for um, us, sm, ss in out:gmatch("(%d+)m([%d.]+)s (%d+)m([%d.]+)s") do
      total = tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
    end
    if not total then return nil, "unexpected output: " .. out end
    return total
  end
  local full, err = children_cpu(calls + 20)
  local base = full and children_cpu(20)
  shell.run("rm -rf " .. shell.quote(dir))
  if not full or not base then return nil, err end
  return (full - base) / calls * 1e6
end

--- Builds bench/libcurl_floor.c (a minimal C program making the same requests with the same
-- libcurl) into a private directory; returns a function(url, headers, ca_file, calls) ->
-- { us =, user =, sys =, peak_kb =, loaded_kb = } | nil, why; or nil, why when it cannot build.
function M.libcurl_floor()
  local dir = private_dir()
  local exe = dir .. "/libcurl_floor"
  local ok, out = shell.run("cc -O2 -o " .. shell.quote(exe) .. " bench/libcurl_floor.c"
    .. " $(pkg-config --cflags --libs libcurl 2>/dev/null || echo -lcurl)")
  if not ok then
    shell.run("rm -rf " .. shell.quote(dir))
    return nil, "cannot build bench/libcurl_floor.c: " .. out
  end
  local function run(url, headers, ca_file, calls)
    local args = { exe, url, ca_file, tostring(calls) }
    for _, h in ipairs(headers) do args[#args + 1] = h end
    for i, a in ipairs(args) do args[i] = shell.quote(a) end
    local okRun, res = shell.run(table.concat(args, " "))
    local us, user, sys, peak, loaded = res:match("^([%d.]+) ([%d.]+) ([%d.]+) (%d+) (%d+)")
    if not okRun or not us then return nil, res end
    return { us = tonumber(us), user = tonumber(user), sys = tonumber(sys), peak_kb = tonumber(peak),
      loaded_kb = tonumber(loaded) }
  end
  return run, function() shell.run("rm -rf " .. shell.quote(dir)) end
end

-- Resident memory by mapping, from /proc/self/smaps, in kB: { [name] = { rss =, anon = } }.
local function smaps()
  local per, cur = {}, nil
  local f = io.open("/proc/self/smaps", "r")
  if not f then return nil end
  for line in f:lines() do
    local name = line:match("^%x+%-%x+ %S+ %x+ %S+ %d+%s*(.*)$")
    if name then
      cur = per[name ~= "" and name or "[anonymous]"] or { rss = 0, anon = 0 }
      per[name ~= "" and name or "[anonymous]"] = cur
    else
      local k, v = line:match("^(%a+):%s+(%d+) kB")
      if k == "Rss" then cur.rss = cur.rss + tonumber(v)
      elseif k == "Anonymous" then cur.anon = cur.anon + tonumber(v) end
    end
  end
  f:close()
  return per
end

-- Which group a mapping belongs to in the breakdown.
local function group_of(name)
  if name:find("/iothub/core.so", 1, true) or name:find("/iothub/curl.so", 1, true) then return "iothub modules" end
  if name:find("libcrypto", 1, true) or name:find("libssl", 1, true) then return "OpenSSL (libcrypto, libssl)" end
  if name:find("libcurl", 1, true) then return "libcurl" end
  if name:find("lua", 1, true) or name:find("libm%.") or name:find("libreadline") or name:find("libtinfo")
    or name:find("libc%.so") or name:find("ld%-linux") or name:find("libdl") or name:find("libgcc") then
    return "interpreter and libc"
  end
  if name:sub(1, 1) == "/" then return "libcurl's other dependencies (gnutls, ldap, ssh2, ...)" end
  return "heap and other anonymous memory"
end

--- Current resident memory grouped (file-backed libraries vs heap), largest first:
-- { { name =, kb =, anon_kb = } ... }, plus the total in kB; nil where /proc is missing.
function M.rss_breakdown()
  local per = smaps()
  if not per then return nil end
  local groups, total = {}, 0
  for name, v in pairs(per) do
    local g = group_of(name)
    groups[g] = groups[g] or { name = g, kb = 0, anon_kb = 0 }
    groups[g].kb = groups[g].kb + v.rss
    groups[g].anon_kb = groups[g].anon_kb + v.anon
    total = total + v.rss
  end
  local list = {}
  for _, g in pairs(groups) do list[#list + 1] = g end
  table.sort(list, function(a, b) return a.kb > b.kb end)
  return list, total
end

return M
