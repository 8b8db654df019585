-- End-to-end checks of the emulator's shared access policies, identity registry, twins
-- and direct methods over real HTTP: bin/iothub-emulator runs (HTTP only, nothing kept)
-- with a devices file this spec writes, driven through iothub.curl and the Lua client.
--   busted --lua=lua5.4 spec/emulator/registry_spec.lua
local core = require "iothub.core"
local iothub = require "iothub"
local auth = require "emulator.auth"
local devices_file = require "emulator.devices_file"
local emulator_process = require "support.emulator_process"
local shell = require "support.shell"

local null = core.null
local sleep = shell.sleep

local DEVICES = [[
return {
  seed = 7,
  devices = {
    { id = "echo",
      methods = {
        echo = function(p) return 200, p end,
        answer = function(p) return p.status, p.body end,
        sleepy = function(p, ctx) ctx.sleep(p.seconds) return 200, { slept = p.seconds } end,
        big = function(p) return 200, ("x"):rep(p.bytes) end,
        restart = function(p, ctx) ctx.disconnect(p.seconds) return 200, { restarting = true } end,
      },
      onDesired = function(patch, ctx) ctx.report({ seen = patch["$version"] }) end },
    { id = "slow", latency = 0.4, methods = { ping = function() return 200, "pong" end } },
    { id = "sleeper", offline = true, methods = { ping = function() return 200, "pong" end } },
    { id = "flaky", failureRate = 0.5, methods = { ping = function() return 200, "pong" end } },
    { id = "busy", failureRate = 1, failure = { status = 503, payload = { busy = true } } },
  },
  fleets = { { count = 3, id = "fl-%d", tags = function(i) return { n = i } end } },
}
]]

