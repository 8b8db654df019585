--- A small HTTP/1.1 client core for socket-based transports (the nginx cosocket transport):
-- URL parsing, request writing, response reading (status line, headers, Content-Length,
-- chunked and read-until-close bodies) and the keep-alive decision.
--
-- Pure Lua and socket-agnostic: `read_response` needs only an object with
-- `sock:receive("*l")` (a line without its CR LF) and `sock:receive(n)` (exactly n bytes),
-- each returning data or nil, err, partial — the contract of nginx cosockets and LuaSocket —
-- so it is unit tested with a fake socket outside nginx.
--
-- Errors are { kind = "network"|"timeout"|"protocol", code =, message = } like the curl
-- transport's ("protocol": the answer was cut short, TruncatedResponse).
-- @module iothub.http1
local M = {}

M.MAX_HEADER_BYTES = 1024 * 1024       -- same cap as the curl transport
M.DEFAULT_MAX_BODY = 64 * 1024 * 1024  -- same default as the curl transport
local READ_CHUNK = 64 * 1024           -- read-until-close bodies arrive in pieces of this size

local DEFAULT_PORTS = { http = 80, https = 443 }

--- Splits "http(s)://host[:port][/path][?query]" into its parts.
-- Returns { scheme, tls, host, port, authority, target } or nil, message.
-- `host` has no brackets for IPv6 literals; `authority` is what goes into the Host header.
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "URL must be a string, got " .. type(url) end
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  scheme = scheme and scheme:lower()
  if not DEFAULT_PORTS[scheme] then
    return nil, "URL '" .. url:sub(1, 80) .. "' must start with http:// or https://"
  end
  rest = rest:gsub("#.*$", "")
  local authority, target = rest:match("^([^/?]*)(.*)$")
  if authority:find("@", 1, true) then
    return nil, "URL must not carry user information (user@host); credentials go in headers"
  end
  local host, port
  if authority:sub(1, 1) == "[" then
    host, port = authority:match("^%[([%x:.]+)%]:?(%d*)$")
  else
    host, port = authority:match("^([^:]+):?(%d*)$")
  end
  if not host or host == "" then return nil, "URL '" .. url:sub(1, 80) .. "' has no usable host" end
  if host:find("[%s%c]") then return nil, "URL host must not contain spaces or control characters" end
  if port == "" then
    port = DEFAULT_PORTS[scheme]
  else
    port = tonumber(port)
    if port < 1 or port > 65535 then return nil, "URL port must be within 1..65535" end
  end
  if target == "" then target = "/" elseif target:sub(1, 1) == "?" then target = "/" .. target end
  if target:find("[%s%c]") then return nil, "URL path must not contain spaces or control characters" end
  local host_header = host:find(":", 1, true) and ("[" .. host .. "]") or host
  if port ~= DEFAULT_PORTS[scheme] then host_header = host_header .. ":" .. port end
  return { scheme = scheme, tls = scheme == "https", host = host:lower(), port = port,
    authority = host_header, target = target }
end

-- Framing headers are ours to write: a caller's copy could contradict the body we send.
local RESERVED = { ["content-length"] = true, ["transfer-encoding"] = true, connection = true }
local BODY_METHODS = { POST = true, PUT = true, PATCH = true }

