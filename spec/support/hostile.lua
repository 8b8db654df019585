-- Hostile HTTP/1.1 clients for specs and benches: raw loopback sockets (cqueues, under Lua 5.4
-- and LuaJIT alike) that send whatever bytes they are given, as fast or as slowly as the
-- caller likes, and read back what the server answers, however the connection ends.
--
--   local hostile = require "support.hostile"
--   local text = hostile.request("GET", "/jobs/v2/x?api-version=2021-04-12", { "X-Big: " .. big })
--   local responses, how = hostile.exchange(port, text)     -- how: "eof", "reset" or "timeout"
--   hostile.exchange(port, text, { responses = 1 })          -- or "answered": stop at the first
--   local c = hostile.connect(port); c:send("G"); c:poll()   -- what has arrived, and closed or not
--   c:read_response()                                        -- the next complete response
--   hostile.raise_open_files(1200)                           -- room for that many sockets
local core = require "iothub.core"
local cqueues = require "cqueues"
local socket = require "cqueues.socket"
local errno = require "cqueues.errno"
local shell = require "support.shell"

local M = {}

-- A request as bytes: request line, Host, the given header lines ("Name: value"), then
-- Content-Length and the body when there is one (unless a header already frames it).
function M.request(method, target, headers, body)
  local lines = { method .. " " .. target .. " HTTP/1.1", "Host: localhost" }
  local framed = false
  for _, h in ipairs(headers or {}) do
    lines[#lines + 1] = h
    local name = h:match("^([^:]+):"):lower()
    if name == "content-length" or name == "transfer-encoding" then framed = true end
  end
  if body and not framed then lines[#lines + 1] = "Content-Length: " .. #body end
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
end

-- The responses in raw bytes read from a connection, in order: { status, reason, headers (by
-- lower-case name), body }. A response cut short is left out.
function M.parse(raw)
  local out, pos = {}, 1
  while true do
    local head_end = raw:find("\r\n\r\n", pos, true)
    if not head_end then break end
    local head = raw:sub(pos, head_end - 1)
    local status, reason = head:match("^HTTP/1%.%d (%d%d%d) ?([^\r\n]*)")
    if not status then break end
    local headers = {}
    for name, value in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do
      name = name:lower()
      if headers[name] then headers[name] = headers[name] .. ", " .. value else headers[name] = value end
    end
    local length = tonumber(headers["content-length"] or "0")
    local body_start = head_end + 4
    if not length or #raw < body_start + length - 1 then break end
    out[#out + 1] = { status = tonumber(status), reason = reason, headers = headers,
      body = raw:sub(body_start, body_start + length - 1) }
    pos = body_start + length
  end
  return out
end

-- The error inside envelope B (Message holds JSON, ExceptionMessage is empty), or nil and why.
function M.inner_error(response)
  local outer = response and core.json_decode(response.body)
  if type(outer) ~= "table" or type(outer.Message) ~= "string" or outer.ExceptionMessage ~= "" then
    return nil, "not envelope B: " .. tostring(response and response.body):sub(1, 200)
  end
  return core.json_decode(outer.Message)
end

local Conn = {}
Conn.__index = Conn

-- cqueues reports a read past the end as EPIPE, a write to a closed connection as EPIPE or
-- ECONNRESET.
local function why_text(why, reading)
  if why == errno.ECONNRESET then return "reset" end
  if why == errno.EPIPE then return reading and "eof" or "closed" end
  if why == errno.ETIMEDOUT then return "timeout" end
  return type(why) == "number" and errno.strerror(why) or tostring(why)
end

-- A connection to 127.0.0.1:port; raises when even the connect fails.
function M.connect(port)
  local s = assert(socket.connect({ host = "127.0.0.1", port = port, nodelay = true }))
  s:setmode("bn", "bn")
  s:onerror(function(_, _, why) return why end) -- errors are returned, never raised
  local c = setmetatable({ sock = s, received = {}, closed = nil }, Conn)
  local ok, why = s:connect(10)
  if not ok then
    s:close()
    error("cannot connect to 127.0.0.1:" .. port .. ": " .. why_text(why), 2)
  end
  return c
end

-- Sends bytes at once; true, or nil and "closed" / "reset" when the server has closed the
-- connection.
function Conn:send(data)
  local ok, why = self.sock:write(data)
  if ok then ok, why = self.sock:flush() end
  if not ok then
    self.sock:clearerr()
    return nil, why_text(why)
  end
  return true
end

-- Reads whatever has arrived, waiting up to `wait` seconds (default 0) when nothing has;
-- returns everything received so far and how the connection ended ("eof" / "reset"), or
-- nil while it is open.
function Conn:poll(wait)
  if self.closed then return table.concat(self.received), self.closed end
  local deadline = core.monotime() + (wait or 0)
  local got = false
  repeat
    local data, why = self.sock:recv(-65536, "bn")
    if data then
      self.received[#self.received + 1] = data
      got = true
    elseif why == nil or why == errno.EPIPE then
      self.closed = "eof"
    elseif why == errno.EAGAIN then
      local left = deadline - core.monotime()
      if got or left <= 0 then break end
      cqueues.poll(self.sock, left)
    else
      self.closed = why_text(why, true)
    end
  until self.closed
  return table.concat(self.received), self.closed
end

-- Waits up to `timeout` seconds (default 30) for the server to close the connection;
-- returns the bytes received and "eof", "reset" or "timeout".
function Conn:read_until_closed(timeout)
  local raw, how = self:poll(timeout or 30)
  return raw, how or "timeout"
end

-- Waits up to `timeout` seconds (default 30) for the next complete response on this
-- connection; returns it, or nil and "eof" / "reset" / "timeout".
function Conn:read_response(timeout)
  local deadline = core.monotime() + (timeout or 30)
  repeat
    local raw, closed = self:poll(math.min(0.05, math.max(0, deadline - core.monotime())))
    local parsed = M.parse(raw)
    if #parsed > (self.answered or 0) then
      self.answered = self.answered and self.answered + 1 or 1
      return parsed[self.answered]
    end
    if closed then return nil, closed end
  until core.monotime() >= deadline
  return nil, "timeout"
end

function Conn:close()
  self.sock:close()
end

-- Sends text on a new connection and reads until the server closes it, or `opts.responses`
-- complete responses have arrived (then how is "answered"), or opts.timeout seconds (default
-- 30) pass; returns the parsed responses, how the connection ended, and the raw bytes.
function M.exchange(port, text, opts)
  opts = opts or {}
  local c = M.connect(port)
  c:send(text)
  local deadline = core.monotime() + (opts.timeout or 30)
  local raw, how
  repeat
    raw, how = c:poll(math.min(0.05, math.max(0, deadline - core.monotime())))
    if not how and opts.responses and #M.parse(raw) >= opts.responses then how = "answered" end
  until how or core.monotime() >= deadline
  c:close()
  return M.parse(raw), how or "timeout", raw
end

-- Raises this process's soft limit on open files to at least n (up to the hard limit), so a
-- spec can hold n sockets; returns the new limit.
function M.raise_open_files(n)
  local _, out = shell.run("ulimit -Sn; ulimit -Hn")
  local soft, hard = out:match("(%S+)%s+(%S+)")
  soft = tonumber(soft) or math.huge
  hard = hard == "unlimited" and math.huge or tonumber(hard) or soft
  if soft >= n then return soft end
  local want = math.min(n, hard)
  -- the shell io.popen starts is this process's child, so $PPID is this process
  local ok, err = shell.run("prlimit --pid $PPID --nofile=" .. want .. ":")
  assert(ok, "cannot raise the open-files limit to " .. want .. " (prlimit from util-linux): " .. err)
  return want
end

return M
