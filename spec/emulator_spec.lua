-- End-to-end checks of the local IoT Hub emulator: starts bin/iothub-emulator with
-- examples/devices.lua on free ports and talks to it over real HTTP with the curl CLI.
--   busted --lua=lua5.4 spec/emulator_spec.lua
local core = require "iothub.core"
local shell = require "support.shell"
local sh_quote, run, sleep = shell.quote, shell.run, shell.sleep
local read_file, write_file, alive = shell.read_file, shell.write_file, shell.alive

local KEY = "aW90aHViLWVtdWxhdG9yLWRldmVsb3BtZW50LWtleSE=" -- the launcher's default key
local V = "api-version=2021-04-12"


-- Runs a shell command; returns ok, output.





local ROOT = (function()
  local _, pwd = run("pwd")
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local dir = src:match("^(.*)/spec/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then dir = pwd:gsub("%s+$", "") .. "/" .. dir end
  return dir
end)()

local function token(opts)
  opts = opts or {}
  local sr = opts.sr or "localhost"
  local se = opts.se or (os.time() + 3600)
  local key = core.base64_decode(opts.key or KEY)
  local sig = core.base64_encode(core.hmac_sha256(key, core.url_encode(sr) .. "\n" .. se))
  return "SharedAccessSignature sr=" .. core.url_encode(sr) .. "&sig=" .. core.url_encode(sig)
    .. "&se=" .. se .. "&skn=" .. (opts.skn or "iothubowner")
end

describe("iothub-emulator", function()
  local emu = {}

  -- One HTTP exchange through the curl CLI: returns status, headers (lower-case), raw body.
  local function request(method, path, body, headers, opts)
    opts = opts or {}
    local base = opts.base or emu.http
    local hdr, out, inp = emu.dir .. "/h.txt", emu.dir .. "/b.txt", emu.dir .. "/in.txt"
    local cmd = { "curl -s -S --noproxy '*' --max-time 20 -X", method, "-D", sh_quote(hdr), "-o", sh_quote(out),
      "-w '%{http_code}'" }
    if opts.cacert then cmd[#cmd + 1] = "--cacert " .. sh_quote(opts.cacert) end
    local h = { Authorization = token() }
    for k, v in pairs(headers or {}) do h[k] = v end
    for k, v in pairs(h) do
      if v ~= false then cmd[#cmd + 1] = "-H " .. sh_quote(k .. ": " .. v) end
    end
    if body then
      write_file(inp, type(body) == "string" and body or core.json_encode(body))
      cmd[#cmd + 1] = "-H 'Content-Type: application/json; charset=utf-8' --data-binary @" .. sh_quote(inp)
    end
    cmd[#cmd + 1] = sh_quote(base .. path)
    local ok, status = run(table.concat(cmd, " "))
    assert(ok, "curl failed: " .. status)
    local headers_out = {}
    for line in (read_file(hdr) or ""):gmatch("[^\r\n]+") do
      local k, v = line:match("^([^:]+):%s*(.*)$")
      if k then headers_out[k:lower()] = v end
    end
    return tonumber(status), headers_out, read_file(out) or ""
  end

  local function api(method, path, body, headers)
    local sep = path:find("?", 1, true) and "&" or "?"
    local status, h, raw = request(method, path .. sep .. V, body, headers)
    local decoded = raw ~= "" and core.json_decode(raw) or nil
    return status, decoded, h, raw
  end

  -- Envelope B inside Message, as the real hub sends errors.
  local function inner_error(body)
    assert.is_table(body)
    assert.equal("", body.ExceptionMessage)
    return core.json_decode(body.Message)
  end

  local function wait_job(id, wanted, timeout)
    local deadline = os.time() + (timeout or 15)
    local job
    repeat
      local status
      status, job = api("GET", "/jobs/v2/" .. id)
      assert.equal(200, status)
      if job.status == wanted then return job end
      sleep(0.2)
    until os.time() > deadline
    error("job " .. id .. " stayed " .. tostring(job and job.status) .. ", wanted " .. wanted)
  end

  local function iso(t)
    return os.date("!%Y-%m-%dT%H:%M:%S.000Z", t)
  end

  local function start()
    local ok, dir = run("mktemp -d /tmp/iothub-emu-spec.XXXXXX")
    assert(ok, dir)
    emu.dir = dir:gsub("%s+$", "")
    -- Background jobs of a non-interactive shell ignore SIGINT; reset it so the launcher
    -- can be stopped with Ctrl-C's signal as a person would.
    local reset_int = run("env --default-signal=INT true") and "env --default-signal=INT " or ""
    emu.stop_signal = reset_int ~= "" and "INT" or "TERM"
    for _ = 1, 5 do
      local port = math.random(20000, 60000)
      emu.http_port, emu.https_port = port, port + 1
      emu.out = emu.dir .. "/launcher.out"
      emu.rc_file = emu.dir .. "/launcher.rc"
      local pid_file = emu.dir .. "/launcher.pid"
      os.remove(pid_file)
      -- A wrapper records the launcher's exit status; env execs it, so $! is the launcher.
      local cmd = "( " .. reset_int .. sh_quote(ROOT .. "/bin/iothub-emulator")
        .. " --devices " .. sh_quote(ROOT .. "/examples/devices.lua")
        .. " --http-port " .. port .. " --https-port " .. (port + 1)
        .. " --dir " .. sh_quote(emu.dir .. "/state")
        .. " >" .. sh_quote(emu.out) .. " 2>&1 </dev/null & echo $! >" .. sh_quote(pid_file)
        .. "; wait $!; echo $? >" .. sh_quote(emu.rc_file) .. " ) >/dev/null 2>&1 &"
      run(cmd)
      for _ = 1, 50 do
        emu.pid = tonumber((read_file(pid_file) or ""):match("%d+"))
        if emu.pid then break end
        sleep(0.05)
      end
      assert(emu.pid, "no launcher pid")
      for _ = 1, 150 do
        local out = read_file(emu.out) or ""
        if out:find("\nready\n", 1, true) or out:find("^ready\n") then
          emu.http = "http://127.0.0.1:" .. port
          return
        end
        if not alive(emu.pid) then break end
        sleep(0.1)
      end
      if alive(emu.pid) then run("kill " .. emu.pid) end
    end
    error("the emulator did not start:\n" .. (read_file(emu.out) or ""))
  end

  local function stop()
    if not emu.pid or not alive(emu.pid) then return true end
    local nginx_pid = tonumber(read_file(emu.dir .. "/state/nginx.pid") or "")
    run("kill -" .. emu.stop_signal .. " " .. emu.pid)
    for _ = 1, 100 do
      if not alive(emu.pid) then break end
      sleep(0.1)
    end
    local stopped = not alive(emu.pid) and not (nginx_pid and alive(nginx_pid))
    return stopped, nginx_pid
  end

  lazy_setup(function()
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100003)
    start()
  end)

  lazy_teardown(function()
    stop()
    if emu.dir then run("rm -rf " .. sh_quote(emu.dir)) end
  end)

  it("prints the connection string, endpoints and CA", function()
    local out = read_file(emu.out)
    assert.truthy(out:find("IOTHUB_CONNECTION_STRING=HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey="
      .. KEY .. "\n", 1, true))
    assert.truthy(out:find("endpoint http://127.0.0.1:" .. emu.http_port .. "\n", 1, true))
    assert.truthy(out:find("endpoint https://localhost:" .. emu.https_port .. "\n", 1, true))
    local ca = out:match("\nca ([^\n]+)\n")
    assert.truthy(ca and read_file(ca), "ca file")
    emu.ca = ca
  end)

  it("serves HTTPS with a certificate from its private CA", function()
    local status, _, body = request("GET", "/twins/myDeviceId?" .. V, nil, nil,
      { base = "https://localhost:" .. emu.https_port, cacert = emu.ca })
    assert.equal(200, status)
    assert.equal("myDeviceId", core.json_decode(body).deviceId)
  end)

  describe("auth", function()
    local function assert_unauthorized(headers)
      local status, h, raw = request("GET", "/twins/myDeviceId?" .. V, nil, headers)
      assert.equal(401, status)
      assert.equal("IotHubUnauthorizedAccess", h["iothub-errorcode"])
      assert.equal("application/json; charset=utf-8", h["content-type"])
      local err = inner_error(core.json_decode(raw))
      assert.equal(401002, err.errorCode)
      assert.equal("Unauthorized", err.message)
      assert.is_string(err.trackingId)
      assert.is_string(err.timestampUtc)
    end

    it("rejects a bad signature with the hub's error envelope", function()
      assert_unauthorized({ Authorization = token({ key = core.base64_encode("wrong key, same length as ours!!") }) })
    end)

    it("rejects missing, expired, foreign-scope and unknown-policy tokens", function()
      assert_unauthorized({ Authorization = false })
      assert_unauthorized({ Authorization = token({ se = os.time() - 3600 }) })
      assert_unauthorized({ Authorization = token({ sr = "otherhub.azure-devices.net" }) })
      assert_unauthorized({ Authorization = token({ skn = "nosuchpolicy" }) })
      assert_unauthorized({ Authorization = token({ skn = "service" }) }) -- a real policy, but not this key
    end)

    it("accepts a valid token, also one scoped to a path under the host", function()
      assert.equal(200, (api("GET", "/twins/myDeviceId")))
      assert.equal(200, (api("GET", "/twins/myDeviceId", nil, { Authorization = token({ sr = "LOCALHOST/twins" }) })))
    end)

    it("requires api-version", function()
      local status, h, raw = request("GET", "/twins/myDeviceId")
      assert.equal(400, status)
      assert.equal("InvalidProtocolVersion", h["iothub-errorcode"])
      assert.equal(400001, inner_error(core.json_decode(raw)).errorCode)
    end)
  end)

  describe("direct methods", function()
    it("runs the device's handler", function()
      local status, body = api("POST", "/twins/myDeviceId/methods",
        { methodName = "lockDoor", payload = core.null, responseTimeoutInSeconds = 30 })
      assert.equal(200, status)
      assert.same({ status = 200, payload = { locked = true } }, body)
      sleep(0.3)
      assert.truthy(read_file(emu.out):find("[myDeviceId] Locking Door!", 1, true))
    end)

    it("answers 501 inside a 200 for a method the device does not handle", function()
      local status, body = api("POST", "/twins/myDeviceId/methods", { methodName = "reboot" })
      assert.equal(200, status)
      assert.equal(501, body.status)
    end)

    it("maps unknown, offline devices and bad timeouts to the hub's errors", function()
      local status, body, h = api("POST", "/twins/nosuch/methods", { methodName = "lockDoor" })
      assert.equal(404, status)
      assert.equal("DeviceNotFound", h["iothub-errorcode"])
      assert.equal(404001, inner_error(body).errorCode)
      status, body, h = api("POST", "/twins/door-basement/methods", { methodName = "lockDoor" })
      assert.equal(404, status)
      assert.equal("DeviceNotOnline", h["iothub-errorcode"])
      assert.equal(404103, inner_error(body).errorCode)
      status, body = api("POST", "/twins/myDeviceId/methods", { methodName = "lockDoor", responseTimeoutInSeconds = 301 })
      assert.equal(400, status)
      assert.equal(400004, inner_error(body).errorCode)
    end)
  end)

  describe("registry and twins", function()
    it("creates, conflicts on and deletes devices", function()
      local status, dev = api("PUT", "/devices/spec-dev", { deviceId = "spec-dev" })
      assert.equal(200, status)
      assert.is_string(dev.authentication.symmetricKey.primaryKey)
      local s2, body = api("PUT", "/devices/spec-dev", { deviceId = "spec-dev" })
      assert.equal(409, s2)
      assert.equal(409001, inner_error(body).errorCode)
      assert.equal(204, (api("DELETE", "/devices/spec-dev", nil, { ["If-Match"] = '"*"' })))
      assert.equal(404, (api("GET", "/devices/spec-dev")))
    end)

    it("merges twin patches, honours If-Match and bumps versions", function()
      local _, twin = api("GET", "/twins/door-003")
      local status, patched = api("PATCH", "/twins/door-003",
        { tags = { color = "red" }, properties = { desired = { mode = "eco" } } }, { ["If-Match"] = '"' .. twin.etag .. '"' })
      assert.equal(200, status)
      assert.equal("red", patched.tags.color)
      assert.equal("eco", patched.properties.desired.mode)
      assert.equal(twin.properties.desired["$version"] + 1, patched.properties.desired["$version"])
      assert.equal(twin.version + 1, patched.version)
      local s412, body = api("PATCH", "/twins/door-003", { tags = { color = core.null } }, { ["If-Match"] = '"' .. twin.etag .. '"' })
      assert.equal(412, s412)
      assert.equal(412001, inner_error(body).errorCode)
      local _, cleared = api("PATCH", "/twins/door-003", { tags = { color = core.null } }, { ["If-Match"] = "*" })
      assert.is_nil(cleared.tags.color)
    end)

    it("queries twins by tag", function()
      local status, rows, h = api("POST", "/devices/query",
        { query = "SELECT * FROM devices WHERE tags.location.floor = 1 AND tags.location.building = '43'" })
      assert.equal(200, status)
      assert.equal("Twin", h["x-ms-item-type"])
      local ids = {}
      for _, r in ipairs(rows) do ids[#ids + 1] = r.deviceId end
      assert.same({ "door-001", "door-004" }, ids)
      local bad, body = api("POST", "/devices/query", { query = "SELECT deviceId, COUNT() FROM devices" })
      assert.equal(400, bad)
      assert.truthy(inner_error(body).message:find("SELECT *", 1, true))
    end)
  end)

  describe("jobs", function()
    it("runs a method job on myDeviceId to completion with a 200 device row", function()
      local status, job = api("PUT", "/jobs/v2/spec-method", {
        jobId = "spec-method", type = "scheduleDeviceMethod",
        cloudToDeviceMethod = { methodName = "lockDoor", payload = core.null, responseTimeoutInSeconds = 30 },
        queryCondition = "deviceId = 'myDeviceId'", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      assert.equal("queued", job.status)
      job = wait_job("spec-method", "completed")
      assert.same({ deviceCount = 1, succeededCount = 1, failedCount = 0, runningCount = 0, pendingCount = 0 },
        job.deviceJobStatistics)
      local _, rows, h = api("POST", "/devices/query",
        { query = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'spec-method'" })
      assert.equal("DeviceJob", h["x-ms-item-type"])
      assert.equal(1, #rows)
      assert.equal("myDeviceId", rows[1].deviceId)
      assert.equal("completed", rows[1].status)
      assert.equal("scheduleDeviceMethod", rows[1].jobType)
      assert.equal(200, rows[1].outcome.deviceMethodResponse.status)
      assert.same({ locked = true }, rows[1].outcome.deviceMethodResponse.payload)
    end)

    it("lands a twin job's desired properties", function()
      local status = api("PUT", "/jobs/v2/spec-twin", {
        jobId = "spec-twin", type = "scheduleUpdateTwin",
        updateTwin = { etag = "*", properties = { desired = { building = "43", floor = 3 } } },
        queryCondition = "deviceId IN ['myDeviceId']", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      local job = wait_job("spec-twin", "completed")
      assert.equal(1, job.deviceJobStatistics.succeededCount)
      local _, twin = api("GET", "/twins/myDeviceId")
      assert.equal("43", twin.properties.desired.building)
      assert.equal(3, twin.properties.desired.floor)
      assert.equal(math.type and "integer" or "number", math.type and math.type(twin.properties.desired.floor) or "number")
    end)

    it("validates job requests", function()
      local base = { type = "scheduleUpdateTwin", updateTwin = { properties = { desired = { a = 1 } } },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 60 }
      -- A twin job must carry etag "*": the hub answers 412 PreconditionFailed (reference §3.6).
      local status, body = api("PUT", "/jobs/v2/spec-bad", base)
      assert.equal(412, status)
      assert.equal(412001, inner_error(body).errorCode)
      base.updateTwin.etag = "*"
      base.type = "scheduleDirectMethod"
      local s2, _, h = api("PUT", "/jobs/v2/spec-bad", base)
      assert.equal(400, s2)
      assert.equal("GenericBadRequest", h["iothub-errorcode"])
      local s3, _, h3 = api("PUT", "/jobs/v2/spec-method", {
        jobId = "spec-method", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 60 })
      assert.equal(409, s3)
      assert.equal("JobAlreadyExists", h3["iothub-errorcode"])
      local s4, _, h4 = api("GET", "/jobs/v2/no-such-job")
      assert.equal(404, s4)
      assert.equal("JobNotFound", h4["iothub-errorcode"])
    end)

    it("cancels a future job", function()
      local status = api("PUT", "/jobs/v2/spec-future", {
        jobId = "spec-future", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time() + 6 * 86400), maxExecutionTimeInSeconds = 3600,
      })
      assert.equal(200, status)
      wait_job("spec-future", "scheduled")
      local s2, job = api("POST", "/jobs/v2/spec-future/cancel")
      assert.equal(200, s2)
      assert.equal("cancelled", job.status)
      assert.equal("cancelled", (select(2, api("GET", "/jobs/v2/spec-future"))).status)
      local _, list, h = api("GET", "/jobs/v2/query?jobStatus=Cancelled")
      assert.equal("JobResponse", h["x-ms-item-type"])
      assert.equal(1, #list)
      assert.equal("spec-future", list[1].jobId)
    end)

    it("pages devices.jobs rows with a continuation token", function()
      api("PUT", "/jobs/v2/spec-all", {
        jobId = "spec-all", type = "scheduleDeviceMethod", cloudToDeviceMethod = { methodName = "lockDoor" },
        queryCondition = "*", startTime = iso(os.time()), maxExecutionTimeInSeconds = 3600,
      })
      local job = wait_job("spec-all", "completed")
      local total = job.deviceJobStatistics.deviceCount
      assert.is_true(total >= 7)
      assert.equal(1, job.deviceJobStatistics.failedCount) -- door-basement is offline
      local q = { query = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'spec-all'" }
      local seen, pages, continuation = {}, 0, nil
      repeat
        local status, rows, h = api("POST", "/devices/query", q,
          { ["x-ms-max-item-count"] = "3", ["x-ms-continuation"] = continuation or false })
        assert.equal(200, status)
        assert.equal("DeviceJob", h["x-ms-item-type"])
        pages = pages + 1
        assert.is_true(#rows <= 3)
        for _, r in ipairs(rows) do
          assert.is_nil(seen[r.deviceId])
          seen[r.deviceId] = r
        end
        continuation = h["x-ms-continuation"]
        if continuation then assert.equal(3, #rows) end
      until not continuation or pages > 10
      assert.equal(math.ceil(total / 3), pages)
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.equal(total, n)
      assert.equal("failed", seen["door-basement"].status)
      assert.equal("DeviceNotOnline", seen["door-basement"].error.code)
    end)
  end)

  it("stops cleanly on SIGINT, exits 0 and leaves no nginx behind", function()
    local stopped, nginx_pid = stop()
    assert.is_number(nginx_pid)
    assert.is_true(stopped)
    for _ = 1, 20 do
      if read_file(emu.rc_file) then break end
      sleep(0.1)
    end
    assert.equal("0", (read_file(emu.rc_file) or ""):match("%d+"))
    assert.truthy(read_file(emu.out):find("[hub]", 1, true))
  end)
end)
