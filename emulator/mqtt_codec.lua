--- MQTT 3.1.1 packets as the emulator's device endpoint reads and writes them: one codec for
-- both transports (WebSocket on the HTTPS port, TLS on the MQTT port), which only move bytes.
--
-- Reading is incremental: a Reader takes bytes as they arrive and hands back whole packets as
-- tables, or an error that names what is wrong (the session then closes the connection, as
-- the hub does). Writing builds the few packets a server sends. Pure Lua with no bit library,
-- so the same file runs under LuaJIT (inside nginx) and Lua 5.4 (specs, fuzzing).
-- Spec: MQTT Version 3.1.1, OASIS Standard, 29 October 2014 (section numbers below).
local M = {}

M.CONNECT, M.CONNACK, M.PUBLISH, M.PUBACK, M.PUBREC, M.PUBREL, M.PUBCOMP = 1, 2, 3, 4, 5, 6, 7
M.SUBSCRIBE, M.SUBACK, M.UNSUBSCRIBE, M.UNSUBACK, M.PINGREQ, M.PINGRESP, M.DISCONNECT = 8, 9, 10, 11, 12, 13, 14

M.NAMES = { "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBSCRIBE",
  "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT" }

--- CONNACK return codes (3.2.2.3).
M.ACCEPTED, M.BAD_PROTOCOL, M.BAD_CLIENT_ID, M.UNAVAILABLE, M.BAD_CREDENTIALS, M.NOT_AUTHORIZED = 0, 1, 2, 3, 4, 5

--- The largest packet a Reader accepts unless told otherwise: IoT Hub's device-to-cloud
-- message limit (256 KB) plus room for the topic and properties.
M.DEFAULT_MAX_PACKET = 256 * 1024 + 4096

local byte, char, sub = string.byte, string.char, string.sub
local floor = math.floor

-- Packets whose fixed-header flags must be exactly these (2.2.2); PUBLISH carries its own.
local REQUIRED_FLAGS = { [M.CONNECT] = 0, [M.CONNACK] = 0, [M.PUBACK] = 0, [M.PUBREC] = 0, [M.PUBREL] = 2,
  [M.PUBCOMP] = 0, [M.SUBSCRIBE] = 2, [M.SUBACK] = 0, [M.UNSUBSCRIBE] = 2, [M.UNSUBACK] = 0,
  [M.PINGREQ] = 0, [M.PINGRESP] = 0, [M.DISCONNECT] = 0 }

---------------------------------------------------------------------------
-- Strings and topics