--- Builds the request head: request line, Host, the caller's header lines, Content-Length.
-- Raises on misuse (a header line that is not "Name: value", has CR/LF/NUL, or sets framing).
-- @param method e.g. "GET"
-- @param u a parse_url result
-- @param headers array of "Name: value" lines (or nil)
-- @param body string or nil
-- @return the head as a string (ending with the blank line); the body is sent after it
function M.request_head(method, u, headers, body)
  local out = { method .. " " .. u.target .. " HTTP/1.1" }
  local has_host = false
  for i, line in ipairs(headers or {}) do
    if type(line) ~= "string" then
      error(("request header %d must be a string, got %s"):format(i, type(line)), 2)
    end
    if line:find("[\r\n%z]") then
      error(("request header %d contains CR, LF or NUL; refusing to send it"):format(i), 2)
    end
    local name = line:match("^([!#$%%&'*+%-.^_`|~%w]+):")
    if not name then error(("request header %d is not a 'Name: value' line"):format(i), 2) end
    name = name:lower()
    if RESERVED[name] then
      error(("request header %d sets %s, which the transport derives from the body"):format(i, name), 2)
    end
    if name == "host" then has_host = true end
    out[#out + 1] = line
  end
  if not has_host then table.insert(out, 2, "Host: " .. u.authority) end
  if body ~= nil then
    out[#out + 1] = "Content-Length: " .. #body
  elseif BODY_METHODS[method] then
    out[#out + 1] = "Content-Length: 0" -- some servers answer 411 without it
  end
  out[#out + 1] = ""
  out[#out + 1] = ""
  return table.concat(out, "\r\n")
end

local function fail(kind, code, message)
  return nil, { kind = kind, code = code, message = message }
end

-- Maps a socket error ("timeout", "closed", ...) to the transport error shape.
local function socket_error(where, err, doing)
  if err == "timeout" then
    return fail("timeout", "Timeout", where .. ": timed out " .. doing)
  elseif err == "closed" then
    return fail("network", "ConnectionClosed", where .. ": connection closed by the server " .. doing)
  end
  return fail("network", "ReceiveFailed", where .. ": " .. tostring(err) .. " " .. doing)
end
M.socket_error = socket_error

local function bad_response(where, what)
  return fail("network", "BadResponse", where .. ": invalid HTTP response: " .. what)
end

-- Does a comma-separated header value contain token (case-insensitively)?
local function has_token(value, token)
  if not value then return false end
  for item in value:gmatch("[^,]+") do
    if item:match("^%s*(.-)%s*$"):lower() == token then return true end
  end
  return false
end
M.has_token = has_token

-- Reads header lines up to the blank line into a lower-cased name -> value table
-- (repeats joined with ", ", obsolete folded lines appended). Returns headers | nil, err.
local function read_headers(sock, where, budget)
  local headers, last = {}, nil
  while true do
    local line, err = sock:receive("*l")
    if not line then return socket_error(where, err, "reading the response headers") end
    if line == "" then return headers, budget end
    budget = budget - #line - 2
    if budget < 0 then
      return fail("network", "ResponseTooLarge", where .. ": response headers exceed " .. M.MAX_HEADER_BYTES .. " bytes")
    end
    local first = line:sub(1, 1)
    if first == " " or first == "\t" then
      if not last then return bad_response(where, "a header continuation line comes first") end
      headers[last] = headers[last] .. " " .. line:match("^%s*(.-)%s*$")
    else
      local name, value = line:match("^([^:%s]+):%s*(.-)%s*$")
      if not name then return bad_response(where, "header line without a name: '" .. line:sub(1, 60) .. "'") end
      name = name:lower()
      headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
      last = name
    end
  end
end

-- Reads exactly n bytes, treating a short read as an error.
local function read_exact(sock, n, where, doing)
  if n == 0 then return "" end
  local data, err = sock:receive(n)
  if not data then return socket_error(where, err, doing) end
  return data
end

local function too_large(where, max_body)
  return fail("network", "ResponseTooLarge", where .. ": response body exceeds maxBody (" .. max_body .. " bytes)")
end

local function read_chunked(sock, where, max_body)
  local parts, total = {}, 0
  while true do
    local line, err = sock:receive("*l")
    if not line then return socket_error(where, err, "reading a chunk size") end
    local hex = line:match("^%s*(%x+)%s*;?") -- chunk extensions after ';' are ignored
    if not hex or #hex > 12 then return bad_response(where, "bad chunk size line '" .. line:sub(1, 40) .. "'") end
    local size = tonumber(hex, 16)
    if size == 0 then break end
    total = total + size
    if total > max_body then return too_large(where, max_body) end
    local data, rerr = read_exact(sock, size, where, "reading a chunk")
    if not data then return nil, rerr end
    parts[#parts + 1] = data
    local crlf, cerr = sock:receive("*l")
    if not crlf then return socket_error(where, cerr, "reading a chunk") end
    if crlf ~= "" then return bad_response(where, "chunk data longer than its declared size") end
  end
  -- Trailer fields, up to the blank line; the hub sends none and we keep none.
  while true do
    local line, err = sock:receive("*l")
    if not line then return socket_error(where, err, "reading the chunked trailer") end
    if line == "" then break end
  end
  return table.concat(parts)
end

local function read_until_close(sock, where, max_body)
  local parts, total = {}, 0
  while true do
    local data, err, partial = sock:receive(READ_CHUNK)
    data = data or partial
    if data and data ~= "" then
      total = total + #data
      if total > max_body then return too_large(where, max_body) end
      parts[#parts + 1] = data
    end
    if err == "closed" then return table.concat(parts) end
    if err then return socket_error(where, err, "reading the response body") end
  end
end

--- Reads one response to a request made with `method`.
-- @param sock an object with receive("*l") and receive(n)
-- @param method the request's method (a HEAD response has no body)
-- @param[opt] opts { where = "GET http://host:port" (prefix for messages), maxBody = bytes }
-- @return res = { status, headers, body }, keepalive (may the connection be reused?)
-- @return or nil, err, started (true once any byte of the response arrived)
function M.read_response(sock, method, opts)
  opts = opts or {}
  local where = opts.where or method
  local max_body = opts.maxBody or M.DEFAULT_MAX_BODY
  local status, major, minor, headers
  local budget = M.MAX_HEADER_BYTES
  local started = false
  repeat
    local line, err = sock:receive("*l")
    if not line then
      local _, e = socket_error(where, err, "waiting for the response")
      return nil, e, started
    end
    started = true
    major, minor, status = line:match("^HTTP/(%d)%.(%d) (%d%d%d)")
    if not status then
      local _, e = bad_response(where, "status line '" .. line:sub(1, 60) .. "'")
      return nil, e, true
    end
    status = tonumber(status)
    local left_or_err
    headers, left_or_err = read_headers(sock, where, budget - #line)
    if not headers then return nil, left_or_err, true end
    budget = left_or_err
    if status == 101 then
      local _, e = bad_response(where, "101 Switching Protocols was not asked for")
      return nil, e, true
    end
  until status >= 200 -- 100 Continue, 103 Early Hints: the real answer follows

  local keepalive
  if major == "1" and minor == "0" then
    keepalive = has_token(headers["connection"], "keep-alive")
  else
    keepalive = not has_token(headers["connection"], "close")
  end

  local body, err
  local te, cl = headers["transfer-encoding"], headers["content-length"]
  if method == "HEAD" or status == 204 or status == 304 then
    body = ""
  elseif te then
    -- Only a final "chunked" frames the body; anything else runs to the end of the connection.
    local last = te:lower():match("([^,%s]+)%s*$")
    if last == "chunked" then
      body, err = read_chunked(sock, where, max_body)
    else
      keepalive = false
      body, err = read_until_close(sock, where, max_body)
    end
  elseif cl then
    -- Repeated identical values ("5, 5") are allowed; differing ones mean the framing is unknown.
    -- An empty value (or only commas) gives no length at all.
    local n, bad = nil, false
    for item in cl:gmatch("[^,]+") do
      local v = item:match("^%s*(%d+)%s*$")
      if not v or (n and tonumber(v) ~= n) then bad = true break end
      n = tonumber(v)
    end
    if bad or not n then
      local _, e = bad_response(where, "Content-Length '" .. cl:sub(1, 40) .. "'")
      return nil, e, true
    end
    if n > max_body then
      local _, e = too_large(where, max_body)
      return nil, e, true
    end
    body, err = read_exact(sock, n, where, "reading the response body")
  else
    keepalive = false
    body, err = read_until_close(sock, where, max_body)
  end
  if not body then
    if err.code == "ConnectionClosed" then
      -- The answer began and was cut short: a broken answer, not a lost connection.
      err = { kind = "protocol", code = "TruncatedResponse",
        message = err.message .. " (HTTP " .. status .. "; the body ended before its framing said)" }
    end
    return nil, err, true
  end
  return { status = status, headers = headers, body = body }, keepalive
end

return M
