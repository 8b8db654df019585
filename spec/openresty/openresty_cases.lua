-- luacheck: globals ngx
-- Test cases that run inside the test nginx (spec/openresty/nginx.conf.in), driven by
-- spec/openresty/run.sh through GET /t/<case>?scheme=http|https. Each answers one line:
--   PASS <case>[<scheme>]: <details>     or     FAIL <case>[<scheme>]: <why>
-- Everything goes through the client's automatic transport choice (cosockets), against the
-- emulator started by run.sh. Settings come from openresty_env.lua, written by run.sh.
local iothub = require "iothub"
local json = require "iothub.json"
local Cosocket = require "iothub.transport.cosocket"
local env = require "openresty_env"

local M = {}
local dict = ngx.shared.openresty_test

local function fail(fmt, ...) error(string.format(fmt, ...), 0) end
local function check(cond, fmt, ...) if not cond then fail(fmt, ...) end end
local function ok(value, err)
  if value == nil then error(tostring(err), 0) end
  return value
end

local function suffix()
  return iothub.uuid():sub(1, 8)
end

local function now()
  ngx.update_time()
  return ngx.now()
end

-- One client per class and scheme in this worker, so the keep-alive counters accumulate.
local clients = {}
local function client(class, scheme)
  local key = (class == iothub.Registry and "registry:" or "jobs:") .. scheme
  if not clients[key] then
    clients[key] = ok(class.fromConnectionString(env.cs, { endpoint = env[scheme .. "_endpoint"], timeout = 20 }))
  end
  return clients[key]
end

-- Ids made by earlier cases, per scheme (one worker: module state persists across requests).
local made = { http = {}, https = {} }

local cases = {}

