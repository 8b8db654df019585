-- Regressions for what fuzzing and the sanitizers found in the C core (issue 9), one test per
-- finding. Each input is the minimized one the fuzzer or a user produced; before the fixes
-- these read or wrote out of bounds, or converted an out-of-range double (undefined
-- behaviour), which `make asan` and `make valgrind` turn into failures.
local core = require "iothub.core"
local curl = require "iothub.curl"

local function contains(s, sub) return type(s) == "string" and s:find(sub, 1, true) ~= nil end

describe("fuzz findings", function()
  it("an unknown function in the SELECT list is an error naming it and its column", function()
    -- was: FUNCS[] read past its end when a syntax error followed the unknown function
    local q, msg, code = core.query_compile("SELECT p(d d)")
    assert.is_nil(q)
    assert.equal("InvalidArgument", code)
    assert.truthy(contains(msg, "column 8"), msg)
    assert.truthy(contains(msg, "unknown function 'p'"), msg)
    -- was: compiled, ignoring the function and selecting tags.x
    q, msg = core.query_compile("SELECT foo(tags.x) FROM devices")
    assert.is_nil(q)
    assert.truthy(contains(msg, "unknown function 'foo'"), msg)
    assert.truthy(contains(msg, "column 8"), msg)
    -- the known aggregates still compile
    assert.truthy(core.query_compile("SELECT MAX(tags.x) FROM devices"))
  end)

  it("a GROUP BY path of any length is described without overflowing the Lua stack", function()
    -- was: one stack slot per segment with no check (30 segments crashed Lua 5.4)
    for _, n in ipairs({ 30, 1000 }) do
      local path = string.rep("a.", n - 1) .. "a"
      local q = assert(core.query_compile("SELECT COUNT() FROM devices GROUP BY " .. path))
      assert.equal(path, q:info().groupBy[1])
    end
  end)

  it("an integer range check of a huge or NaN number reports it instead of casting it", function()
    for _, v in ipairs({ 1e19, -1e19, 1e300, 0 / 0, math.huge }) do
      local ok, msg, code = core.check_integer_range("maxExecutionTimeInSeconds", v, 1, 10)
      assert.is_nil(ok)
      assert.equal("InvalidArgument", code)
      assert.truthy(contains(msg, "whole number of seconds between 1 and 10"), msg)
    end
    assert.is_true(core.check_integer_range("n", 10, 1, 10))
  end)

  it("retry decisions take any number as a status", function()
    for _, status in ipairs({ 1e10, -1e10, 0 / 0, math.huge, 429.5 }) do
      local delay, why = core.retry_decision{ status = status, attempt = 1 }
      assert.is_nil(delay)
      assert.equal("not-retryable", why)
      assert.is_false(core.retryable(status))
    end
    assert.truthy(core.retry_decision{ status = 429, attempt = 1 })
    assert.is_true(core.retryable(503))
  end)

  it("a response with no header bytes parses to an empty header table", function()
    -- was: pointer arithmetic on NULL in push_headers
    assert.same({}, curl.parse_headers(""))
    local h = curl.parse_headers("HTTP/1.1 200 OK\r\nContent-Type: a\r\nX-A: 1\r\n\tfolded\r\nx-a: 2\r\nnocolon\r\n\r\n")
    assert.same({ ["content-type"] = "a", ["x-a"] = "1 folded, 2" }, h)
  end)
end)

