-- The emulator's MQTT device session (emulator/mqtt_session.lua) against a recording hub and
-- an injected clock: the connection rules IoT Hub applies, with no network.
local mqtt = require "emulator.mqtt_codec"
local Session = require "emulator.mqtt_session"

local HOST = "localhost"

local function fake_hub()
  local hub = { calls = {}, logs = {}, twin = { status = 200, body = '{"desired":{"$version":1},"reported":{"$version":1}}' } }
  local function record(name) return function(...) hub.calls[#hub.calls + 1] = { name, ... } end end
  function hub.authenticate(c)
    hub.calls[#hub.calls + 1] = { "authenticate", c }
    if c.password == "good" then return c.deviceId end
    return nil, mqtt.NOT_AUTHORIZED, "signature does not match"
  end
  hub.attach, hub.detach, hub.subscribed = record("attach"), record("detach"), record("subscribed")
  hub.methodReply, hub.telemetry = record("methodReply"), record("telemetry")
  function hub.twinGet() return hub.twin.status, hub.twin.body end
  function hub.twinReport(_, body)
    hub.calls[#hub.calls + 1] = { "twinReport", body }
    if body:sub(1, 1) ~= "{" then return 400, '{"message":"not a JSON object"}' end
    return 204, 7
  end
  function hub.log(text) hub.logs[#hub.logs + 1] = text end
  return hub
end

local function open(opts)
  opts = opts or {}
  local hub = fake_hub()
  local t = { now = 1000, sent = {}, closed = nil }
  local s = Session.new({ hub = hub, now = function() return t.now end, maxPacket = opts.maxPacket,
    send = function(bytes)
      local p = assert(mqtt.decode(bytes))
      t.sent[#t.sent + 1] = p
    end,
    close = function(reason) t.closed = reason end })
  return s, hub, t
end

local function connect(s, id, password, username)
  s:receive(mqtt.connect({ clientId = id or "door1", keepAlive = 60,
    username = username or (HOST .. "/" .. (id or "door1") .. "/?api-version=2021-04-12&DeviceClientType=x"),
    password = password or "good" }))
end

local function last(t) return t.sent[#t.sent] end

describe("MQTT session", function()
  it("accepts a device whose token the hub accepts, and attaches it", function()
    local s, hub, t = open()
    connect(s)
    assert.equal(mqtt.CONNACK, last(t).type)
    assert.equal(mqtt.ACCEPTED, last(t).returnCode)
    assert.equal("door1", hub.calls[1][2].deviceId)
    assert.equal(HOST, hub.calls[1][2].hostName)
    assert.same({ "attach", "door1", s }, hub.calls[2])
    assert.is_nil(t.closed)
  end)

  it("refuses a bad token with CONNACK 5 and nothing else, logging why", function()
    local s, hub, t = open()
    connect(s, "door1", "bad")
    assert.equal(1, #t.sent)
    assert.equal(mqtt.NOT_AUTHORIZED, t.sent[1].returnCode)
    assert.matches("refused", t.closed)
    assert.matches("signature does not match", hub.logs[1], 1, true)
    s:receive(mqtt.pingreq())
    assert.equal(1, #t.sent)
  end)

  it("refuses a user name that names another device, before asking the hub", function()
    local s, hub, t = open()
    connect(s, "door1", "good", HOST .. "/door2/?api-version=2021-04-12")
    assert.equal(mqtt.NOT_AUTHORIZED, t.sent[1].returnCode)
    assert.equal(0, #hub.calls)
  end)

  it("answers MQTT 3.1 with CONNACK 1 and an empty client id with CONNACK 2", function()
    local s, _, t = open()
    s:receive("\16\15\0\6MQIsdp\3\2\0\60\0\1d")
    assert.equal(mqtt.BAD_PROTOCOL, t.sent[1].returnCode)
    assert.is_string(t.closed)
    s, _, t = open()
    s:receive(mqtt.connect({ clientId = "", username = "h/x/?", password = "good" }))
    assert.equal(mqtt.BAD_CLIENT_ID, t.sent[1].returnCode)
  end)

  it("closes on a packet before CONNECT, a second CONNECT, or malformed bytes", function()
    local s, _, t = open()
    s:receive(mqtt.pingreq())
    assert.matches("before CONNECT", t.closed)
    s, _, t = open()
    connect(s)
    connect(s)
    assert.matches("second CONNECT", t.closed)
    s, _, t = open()
    connect(s)
    s:receive("\0\0")
    assert.matches("malformed packet", t.closed)
  end)

  it("grants IoT Hub's topics (QoS 2 as 1), refuses others and a sixth subscription", function()
    local s, hub, t = open()
    connect(s)
    s:receive(mqtt.subscribe(1, { { filter = "$iothub/methods/POST/#", qos = 0 },
      { filter = "$iothub/twin/res/#", qos = 2 }, { filter = "some/other/#", qos = 0 } }))
    assert.same({ 0, 1, 0x80 }, last(t).granted)
    assert.is_true(s:methods_online())
    assert.equal("subscribed", hub.calls[#hub.calls][1])
    Session.MAX_SUBSCRIPTIONS = 2
    s:receive(mqtt.subscribe(2, { { filter = "$iothub/twin/PATCH/properties/desired/#", qos = 0 } }))
    Session.MAX_SUBSCRIPTIONS = 5
    assert.same({ 0x80 }, last(t).granted)
    s:receive(mqtt.unsubscribe(3, { "$iothub/methods/POST/#" }))
    assert.equal(mqtt.UNSUBACK, last(t).type)
    assert.is_false(s:methods_online())
  end)

  it("delivers a method only to a subscribed device and routes its reply", function()
    local s, hub, t = open()
    connect(s)
    assert.is_false(s:invoke_method("lockDoor", "1", "{}"))
    s:receive(mqtt.subscribe(1, { { filter = "$iothub/methods/POST/#", qos = 0 } }))
    assert.is_true(s:invoke_method("lockDoor", "1", '{"force":true}'))
    assert.equal("$iothub/methods/POST/lockDoor/?$rid=1", last(t).topic)
    assert.equal('{"force":true}', last(t).payload)
    s:receive(mqtt.publish({ topic = "$iothub/methods/res/200/?$rid=1", payload = '"locked"' }))
    assert.same({ "methodReply", "door1", "1", 200, '"locked"' }, hub.calls[#hub.calls])
  end)

  it("answers twin GET and reported PATCH on the response topic it subscribed to", function()
    local s, hub, t = open()
    connect(s)
    s:receive(mqtt.publish({ topic = "$iothub/twin/GET/?$rid=a", payload = " " }))
    assert.equal(mqtt.CONNACK, last(t).type) -- not subscribed: nothing comes back
    s:receive(mqtt.subscribe(1, { { filter = "$iothub/twin/res/#", qos = 0 } }))
    s:receive(mqtt.publish({ topic = "$iothub/twin/GET/?$rid=a", payload = " " }))
    assert.equal("$iothub/twin/res/200/?$rid=a", last(t).topic)
    assert.equal(hub.twin.body, last(t).payload)
    s:receive(mqtt.publish({ topic = "$iothub/twin/PATCH/properties/reported/?$rid=b", payload = '{"locked":true}' }))
    assert.equal("$iothub/twin/res/204/?$rid=b&$version=7", last(t).topic)
    assert.equal("", last(t).payload)
    s:receive(mqtt.publish({ topic = "$iothub/twin/PATCH/properties/reported/?$rid=c", payload = "[1]" }))
    assert.equal("$iothub/twin/res/400/?$rid=c", last(t).topic)
    assert.is_nil(t.closed)
  end)

  it("pushes desired patches to a subscribed device only", function()
    local s, _, t = open()
    connect(s)
    assert.is_false(s:push_desired(2, '{"fw":"2.0","$version":2}'))
    s:receive(mqtt.subscribe(1, { { filter = "$iothub/twin/PATCH/properties/desired/#", qos = 0 } }))
    assert.is_true(s:push_desired(2, '{"fw":"2.0","$version":2}'))
    assert.equal("$iothub/twin/PATCH/properties/desired/?$version=2", last(t).topic)
  end)

  it("acknowledges telemetry at QoS 1 and hands it to the hub with its properties", function()
    local s, hub, t = open()
    connect(s)
    s:receive(mqtt.publish({ topic = "devices/door1/messages/events/a=1&%24.ct=application%2Fjson",
      payload = '{"t":21}', qos = 1, id = 9 }))
    assert.equal(mqtt.PUBACK, last(t).type)
    assert.equal(9, last(t).id)
    local call = hub.calls[#hub.calls]
    assert.equal("telemetry", call[1])
    assert.equal("1", call[5].a)
  end)

  it("closes on telemetry for another device, an unknown topic, and QoS 2", function()
    for _, p in ipairs({ { topic = "devices/door2/messages/events/", payload = "x" },
      { topic = "foo/bar", payload = "x" }, { topic = "devices/door1/messages/events/", payload = "x", qos = 2, id = 1 } }) do
      local s, _, t = open()
      connect(s)
      s:receive(mqtt.publish(p))
      assert.is_string(t.closed, p.topic)
      assert.equal(1, #t.sent) -- only the CONNACK
    end
  end)

  it("answers PINGREQ and closes after 1.5x the keep-alive of silence", function()
    local s, hub, t = open()
    connect(s)
    t.now = t.now + 80
    assert.is_true(s:tick(t.now))
    s:receive(mqtt.pingreq())
    assert.equal(mqtt.PINGRESP, last(t).type)
    t.now = t.now + 89
    assert.is_true(s:tick(t.now))
    t.now = t.now + 2
    assert.is_false(s:tick(t.now))
    assert.matches("keep%-alive 60", t.closed)
    assert.same({ "detach", "door1", s }, hub.calls[#hub.calls])
  end)

  it("closes a connection that never sends CONNECT", function()
    local s, _, t = open()
    t.now = t.now + 11
    assert.is_false(s:tick(t.now, 10))
    assert.matches("no CONNECT", t.closed)
  end)

  it("detaches once on DISCONNECT", function()
    local s, hub, t = open()
    connect(s)
    s:receive(mqtt.disconnect())
    s:close("again")
    local detaches = 0
    for _, c in ipairs(hub.calls) do if c[1] == "detach" then detaches = detaches + 1 end end
    assert.equal(1, detaches)
    assert.equal("the device disconnected", t.closed)
  end)
end)
