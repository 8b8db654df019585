--- The byte pipes that carry a device's MQTT session inside nginx: WebSocket frames on the
-- HTTPS port (`/$iothub/websocket`, subprotocol `mqtt`) and raw bytes from the TLS port (the
-- stream module terminates TLS and hands the connection to an internal HTTP location, see
-- mqtt_pipe.js). Both only move bytes: every MQTT rule is in emulator.mqtt_session.
--
-- Other requests (a REST method call, a twin job) reach a connected device through its
-- session's send, which queues bytes and wakes this request's writer thread: in nginx only
-- the request that owns a socket may write to it.
local Session = require "emulator.mqtt_session"

local M = {}

--- Seconds between keep-alive checks while a connection is quiet.
M.TICK = 1
--- A connection that sends no CONNECT within this many seconds is closed.
M.CONNECT_TIMEOUT = 10

-- Runs one session over recv() -> bytes | nil, "timeout" | nil, err and write(bytes) -> ok, err,
-- until it closes. finish(reason) runs once at the end (send a close frame, ...).
local function pump(hub, transport, recv, write, finish, maxPacket)
  local semaphore = require "ngx.semaphore"
  local wake = semaphore.new()
  local queue, closing = {}, nil
  local session = Session.new({ hub = hub, now = ngx.now, transport = transport, maxPacket = maxPacket,
    send = function(bytes)
      queue[#queue + 1] = bytes
      wake:post(1)
    end,
    close = function(reason)
      closing = reason
      wake:post(1)
    end })

  local writer = ngx.thread.spawn(function()
    while true do
      wake:wait(M.TICK * 5)
      while #queue > 0 do
        local out = table.concat(queue)
        queue = {}
        local ok, err = write(out)
        if not ok then
          session:close("write failed: " .. tostring(err))
          break
        end
      end
      if closing then return end
    end
  end)

  while session:is_open() do
    local data, err = recv()
    if data then
      if #data > 0 then session:receive(data) end
    elseif err == "timeout" then
      session:tick(ngx.now(), M.CONNECT_TIMEOUT)
    else
      session:close("connection lost: " .. tostring(err))
    end
  end
  ngx.thread.wait(writer)
  finish(session.closeReason)
  return session
end

--- content_by_lua handler of /$iothub/websocket.
function M.serve_websocket(hub, maxPacket)
  local offered = ngx.req.get_headers()["sec-websocket-protocol"]
  if type(offered) == "table" then offered = table.concat(offered, ",") end
  local wants_mqtt = false
  for p in (offered or ""):gmatch("[^,%s]+") do if p == "mqtt" then wants_mqtt = true end end
  if not wants_mqtt then
    ngx.status = 400
    ngx.say("MQTT over WebSockets needs the subprotocol 'mqtt' (Sec-WebSocket-Protocol: mqtt)")
    return ngx.exit(400)
  end
  -- nginx.websocket.server echoes the first offered subprotocol: offer exactly "mqtt".
  ngx.req.set_header("Sec-WebSocket-Protocol", "mqtt")
  local server = require "nginx.websocket.server"
  local ws, err = server:new({ timeout = M.TICK * 1000, max_payload_len = maxPacket })
  if not ws then
    hub.log("[mqtt] websocket handshake failed: " .. tostring(err))
    return ngx.exit(400)
  end
  local function recv()
    local data, typ, rerr = ws:recv_frame()
    if not data then
      if rerr and rerr:find("timeout", 1, true) then return nil, "timeout" end
      return nil, rerr or "closed"
    end
    if typ == "binary" or typ == "continuation" then return data end
    if typ == "ping" then ws:send_pong(data) return "" end
    if typ == "pong" then return "" end
    if typ == "close" then return nil, "closed by the device" end
    return nil, "a " .. tostring(typ) .. " frame (MQTT travels in binary frames)"
  end
  local function write(bytes) return ws:send_binary(bytes) end
  pump(hub, "websocket", recv, write, function() ws:send_close() end, maxPacket)
end

--- content_by_lua handler of the internal location the TLS port's connections arrive at,
-- after the upgrade request mqtt_pipe.js puts in front of the device's bytes.
function M.serve_raw(hub, maxPacket)
  local sock, err = ngx.req.socket(true)
  if not sock then
    hub.log("[mqtt] raw socket: " .. tostring(err))
    return ngx.exit(500)
  end
  if not sock:send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: iothub-mqtt\r\nConnection: Upgrade\r\n\r\n") then
    return
  end
  sock:settimeout(M.TICK * 1000)
  local function recv()
    local data, rerr = sock:receiveany(65536)
    if data then return data end
    return nil, rerr
  end
  local function write(bytes) return sock:send(bytes) end
  pump(hub, "tls", recv, write, function() end, maxPacket)
end

return M
