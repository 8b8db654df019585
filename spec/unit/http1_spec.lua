-- iothub.http1 against a fake socket (the cosocket receive contract), the cosocket
-- transport's phase and TLS decisions against a fake `ngx`, and transport selection outside
-- nginx. The real-nginx side is spec/openresty/run.sh.
local http1 = require "iothub.http1"

-- A socket that serves `data` through receive("*l") / receive(n) like an nginx cosocket:
-- lines lose their CR LF; a short read returns nil, "closed", partial. `cuts` (byte offsets)
-- make the data arrive in separate pieces, to prove nothing assumes one read per line.
local function fake_socket(data, opts)
  opts = opts or {}
  local pos = 1
  local sock = { reads = 0 }
  function sock.receive(_, pattern)
    sock.reads = sock.reads + 1
    if opts.timeout_at and pos >= opts.timeout_at then return nil, "timeout", "" end
    if pattern == "*l" then
      local nl = data:find("\n", pos, true)
      if not nl then
        local partial = data:sub(pos)
        pos = #data + 1
        return nil, "closed", partial
      end
      local line = data:sub(pos, nl - 1):gsub("\r$", "")
      pos = nl + 1
      return line
    end
    assert(type(pattern) == "number", "fake socket: unsupported pattern " .. tostring(pattern))
    local chunk = data:sub(pos, pos + pattern - 1)
    pos = pos + #chunk
    if #chunk < pattern then return nil, "closed", chunk end
    return chunk
  end
  function sock.rest() return data:sub(pos) end
  return sock
end

local function read(data, method, opts)
  return http1.read_response(fake_socket(data), method or "GET", opts)
end

