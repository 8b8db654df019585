-- Registry operations' exact requests against a recording transport.
local iothub = require "iothub"
local support = require "support.client"
local json = require "iothub.json"


local function make(script)
  return support.make(iothub.Registry, script)
end

describe("Registry", function()
  it("reads a twin, URL-encoding the device id", function()
    local registry, rec = make({ { status = 200, body = { deviceId = "a#b", etag = "AAAAAAAAAAE=", version = 2 } } })
    local twin = assert(registry:getTwin("a#b"))
    assert.equal("a#b", twin.deviceId)
    assert.equal("GET", rec:last().method)
    assert.equal("/twins/a%23b", rec:last().path)
  end)

  it("patches a twin with a quoted If-Match, '*' by default", function()
    local registry, rec = make({ { status = 200, body = {} }, { status = 200, body = {} } })
    assert(registry:updateTwin("d1", { tags = { building = "43" } }))
    assert.equal("PATCH", rec:last().method)
    assert.equal('"*"', rec:last().headers["if-match"])
    assert.equal('{"tags":{"building":"43"}}', rec:last().body)
    assert(registry:updateTwin("d1", { properties = { desired = { floor = json.null } } }, "AAAAAAAAAAI="))
    assert.equal('"AAAAAAAAAAI="', rec:last().headers["if-match"])
    assert.equal('{"properties":{"desired":{"floor":null}}}', rec:last().body)
  end)

  it("reports an etag mismatch as 412", function()
    local registry = make({ { status = 412, headers = { ["iothub-errorcode"] = "PreconditionFailed" } } })
    local _, err = registry:updateTwin("d1", { tags = {} }, "old")
    assert.equal(412, err.status)
    assert.equal(412001, err.errorCode)
  end)

  it("pages twin queries", function()
    local registry, rec = make({
      { status = 200, headers = { ["x-ms-continuation"] = "n1" }, body = json.array({ { deviceId = "a" } }) },
      { status = 200, body = json.array({ { deviceId = "b" } }) },
    })
    local ids = {}
    for twin, err in registry:queryTwins("SELECT * FROM devices WHERE tags.building = '43'", { pageSize = 1 }) do
      assert.is_truthy(twin, tostring(err))
      ids[#ids + 1] = twin.deviceId
    end
    assert.same({ "a", "b" }, ids)
    assert.equal('{"query":"SELECT * FROM devices WHERE tags.building = \'43\'"}', rec.requests[2].body)
    assert.equal("n1", rec.requests[2].headers["x-ms-continuation"])
  end)

  it("surfaces a failed page as false, err", function()
    local registry = make({ { status = 400, body = '{"errorCode":400004,"message":"bad query"}' } })
    local seen = {}
    for twin, err in registry:queryTwins("SELECT * FROM devices WHERE") do seen[#seen + 1] = { twin, err } end
    assert.equal(1, #seen)
    assert.is_false(seen[1][1])
    assert.equal("bad query", seen[1][2].message)
  end)

  it("invokes a direct method without retrying and waits past the method timeouts", function()
    local registry, rec = make({ { status = 504, headers = { ["iothub-errorcode"] = "GatewayTimeout" } } })
    local _, err = registry:invokeDeviceMethod("d1", { methodName = "lockDoor", responseTimeoutInSeconds = 100,
      connectTimeoutInSeconds = 20 })
    assert.equal(504, err.status)
    assert.equal(1, #rec.requests)
    local req = rec:last()
    assert.equal("/twins/d1/methods", req.path)
    assert.equal('{"connectTimeoutInSeconds":20,"methodName":"lockDoor","payload":null,"responseTimeoutInSeconds":100}', req.body)
    assert.is_true(req.timeout >= 120)
  end)

  it("returns the device's answer", function()
    local registry = make({ { status = 200, body = { status = 200, payload = { locked = true } } } })
    local result = assert(registry:invokeDeviceMethod("d1", { methodName = "lockDoor" }))
    assert.equal(200, result.status)
    assert.is_true(result.payload.locked)
  end)

  it("creates, reads and deletes device identities", function()
    local registry, rec = make({
      { status = 200, body = { deviceId = "d1", authentication = { symmetricKey = { primaryKey = "k" } } } },
      { status = 200, body = { deviceId = "d1" } },
      { status = 204 },
    })
    assert.equal("d1", assert(registry:create({ deviceId = "d1" })).deviceId)
    assert.equal("PUT", rec.requests[1].method)
    assert.equal("/devices/d1", rec.requests[1].path)
    assert.equal('{"deviceId":"d1"}', rec.requests[1].body)
    assert(registry:get("d1"))
    assert.is_true(registry:delete("d1"))
    assert.equal("DELETE", rec.requests[3].method)
    assert.equal('"*"', rec.requests[3].headers["if-match"])
  end)

  describe("identities whose answers were lost", function()
    local NET = { err = { kind = "network", code = "CURLE_RECV_ERROR", message = "connection reset" } }
    local EXISTS = { status = 409, headers = { ["iothub-errorcode"] = "DeviceAlreadyExists" },
      body = '{"Message":"{\\"errorCode\\":409001,\\"message\\":\\"exists\\"}","ExceptionMessage":""}' }
    local GONE = { status = 404, headers = { ["iothub-errorcode"] = "DeviceNotFound" } }
    local HELD = { status = 200, body = { deviceId = "d1", status = "enabled",
      authentication = { type = "sas", symmetricKey = { primaryKey = "p1", secondaryKey = "s1" } } } }

    it("a create retried after a lost answer reads the device back instead of failing on 409", function()
      local registry, rec = make({ NET, EXISTS, HELD })
      local device = assert(registry:create({ deviceId = "d1", status = "enabled" }))
      assert.equal("p1", device.authentication.symmetricKey.primaryKey)
      assert.same({ "PUT", "PUT", "GET" }, { rec.requests[1].method, rec.requests[2].method, rec.requests[3].method })
    end)

    it("a create that meets a different device is a conflict", function()
      local registry = make({ NET, EXISTS, HELD })
      local _, err = registry:create({ deviceId = "d1", status = "disabled" })
      assert.equal(409, err.status)
      assert.equal("DeviceAlreadyExists", err.code)
      assert.matches("differs from the one asked for", err.message, 1, true)
    end)

    it("a first-attempt 409 is a conflict unless the device has the keys we gave", function()
      local registry, rec = make({ EXISTS })
      local _, err = registry:create({ deviceId = "d1" })
      assert.equal(409, err.status)
      assert.equal(1, #rec.requests) -- nothing said it could be ours: no read-back
      registry, rec = make({ EXISTS, HELD })
      local device = assert(registry:create({ deviceId = "d1",
        authentication = { type = "sas", symmetricKey = { primaryKey = "p1", secondaryKey = "s1" } } }))
      assert.equal("d1", device.deviceId)
      assert.equal(2, #rec.requests)
      registry = make({ EXISTS, HELD })
      _, err = registry:create({ deviceId = "d1", authentication = { symmetricKey = { primaryKey = "other" } } })
      assert.equal(409, err.status)
    end)

    it("a delete retried after a lost answer is done when the device is gone; a first 404 is an error", function()
      local registry, rec = make({ NET, GONE })
      assert.is_true(registry:delete("d1"))
      assert.equal(2, #rec.requests)
      registry = make({ { status = 503 }, GONE })
      assert.is_true(registry:delete("d1"))
      registry = make({ { status = 429 }, GONE }) -- throttled: surely not done, so the 404 is real
      local _, err = registry:delete("d1")
      assert.equal(404, err.status)
      registry = make({ GONE })
      _, err = registry:delete("d1")
      assert.equal("DeviceNotFound", err.code)
    end)
  end)

  it("refuses bad device ids before sending", function()
    local registry, rec = make({})
    for _, id in ipairs({ "", ("d"):rep(129), "bad/id", "sp ace" }) do
      local _, err = registry:getTwin(id)
      assert.equal("invalid_argument", err.kind)
    end
    assert.equal(0, #rec.requests)
    assert.has_error(function() registry:getTwin(nil) end)
  end)

  it("checks a device id on its own, as a value, without a client", function()
    assert.is_true(iothub.Registry.checkDeviceId("door-001:a.b+c%_#*?!(),=@;$'"))
    local ok, msg = iothub.Registry.checkDeviceId("bad/id")
    assert.is_nil(ok)
    assert.matches("position 4", msg, 1, true)
    ok, msg = iothub.Registry.checkDeviceId(42)
    assert.is_nil(ok)
    assert.matches("must be a string, got number", msg, 1, true)
  end)
end)
