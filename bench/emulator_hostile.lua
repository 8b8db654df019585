-- The normal client's getJob latency while hostile clients attack the emulator: for each
-- attack (spec/emulator/hostile_spec.lua has the same cases, asserting the refusals), a
-- separate attacker process (this script again, with --attack) hammers the emulator as fast
-- as it can, and this process times `calls` getJobs by the project's own client over one
-- keep-alive connection, a few ms apart. Prints p50 / p99 / max per attack (target: under
-- 50 ms) and what the attacker got back. The emulator runs with its default limits and a
-- 1,000-device fleet. Not a timed test: the 2 cores are shared with the attacker, nginx and
-- this client, so figures vary with the machine's load. Run from the repository root:
--   lua5.4 bench/emulator_hostile.lua [calls=400] [attack ...]
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local core = require "iothub.core"
local shell = require "support.shell"
local E = require "support.emulator_process"
local hostile = require "support.hostile"

local V = E.API_VERSION
local JOB = "/jobs/v2/steady?" .. V
local IDLE = 1000
local DRIPPERS = 100

---------------------------------------------------------------------------
-- Attacks: name -> { what, fn(port, ready, stopped) -> requests, statuses }. ready() is
-- called once the attack is established; stopped() says when to end.

local function tally(statuses, responses, how)
  if #responses == 0 then
    statuses[how] = (statuses[how] or 0) + 1
  end
  for _, r in ipairs(responses) do statuses[r.status] = (statuses[r.status] or 0) + 1 end
end

-- Sends the requests made by next_request() one after another, each on a new connection.
local function flood(next_request, exchange_opts)
  return function(port, ready, stopped)
    local n, statuses = 0, {}
    ready()
    repeat
      local responses, how = hostile.exchange(port, next_request(n), exchange_opts or { responses = 1, timeout = 10 })
      tally(statuses, responses, how)
      n = n + 1
    until stopped()
    return n, statuses
  end
end