-- Found by the fuzz targets in fuzz/ (make fuzz); the minimized inputs, one test per finding.
describe("fuzz findings (fuzz/ targets)", function()
  local http1 = require "iothub.http1"

  -- A table whose every field read runs a full collection and hands back a fresh copy of the
  -- value (strings over 40 bytes are not interned, so the copy is a new object): what C reads
  -- through lua_getfield must stay on the Lua stack while it is used.
  local function collecting(t)
    return setmetatable({}, { __index = function(_, k)
      collectgarbage()
      local v = t[k]
      if type(v) == "string" then v = (v .. "#"):sub(1, -2) end
      return v
    end })
  end

  it("monitor_decision keeps a number status alive while it compares it (policy target)", function()
    -- was: use after free in terminal(): the status string converted from 5 was popped, then
    -- collected by the next field read
    local decision, delay = core.monitor_decision(collecting{ status = 5, now = 0, interval = 5 })
    assert.equal("sleep", decision)
    assert.equal(5, delay)
    assert.equal("done", (core.monitor_decision(collecting{ status = "completed" })))
  end)

  it("build_request keeps the endpoint alive while it copies it (request target)", function()
    -- was: use after free: the endpoint string was popped before the URL was built from it
    local host = "https://" .. string.rep("long-hub-name-", 4) .. "x.azure-devices.net"
    local url = core.build_request(collecting{ endpoint = host .. "/", path = "/jobs/v2/j1",
      query = { { "api-version", "2021-04-12" } } })
    assert.equal(host .. "/jobs/v2/j1?api-version=2021-04-12", url)
    -- the minimized input: a number as the endpoint, converted to a string no table holds
    assert.equal("7/x", (core.build_request(collecting{ endpoint = 7, path = { "x" } })))
  end)

  it("an empty Content-Length is a bad response, not a Lua error (http1 target)", function()
    -- was: "attempt to compare number with nil" raised out of read_response
    for _, value in ipairs({ "", ",", " , " }) do
      local data = "HTTP/1.1 200 OK\nContent-Length: " .. value .. "\n\nhello"
      local pos = 1
      local sock = { receive = function(_, pattern)
        if pattern == "*l" then
          local nl = data:find("\n", pos, true)
          if not nl then return nil, "closed", data:sub(pos) end
          local line = data:sub(pos, nl - 1)
          pos = nl + 1
          return line
        end
        return nil, "closed", ""
      end }
      local res, err, started = http1.read_response(sock, "GET")
      assert.is_nil(res)
      assert.same({ "network", "BadResponse", true }, { err.kind, err.code, started })
      assert.truthy(contains(err.message, "Content-Length"), err.message)
    end
  end)

  it("parse_url refuses a host with control characters or spaces (http1 target)", function()
    -- was: "https://\1\r" parsed, and request_head wrote "Host: \1\r\r\n": a CR inside the head
    -- (with a line feed, a host such as "h\r\nX-Evil" would have added a header line)
    for _, url in ipairs({ "https://\1\r", "https://h\r\nX-Evil/path", "http://a b:80/x", "http://h\0/" }) do
      local u, msg = http1.parse_url(url)
      assert.is_nil(u, url)
      assert.truthy(contains(msg, "spaces or control characters"), msg)
    end
    assert.equal("myhub.azure-devices.net", http1.parse_url("https://MyHub.azure-devices.net/x").host)
  end)

  it("a key glued onto SharedAccessKeyName by a missing ';' is not echoed (sas target)", function()
    -- was: "connection string has SharedAccessKeyName 'iothubowner SharedAccessKey=<key>' but no
    -- SharedAccessKey": the whole value, key included, in the message
    local secret = "c2VjcmV0c2VjcmV0c2VjcmV0"
    for _, glue in ipairs({ " ", ",", "&sig=", "" }) do
      local cs = "HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner" .. glue .. "SharedAccessKey=" .. secret
      local ok, msg, code = core.parse_connection_string(cs)
      assert.is_nil(ok)
      assert.equal("InvalidConnectionString", code)
      assert.is_nil(msg:find(secret, 1, true), msg)
      assert.truthy(contains(msg, "is a ';' missing?"), msg)
    end
    -- a name that looks like one is still shown
    local _, msg = core.parse_connection_string("HostName=h.azure-devices.net;SharedAccessKeyName=iothubowner")
    assert.truthy(contains(msg, "SharedAccessKeyName 'iothubowner' but no SharedAccessKey"), msg)
  end)

  it("format_time(parse_time(s)) keeps the milliseconds of times after 2106 (time target)", function()
    -- was: "6940-02-17T01:57:24.517Z" formatted as .516: past 2106 a double lies more than the
    -- microsecond the formatter rounded to below the millisecond it stands for
    for _, s in ipairs({ "6940-02-17T01:57:24.517Z", "2107-01-01T00:00:00.001Z", "2300-05-05T05:05:05.555Z",
      "9999-12-31T23:59:59.999Z", "0001-03-04T05:06:07.999Z", "1969-12-31T23:59:59.999Z" }) do
      assert.equal(s, core.format_time(core.parse_time(s)))
    end
    -- and it still truncates what is not a whole millisecond
    assert.equal("1970-01-01T00:00:01.999Z", core.format_time(1.9996))
    assert.equal("2023-01-01T00:00:00.999Z", core.format_time(1672531200.9999))
  end)
end)