describe("iothub.http1", function()
  describe("parse_url", function()
    it("splits scheme, host, port, Host header and target", function()
      local u = assert(http1.parse_url("https://myhub.azure-devices.net/jobs/v2/j1?api-version=2021-04-12"))
      assert.same({ scheme = "https", tls = true, host = "myhub.azure-devices.net", port = 443,
        authority = "myhub.azure-devices.net", target = "/jobs/v2/j1?api-version=2021-04-12" }, u)
      u = assert(http1.parse_url("http://127.0.0.1:8080"))
      assert.same({ "127.0.0.1", 8080, "127.0.0.1:8080", "/", false }, { u.host, u.port, u.authority, u.target, u.tls })
      u = assert(http1.parse_url("http://[::1]:9000?x=1#frag"))
      assert.same({ "::1", 9000, "[::1]:9000", "/?x=1" }, { u.host, u.port, u.authority, u.target })
    end)

    it("refuses what it cannot send, saying why", function()
      assert.matches("http:// or https://", select(2, http1.parse_url("ftp://h/x")))
      assert.matches("user information", select(2, http1.parse_url("https://user:pw@h/x")))
      assert.matches("1..65535", select(2, http1.parse_url("http://h:70000/")))
      assert.matches("no usable host", select(2, http1.parse_url("http:///x")))
      assert.matches("spaces", select(2, http1.parse_url("http://h/a b")))
    end)
  end)

  describe("request_head", function()
    local u = assert(http1.parse_url("http://127.0.0.1:8080/jobs/v2/j1?api-version=1"))

    it("writes the request line, Host, the caller's headers and Content-Length", function()
      local head = http1.request_head("PUT", u, { "Authorization: SharedAccessSignature x", "Accept: application/json" }, "{}")
      assert.equal("PUT /jobs/v2/j1?api-version=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" ..
        "Authorization: SharedAccessSignature x\r\nAccept: application/json\r\nContent-Length: 2\r\n\r\n", head)
    end)

    it("sends Content-Length: 0 for a bodiless POST and none for GET", function()
      assert.matches("Content%-Length: 0\r\n\r\n$", http1.request_head("POST", u, {}, nil))
      assert.not_matches("Content%-Length", http1.request_head("GET", u, nil, nil))
    end)

    it("keeps a caller's Host header instead of adding one", function()
      local head = http1.request_head("GET", u, { "Host: other" })
      assert.equal(1, select(2, head:gsub("\r\nHost:", "")))
      assert.matches("\r\nHost: other\r\n", head)
    end)

    it("raises on header lines that could split or reframe the request", function()
      assert.has_error(function() http1.request_head("GET", u, { "X: a\r\nEvil: 1" }) end,
        "request header 1 contains CR, LF or NUL; refusing to send it")
      assert.has_error(function() http1.request_head("GET", u, { "no colon" }) end,
        "request header 1 is not a 'Name: value' line")
      assert.has_error(function() http1.request_head("POST", u, { "A: b", "Content-Length: 5" }, "x") end,
        "request header 2 sets content-length, which the transport derives from the body")
      assert.has_error(function() http1.request_head("GET", u, { 42 }) end,
        "request header 1 must be a string, got number")
    end)
  end)

  describe("read_response", function()
    it("reads a Content-Length body and keeps an HTTP/1.1 connection alive", function()
      local sock = fake_socket("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{\"a\":1}\r\nNEXT")
      local res, keep = http1.read_response(sock, "GET")
      assert.same({ status = 200, headers = { ["content-type"] = "application/json", ["content-length"] = "9" },
        body = "{\"a\":1}\r\n" }, res)
      assert.is_true(keep)
      assert.equal("NEXT", sock.rest()) -- nothing of the next response was consumed
    end)

    it("lower-cases names, joins repeats with ', ' and unfolds obsolete continuation lines", function()
      local res = assert(read("HTTP/1.1 200 OK\r\nX-Ms-Continuation: abc\r\nVary: a\r\nVARY: b\r\n" ..
        "X-Long: one\r\n   two\r\nContent-Length: 0\r\n\r\n"))
      assert.same({ ["x-ms-continuation"] = "abc", vary = "a, b", ["x-long"] = "one two",
        ["content-length"] = "0" }, res.headers)
    end)

    it("reads chunked bodies, ignoring chunk extensions and trailers", function()
      local sock = fake_socket("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" ..
        "4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\nNEXT")
      local res, keep = http1.read_response(sock, "GET")
      assert.equal("Wikipedia in\r\n\r\nchunks.", res.body)
      assert.is_true(keep)
      assert.equal("NEXT", sock.rest())
    end)

    it("skips 100 Continue and 103 Early Hints before the real answer", function()
      local res = assert(read("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" ..
        "HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"))
      assert.equal(201, res.status)
      assert.is_nil(res.headers.link)
      assert.equal("ok", res.body)
    end)

    it("decides keep-alive from the version and Connection tokens", function()
      local function keep(data) return select(2, read(data)) end
      assert.is_false(keep("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 0\r\n\r\n"))
      assert.is_false(keep("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"))
      assert.is_true(keep("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"))
      -- no length: the body runs to the end of the connection, which then cannot be reused
      local res, k = read("HTTP/1.1 200 OK\r\n\r\nuntil the end")
      assert.equal("until the end", res.body)
      assert.is_false(k)
      -- a transfer coding other than a final chunked also runs to the close
      res, k = read("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw")
      assert.equal("raw", res.body)
      assert.is_false(k)
    end)

    it("reads no body for HEAD, 204 and 304 even with a Content-Length", function()
      local sock = fake_socket("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nNEXT")
      assert.equal("", http1.read_response(sock, "HEAD").body)
      assert.equal("NEXT", sock.rest())
      assert.equal("", assert(read("HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n")).body)
      assert.equal("", assert(read("HTTP/1.1 304 Not Modified\r\n\r\n")).body)
    end)

    it("accepts repeated equal Content-Length values and refuses differing ones", function()
      assert.equal("abc", assert(read("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc")).body)
      local res, err, started = read("HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd")
      assert.is_nil(res)
      assert.same({ "network", "BadResponse", true }, { err.kind, err.code, started })
      assert.matches("Content%-Length '3, 4'", err.message)
    end)

    it("classifies failures like the curl transport: timeout, network, with the request in the message", function()
      local res, err, started = http1.read_response(fake_socket("", { timeout_at = 1 }), "GET", { where = "GET http://h:80" })
      assert.is_nil(res)
      assert.same({ kind = "timeout", code = "Timeout", message = "GET http://h:80: timed out waiting for the response" }, err)
      assert.is_false(started)

      local function failure(data) return select(2, read(data)) end
      err, started = select(2, read(""))
      assert.same({ "network", "ConnectionClosed", false }, { err.kind, err.code, started })

      err, started = select(2, read("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"))
      assert.same({ "protocol", "TruncatedResponse", true }, { err.kind, err.code, started })
      assert.matches("reading the response body", err.message)

      err = failure("SSH-2.0-OpenSSH\r\n")
      assert.same({ "network", "BadResponse" }, { err.kind, err.code })
      assert.matches("status line 'SSH%-2.0%-OpenSSH'", err.message)

      assert.matches("bad chunk size", failure("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").message)
      assert.matches("longer than its declared size",
        failure("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n").message)
      assert.matches("continuation line comes first", failure("HTTP/1.1 200 OK\r\n  folded first\r\n\r\n").message)
      err = failure("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
      assert.matches("101", err.message)
    end)

    it("enforces maxBody for every framing", function()
      local opts = { maxBody = 4 }
      for _, data in ipairs({
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n12345",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n123\r\n2\r\n45\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\n\r\n12345",
      }) do
        local res, err = read(data, "GET", opts)
        assert.is_nil(res)
        assert.same({ "network", "ResponseTooLarge" }, { err.kind, err.code })
        assert.matches("maxBody %(4 bytes%)", err.message)
      end
      assert.equal("1234", assert(read("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n1234", "GET", opts)).body)
    end)

    it("caps the header block", function()
      local saved = http1.MAX_HEADER_BYTES
      http1.MAX_HEADER_BYTES = 64
      local res, err = read("HTTP/1.1 200 OK\r\nX-Big: " .. ("a"):rep(100) .. "\r\n\r\n")
      http1.MAX_HEADER_BYTES = saved
      assert.is_nil(res)
      assert.equal("ResponseTooLarge", err.code)
    end)
  end)
end)

-- A fake `ngx` for the cosocket transport's decisions that need no network: phases, TLS
-- error wording, pooling and the retry on a stale kept-alive connection.
local function fake_ngx(phase, script)
  local log = { connects = {}, keepalive = 0, closed = 0, logs = {} }
  local n = { WARN = 4, log = function(_, ...) log.logs[#log.logs + 1] = table.concat({ ... }) end }
  function n.get_phase() return phase end
  function n.sleep(s) log.slept = (log.slept or 0) + s end
  n.socket = {}
  function n.socket.tcp()
    local entry = assert(table.remove(script, 1), "fake ngx: no scripted connection left")
    local sock = fake_socket(entry.data or "", entry)
    function sock.settimeouts() end
    function sock.settimeout() end
    function sock.connect(_, host, port, opts)
      log.connects[#log.connects + 1] = { host = host, port = port, pool = opts.pool }
      if entry.connect_err then return nil, entry.connect_err end
      return 1
    end
    local closed = false
    function sock.getreusedtimes()
      if closed then return nil, "closed" end
      return entry.reused or 0
    end
    function sock.sslhandshake(_, reuse, name, verify)
      log.handshake = { reuse = reuse, name = name, verify = verify }
      closed = entry.closed_by_handshake
      if entry.tls_err then return nil, entry.tls_err end
      return true
    end
    function sock.send(_, payload)
      log.sent = type(payload) == "table" and table.concat(payload) or payload
      if entry.send_err then return nil, entry.send_err end
      return #log.sent
    end
    function sock.setkeepalive() log.keepalive = log.keepalive + 1; return 1 end
    function sock.close() log.closed = log.closed + 1; return 1 end
    return sock
  end
  return n, log
end

describe("iothub.transport.cosocket (fake ngx)", function()
  local Cosocket = require "iothub.transport.cosocket"
  local saved_ngx

  before_each(function() saved_ngx = rawget(_G, "ngx") end)
  after_each(function() rawset(_G, "ngx", saved_ngx) end)

  local OK = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"

  it("sends over a pooled connection per host:port:TLS mode, checking the certificate by default", function()
    local n, log = fake_ngx("timer", { { data = OK } })
    rawset(_G, "ngx", n)
    local t = Cosocket.new()
    local res = assert(t:request({ method = "GET", url = "https://localhost:8443/jobs/v2/j1", headers = { "A: b" } }))
    assert.same({ status = 200, headers = { ["content-length"] = "2" }, body = "{}" }, res)
    assert.same({ host = "127.0.0.1", port = 8443, pool = "iothub:localhost:8443:tls" }, log.connects[1])
    assert.same({ reuse = false, name = "localhost", verify = true }, log.handshake)
    assert.equal("GET /jobs/v2/j1 HTTP/1.1\r\nHost: localhost:8443\r\nA: b\r\n\r\n", log.sent)
    assert.equal(1, log.keepalive)
    assert.same({ requests = 1, connects = 1, reused = 0 }, t:stats())
  end)

  it("sends again on a fresh connection when a reused one was closed before answering", function()
    local n, log = fake_ngx("content", { { data = "", reused = 3 }, { data = OK } })
    rawset(_G, "ngx", n)
    local t = Cosocket.new({ verify = false })
    assert(t:request({ method = "POST", url = "https://hub/devices/query", body = "{}" }))
    assert.equal(2, #log.connects)
    assert.equal("iothub:hub:443:tls-noverify", log.connects[1].pool)
    assert.is_false(log.handshake.verify)
    assert.same({ requests = 1, connects = 1, reused = 1 }, t:stats())
  end)

  it("does not resend after a fresh connection fails, or after a timeout", function()
    local n = fake_ngx("content", { { data = "" }, { data = "", reused = 1, timeout_at = 1 } })
    rawset(_G, "ngx", n)
    local t = Cosocket.new()
    local res, err = t:request({ method = "GET", url = "http://hub/x" })
    assert.is_nil(res)
    assert.same({ "network", "ConnectionClosed" }, { err.kind, err.code })
    err = select(2, t:request({ method = "GET", url = "http://hub/x" }))
    assert.same({ "timeout", "Timeout" }, { err.kind, err.code })
  end)

  it("explains TLS failures: where trust comes from inside nginx, host mismatches", function()
    local n, log = fake_ngx("timer", {
      { tls_err = "20: unable to get local issuer certificate" },
      { tls_err = "certificate host mismatch" },
      { connect_err = "no resolver defined to resolve \"myhub.azure-devices.net\"" },
      { closed_by_handshake = true }, -- ngx_lua 0.10.23: "true", but verification failed
    })
    rawset(_G, "ngx", n)
    local t = Cosocket.new({ caFile = "/etc/iothub/ca.pem" })
    assert.matches("caFile '/etc/iothub/ca.pem' is not read", log.logs[1] or "", 1, true)
    local _, err = t:request({ method = "GET", url = "https://myhub.azure-devices.net/x" })
    assert.same({ "tls", "CertificateVerifyFailed" }, { err.kind, err.code })
    assert.matches("lua_ssl_trusted_certificate /etc/iothub/ca.pem;", err.message, 1, true)
    _, err = t:request({ method = "GET", url = "https://127.0.0.1:8443/x" })
    assert.same({ "tls", "HostMismatch" }, { err.kind, err.code })
    assert.matches("does not name '127.0.0.1'", err.message, 1, true)
    _, err = t:request({ method = "GET", url = "https://myhub.azure-devices.net/x" })
    assert.same({ "network", "ResolveFailed" }, { err.kind, err.code })
    assert.matches("resolver", err.message, 1, true)
    _, err = t:request({ method = "GET", url = "https://myhub.azure-devices.net/x" })
    assert.same({ "tls", "CertificateRejected" }, { err.kind, err.code })
    assert.matches("not issued for 'myhub.azure-devices.net'", err.message, 1, true)
    assert.matches("lua_ssl_trusted_certificate /etc/iothub/ca.pem;", err.message, 1, true)
  end)

  it("raises in phases without cosockets, pointing at ngx.timer.at", function()
    for _, phase in ipairs({ "init", "init_worker", "set", "header_filter", "body_filter", "log" }) do
      rawset(_G, "ngx", (fake_ngx(phase, {})))
      local ok, msg = pcall(function()
        Cosocket.new():request({ method = "GET", url = "http://hub/x" })
      end)
      assert.is_false(ok)
      assert.matches("'" .. phase .. "' phase", msg, 1, true)
      assert.matches("ngx.timer.at(0, function(premature)", msg, 1, true)
    end
  end)

  it("is chosen automatically by clients inside nginx; sleeps go through ngx.sleep", function()
    local n, log = fake_ngx("timer", { { data = "HTTP/1.1 200 OK\r\nContent-Length: 35\r\n\r\n" ..
      "{\"jobId\":\"j1\",\"status\":\"completed\"}" } })
    rawset(_G, "ngx", n)
    local iothub = require "iothub"
    local jobs = assert(iothub.JobClient.fromConnectionString(
      "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=", { endpoint = "http://127.0.0.1:1" }))
    local curl_before = package.loaded["iothub.transport.curl"]
    assert.equal("completed", assert(jobs:getJob("j1")).status)
    assert.equal(Cosocket, getmetatable(jobs.pipeline:transport()))
    assert.equal(curl_before, package.loaded["iothub.transport.curl"]) -- nothing new loaded
    jobs.pipeline:sleep(0.25)
    assert.equal(0.25, log.slept)
    n.get_phase = function() return "log" end
    assert.has_error(function() jobs:getJob("j1") end)
    assert.has_error(function() jobs.pipeline:sleep(1) end)
  end)

  it("refuses transport = 'curl' inside nginx, takes 'cosocket' and objects", function()
    rawset(_G, "ngx", (fake_ngx("init", {})))
    local iothub = require "iothub"
    local CS = "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ="
    local ok, msg = pcall(iothub.JobClient.fromConnectionString, CS, { transport = "curl" })
    assert.is_false(ok)
    assert.matches("libcurl would block the worker", msg, 1, true)
    local jobs = assert(iothub.JobClient.fromConnectionString(CS, { transport = "cosocket" }))
    assert.equal(Cosocket, getmetatable(jobs.pipeline:transport()))
    local custom = { request = function() return { status = 200, headers = {}, body = "{}" } end }
    jobs = assert(iothub.JobClient.fromConnectionString(CS, { transport = custom }))
    assert.equal(custom, jobs.pipeline:transport())
    assert.has_error(function()
      iothub.JobClient.fromConnectionString(CS, { proxy = "http://proxy:3128" }).pipeline:transport()
    end)
  end)
end)

describe("transport selection outside nginx", function()
  local iothub = require "iothub"
  local CS = "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ="

  it("takes transport = 'curl' or an object, and refuses anything else", function()
    local jobs = assert(iothub.JobClient.fromConnectionString(CS, { transport = "curl" }))
    assert.equal(require("iothub.transport.curl"), getmetatable(jobs.pipeline:transport()))
    assert.has_error(function() iothub.JobClient.fromConnectionString(CS, { transport = "resty" }) end,
      "option 'transport' must be \"curl\", \"cosocket\" or a transport object, got 'resty'")
    assert.has_error(function() iothub.JobClient.fromConnectionString(CS, { transport = {} }) end,
      "option 'transport' must be \"curl\", \"cosocket\" or an object with a request(req) method")
  end)

  it("refuses transport = 'cosocket' where there is no nginx", function()
    local ok, msg = pcall(iothub.JobClient.fromConnectionString, CS, { transport = "cosocket" })
    assert.is_false(ok)
    assert.matches("needs nginx's ngx.socket.tcp", msg, 1, true)
  end)

  it("defaults to curl", function()
    local jobs = assert(iothub.JobClient.fromConnectionString(CS))
    assert.equal(require("iothub.transport.curl"), getmetatable(jobs.pipeline:transport()))
  end)
end)