local function cycle(list)
  return function(n) return list[n % #list + 1] end
end

local function token() return "Authorization: " .. E.token() end

local function many_headers(count)
  local t = { token() }
  for i = 1, count do t[#t + 1] = "X-H" .. i .. ": v" end
  return t
end

local function sas_cases()
  local now = os.time()
  local sig = core.url_encode(core.base64_encode(core.hmac_sha256(core.base64_decode(E.KEY), "localhost\n" .. (now - 3600))))
  local function tok(fields) return "Authorization: SharedAccessSignature " .. table.concat(fields, "&") end
  local list = {}
  for _, h in ipairs({
    {}, { "Authorization: Bearer x" },
    { tok({ "sr=localhost", "se=" .. (now + 3600), "skn=iothubowner" }) },
    { tok({ "sr=localhost", "sig=" .. sig, "se=1", "se=2", "skn=iothubowner" }) },
    { tok({ "sr=localhost", "sig=not*base64!", "se=" .. (now + 3600), "skn=iothubowner" }) },
    { tok({ "sr=localhost", "sig=" .. ("QUFB"):rep(3000), "se=" .. (now + 3600), "skn=" .. ("p"):rep(3000) }) },
    { "Authorization: " .. E.token({ sr = "otherhub" }) }, { "Authorization: " .. E.token({ skn = "nosuch" }) },
    { "Authorization: " .. E.token({ se = now - 3600 }) }, { "Authorization: " .. E.token({ se = now + 20 * 366 * 86400 }) },
    { "Authorization: " .. E.token({ key = core.base64_encode("a key of the right size, not ours") }) },
    { tok({ "sr=localhost", "sig=" .. sig, "x=a se=" .. (now - 3600), "se=" .. (now + 3600), "skn=iothubowner" }) },
  }) do
    list[#list + 1] = hostile.request("GET", JOB, h)
  end
  return list
end

local function query_cases()
  local function q(sql) return hostile.request("POST", "/devices/query?" .. V, { token() }, core.json_encode({ query = sql })) end
  local ids = {}
  for i = 1, 540 do ids[i] = string.format("'sim-%06d'", i * 2) end
  return {
    q("SELECT * FROM devices WHERE " .. ("("):rep(300) .. "deviceId = 'x'" .. (")"):rep(300)),
    q("SELECT * FROM devices WHERE " .. ("NOT "):rep(300) .. "deviceId = 'x'"),
    hostile.request("POST", "/devices/query?" .. V, { token() },
      '{"query":"SELECT * FROM devices","x":' .. ("["):rep(200) .. ("]"):rep(200) .. "}"),
    q("SELECT deviceId FROM devices WHERE deviceId IN [" .. table.concat(ids, ",") .. "]"), -- valid: 540 of 1,000
    q("SELECT * FROM devices WHERE deviceId = '" .. ("q"):rep(1024 * 1024) .. "'"),
  }
end

-- Holds `count` connections that do step(conn, i) until stopped, reopening closed ones.
local function hold(count, first, step)
  return function(port, ready, stopped)
    local conns, reopened, statuses = {}, 0, {}
    for i = 1, count do conns[i] = hostile.connect(port); first(conns[i], i) end
    ready()
    repeat
      for i = 1, count do
        local c = conns[i]
        local raw, closed = c:poll()
        if closed then
          tally(statuses, hostile.parse(raw), closed)
          c:close()
          conns[i] = hostile.connect(port)
          first(conns[i], i)
          reopened = reopened + 1
        elseif step then
          step(c, i)
        end
      end
      core.sleep(0.05)
    until stopped()
    for _, c in ipairs(conns) do c:close() end
    return reopened, statuses
  end
end

local function dripper(text)
  return function(c) c.next = 1; c.text = text end, function(c)
    if c.next <= #c.text then
      c:send(c.text:sub(c.next, c.next))
      c.next = c.next + 1
    end
  end
end

local big_body = ("x"):rep(5 * 1024 * 1024)
local drip_header_first, drip_header_step = dripper(hostile.request("GET", JOB, { token(), "X-Pad: " .. ("p"):rep(2000) }))
local drip_body = core.json_encode({ query = "SELECT * FROM devices" .. (" "):rep(2000) })
local drip_body_first, drip_body_step = dripper(drip_body)

local ATTACKS = {
  { "none", "no attack (baseline)", nil },
  { "header", "one 20 KB header per request", flood(function()
    return hostile.request("GET", JOB, { token(), "X-Big: " .. ("b"):rep(20000) })
  end) },
  { "headers", "8,000 headers (and 150) per request", flood(cycle({
    hostile.request("GET", JOB, many_headers(8000)), hostile.request("GET", JOB, many_headers(150)) })) },
  { "body", "10 GB declared, 5 MB sent (declared and chunked)", flood(cycle({
    hostile.request("PUT", "/devices/x?" .. V, { token(), "Content-Length: 10000000000" }),
    hostile.request("PUT", "/devices/x?" .. V, { token() }, big_body),
    hostile.request("PUT", "/devices/x?" .. V, { token(), "Transfer-Encoding: chunked" },
      string.format("%x", #big_body) .. "\r\n" .. big_body .. "\r\n0\r\n\r\n"),
  })) },
  { "idle", IDLE .. " connections that never send a byte", hold(IDLE, function() end) },
  { "drip-headers", DRIPPERS .. " connections dripping headers, a byte per 50 ms each",
    hold(DRIPPERS, function(c, i) drip_header_first(c, i) end, drip_header_step) },
  { "drip-body", DRIPPERS .. " connections dripping a body, a byte per 50 ms each",
    hold(DRIPPERS, function(c, i)
      c:send(hostile.request("POST", "/devices/query?" .. V, { token(), "Content-Length: " .. #drip_body }))
      drip_body_first(c, i)
    end, drip_body_step) },
  { "sas", "malformed, forged and expired SAS tokens", flood(cycle(sas_cases())) },
  { "query", "deep, 1 MB and long-IN-list queries", flood(cycle(query_cases())) },
}

local BY_NAME = {}
for _, a in ipairs(ATTACKS) do BY_NAME[a[1]] = a end

---------------------------------------------------------------------------
-- Attacker process: <interpreter> bench/emulator_hostile.lua --attack NAME PORT DIR

if arg and arg[1] == "--attack" then
  local attack, port, dir = BY_NAME[arg[2]], tonumber(arg[3]), arg[4]
  hostile.raise_open_files(IDLE + 200)
  local deadline = core.monotime() + 120 -- stops by itself, whatever happens to the bench
  local checks = 0
  local n, statuses = attack[3](port, function() shell.write_file(dir .. "/ready", "ready\n") end, function()
    checks = checks + 1
    if checks % 5 ~= 0 then return false end
    return core.monotime() > deadline or io.open(dir .. "/stop") ~= nil
  end)
  local parts = {}
  for k, v in pairs(statuses) do parts[#parts + 1] = tostring(k) .. " x" .. v end
  table.sort(parts)
  shell.write_file(dir .. "/result.tmp", n .. "\n" .. table.concat(parts, ", ") .. "\n")
  os.rename(dir .. "/result.tmp", dir .. "/result")
  os.exit(0)
end

---------------------------------------------------------------------------
-- The bench

local calls = tonumber(arg and arg[1]) or 400
local only = {}
for i = 2, arg and #arg or 0 do only[arg[i]] = true end
local INTERPRETER = jit and "luajit" or "lua5.4"
local GAP = 0.005 -- seconds between the normal client's calls

local tmp = shell.temp_dir("iothub-emu-hostile")
local devices = tmp .. "/fleet.lua"
shell.write_file(devices, [[
-- 1,000 simulated devices, written by bench/emulator_hostile.lua
return { fleets = { { count = 1000, id = "sim-%06d", tags = function(i) return { n = i } end } } }
]])

local function percentile(sorted, p)
  return sorted[math.max(1, math.ceil(#sorted * p))]
end

local emu
local ok, err = pcall(function()
  emu = E.start({ devices = devices, temp_dir = true, ready_timeout = 60 })
  local iothub = require "iothub"
  local cs = emu:output():match("IOTHUB_CONNECTION_STRING=([^\n]+)")
  local client = assert(iothub.JobClient.fromConnectionString(cs, { endpoint = emu.base, proxy = "" }))
  assert(client:scheduleTwinUpdate("steady", "deviceId = 'sim-000001'", { tags = { steady = 1 } }))
  assert(client:monitorJob("steady", { interval = 0.05, maxInterval = 0.1, timeout = 30 }).status == "completed")
  for _ = 1, 20 do assert(client:getJob("steady")) end

  print(("getJob latency under attack: %d calls %d ms apart per attack, client %s, nginx LuaJIT, %d devices")
    :format(calls, GAP * 1000, INTERPRETER, 1000))
  print(("%-14s %8s %8s %8s  %-10s %s"):format("attack", "p50 ms", "p99 ms", "max ms", "failures", "attacker"))
  for _, attack in ipairs(ATTACKS) do
    local name = attack[1]
    if next(only) == nil or only[name] then
      local dir = tmp .. "/" .. name
      shell.run("mkdir -p " .. shell.quote(dir))
      local pid
      if attack[3] then
        local _, out = shell.run(INTERPRETER .. " bench/emulator_hostile.lua --attack " .. name .. " " .. emu.http_port
          .. " " .. shell.quote(dir) .. " >" .. shell.quote(dir .. "/log") .. " 2>&1 & echo $!")
        pid = tonumber(out:match("%d+"))
        local waited = core.monotime() + 30
        while not shell.read_file(dir .. "/ready") and core.monotime() < waited do core.sleep(0.02) end
        assert(shell.read_file(dir .. "/ready"), "the attacker did not start: " .. (shell.read_file(dir .. "/log") or ""))
        core.sleep(0.2) -- let the attack get going
      end
      local _, health = emu:control("GET", "/_emulator/health")
      local lat, failures = {}, 0
      for i = 1, calls do
        local t0 = core.monotime()
        local job = client:getJob("steady")
        lat[i] = (core.monotime() - t0) * 1000
        if not (job and job.jobId == "steady" and job.status == "completed") then failures = failures + 1 end
        core.sleep(GAP)
      end
      local result = "-"
      if pid then
        shell.write_file(dir .. "/stop", "")
        local waited = core.monotime() + 60
        while not shell.read_file(dir .. "/result") and core.monotime() < waited do core.sleep(0.05) end
        local r = shell.read_file(dir .. "/result")
        if r then
          local n, statuses = r:match("^(%d+)\n(.*)\n$")
          result = ((name == "idle" or name:find("^drip")) and (n .. " reopened") or (n .. " requests"))
            .. "; " .. (statuses ~= "" and statuses or "no answers") .. "; " .. tostring(health.connections) .. " connections"
        else
          result = "attacker did not finish: " .. (shell.read_file(dir .. "/log") or "")
          shell.run("kill " .. pid)
        end
      end
      table.sort(lat)
      print(("%-14s %8.2f %8.2f %8.2f  %-10d %s"):format(name, percentile(lat, 0.5), percentile(lat, 0.99),
        lat[#lat], failures, result))
      print(("%-14s   %s"):format("", attack[2]))
    end
  end
end)
if emu then emu:cleanup() end
shell.run("rm -rf " .. shell.quote(tmp))
if not ok then error(err, 0) end