function cases.jobs_method(scheme)
  local jobs = client(iothub.JobClient, scheme)
  local id = "or-method-" .. scheme .. "-" .. suffix()
  local job = ok(jobs:scheduleDeviceMethod(id, "deviceId IN ['myDeviceId','door-001','door-basement']",
    { methodName = "lockDoor", payload = { force = true }, responseTimeoutInSeconds = 10 }))
  check(job.jobId == id and job.type == "scheduleDeviceMethod", "schedule answered %s", json.encode(job))
  local snapshots = 0
  local final = ok(jobs:monitorJob(id, { interval = 0.2, timeout = 30,
    onProgress = function() snapshots = snapshots + 1 end }))
  local s = final.deviceJobStatistics
  check(final.status == "completed", "job ended %s", final.status)
  check(s.deviceCount == 3 and s.succeededCount == 2 and s.failedCount == 1, "statistics %s", json.encode(s))
  local rows, pager = {}, jobs:deviceJobs(id, { pageSize = 1 })
  for row, err in pager do
    if not row then fail("deviceJobs: %s", tostring(err)) end
    rows[row.deviceId] = row
  end
  check(pager.pages >= 3, "deviceJobs took %d pages at pageSize 1", pager.pages)
  check(rows.myDeviceId and rows.myDeviceId.status == "completed"
    and rows.myDeviceId.outcome.deviceMethodResponse.status == 200, "myDeviceId row %s", json.encode(rows.myDeviceId))
  check(rows["door-basement"] and rows["door-basement"].status == "failed", "door-basement row %s",
    json.encode(rows["door-basement"]))
  local failed = ok(jobs:deviceJobs(id, { status = "failed" }):all())
  check(#failed == 1 and failed[1].deviceId == "door-basement", "failed rows %s", json.encode(failed))
  made[scheme].method = id
  return ("%s completed (3 devices: 2 succeeded, 1 failed) after %d snapshots; %d device rows over %d pages")
    :format(id, snapshots, 3, pager.pages)
end

function cases.jobs_twin(scheme)
  local jobs = client(iothub.JobClient, scheme)
  local id = "or-twin-" .. scheme .. "-" .. suffix()
  local mark = suffix()
  ok(jobs:scheduleTwinUpdate(id, "deviceId IN ['myDeviceId','door-002']",
    { tags = { dashboard = mark }, properties = { desired = { mode = mark } } }))
  local final = ok(jobs:monitorJob(id, { interval = 0.2, timeout = 30 }))
  check(final.status == "completed" and final.deviceJobStatistics.succeededCount == 2,
    "twin job ended %s", json.encode(final))
  local twin = ok(client(iothub.Registry, scheme):getTwin("door-002"))
  check(twin.tags.dashboard == mark and twin.properties.desired.mode == mark, "twin not patched: %s", json.encode(twin))
  made[scheme].twin = id
  return id .. " completed on 2 devices; door-002's twin carries the patch"
end

function cases.jobs_get_cancel(scheme)
  local jobs = client(iothub.JobClient, scheme)
  local id = "or-cancel-" .. scheme .. "-" .. suffix()
  ok(jobs:scheduleDeviceMethod(id, "deviceId = 'myDeviceId'", { methodName = "lockDoor" }, ngx.time() + 3600))
  local got = ok(jobs:getJob(id))
  check(got.status == "scheduled" or got.status == "queued", "a job starting in an hour is %s", got.status)
  local cancelled = ok(jobs:cancelJob(id))
  check(cancelled.status == "cancelled", "cancelJob answered status %s", tostring(cancelled.status))
  check(ok(jobs:getJob(id)).status == "cancelled", "getJob after cancel is not cancelled")
  local none, err = jobs:getJob("or-missing-" .. suffix())
  check(none == nil and err.status == 404 and err.code == "JobNotFound", "unknown job: %s", tostring(err))
  made[scheme].cancelled = id
  return id .. ": " .. got.status .. " -> cancelled; an unknown id is " .. err.code
end

function cases.jobs_query(scheme)
  local jobs = client(iothub.JobClient, scheme)
  local seen, pager = {}, jobs:queryJobs({ pageSize = 2 })
  local count = 0
  for job, err in pager do
    if not job then fail("queryJobs: %s", tostring(err)) end
    seen[job.jobId] = job
    count = count + 1
  end
  for what, id in pairs(made[scheme]) do
    check(seen[id], "queryJobs did not list the %s job %s", what, id)
  end
  check(pager.pages >= 2, "%d jobs came in %d page(s) at pageSize 2", count, pager.pages)
  local cancelled = ok(jobs:queryJobs({ status = "cancelled", type = "scheduleDeviceMethod" }):all())
  local found = false
  for _, job in ipairs(cancelled) do
    check(job.status == "cancelled" and job.type == "scheduleDeviceMethod", "filter let %s through", json.encode(job))
    if job.jobId == made[scheme].cancelled then found = true end
  end
  check(found, "the cancelled job is missing from the filtered listing")
  return ("%d jobs over %d pages; %d cancelled method job(s) by filter"):format(count, pager.pages, #cancelled)
end

function cases.registry(scheme)
  local reg = client(iothub.Registry, scheme)
  local dev = "or-dev-" .. scheme .. "-" .. suffix()
  check(ok(reg:create({ deviceId = dev })).deviceId == dev, "create answered another device")
  check(ok(reg:get(dev)).deviceId == dev, "get answered another device")
  local twin = ok(reg:getTwin(dev))
  local updated = ok(reg:updateTwin(dev, { tags = { site = "lab" }, properties = { desired = { level = 2 } } }, twin.etag))
  check(updated.tags.site == "lab" and updated.properties.desired.level == 2, "updateTwin: %s", json.encode(updated))
  local n, pager = 0, reg:queryTwins("SELECT * FROM devices WHERE tags.fleet = 'load'", { pageSize = 7 })
  for t, err in pager do
    if not t then fail("queryTwins: %s", tostring(err)) end
    n = n + 1
  end
  check(n == 40 and pager.pages == 6, "queryTwins: %d twins over %d pages (want 40 over 6)", n, pager.pages)
  local answer = ok(reg:invokeDeviceMethod("myDeviceId", { methodName = "lockDoor", responseTimeoutInSeconds = 5 }))
  check(answer.status == 200 and answer.payload.locked == true, "lockDoor answered %s", json.encode(answer))
  local _, offline = reg:invokeDeviceMethod("door-basement", { methodName = "lockDoor", responseTimeoutInSeconds = 5 })
  check(offline and offline.code == "DeviceNotOnline", "offline device: %s", tostring(offline))
  check(ok(reg:delete(dev)) == true, "delete did not answer true")
  local gone, err = reg:get(dev)
  check(gone == nil and err.status == 404, "deleted device still readable: %s", tostring(err))
  return ("create/get/getTwin/updateTwin/delete %s; %d twins over %d pages; lockDoor 200; offline %s")
    :format(dev, n, pager.pages, offline.code)
end

function cases.keepalive(scheme)
  local transport = client(iothub.JobClient, scheme).pipeline:transport()
  check(getmetatable(transport) == Cosocket, "the client chose another transport")
  local s = transport:stats()
  check(s.reused > 0 and s.connects < s.requests, "no connection was reused: %s", json.encode(s))
  return ("%d requests, %d connections opened, %d served on kept-alive ones"):format(s.requests, s.connects, s.reused)
end

function cases.transport_errors()
  local t = Cosocket.new({ timeout = 5 })
  local _, err = t:request({ method = "GET", url = "http://127.0.0.1:" .. env.closed_port .. "/" })
  check(err and err.kind == "network" and err.code == "ConnectFailed", "closed port: %s", json.encode(err))

  local started = now()
  _, err = t:request({ method = "GET", url = env.test_http .. "/sleep?s=3", timeout = 0.3 })
  local waited = now() - started
  check(err and err.kind == "timeout", "slow answer: %s", json.encode(err))
  check(waited < 1.5, "the 0.3 s timeout took %.2f s", waited)

  _, err = t:request({ method = "GET", url = env.test_tls .. "/" })
  -- ngx_lua reports the X509 reason, or only that the socket was closed (see cosocket.lua).
  check(err and err.kind == "tls" and (err.code == "CertificateVerifyFailed" or err.code == "CertificateRejected")
    and err.message:find("lua_ssl_trusted_certificate", 1, true), "untrusted certificate: %s", json.encode(err))
  local untrusted = err.code
  local res = ok(Cosocket.new({ verify = false }):request({ method = "GET", url = env.test_tls .. "/" }))
  check(res.status == 200, "verify=false: status %s", tostring(res.status))

  _, err = t:request({ method = "GET", url = env.https_ip_endpoint .. "/_emulator/health" })
  -- The emulator's certificate names 127.0.0.1 as an IP address, but nginx checks the name
  -- as a host name only: by IP, TLS with verification is refused.
  check(err and err.kind == "tls" and (err.code == "HostMismatch" or err.code == "CertificateRejected"),
    "https by IP: %s", json.encode(err))
  local by_ip = err.code

  local ipv6 = "no IPv6 loopback"
  if env.ipv6 then
    res = ok(t:request({ method = "GET", url = "http://[::1]:" .. env.emulator_http_port .. "/_emulator/health" }))
    check(res.status == 200, "http://[::1]: status %s", tostring(res.status))
    ipv6 = "http://[::1] 200"
  end

  res = ok(t:request({ method = "GET", url = env.test_http .. "/chunked" }))
  check(res.body == "one,two,three" and res.headers["transfer-encoding"] == "chunked", "chunked: %s", json.encode(res))
  -- The first /close may ride a pooled connection; it is closed after, so the next two are new.
  res = ok(t:request({ method = "GET", url = env.test_http .. "/close" }))
  local before = t:stats()
  ok(t:request({ method = "GET", url = env.test_http .. "/close" }))
  ok(t:request({ method = "GET", url = env.test_http .. "/close" }))
  local after = t:stats()
  check(res.body == "bye" and after.connects - before.connects == 2, "Connection: close was pooled: %s", json.encode(after))

  -- A service error keeps the hub's envelope through this transport.
  local bad = ok(iothub.JobClient.fromConnectionString(env.cs:gsub("SharedAccessKey=[^;]+", "SharedAccessKey=d3Jvbmcta2V5"),
    { endpoint = env.https_endpoint, retry = false }))
  _, err = bad:getJob("anything")
  check(err and err.kind == "service" and err.status == 401, "wrong key: %s", tostring(err))
  return ("refused -> network/ConnectFailed; 0.3 s timeout after %.2f s; untrusted -> tls/%s; " ..
    "https://127.0.0.1 -> tls/%s; %s; chunked and Connection: close handled; wrong key -> HTTP 401")
    :format(waited, untrusted, by_ip, ipv6)
end

-- Phases without cosockets: the messages recorded by init, init_worker and log handlers.
function cases.phases()
  local want = { init = "'init' phase", init_worker = "'init_worker' phase", log = "'log' phase" }
  local lines = {}
  for phase, text in pairs(want) do
    local msg = dict:get("phase:" .. phase)
    check(msg, "nothing recorded for the %s phase", phase)
    check(msg:find(text, 1, true) and msg:find("ngx.timer.at(0, function(premature)", 1, true),
      "%s phase message: %s", phase, msg)
    lines[#lines + 1] = phase
  end
  local timer = dict:get("phase:timer")
  check(timer == "JobNotFound", "the timer started from init_worker got %s", tostring(timer))
  return "raised in " .. table.concat(lines, ", ") .. " naming ngx.timer.at; the timer from init_worker reached the hub ("
    .. timer .. "); e.g. " .. dict:get("phase:init_worker")
end

function cases.no_libcurl()
  local refused, why = pcall(iothub.JobClient.fromConnectionString, env.cs, { transport = "curl" })
  check(not refused and tostring(why):find("libcurl would block the worker", 1, true),
    "transport = \"curl\" was not refused in the worker: %s", tostring(why))
  local made_scheduler, swhy = pcall(iothub.Scheduler.new)
  check(not made_scheduler and tostring(swhy):find("ngx.thread.spawn", 1, true),
    "iothub.Scheduler.new was not refused in the worker: %s", tostring(swhy))
  check(package.loaded["iothub.curl"] == nil, "iothub.curl is loaded in the worker")
  check(package.loaded["iothub.transport.curl"] == nil, "iothub.transport.curl is loaded in the worker")
  check(package.loaded["iothub.core"] ~= nil, "iothub.core is not loaded: did the other cases run?")
  local f = ok(io.open("/proc/self/maps", "r"))
  local maps = f:read("*a")
  f:close()
  check(not maps:find("libcurl", 1, true), "libcurl is mapped into the worker process")
  check(maps:find("iothub/core.so", 1, true), "iothub/core.so is not mapped: wrong process?")
  local mods = {}
  for name in pairs(package.loaded) do
    if name:find("^iothub") then mods[#mods + 1] = name end
  end
  table.sort(mods)
  return "transport = \"curl\" and iothub.Scheduler refused; no libcurl in package.loaded or /proc/self/maps; iothub modules loaded: "
    .. table.concat(mods, " ")
end

---------------------------------------------------------------------------
-- Responsiveness: 50 monitors plus one slow hub answer in flight in this worker while
-- run.sh times /health from outside.

local LOAD_JOBS, SLOW_SECONDS = 50, 5

local function run_load(premature, scheme, ids)
  if premature then return end
  local jobs, reg = client(iothub.JobClient, scheme), client(iothub.Registry, scheme)
  local started = now()
  local polls = 0
  local threads = {}
  for i, id in ipairs(ids) do
    threads[i] = ngx.thread.spawn(function()
      dict:incr("load:monitors", 1)
      local final, err = jobs:monitorJob(id, { interval = 0.25, maxInterval = 0.25, timeout = 60,
        onProgress = function() polls = polls + 1 end })
      dict:incr("load:monitors", -1)
      if not final then return "error: " .. tostring(err) end
      return final.status .. "/" .. tostring(final.deviceJobStatistics.succeededCount)
    end)
  end
  local slow = ngx.thread.spawn(function()
    dict:set("load:slow", 1)
    local t0 = now()
    local answer, err = reg:invokeDeviceMethod("slow-device",
      { methodName = "slowOp", payload = { seconds = SLOW_SECONDS }, responseTimeoutInSeconds = 30 })
    dict:set("load:slow", 0)
    return answer and answer.status or ("error: " .. tostring(err)), now() - t0
  end)
  dict:set("load:max", dict:get("load:monitors")) -- every thread ran up to its first wait
  local outcomes = {}
  for _, th in ipairs(threads) do
    local _, outcome = ngx.thread.wait(th)
    outcomes[outcome] = (outcomes[outcome] or 0) + 1
  end
  local _, slow_status, slow_seconds = ngx.thread.wait(slow)
  dict:set("load:result", json.encode({ outcomes = outcomes, polls = polls, seconds = now() - started,
    slowStatus = slow_status, slowSeconds = slow_seconds, maxInFlight = dict:get("load:max") }))
end

function cases.load_start(scheme)
  local jobs = client(iothub.JobClient, scheme)
  local ids = {}
  for i = 1, LOAD_JOBS do
    ids[i] = "or-load-" .. scheme .. "-" .. i .. "-" .. suffix()
    ok(jobs:scheduleTwinUpdate(ids[i], "tags.fleet = 'load'", { tags = { wave = i } }))
  end
  dict:set("load:monitors", 0)
  dict:set("load:slow", 0)
  dict:delete("load:result")
  ok(ngx.timer.at(0, run_load, scheme, ids))
  return LOAD_JOBS .. " twin jobs over 40 devices each scheduled; monitors starting in a timer"
end

function cases.load_status()
  return ("monitors=%d slow=%d"):format(dict:get("load:monitors") or -1, dict:get("load:slow") or -1)
end

function cases.load_result()
  local deadline = now() + 60
  local raw
  repeat
    raw = dict:get("load:result")
    if not raw then ngx.sleep(0.2) end
  until raw or now() > deadline
  check(raw, "the load did not finish within 60 s")
  local r = json.decode(raw)
  check(r.outcomes["completed/40"] == LOAD_JOBS, "monitor outcomes %s", json.encode(r.outcomes))
  check(r.maxInFlight == LOAD_JOBS, "only %s monitors were in flight at once", tostring(r.maxInFlight))
  check(r.slowStatus == 200 and r.slowSeconds >= SLOW_SECONDS - 0.5, "slow method: %s after %.2f s",
    tostring(r.slowStatus), r.slowSeconds or -1)
  return ("%d monitors concurrently in one worker, all completed (40/40 devices) in %.1f s with %d polls; " ..
    "slow method answered 200 after %.1f s"):format(LOAD_JOBS, r.seconds, r.polls, r.slowSeconds)
end

-- The control for the latency probe: a timer that blocks the worker (as a libcurl request
-- would) for 400 ms, starting 200 ms from now. run.sh must see /health stall meanwhile.
function cases.block_start()
  ok(ngx.timer.at(0.2, function(premature)
    if not premature then os.execute("sleep 0.4") end
  end))
  return "the worker blocks for 400 ms in 200 ms"
end

---------------------------------------------------------------------------
-- Phase probes and the request entry point.

-- Builds a client (which works in any phase) and records for cases.phases what calling
-- jobs[method](job_id) raises in this phase; returns the client.
local function record_phase_error(phase, method, job_id)
  local jobs = ok(iothub.JobClient.fromConnectionString(env.cs, { endpoint = env.http_endpoint }))
  local okc, msg = pcall(jobs[method], jobs, job_id)
  dict:set("phase:" .. phase, okc and "no error" or tostring(msg))
  return jobs
end

-- init_by_lua (master): a request raises, naming ngx.timer.at.
function M.init()
  record_phase_error("init", "getJob", "from-init")
end

-- init_worker_by_lua: monitorJob raises; the timer the message suggests reaches the hub.
function M.init_worker()
  local jobs = record_phase_error("init_worker", "monitorJob", "from-init-worker")
  ngx.timer.at(0, function(premature)
    if premature then return end
    local _, err = jobs:getJob("or-from-timer-" .. suffix())
    dict:set("phase:timer", err and err.code or "no error")
  end)
end

-- log_by_lua on /probe/log.
function M.log_phase()
  record_phase_error("log", "getJob", "from-log")
end

function M.run()
  local name = ngx.var.uri:match("^/t/([%w_]+)$")
  local scheme = ngx.var.arg_scheme or "http"
  local label = tostring(name) .. "[" .. scheme .. "]"
  local case = name and cases[name]
  if not case then
    ngx.status = 404
    ngx.say("FAIL ", label, ": no such case")
    return
  end
  local okc, result = pcall(case, scheme)
  ngx.say(okc and "PASS " or "FAIL ", label, ": ", (tostring(result):gsub("\n", " ")))
end

return M
