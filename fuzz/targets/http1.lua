-- The cosocket transport's HTTP/1.1 response parser (lua/iothub/http1.lua, pure Lua), fed
-- through a fake socket that serves the input the way an nginx cosocket does: receive("*l")
-- returns a line without its LF and with every CR dropped, receive(n) exactly n bytes, and at
-- the end of the data nil, "closed" and the partial data. The first byte picks the request
-- method, a body limit and whether the socket times out part way. read_response must never
-- raise: it returns a response or nil and an error table. The header budget is lowered so
-- that inputs reach it.
-- libfuzzer: -dict=fuzz/dict/http.dict
local http1 = require "iothub.http1"
local fz = require "fuzzlib"
local check = fz.check

-- Small enough for a fuzz input to reach: the header budget is read at each call.
http1.MAX_HEADER_BYTES = 600

local METHODS = { "GET", "PUT", "POST", "DELETE", "HEAD", "PATCH", "GET", "GET" }
local KINDS = { network = true, timeout = true, protocol = true }

local function socket(data, timeout_at)
  local pos = 1
  local sock = {}
  function sock.receive(_, pattern)
    if timeout_at and pos >= timeout_at then return nil, "timeout", "" end
    if pattern == "*l" then
      local nl = data:find("\n", pos, true)
      if not nl then
        local partial = data:sub(pos):gsub("\r", "")
        pos = #data + 1
        return nil, "closed", partial
      end
      local line = data:sub(pos, nl - 1):gsub("\r", "")
      pos = nl + 1
      return line
    end
    check(math.type(pattern) == "integer" and pattern > 0, "receive(%s): not a line or a positive count", pattern)
    local chunk = data:sub(pos, pos + pattern - 1)
    pos = pos + #chunk
    if #chunk < pattern then return nil, "closed", chunk end
    return chunk
  end
  return sock
end

return {
  cover = { "lua/iothub/http1.lua" },
  run = function(data)
    local ctl = data:byte(1) or 0
    local stream = data:sub(2)
    local method = METHODS[ctl % 8 + 1]
    local max_body = (ctl >> 3) % 2 == 1 and 16 or nil
    local timeout_at = (ctl >> 4) % 2 == 1 and (#stream // 2 + 1) or nil
    local res, err, started = http1.read_response(socket(stream, timeout_at), method, { maxBody = max_body })
    if res then
      check(math.type(res.status) == "integer" and res.status >= 200 and res.status <= 999, "status %s", res.status)
      check(type(res.headers) == "table" and type(res.body) == "string", "response lacks headers or body")
      check(#res.body <= (max_body or http1.DEFAULT_MAX_BODY), "a body of %d bytes passed maxBody", #res.body)
      check(type(err) == "boolean", "keepalive is a %s", type(err))
      if method == "HEAD" then check(res.body == "", "a HEAD response has a body") end
    else
      check(type(err) == "table" and KINDS[err.kind] and type(err.code) == "string" and type(err.message) == "string",
        "read_response failed without a proper error table")
      check(type(started) == "boolean", "started is a %s", type(started))
    end
    -- the first line as a URL: parse_url returns a table or nil, message, never raises
    local u, msg = http1.parse_url(stream:match("^[^\n]*"))
    check(u ~= nil or type(msg) == "string", "parse_url failed without a message")
    -- the next lines as request headers: request_head refuses (raises) or writes them intact
    if u then
      local lines = {}
      for line in stream:gmatch("\n([^\n]*)") do
        if #lines == 3 then break end
        lines[#lines + 1] = line
      end
      local ok, head = pcall(http1.request_head, method, u, lines, ctl % 3 == 0 and stream or nil)
      if ok then
        check(head:sub(-4) == "\r\n\r\n", "the request head does not end with a blank line")
        check(not head:sub(1, -5):gsub("\r\n", ""):find("[\r\n]"), "a bare CR or LF in the request head")
        for _, line in ipairs(lines) do check(head:find(line, 1, true), "a header line was changed: %s", line) end
      else
        check(type(head) == "string" and head:find("request header", 1, true), "request_head raised: %s", head)
      end
    end
  end,
}
