-- The emulator's MQTT 3.1.1 codec (emulator/mqtt_codec.lua): packets as the device SDKs send
-- them, every refusal a malformed packet gets, incremental reading and topic matching.
local mqtt = require "emulator.mqtt_codec"

local function hex(s) return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end)) end

local function decode_all(bytes)
  local r = mqtt.reader()
  r:feed(bytes)
  local out = {}
  while true do
    local p, err = r:next()
    if p == nil then return out end
    if p == false then return out, err end
    out[#out + 1] = p
  end
end

local HOST = "myhub.azure-devices.net"
local USER = HOST .. "/door1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4"
local PASSWORD = "SharedAccessSignature sr=" .. HOST .. "%2Fdevices%2Fdoor1&sig=abc%3D&se=1700000000"

describe("MQTT codec", function()
  it("reads a CONNECT as the Node device SDK sends it", function()
    local bytes = mqtt.connect({ clientId = "door1", username = USER, password = PASSWORD, keepAlive = 180 })
    -- fixed header, "MQTT", level 4, flags user+password, keepalive 180
    assert.equal("10", hex(bytes:sub(1, 1)))
    assert.equal("00044d51545404c000b4", hex(bytes:sub(4, 13)))
    local p, nextpos = mqtt.decode(bytes)
    assert.equal(#bytes + 1, nextpos)
    assert.equal(mqtt.CONNECT, p.type)
    assert.equal("door1", p.clientId)
    assert.equal(USER, p.username)
    assert.equal(PASSWORD, p.password)
    assert.equal(180, p.keepAlive)
    assert.is_false(p.cleanSession)
    assert.is_nil(p.will)
  end)

  it("reads a CONNECT with a will", function()
    local p = mqtt.decode(mqtt.connect({ clientId = "d", cleanSession = true,
      will = { topic = "w/t", payload = "bye", qos = 1, retain = true } }))
    assert.is_true(p.cleanSession)
    assert.same({ topic = "w/t", payload = "bye", qos = 1, retain = true }, p.will)
  end)

  it("marks an MQTT 3.1 CONNECT as unsupported, for a CONNACK 1", function()
    local body = "\0\6MQIsdp\3\0\0\60\0\1d"
    local p = mqtt.decode("\16" .. string.char(#body) .. body)
    assert.is_true(p.unsupported)
    assert.equal("MQIsdp", p.protocol)
    assert.equal(3, p.level)
  end)

  it("reads PUBLISH at QoS 0 and 1, SUBSCRIBE, UNSUBSCRIBE, PUBACK, PINGREQ, DISCONNECT", function()
    local stream = mqtt.publish({ topic = "$iothub/twin/GET/?$rid=1", payload = " " }) ..
      mqtt.publish({ topic = "devices/door1/messages/events/", payload = "{\"t\":1}", qos = 1, id = 7 }) ..
      mqtt.subscribe(2, { { filter = "$iothub/methods/POST/#", qos = 0 }, { filter = "$iothub/twin/res/#", qos = 2 } }) ..
      mqtt.unsubscribe(3, { "$iothub/twin/res/#" }) .. mqtt.puback(9) .. mqtt.pingreq() .. mqtt.disconnect()
    local packets, err = decode_all(stream)
    assert.is_nil(err)
    assert.equal(7, #packets)
    assert.same({ type = mqtt.PUBLISH, topic = "$iothub/twin/GET/?$rid=1", payload = " ", qos = 0, dup = false,
      retain = false }, packets[1])
    assert.equal(7, packets[2].id)
    assert.equal(1, packets[2].qos)
    assert.same({ { filter = "$iothub/methods/POST/#", qos = 0 }, { filter = "$iothub/twin/res/#", qos = 2 } },
      packets[3].filters)
    assert.same({ { filter = "$iothub/twin/res/#" } }, packets[4].filters)
    assert.equal(9, packets[5].id)
    assert.equal(mqtt.PINGREQ, packets[6].type)
    assert.equal(mqtt.DISCONNECT, packets[7].type)
  end)

  it("writes what a server sends, readable back", function()
    assert.equal("20020000", hex(mqtt.connack(mqtt.ACCEPTED)))
    assert.equal("20020105", hex(mqtt.connack(mqtt.NOT_AUTHORIZED, true)))
    assert.equal("d000", hex(mqtt.pingresp()))
    assert.equal("4002002a", hex(mqtt.puback(42)))
    assert.equal("900400020001", hex(mqtt.suback(2, { 0, 1 })))
    local p = mqtt.decode(mqtt.suback(5, { 1, 0x80 }))
    assert.same({ 1, 0x80 }, p.granted)
    p = mqtt.decode(mqtt.publish({ topic = "$iothub/methods/POST/lockDoor/?$rid=1", payload = "null" }))
    assert.equal("null", p.payload)
  end)

  it("encodes and reads remaining lengths at every size boundary", function()
    for _, n in ipairs({ 0, 1, 127, 128, 16383, 16384, 70000 }) do
      local topic = "t"
      local payload = string.rep("x", math.max(0, n - 3))
      local bytes = mqtt.publish({ topic = topic, payload = payload })
      local p, nextpos = mqtt.decode(bytes, 1, 1e9)
      assert.equal(#bytes + 1, nextpos, "size " .. n)
      assert.equal(payload, p.payload)
    end
  end)

  it("hands back packets only when whole, fed one byte at a time", function()
    local stream = mqtt.connect({ clientId = "d1", keepAlive = 5 }) .. mqtt.pingreq() ..
      mqtt.publish({ topic = "a/b", payload = string.rep("z", 300), qos = 1, id = 1 })
    local r = mqtt.reader()
    local got = {}
    for i = 1, #stream do
      r:feed(stream:sub(i, i))
      while true do
        local p = r:next()
        if not p then break end
        got[#got + 1] = p.type
      end
    end
    assert.same({ mqtt.CONNECT, mqtt.PINGREQ, mqtt.PUBLISH }, got)
    assert.equal(0, r:pending())
  end)

  local malformed = {
    { "a reserved packet type", "\0\0", "reserved" },
    { "wrong SUBSCRIBE flags", "\128\5\0\1\0\1a", "flags" },
    { "a five-byte remaining length", "\48\255\255\255\255\1", "four bytes" },
    { "PUBLISH at QoS 3", "\54\3\0\1a", "QoS 3" },
    { "a wildcard in a topic name", "\48\3\0\1#", "wildcard" },
    { "an empty topic name", "\48\2\0\0", "empty" },
    { "a topic length past the packet", "\48\3\0\9a", "remain" },
    { "invalid UTF-8 in a topic", "\48\3\0\1\255", "UTF-8" },
    { "U+0000 in a topic", "\48\3\0\1\0", "UTF-8" },
    { "a surrogate in a topic", "\48\5\0\3\237\160\128", "UTF-8" },
    { "packet id 0 at QoS 1", "\50\5\0\1a\0\0", "packet id 0" },
    { "SUBSCRIBE without filters", "\130\2\0\1", "no topic filter" },
    { "a bad filter", "\130\7\0\1\0\3a#b\0", "not a valid filter" },
    { "requested QoS 3", "\130\6\0\1\0\1a\3", "QoS" },
    { "PINGREQ with a body", "\192\1\0", "with a body" },
    { "CONNECT reserved flag", "\16\12\0\4MQTT\4\1\0\60\0\0", "reserved bit" },
    { "password without user name", "\16\14\0\4MQTT\4\64\0\60\0\0\0\0", "password without" },
    { "bytes after CONNECT", "\16\13\0\4MQTT\4\0\0\60\0\0\9", "after the CONNECT" },
  }
  for _, case in ipairs(malformed) do
    it("refuses " .. case[1] .. ", naming what is wrong", function()
      local ok, err = mqtt.decode(case[2])
      assert.is_false(ok)
      assert.matches(case[3], err, 1, true)
    end)
  end

  it("refuses a packet over the limit before its body arrives, and stays failed", function()
    local r = mqtt.reader(100)
    r:feed(mqtt.publish({ topic = "t", payload = string.rep("x", 200) }):sub(1, 4))
    local ok, err = r:next()
    assert.is_false(ok)
    assert.matches("larger than the limit of 100", err, 1, true)
    r:feed(mqtt.pingreq())
    assert.is_false((r:next()))
  end)

  it("matches topics against filters as 4.7 says", function()
    assert.is_true(mqtt.topic_matches("$iothub/methods/POST/#", "$iothub/methods/POST/lockDoor/?$rid=1"))
    assert.is_true(mqtt.topic_matches("a/+/c", "a/b/c"))
    assert.is_false(mqtt.topic_matches("a/+/c", "a/b/d"))
    assert.is_true(mqtt.topic_matches("a/#", "a"))
    assert.is_false(mqtt.topic_matches("#", "$iothub/twin/res/200"))
    assert.is_false(mqtt.topic_matches("+/x", "$sys/x"))
    assert.is_false(mqtt.topic_matches("a/b", "a/b/c"))
    assert.is_false(mqtt.topic_matches("a/b/c", "a/b"))
    assert.is_true(mqtt.valid_topic_filter("+/+/#"))
    assert.is_false(mqtt.valid_topic_filter("a/#/b"))
    assert.is_false(mqtt.valid_topic_filter("a+"))
  end)
end)
