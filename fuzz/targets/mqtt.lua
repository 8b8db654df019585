-- The emulator's MQTT 3.1.1 codec (emulator/mqtt_codec.lua), which reads whatever a device
-- connection sends. The input is read whole and again in chunks whose sizes the first bytes
-- pick: both readings must agree packet by packet, never raise, and stop at the first
-- malformed packet with a message. Every packet a client can send, once read, must encode back
-- to bytes that read as the same packet.
-- libfuzzer: -max_len=4096
local mqtt = require "emulator.mqtt_codec"
local fz = require "fuzzlib"
local check = fz.check

local function same(a, b, path)
  if type(a) ~= "table" or type(b) ~= "table" then
    check(a == b, "%s differs: %s vs %s", path, tostring(a), tostring(b))
    return
  end
  for k, v in pairs(a) do same(v, b[k], path .. "." .. tostring(k)) end
  for k in pairs(b) do check(a[k] ~= nil, "%s.%s appeared", path, tostring(k)) end
end

local function read_all(reader)
  local out = {}
  while true do
    local p, err = reader:next()
    if p == nil then return out end
    if p == false then
      check(type(err) == "string" and #err > 0, "a refusal without a message")
      out.failed = err
      return out
    end
    out[#out + 1] = p
  end
end

local ENCODE = {
  [mqtt.CONNECT] = function(p) return mqtt.connect(p) end,
  [mqtt.PUBLISH] = function(p) return mqtt.publish(p) end,
  [mqtt.SUBSCRIBE] = function(p) return mqtt.subscribe(p.id, p.filters) end,
  [mqtt.UNSUBSCRIBE] = function(p)
    local list = {}
    for i, f in ipairs(p.filters) do list[i] = f.filter end
    return mqtt.unsubscribe(p.id, list)
  end,
  [mqtt.PUBACK] = function(p) return mqtt.puback(p.id) end,
  [mqtt.PINGREQ] = function() return mqtt.pingreq() end,
  [mqtt.DISCONNECT] = function() return mqtt.disconnect() end,
}

return function(data)
  if #data < 2 then return end
  local step, limit = data:byte(1) % 17 + 1, 64 + data:byte(2) * 16
  local body = data:sub(3)

  local whole = mqtt.reader(limit)
  whole:feed(body)
  local a = read_all(whole)

  local chunked = mqtt.reader(limit)
  local b = {}
  for i = 1, #body, step do
    chunked:feed(body:sub(i, i + step - 1))
    local got = read_all(chunked)
    for _, p in ipairs(got) do b[#b + 1] = p end
    if got.failed then b.failed = got.failed break end
  end
  if not b.failed then
    local rest = read_all(chunked)
    for _, p in ipairs(rest) do b[#b + 1] = p end
  end
  check(#a == #b, "whole reading gave %d packets, chunked %d", #a, #b)
  check((a.failed == nil) == (b.failed == nil), "one reading failed, the other not: %s / %s",
    tostring(a.failed), tostring(b.failed))
  for i = 1, #a do same(a[i], b[i], "packet " .. i) end

  for i, p in ipairs(a) do
    local encode = ENCODE[p.type]
    if encode and not p.unsupported then
      local bytes = encode(p)
      local again, nextpos = mqtt.decode(bytes, 1, 1e9)
      check(again, "packet %d (%s) re-encoded does not read back: %s", i, mqtt.NAMES[p.type], tostring(nextpos))
      check(nextpos == #bytes + 1, "packet %d re-encoded reads short", i)
      same(p, again, "round trip of " .. mqtt.NAMES[p.type])
    end
  end
end
