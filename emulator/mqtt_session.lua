--- One device's MQTT connection, as IoT Hub runs it (hub-behavior.md §8): the protocol state
-- machine between the bytes a transport moves and the hub that owns devices, twins and
-- methods. It never touches a socket: a transport calls session:receive(bytes) and
-- session:tick(now), and the session answers through the send(bytes) and close(reason)
-- functions it was given. So the WebSocket endpoint and the TLS port share every rule, and
-- specs drive it with no network at all.
--
-- The hub side is an object with these methods (emulator's composition root provides it):
--   authenticate{ clientId=, deviceId=, hostName=, username=, password= }
--       -> deviceId | nil, connackCode, why          (why is logged, never sent)
--   attach(deviceId, session)        the device is connected (a previous session is closed)
--   detach(deviceId, session)        this session ended
--   subscribed(deviceId, session)    its subscriptions changed (methods online or not)
--   twinGet(deviceId)                -> status, body
--   twinReport(deviceId, body)       -> status, version | status, message
--   methodReply(deviceId, rid, status, payload)
--   telemetry(deviceId, topic, payload, properties)
--   log(text)
local mqtt = require "emulator.mqtt_codec"

local Session = {}
Session.__index = Session

--- IoT Hub allows at most this many subscriptions on one connection.
Session.MAX_SUBSCRIPTIONS = 5
--- A silent connection is closed after this many keep-alive intervals (MQTT 3.1.1, 3.1.2.10).
Session.KEEPALIVE_GRACE = 1.5

-- The filters IoT Hub grants a device, by what they enable.
local METHODS_FILTER = "$iothub/methods/POST/#"
local TWIN_RESPONSES_FILTER = "$iothub/twin/res/#"
local DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"

--- opts: hub, send(bytes), close(reason), now() (seconds), maxPacket, transport (a name for logs)
function Session.new(opts)
  local self = setmetatable({
    hub = opts.hub, send = opts.send, closeTransport = opts.close, now = opts.now,
    reader = mqtt.reader(opts.maxPacket), transport = opts.transport or "mqtt",
    subscriptions = {}, state = "new",
  }, Session)
  self.lastHeard = self.now()
  return self
end

-- Ends the session once: tells the hub, then the transport.
function Session:close(reason)
  if self.state == "closed" then return end
  local was = self.state
  self.state = "closed"
  self.closeReason = reason
  if self.deviceId then
    self.hub.log(("[mqtt] %s disconnected (%s): %s"):format(self.deviceId, self.transport, reason))
    if was == "connected" then self.hub.detach(self.deviceId, self) end
  end
  self.closeTransport(reason)
end

function Session:is_open() return self.state ~= "closed" end

--- Bytes from the device.
function Session:receive(bytes)
  if self.state == "closed" then return end
  self.lastHeard = self.now()
  self.reader:feed(bytes)
  while self.state ~= "closed" do
    local packet, err = self.reader:next()
    if packet == nil then return end
    if packet == false then return self:close("malformed packet: " .. err) end
    self:_handle(packet)
  end
end

--- Keep-alive: closes a connection silent for 1.5x its keep-alive (and one that never sent
-- CONNECT within connectTimeout s). Call it now and then; returns false once closed.
function Session:tick(now, connectTimeout)
  if self.state == "closed" then return false end
  local silent = now - self.lastHeard
  if self.state == "new" and connectTimeout and silent > connectTimeout then
    self:close("no CONNECT within " .. connectTimeout .. " s")
  elseif self.keepAlive and self.keepAlive > 0 and silent > self.keepAlive * Session.KEEPALIVE_GRACE then
    self:close(("silent for %.0f s, keep-alive %d s"):format(silent, self.keepAlive))
  end
  return self.state ~= "closed"
end

---------------------------------------------------------------------------
-- Server to device

local function publish(self, topic, payload)
  if self.state ~= "connected" then return false end
  self.send(mqtt.publish({ topic = topic, payload = payload or "", qos = 0 }))
  return true
end

--- Is the device listening for direct methods (connected and subscribed)?
function Session:methods_online()
  return self.state == "connected" and self.subscriptions[METHODS_FILTER] ~= nil
end

--- Invokes a direct method: false when the device does not listen for methods.
function Session:invoke_method(name, rid, payload)
  if not self:methods_online() then return false end
  return publish(self, "$iothub/methods/POST/" .. name .. "/?$rid=" .. rid, payload)
end

--- Pushes a desired-properties patch (body already carries "$version").
function Session:push_desired(version, body)
  if not self.subscriptions[DESIRED_FILTER] then return false end
  return publish(self, "$iothub/twin/PATCH/properties/desired/?$version=" .. version, body)
end

local function twin_response(self, status, rid, version, body)
  if not self.subscriptions[TWIN_RESPONSES_FILTER] then return end
  local topic = "$iothub/twin/res/" .. status .. "/?$rid=" .. rid
  if version then topic = topic .. "&$version=" .. version end
  publish(self, topic, body)
end

---------------------------------------------------------------------------
-- Device to server

-- The device id a username names: "{host}/{deviceId}/?api-version=..." (modules, with a
-- second path segment, are not supported).
local function parse_username(username)
  local host, path, query = username:match("^([^/]+)/(.-)/%?(.*)$")
  if not host then host, path = username:match("^([^/]+)/([^?]-)/?$") end
  return host, path, query
end

-- Values of a topic's property bag ("?$rid=1&$version=2" -> { ["$rid"]="1", ... }).
local function properties(bag)
  local props = {}
  for pair in (bag or ""):gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    props[k] = v
  end
  return props
end

local handlers = {}

handlers[mqtt.CONNECT] = function(self, p)
  if self.state ~= "new" then return self:close("a second CONNECT") end
  if p.unsupported then
    self.send(mqtt.connack(mqtt.BAD_PROTOCOL))
    return self:close(("protocol %s level %s; IoT Hub speaks MQTT 3.1.1 (level 4)"):format(p.protocol, p.level))
  end
  if p.clientId == "" then
    self.send(mqtt.connack(mqtt.BAD_CLIENT_ID))
    return self:close("an empty client id; IoT Hub needs the device id")
  end
  local refuse = function(code, why)
    self.hub.log(("[mqtt] refused %q (%s): %s"):format(p.clientId, self.transport, why))
    self.send(mqtt.connack(code))
    self:close("refused: " .. why)
  end
  if not p.username then return refuse(mqtt.NOT_AUTHORIZED, "no user name") end
  local host, device = parse_username(p.username)
  if not device then return refuse(mqtt.NOT_AUTHORIZED, "the user name is not {hub}/{deviceId}/?api-version=...") end
  if device ~= p.clientId then
    return refuse(mqtt.NOT_AUTHORIZED, ("the user name names device %q, the client id %q"):format(device, p.clientId))
  end
  if device:find("/", 1, true) then return refuse(mqtt.NOT_AUTHORIZED, "modules are not supported") end
  local id, code, why = self.hub.authenticate({ clientId = p.clientId, deviceId = device, hostName = host,
    username = p.username, password = p.password })
  if not id then return refuse(code or mqtt.NOT_AUTHORIZED, why or "not authorized") end
  self.deviceId, self.keepAlive, self.state = id, p.keepAlive, "connected"
  self.send(mqtt.connack(mqtt.ACCEPTED, false))
  self.hub.attach(id, self)
  self.hub.log(("[mqtt] %s connected (%s, keep-alive %d s)"):format(id, self.transport, p.keepAlive))
end

-- The topics a device may publish to, and what each does.
local function on_publish(self, p)
  local topic = p.topic
  local rid = topic:match("^%$iothub/twin/GET/%?%$rid=(.*)$")
  if rid then
    local status, body = self.hub.twinGet(self.deviceId)
    twin_response(self, status, rid, nil, body)
    return true
  end
  rid = topic:match("^%$iothub/twin/PATCH/properties/reported/%?%$rid=(.*)$")
  if rid then
    rid = rid:match("^[^&]*")
    local status, version = self.hub.twinReport(self.deviceId, p.payload)
    if status == 204 then twin_response(self, 204, rid, version, "")
    else twin_response(self, status, rid, nil, version) end
    return true
  end
  local status, bag = topic:match("^%$iothub/methods/res/(%d+)/%?(.*)$")
  if status then
    local props = properties(bag)
    if not props["$rid"] then return false, "a method response without $rid" end
    self.hub.methodReply(self.deviceId, props["$rid"], tonumber(status), p.payload)
    return true
  end
  local device, rest = topic:match("^devices/([^/]+)/messages/events/?(.*)$")
  if device then
    if device ~= self.deviceId then return false, "telemetry for device " .. device .. " from " .. self.deviceId end
    self.hub.telemetry(self.deviceId, topic, p.payload, properties(rest))
    return true
  end
  return false, "publish to " .. topic .. ", which IoT Hub does not accept"
end

handlers[mqtt.PUBLISH] = function(self, p)
  if p.qos == 2 then return self:close("PUBLISH at QoS 2, which IoT Hub does not support") end
  local ok, why = on_publish(self, p)
  if not ok then return self:close(why) end
  if p.qos == 1 and self.state == "connected" then self.send(mqtt.puback(p.id)) end
end

local GRANTABLE = { [METHODS_FILTER] = true, [TWIN_RESPONSES_FILTER] = true, [DESIRED_FILTER] = true }

handlers[mqtt.SUBSCRIBE] = function(self, p)
  local granted = {}
  local changed = false
  for i, f in ipairs(p.filters) do
    local count = 0
    for _ in pairs(self.subscriptions) do count = count + 1 end
    local c2d = f.filter == "devices/" .. self.deviceId .. "/messages/devicebound/#"
    if not (GRANTABLE[f.filter] or c2d) then
      granted[i] = 0x80
      self.hub.log(("[mqtt] %s: subscription to %s refused (not an IoT Hub topic)"):format(self.deviceId, f.filter))
    elseif not self.subscriptions[f.filter] and count >= Session.MAX_SUBSCRIPTIONS then
      granted[i] = 0x80
      self.hub.log(("[mqtt] %s: subscription to %s refused (at most %d)"):format(self.deviceId, f.filter,
        Session.MAX_SUBSCRIPTIONS))
    else
      granted[i] = f.qos == 2 and 1 or f.qos -- QoS 2 is granted as 1
      self.subscriptions[f.filter] = granted[i]
      changed = true
    end
  end
  self.send(mqtt.suback(p.id, granted))
  if changed then self.hub.subscribed(self.deviceId, self) end
end

handlers[mqtt.UNSUBSCRIBE] = function(self, p)
  for _, f in ipairs(p.filters) do self.subscriptions[f.filter] = nil end
  self.send(mqtt.unsuback(p.id))
  self.hub.subscribed(self.deviceId, self)
end

handlers[mqtt.PINGREQ] = function(self)
  self.send(mqtt.pingresp())
end

handlers[mqtt.PUBACK] = function() end -- the server publishes at QoS 0: nothing to settle

handlers[mqtt.DISCONNECT] = function(self)
  self:close("the device disconnected")
end

function Session:_handle(p)
  if self.state == "new" and p.type ~= mqtt.CONNECT then
    return self:close(mqtt.NAMES[p.type] .. " before CONNECT")
  end
  local handler = handlers[p.type]
  if not handler then return self:close(mqtt.NAMES[p.type] .. " is not a packet a device sends here") end
  handler(self, p)
end

return Session