-- Well-formed UTF-8 with no U+0000 and no surrogates (1.5.3): what MQTT strings must be.
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    if c == 0 then return false end
    if c < 0x80 then
      i = i + 1
    else
      local len, min
      if c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
      elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
      elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
      else return false end
      if i + len - 1 > n then return false end
      local cp = c - (len == 2 and 0xC0 or len == 3 and 0xE0 or 0xF0)
      for k = i + 1, i + len - 1 do
        local cc = byte(s, k)
        if cc < 0x80 or cc > 0xBF then return false end
        cp = cp * 64 + (cc - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
      i = i + len
    end
  end
  return true
end
M.valid_utf8 = valid_utf8

--- A topic name a PUBLISH may carry: non-empty, no wildcards (4.7.1, 4.7.3).
function M.valid_topic_name(topic)
  return #topic > 0 and not topic:find("[#+]")
end

--- A topic filter a SUBSCRIBE may carry: '#' alone in the last level, '+' alone in a level.
function M.valid_topic_filter(filter)
  if #filter == 0 then return false end
  local levels, n = {}, 0
  for level in (filter .. "/"):gmatch("([^/]*)/") do
    n = n + 1
    levels[n] = level
  end
  for i, level in ipairs(levels) do
    if level:find("#", 1, true) and (level ~= "#" or i ~= n) then return false end
    if level:find("+", 1, true) and level ~= "+" then return false end
  end
  return true
end

--- Does topic (a name) match filter (4.7)? Topics starting with '$' match no filter that
-- starts with a wildcard (4.7.2).
function M.topic_matches(filter, topic)
  if byte(topic, 1) == 36 and (byte(filter, 1) == 35 or byte(filter, 1) == 43) then return false end
  local fpos, tpos = 1, 1
  while true do
    local fend = filter:find("/", fpos, true)
    local flevel = sub(filter, fpos, (fend or 0) - 1)
    if flevel == "#" then return true end
    local tend = topic:find("/", tpos, true)
    local tlevel = sub(topic, tpos, (tend or 0) - 1)
    if flevel ~= "+" and flevel ~= tlevel then return false end
    if not fend and not tend then return true end
    if not tend then
      -- "a/#" matches "a" too (4.7.1.2)
      return sub(filter, fend + 1) == "#"
    end
    if not fend then return false end
    fpos, tpos = fend + 1, tend + 1
  end
end

---------------------------------------------------------------------------
-- Reading

-- A cursor over one packet's variable header and payload.
local Cursor = {}
Cursor.__index = Cursor

local function cursor(data, first, last)
  return setmetatable({ data = data, pos = first, last = last }, Cursor)
end

function Cursor:left() return self.last - self.pos + 1 end

function Cursor:u8(what)
  if self.pos > self.last then return nil, what .. " is missing" end
  local v = byte(self.data, self.pos)
  self.pos = self.pos + 1
  return v
end

function Cursor:u16(what)
  if self.pos + 1 > self.last then return nil, what .. " is missing or cut short" end
  local a, b = byte(self.data, self.pos, self.pos + 1)
  self.pos = self.pos + 2
  return a * 256 + b
end

-- A length-prefixed byte string (1.5.3); utf8 = true also checks it is an MQTT string.
function Cursor:bytes(what, utf8)
  local n, err = self:u16(what .. "'s length")
  if not n then return nil, err end
  if self.pos + n - 1 > self.last then
    return nil, ("%s says %d bytes but only %d remain"):format(what, n, self:left())
  end
  local s = sub(self.data, self.pos, self.pos + n - 1)
  self.pos = self.pos + n
  if utf8 and not valid_utf8(s) then return nil, what .. " is not valid UTF-8 (or contains U+0000)" end
  return s
end

function Cursor:rest()
  local s = sub(self.data, self.pos, self.last)
  self.pos = self.last + 1
  return s
end

local decode = {}

-- 3.1: CONNECT
decode[M.CONNECT] = function(c)
  local p = { type = M.CONNECT }
  local name, err = c:bytes("the protocol name", true)
  if not name then return nil, err end
  local level
  level, err = c:u8("the protocol level")
  if not level then return nil, err end
  if name ~= "MQTT" or level ~= 4 then
    -- 3.1.2.2: answer CONNACK 1 and close; MQTT 3.1 ("MQIsdp", level 3) is not what the hub speaks
    p.protocol, p.level, p.unsupported = name, level, true
    return p
  end
  local flags
  flags, err = c:u8("the connect flags")
  if not flags then return nil, err end
  if flags % 2 == 1 then return nil, "the connect flags' reserved bit is set" end
  local will = floor(flags / 4) % 2 == 1
  local will_qos = floor(flags / 8) % 4
  local will_retain = floor(flags / 32) % 2 == 1
  local has_password = floor(flags / 64) % 2 == 1
  local has_username = floor(flags / 128) % 2 == 1
  p.cleanSession = floor(flags / 2) % 2 == 1
  if not will and (will_qos ~= 0 or will_retain) then return nil, "will QoS or retain set without a will" end
  if will_qos == 3 then return nil, "will QoS 3 is not a QoS" end
  if has_password and not has_username then return nil, "a password without a user name" end
  p.keepAlive, err = c:u16("the keep alive")
  if not p.keepAlive then return nil, err end
  p.clientId, err = c:bytes("the client id", true)
  if not p.clientId then return nil, err end
  if will then
    p.will = { qos = will_qos, retain = will_retain }
    p.will.topic, err = c:bytes("the will topic", true)
    if not p.will.topic then return nil, err end
    if not M.valid_topic_name(p.will.topic) then return nil, "the will topic is empty or has a wildcard" end
    p.will.payload, err = c:bytes("the will message")
    if not p.will.payload then return nil, err end
  end
  if has_username then
    p.username, err = c:bytes("the user name", true)
    if not p.username then return nil, err end
  end
  if has_password then
    p.password, err = c:bytes("the password")
    if not p.password then return nil, err end
  end
  if c:left() > 0 then return nil, ("%d bytes after the CONNECT payload"):format(c:left()) end
  return p
end

-- 3.3: PUBLISH
decode[M.PUBLISH] = function(c, flags)
  local p = { type = M.PUBLISH, dup = floor(flags / 8) == 1, qos = floor(flags / 2) % 4, retain = flags % 2 == 1 }
  if p.qos == 3 then return nil, "PUBLISH with QoS 3, which is not a QoS" end
  if p.qos == 0 and p.dup then return nil, "PUBLISH with DUP set at QoS 0" end
  local err
  p.topic, err = c:bytes("the topic name", true)
  if not p.topic then return nil, err end
  if not M.valid_topic_name(p.topic) then return nil, "the topic name is empty or has a wildcard" end
  if p.qos > 0 then
    p.id, err = c:u16("the packet id")
    if not p.id then return nil, err end
    if p.id == 0 then return nil, "packet id 0" end
  end
  p.payload = c:rest()
  return p
end

local function packet_id_only(kind)
  return function(c)
    local id, err = c:u16("the packet id")
    if not id then return nil, err end
    if c:left() > 0 then return nil, ("%d bytes after the packet id"):format(c:left()) end
    return { type = kind, id = id }
  end
end
decode[M.PUBACK] = packet_id_only(M.PUBACK)
decode[M.PUBREC] = packet_id_only(M.PUBREC)
decode[M.PUBREL] = packet_id_only(M.PUBREL)
decode[M.PUBCOMP] = packet_id_only(M.PUBCOMP)

-- 3.8: SUBSCRIBE; 3.10: UNSUBSCRIBE
local function filter_list(kind, with_qos)
  return function(c)
    local id, err = c:u16("the packet id")
    if not id then return nil, err end
    if id == 0 then return nil, "packet id 0" end
    local p = { type = kind, id = id, filters = {} }
    while c:left() > 0 do
      local filter
      filter, err = c:bytes("a topic filter", true)
      if not filter then return nil, err end
      if not M.valid_topic_filter(filter) then return nil, ("topic filter %q is not a valid filter"):format(filter) end
      local entry = { filter = filter }
      if with_qos then
        local q
        q, err = c:u8("the requested QoS")
        if not q then return nil, err end
        if q > 2 then return nil, ("requested QoS byte %d (reserved bits set, or QoS 3)"):format(q) end
        entry.qos = q
      end
      p.filters[#p.filters + 1] = entry
    end
    if #p.filters == 0 then return nil, M.NAMES[kind] .. " with no topic filter" end
    return p
  end
end
decode[M.SUBSCRIBE] = filter_list(M.SUBSCRIBE, true)
decode[M.UNSUBSCRIBE] = filter_list(M.UNSUBSCRIBE, false)

local function empty(kind)
  return function(c)
    if c:left() > 0 then return nil, M.NAMES[kind] .. " with a body" end
    return { type = kind }
  end
end
decode[M.PINGREQ] = empty(M.PINGREQ)
decode[M.DISCONNECT] = empty(M.DISCONNECT)
decode[M.PINGRESP] = empty(M.PINGRESP)

decode[M.CONNACK] = function(c)
  local flags, err = c:u8("the acknowledge flags")
  if not flags then return nil, err end
  local rc
  rc, err = c:u8("the return code")
  if not rc then return nil, err end
  if c:left() > 0 or flags > 1 then return nil, "malformed CONNACK" end
  return { type = M.CONNACK, sessionPresent = flags == 1, returnCode = rc }
end

decode[M.SUBACK] = function(c)
  local id, err = c:u16("the packet id")
  if not id then return nil, err end
  local p = { type = M.SUBACK, id = id, granted = {} }
  while c:left() > 0 do p.granted[#p.granted + 1] = c:u8("a return code") end
  return p
end
decode[M.UNSUBACK] = packet_id_only(M.UNSUBACK)

--- Decodes the one packet at the start of data[first..]. Returns packet, next position;
-- nil when more bytes are needed; or false, message for a malformed packet. maxPacket
-- bounds the whole packet (fixed header included).
function M.decode(data, first, maxPacket)
  first = first or 1
  maxPacket = maxPacket or M.DEFAULT_MAX_PACKET
  local n = #data
  if first > n then return nil end
  local b1 = byte(data, first)
  local kind, flags = floor(b1 / 16), b1 % 16
  if kind == 0 or kind == 15 then return false, ("packet type %d is reserved"):format(kind) end
  local required = REQUIRED_FLAGS[kind]
  if required and flags ~= required then
    return false, ("%s with fixed-header flags %d (must be %d)"):format(M.NAMES[kind], flags, required)
  end
  -- Remaining length (2.2.3): at most four bytes of 7 bits each.
  local length, multiplier, pos = 0, 1, first + 1
  for i = 1, 5 do
    if i == 5 then return false, "the remaining length runs past four bytes" end
    if pos > n then return nil end
    local d = byte(data, pos)
    pos = pos + 1
    length = length + (d % 128) * multiplier
    if d < 128 then break end
    multiplier = multiplier * 128
  end
  local total = pos - first + length
  if total > maxPacket then
    return false, ("%s of %d bytes is larger than the limit of %d"):format(M.NAMES[kind], total, maxPacket)
  end
  if pos + length - 1 > n then return nil end
  local packet, err = decode[kind](cursor(data, pos, pos + length - 1), flags)
  if not packet then return false, M.NAMES[kind] .. ": " .. err end
  return packet, pos + length
end

--- An incremental reader: r:feed(bytes) then r:next() until it returns nil (needs more
-- bytes) or false, message (malformed: close the connection; the reader stays failed).
local Reader = {}
Reader.__index = Reader

function M.reader(maxPacket)
  return setmetatable({ buffer = "", pos = 1, maxPacket = maxPacket or M.DEFAULT_MAX_PACKET }, Reader)
end

function Reader:feed(bytes)
  if self.failed then return end
  if self.pos > 1 then
    self.buffer = sub(self.buffer, self.pos)
    self.pos = 1
  end
  self.buffer = self.buffer .. bytes
end

function Reader:next()
  if self.failed then return false, self.failed end
  local packet, nextpos = M.decode(self.buffer, self.pos, self.maxPacket)
  if packet == false then
    self.failed = nextpos
    return false, nextpos
  end
  if not packet then return nil end
  self.pos = nextpos
  return packet
end

--- Bytes read but not yet part of a whole packet.
function Reader:pending() return #self.buffer - self.pos + 1 end

---------------------------------------------------------------------------
-- Writing

local function u16(v) return char(floor(v / 256), v % 256) end

local function str(s) return u16(#s) .. s end

local function remaining_length(n)
  local out = {}
  repeat
    local d = n % 128
    n = floor(n / 128)
    if n > 0 then d = d + 128 end
    out[#out + 1] = char(d)
  until n == 0
  return table.concat(out)
end

local function packet(first_byte, body)
  return char(first_byte) .. remaining_length(#body) .. body
end

function M.connack(returnCode, sessionPresent)
  return packet(0x20, char(sessionPresent and 1 or 0, returnCode))
end

--- p = { topic=, payload=, qos=0|1, id= (QoS 1), retain=, dup= }
function M.publish(p)
  local qos = p.qos or 0
  local first = 0x30 + qos * 2 + (p.retain and 1 or 0) + (p.dup and 8 or 0)
  return packet(first, str(p.topic) .. (qos > 0 and u16(p.id) or "") .. (p.payload or ""))
end

function M.puback(id) return packet(0x40, u16(id)) end

--- granted: QoS per filter, or 0x80 for a refused one.
function M.suback(id, granted)
  local codes = {}
  for i, q in ipairs(granted) do codes[i] = char(q) end
  return packet(0x90, u16(id) .. table.concat(codes))
end

function M.unsuback(id) return packet(0xB0, u16(id)) end

function M.pingresp() return "\208\0" end

-- What a client sends: for specs, benchmarks and the fuzz seeds.

--- c = { clientId=, username=, password=, keepAlive=, cleanSession=, will = { topic=, payload=, qos=, retain= } }
function M.connect(c)
  local flags = (c.cleanSession and 2 or 0) + (c.username and 128 or 0) + (c.password and 64 or 0)
  local payload = str(c.clientId or "")
  if c.will then
    flags = flags + 4 + (c.will.qos or 0) * 8 + (c.will.retain and 32 or 0)
    payload = payload .. str(c.will.topic) .. str(c.will.payload or "")
  end
  if c.username then payload = payload .. str(c.username) end
  if c.password then payload = payload .. str(c.password) end
  return packet(0x10, str("MQTT") .. char(4, flags) .. u16(c.keepAlive or 60) .. payload)
end

--- filters: { { filter=, qos= }, ... }
function M.subscribe(id, filters)
  local body = u16(id)
  for _, f in ipairs(filters) do body = body .. str(f.filter) .. char(f.qos or 0) end
  return packet(0x82, body)
end

function M.unsubscribe(id, filters)
  local body = u16(id)
  for _, f in ipairs(filters) do body = body .. str(f) end
  return packet(0xA2, body)
end

function M.pingreq() return "\192\0" end

function M.disconnect() return "\224\0" end

return M