describe("iothub-emulator policies, registry, twins and methods", function()
  local emu = emulator_process.shared({ devices_source = DEVICES, temp_dir = true })
  local keys = {}
  for _, p in ipairs(auth.policies()) do keys[p.name] = p end -- the launcher's defaults

  local function token(policy, opts)
    opts = opts or {}
    return auth.token(opts.sr or "localhost", opts.key or keys[policy].primaryKey, policy,
      opts.se or (os.time() + 3600))
  end

  -- One exchange signed for opts.policy (default iothubowner) or with opts.auth; returns
  -- status, decoded body, headers, raw body.
  local function request(method, path, body, opts)
    opts = opts or {}
    local headers = { Authorization = opts.auth or token(opts.policy or "iothubowner") }
    for k, v in pairs(opts.headers or {}) do headers[k] = v end
    local status, decoded, h, raw
    if opts.no_version then
      status, decoded, h, raw = emu:request(method, path, body, headers)
    else
      status, decoded, h, raw = emu:api(method, path, body, headers)
    end
    assert(status, decoded)
    return status, decoded, h, raw
  end

  local function hub_error(status, body, h)
    assert.is_table(body, "no error body (HTTP " .. tostring(status) .. ")")
    assert.equal("", body.ExceptionMessage) -- envelope B: the error is JSON inside Message
    local inner = core.json_decode(body.Message)
    assert.equal(status, math.floor(inner.errorCode / 1000))
    assert.is_string(h["iothub-errorcode"])
    return inner, h["iothub-errorcode"]
  end

  -- Asserts an error response: HTTP status, error name and numeric code.
  local function assert_error(expect_status, name, code, status, body, h)
    assert.equal(expect_status, status)
    local inner, header = hub_error(status, body, h)
    assert.equal(name, header)
    assert.equal(code, inner.errorCode)
    return inner
  end

  local function seg(s) return core.url_encode(s) end


  describe("shared access policies", function()
    -- route, body, and the expected status per policy
    local ROUTES = {
      { "GET", "/devices/echo", nil },
      { "PUT", "/devices/probe-%s", {} },
      { "GET", "/twins/echo", nil },
      { "PATCH", "/twins/fl-1", { tags = { probe = 1 } } },
      { "POST", "/twins/echo/methods", { methodName = "echo" } },
      { "POST", "/devices/query", { query = "SELECT * FROM devices" } },
      { "GET", "/jobs/v2/query", nil },
    }
    local EXPECTED = {
      iothubowner = { 200, 200, 200, 200, 200, 200, 200 },
      service = { 401, 401, 200, 200, 200, 200, 401 },
      device = { 401, 401, 401, 401, 401, 401, 401 },
      registryRead = { 200, 401, 200, 401, 401, 200, 401 },
      registryReadWrite = { 200, 200, 200, 200, 401, 200, 200 },
    }

    it("grants each default policy exactly its rights; the rest get 401 IotHubUnauthorizedAccess", function()
      for policy, expected in pairs(EXPECTED) do
        for i, r in ipairs(ROUTES) do
          local status, body, h = request(r[1], r[2]:format(policy), r[3], { policy = policy })
          assert.equal(expected[i], status, policy .. " " .. r[1] .. " " .. r[2])
          if status == 401 then
            local inner = assert_error(401, "IotHubUnauthorizedAccess", 401002, status, body, h)
            assert.equal("Unauthorized", inner.message)
          end
        end
      end
    end)

    it("accepts the secondary key and clock skew up to 5 minutes, nothing else", function()
      assert.equal(200, (request("GET", "/twins/echo", nil,
        { auth = token("service", { key = keys.service.secondaryKey }) })))
      assert.equal(200, (request("GET", "/twins/echo", nil, { auth = token("service", { se = os.time() - 200 }) })))
      assert.equal(401, (request("GET", "/twins/echo", nil, { auth = token("service", { se = os.time() - 400 }) })))
      -- another policy's key under this policy's name
      assert.equal(401, (request("GET", "/twins/echo", nil,
        { auth = token("registryRead", { key = keys.service.primaryKey }) })))
      assert.equal(401, (request("GET", "/twins/echo", nil, { auth = token("nosuchpolicy", { key = keys.service.primaryKey }) })))
      assert.equal(200, (request("GET", "/twins/echo", nil, { auth = token("service", { sr = "localhost/twins/echo" }) })))
      assert.equal(401, (request("GET", "/twins/echo", nil, { auth = token("service", { sr = "localhost/twins/ech" }) })))
    end)

    it("wants an api-version, any plausible one", function()
      local status, body, h = request("GET", "/twins/echo", nil, { no_version = true })
      assert_error(400, "InvalidProtocolVersion", 400001, status, body, h)
      assert.equal(200, (request("GET", "/twins/echo?api-version=2020-03-13", nil, { no_version = true })))
      assert.equal(200, (request("GET", "/twins/echo?api-version=2030-01-01-preview", nil, { no_version = true })))
    end)
  end)

  describe("identity registry", function()
    it("creates devices with generated keys and an etag, refuses duplicates, updates with If-Match", function()
      local status, dev, h = request("PUT", "/devices/reg-1", { deviceId = "reg-1" })
      assert.equal(200, status)
      assert.equal('"' .. dev.etag .. '"', h["etag"])
      assert.equal("sas", dev.authentication.type)
      for _, k in ipairs({ "primaryKey", "secondaryKey" }) do
        assert.equal(32, #core.base64_decode(dev.authentication.symmetricKey[k]))
      end
      assert.equal("Disconnected", dev.connectionState)
      assert_error(409, "DeviceAlreadyExists", 409001, request("PUT", "/devices/reg-1", { deviceId = "reg-1" }))
      assert_error(412, "PreconditionFailed", 412001,
        request("PUT", "/devices/reg-1", { status = "disabled" }, { headers = { ["If-Match"] = '"stale"' } }))
      local s2, updated = request("PUT", "/devices/reg-1", { deviceId = "reg-1", status = "disabled" },
        { headers = { ["If-Match"] = '"' .. dev.etag .. '"' } })
      assert.equal(200, s2)
      assert.equal("disabled", updated.status)
      assert.are_not.equal(dev.etag, updated.etag)
      assert.equal(dev.authentication.symmetricKey.primaryKey, updated.authentication.symmetricKey.primaryKey)
      assert.equal("disabled", select(2, request("GET", "/twins/reg-1")).status)
    end)

    it("keeps supplied keys and validates keys and ids", function()
      local key = core.base64_encode(("k"):rep(24))
      local status, dev = request("PUT", "/devices/reg-2", { authentication = { symmetricKey = { primaryKey = key } } })
      assert.equal(200, status)
      assert.equal(key, dev.authentication.symmetricKey.primaryKey)
      assert_error(400, "ArgumentInvalid", 400004,
        request("PUT", "/devices/reg-3", { authentication = { symmetricKey = { primaryKey = "c2hvcnQ=" } } }))
      assert_error(400, "ArgumentInvalid", 400004,
        request("PUT", "/devices/reg-3", { authentication = { symmetricKey = { primaryKey = "not base64!" } } }))
      assert_error(400, "ArgumentInvalid", 400004, request("PUT", "/devices/" .. seg("bad id"), {}))
      assert_error(400, "ArgumentInvalid", 400004, request("PUT", "/devices/" .. ("x"):rep(129), {}))
      assert_error(400, "ArgumentInvalid", 400004, request("PUT", "/devices/reg-3", { deviceId = "other" }))
      local odd = "a:b.c+d%e_f#g*h?i!j(k)l,m=n@o;p$q'r"
      local s2, created = request("PUT", "/devices/" .. seg(odd), {})
      assert.equal(200, s2)
      assert.equal(odd, created.deviceId)
      assert.equal(odd, select(2, request("GET", "/twins/" .. seg(odd))).deviceId)
    end)

    it("deletes with If-Match, and the twin goes with the device", function()
      local _, dev = request("PUT", "/devices/reg-del", {})
      assert_error(412, "PreconditionFailed", 412001,
        request("DELETE", "/devices/reg-del", nil, { headers = { ["If-Match"] = '"nope"' } }))
      assert.equal(204, (request("DELETE", "/devices/reg-del", nil, { headers = { ["If-Match"] = '"' .. dev.etag .. '"' } })))
      assert_error(404, "DeviceNotFound", 404001, request("GET", "/devices/reg-del"))
      assert_error(404, "DeviceNotFound", 404001, request("GET", "/twins/reg-del"))
      assert_error(404, "DeviceNotFound", 404001, request("DELETE", "/devices/reg-del"))
    end)

    it("round-trips through the Lua client", function()
      local cs = "HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. keys.iothubowner.primaryKey
      local reg = assert(iothub.Registry.fromConnectionString(cs, { endpoint = emu.base, retry = false }))
      local dev = assert(reg:create({ deviceId = "client-1" }))
      assert.equal("client-1", dev.deviceId)
      assert.equal("client-1", assert(reg:get("client-1")).deviceId)
      local twin = assert(reg:updateTwin("client-1", { tags = { site = "lab" } }))
      assert.equal("lab", twin.tags.site)
      assert.equal("lab", assert(reg:getTwin("client-1")).tags.site)
      local res = assert(reg:invokeDeviceMethod("echo", { methodName = "echo", payload = { n = 1 } }))
      assert.same({ status = 200, payload = { n = 1 } }, res)
      local _, err = reg:invokeDeviceMethod("sleeper", { methodName = "ping" })
      assert.equal(404103, err.errorCode)
      assert.is_true(assert(reg:delete("client-1")))
      local none, gerr = reg:get("client-1")
      assert.is_nil(none)
      assert.equal(404, gerr.status)
    end)
  end)

  describe("twins", function()
    it("returns the twin with its etag header, $version and per-level $metadata", function()
      local status, twin, h = request("GET", "/twins/fl-2")
      assert.equal(200, status)
      assert.equal('"' .. twin.etag .. '"', h["etag"])
      assert.same({ n = 2 }, twin.tags)
      assert.equal(1, twin.properties.desired["$version"])
      assert.is_string(twin.properties.desired["$metadata"]["$lastUpdated"])
      local _, patched = request("PATCH", "/twins/fl-2", { properties = { desired = { a = { b = 1, c = 2 } } } })
      local meta = patched.properties.desired["$metadata"]
      assert.equal(2, patched.properties.desired["$version"])
      assert.equal(2, meta.a["$lastUpdatedVersion"])
      assert.equal(2, meta.a.b["$lastUpdatedVersion"])
    end)

    it("merges PATCHes, deletes with null and answers a stale If-Match with 412", function()
      local _, twin = request("GET", "/twins/fl-3")
      local etag = '"' .. twin.etag .. '"'
      local status, p1 = request("PATCH", "/twins/fl-3", { tags = { loc = { room = "a", floor = 1 } } },
        { headers = { ["If-Match"] = etag } })
      assert.equal(200, status)
      assert.equal(twin.version + 1, p1.version)
      local _, p2 = request("PATCH", "/twins/fl-3", { tags = { loc = { room = null, wing = "w" } } },
        { headers = { ["If-Match"] = "*" } })
      assert.same({ n = 3, loc = { floor = 1, wing = "w" } }, p2.tags)
      assert_error(412, "PreconditionFailed", 412001,
        request("PATCH", "/twins/fl-3", { tags = { x = 1 } }, { headers = { ["If-Match"] = etag } }))
    end)

    it("replaces tags and desired on PUT, taking back a whole twin from GET", function()
      request("PATCH", "/twins/fl-1", { tags = { keep = false }, properties = { desired = { old = 1 } } })
      local _, twin = request("GET", "/twins/fl-1")
      local version = twin.properties.desired["$version"]
      twin.tags = { fresh = true }
      twin.properties.desired = { new = 2 }
      local status, put = request("PUT", "/twins/fl-1", twin, { headers = { ["If-Match"] = '"' .. twin.etag .. '"' } })
      assert.equal(200, status)
      assert.same({ fresh = true }, put.tags)
      assert.equal(2, put.properties.desired.new)
      assert.is_nil(put.properties.desired.old)
      assert.equal(version + 1, put.properties.desired["$version"])
      local _, emptied = request("PUT", "/twins/fl-1", { tags = { only = "tags" } })
      assert.is_nil(emptied.properties.desired.new)
    end)

    it("enforces the twin limits with 400004 ArgumentInvalid", function()
      local function refused(patch)
        local status, body, h = request("PATCH", "/twins/fl-2", patch)
        return assert_error(400, "ArgumentInvalid", 400004, status, body, h).message
      end
      local deep = {}
      local t = deep
      for i = 1, 11 do t["l" .. i] = {}; t = t["l" .. i] end
      t.x = 1
      assert.truthy(refused({ tags = deep }):find("depth", 1, true))
      deep.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.l11 = nil
      deep.l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.x = 1
      assert.equal(200, (request("PATCH", "/twins/fl-2", { tags = deep })))
      for _, name in ipairs({ "a.b", "$x", "a b", "tab\t" }) do refused({ tags = { [name] = 1 } }) end
      refused({ properties = { desired = { v = ("v"):rep(4097) } } })
      refused({ tags = { arr = core.json_array({ 1, null }) } })
      refused({ tags = { a = ("a"):rep(4000), b = ("b"):rep(4000), c = ("c"):rep(300) } })
      local desired = {}
      for i = 1, 9 do desired["k" .. i] = ("d"):rep(4000) end
      assert.truthy(refused({ properties = { desired = desired } }):find("32 KB", 1, true))
      refused({ properties = { reported = { r = 1 } } })
      assert_error(400, "IotHubFormatError", 400006, request("PATCH", "/twins/fl-2", "{not json"))
    end)
  end)

  describe("direct methods", function()
    local function invoke(id, req)
      return request("POST", "/twins/" .. id .. "/methods", req)
    end

    it("returns the device's status and payload inside a 200", function()
      local status, body = invoke("echo", { methodName = "answer", payload = { status = 418, body = { tea = true } } })
      assert.equal(200, status)
      assert.same({ status = 418, payload = { tea = true } }, body)
      assert.same({ status = 503, payload = { busy = true } }, select(2, invoke("busy", { methodName = "x" })))
    end)

    it("refuses out-of-range timeouts and payloads over 128 KB with 400004", function()
      for _, req in ipairs({
        { methodName = "echo", responseTimeoutInSeconds = 4 },
        { methodName = "echo", responseTimeoutInSeconds = 301 },
        { methodName = "echo", connectTimeoutInSeconds = 301 },
        { methodName = "echo", connectTimeoutInSeconds = -1 },
        { methodName = "echo", payload = ("p"):rep(128 * 1024 - 1) },
      }) do
        assert_error(400, "ArgumentInvalid", 400004, invoke("echo", req))
      end
      local status, body = invoke("echo", { methodName = "echo", payload = ("p"):rep(128 * 1024 - 2) })
      assert.equal(200, status)
      assert.equal(128 * 1024 - 2, #body.payload)
      assert_error(504, "GatewayTimeout", 504101, invoke("echo", { methodName = "big", payload = { bytes = 128 * 1024 } }))
    end)

    it("answers 404103 for an offline device, after connectTimeoutInSeconds", function()
      local t0 = core.monotime()
      local inner = assert_error(404, "DeviceNotOnline", 404103, invoke("sleeper", { methodName = "ping" }))
      assert.same({ timeout = "00:00:00" }, inner.info)
      assert.is_true(core.monotime() - t0 < 0.5)
      t0 = core.monotime()
      inner = assert_error(404, "DeviceNotOnline", 404103,
        invoke("sleeper", { methodName = "ping", connectTimeoutInSeconds = 1 }))
      assert.same({ timeout = "00:00:01" }, inner.info)
      assert.is_true(core.monotime() - t0 >= 0.9)
      assert_error(404, "DeviceNotFound", 404001, invoke("nosuch", { methodName = "ping" }))
    end)

    it("reaches a device that reconnects within connectTimeoutInSeconds", function()
      assert.equal(200, (invoke("echo", { methodName = "restart", payload = { seconds = 1.5 } })))
      assert_error(404, "DeviceNotOnline", 404103, invoke("echo", { methodName = "echo" }))
      assert.equal("Disconnected", select(2, request("GET", "/twins/echo")).connectionState)
      -- a desired change while it is away is caught up on reconnect
      local _, patched = request("PATCH", "/twins/echo", { properties = { desired = { mode = "away" } } })
      local t0 = core.monotime()
      local status, body = invoke("echo", { methodName = "echo", payload = "back", connectTimeoutInSeconds = 10 })
      local waited = core.monotime() - t0
      assert.equal(200, status)
      assert.equal("back", body.payload)
      assert.is_true(waited > 0.5 and waited < 5, "waited " .. waited)
      local seen
      for _ = 1, 20 do
        seen = select(2, request("GET", "/twins/echo")).properties.reported.seen
        if seen == patched.properties.desired["$version"] then break end
        sleep(0.05)
      end
      assert.equal(patched.properties.desired["$version"], seen)
    end)

    it("adds the device's latency and fails a seeded, predictable share of calls", function()
      local t0 = core.monotime()
      assert.same({ status = 200, payload = "pong" }, select(2, invoke("slow", { methodName = "ping" })))
      assert.is_true(core.monotime() - t0 >= 0.4)
      local draw = devices_file.random_stream(7, "flaky", "knobs") -- the file's seed and the device id
      for _ = 1, 12 do
        local expected = draw() < 0.5 and 500 or 200
        assert.equal(expected, select(2, invoke("flaky", { methodName = "ping" })).status)
      end
    end)

    it("gives up on a device that answers after responseTimeoutInSeconds with 504101", function()
      local t0 = core.monotime()
      local inner = assert_error(504, "GatewayTimeout", 504101,
        invoke("echo", { methodName = "sleepy", payload = { seconds = 8 }, responseTimeoutInSeconds = 5 }))
      local waited = core.monotime() - t0
      assert.is_true(waited >= 4.9 and waited < 7, "waited " .. waited)
      assert.equal("Timed out waiting for the response from device.", inner.message)
      assert.equal(200, (invoke("echo", { methodName = "echo" }))) -- the device is still there
    end)
  end)
end)
