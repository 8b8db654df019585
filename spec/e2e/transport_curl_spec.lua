-- iothub.curl and iothub.transport.curl against a real local nginx (spec/support/server.lua).
-- No timing thresholds: overlap is proven by the server's maxInflight counter.
local cjson = require "cjson"
local curl = require "iothub.curl"
local CurlTransport = require "iothub.transport.curl"
local server = require "support.server"

local IS_JIT = type(jit) == "table"
local PROXY_TARGET = "http://iothub-proxy-test.invalid/some/path?x=1"

describe("iothub.curl / transport.curl", function()
  local srv

  lazy_setup(function()
    srv = server.start()
  end)

  lazy_teardown(function()
    if srv then srv:stop() end
  end)

  -- Transports in tests bypass any proxy from the developer's environment.
  local function transport(opts)
    opts = opts or {}
    if opts.proxy == nil then opts.proxy = "" end
    return CurlTransport.new(opts)
  end

  local function echo(t, req)
    local res, err = t:request(req)
    assert.is_nil(err)
    assert.equal(200, res.status)
    return cjson.decode(res.body), res
  end

  describe("module", function()
    it("reports the libcurl version", function()
      local full, short = curl.version()
      assert.matches("libcurl/", full)
      assert.matches("^%d+%.%d+", short)
    end)

    it("easy and multi handles print, close idempotently and refuse use after close", function()
      local e = curl.easy()
      assert.matches("^iothub.curl.easy %(", tostring(e))
      e:close()
      e:close()
      assert.equal("iothub.curl.easy (closed)", tostring(e))
      assert.has_error(function() e:perform({ method = "GET", url = srv.http_url }) end,
        "attempt to use a closed iothub.curl.easy")
      local m = curl.multi()
      assert.matches("^iothub.curl.multi %(", tostring(m))
      m:close()
      m:close()
      assert.has_error(function() m:pending() end, "attempt to use a closed iothub.curl.multi")
    end)

    if _VERSION == "Lua 5.4" then
      it("supports to-be-closed variables", function()
        local chunk = assert(load([[
          local curl = ...
          local h
          do local e <close> = curl.easy(); h = e end
          return tostring(h)
        ]]))
        assert.equal("iothub.curl.easy (closed)", chunk(curl))
      end)
    end

    it("raises on misuse of request fields", function()
      local e = curl.easy()
      assert.has_error(function() e:perform("x") end)
      assert.has_error(function() e:perform({ url = srv.http_url }) end)
      assert.has_error(function() e:perform({ method = "HEAD", url = srv.http_url }) end)
      assert.has_error(function() e:perform({ method = "GET", url = srv.http_url, timeout = "1" }) end)
      assert.has_error(function() e:perform({ method = "GET", url = srv.http_url, headers = { 1 } }) end)
      assert.has_error(function() e:perform({ method = "GET", url = srv.http_url, headers = { "A: b\r\nC: d" } }) end)
      assert.has_error(function() e:perform({ method = "GET", url = srv.http_url, verify = "no" }) end)
      assert.has_error(function() e:perform({ method = "POST", url = srv.http_url, body = {} }) end)
      e:close()
    end)

    it("easy:request is the positional fast path and returns { status, headers, body }", function()
      local e = curl.easy({ proxy = "", timeout = 10 })
      local res = assert(e:request("POST", srv.http_url .. "/echo?q=1", { "X-One: 1" }, "hi"))
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      local got = cjson.decode(res.body)
      assert.equal("POST", got.method)
      assert.equal("/echo?q=1", got.uri)
      assert.equal("hi", got.body)
      assert.equal("1", got.headers["x-one"])
      local none, msg, code = e:request("GET", "http://127.0.0.1:1/x?sig=secret")
      assert.is_nil(none)
      assert.equal("CURLE_COULDNT_CONNECT", code)
      assert.matches("GET http://127.0.0.1:1", msg, 1, true)
      assert.not_matches("secret", msg, 1, true)
      assert.has_error(function() e:request("HEAD", srv.http_url) end,
        "bad argument 'method' (GET, PUT, POST, PATCH or DELETE expected, got 'HEAD')")
      assert.has_error(function() e:request("GET", 5) end, "bad argument 'url' (string expected, got number)")
      assert.has_error(function() e:request("GET", srv.http_url, "X: y") end,
        "bad argument 'headers' (table expected, got string)")
      assert.has_error(function() e:request("GET", srv.http_url, nil, nil, -1) end,
        "bad argument 'timeout' (non-negative number expected)")
      e:close()
    end)

    it("handle options are every request's defaults; request fields override them", function()
      assert.has_error(function() curl.easy({ caFile = true }) end,
        "bad option 'caFile' (string expected, got boolean)")
      assert.has_error(function() curl.multi({ verify = "no" }) end,
        "bad option 'verify' (boolean expected, got string)")
      local e = curl.easy({ caFile = srv.ca_file, proxy = "", maxBody = 5 })
      local status, _, code = e:perform({ method = "GET", url = srv.https_url .. "/echo" })
      assert.is_nil(status)
      assert.equal("ResponseTooLarge", code) -- the default maxBody, over verified TLS
      assert.equal(200, (e:perform({ method = "GET", url = srv.https_url .. "/echo", maxBody = 1e6 })))
      e:close()
    end)

    it("a handle re-applies changed connection settings and keeps unchanged ones", function()
      local e = curl.easy({ proxy = "" })
      local function get(extra)
        local req = { method = "GET", url = srv.https_url .. "/echo" }
        for k, v in pairs(extra) do req[k] = v end
        return e:perform(req)
      end
      local function connection(extra)
        local status, _, body = get(extra)
        assert.equal(200, status)
        return cjson.decode(body).connection
      end
      local first = connection({ caFile = srv.ca_file })
      assert.equal(first, connection({ caFile = srv.ca_file }))
      assert.equal(0, e:stats().connects) -- unchanged settings: the connection was reused
      local status, msg, code = get({}) -- back to the system CAs, which do not know the test CA
      assert.is_nil(status)
      assert.equal("CURLE_PEER_FAILED_VERIFICATION", code, msg)
      assert.not_equal(first, connection({ verify = false })) -- not the verified connection
      -- the verified connection is still cached: changing settings keeps keep-alive
      assert.equal(first, connection({ caFile = srv.ca_file }))
      e:close()
    end)

    it("stats() describes the last transfer", function()
      local e = curl.easy()
      assert(e:perform({ method = "GET", url = srv.http_url .. "/echo", proxy = "" }))
      local s = e:stats()
      assert.equal(1, s.connects)
      assert.equal("127.0.0.1", s.primaryIp)
      assert.is_true(s.localPort > 0)
      assert.is_true(s.totalTime >= 0)
      e:close()
    end)
  end)

  describe("transport options", function()
    it("validates types and raises on misuse", function()
      assert.has_error(function() CurlTransport.new("x") end)
      assert.has_error(function() CurlTransport.new({ timeout = "1" }) end,
        "CurlTransport.new: option 'timeout' must be a number, got string")
      assert.has_error(function() CurlTransport.new({ verify = 1 }) end)
      assert.has_error(function() CurlTransport.new({ caFile = true }) end)
      assert.has_error(function() CurlTransport.new({ timeout = -1 }) end)
      assert.has_error(function() CurlTransport.new({ bogus = 1 }) end,
        "CurlTransport.new: unknown option 'bogus'")
      local t = transport()
      assert.has_error(function() t:request({ url = srv.http_url }) end)
      assert.has_error(function() t:request({ method = "GET" }) end)
      assert.has_error(function() t:request({ method = "GET", url = srv.http_url, body = 5 }) end)
      assert.has_error(function() t:requestCooperative({ method = "GET", url = srv.http_url }) end)
      t:close()
      t:close()
      assert.has_error(function() t:request({ method = "GET", url = srv.http_url }) end,
        "CurlTransport: transport is closed")
    end)
  end)

  describe("requests", function()
    local t
    before_each(function() t = transport() end)
    after_each(function() t:close() end)

    for _, method in ipairs({ "GET", "PUT", "POST", "PATCH", "DELETE" }) do
      it(method .. " with a body", function()
        local got = echo(t, { method = method, url = srv.http_url .. "/echo/x?a=1&b=2",
          headers = { "Content-Type: application/json" }, body = '{"n":1}' })
        assert.equal(method, got.method)
        assert.equal("/echo/x?a=1&b=2", got.uri)
        assert.equal('{"n":1}', got.body)
        assert.equal("7", got.headers["content-length"])
        assert.equal("application/json", got.headers["content-type"])
        assert.is_nil(got.headers["expect"])
      end)

      it(method .. " without a body", function()
        local got = echo(t, { method = method, url = srv.http_url .. "/echo" })
        assert.equal(method, got.method)
        assert.equal("", got.body)
        if method == "POST" or method == "PUT" or method == "PATCH" then
          assert.equal("0", got.headers["content-length"])
        else
          assert.is_nil(got.headers["content-length"])
        end
        -- libcurl's form-urlencoded default must not leak into API calls
        assert.is_nil(got.headers["content-type"])
      end)
    end

    it("one handle switches methods and bodies cleanly", function()
      local steps = {
        { "POST", '{"a":1}', "7" }, { "GET", nil, nil }, { "PUT", nil, "0" }, { "DELETE", "{}", "2" },
        { "PATCH", "x", "1" }, { "DELETE", nil, nil }, { "GET", nil, nil }, { "POST", nil, "0" },
      }
      for i, step in ipairs(steps) do
        local got = echo(t, { method = step[1], url = srv.http_url .. "/echo?step=" .. i, body = step[2] })
        assert.equal(step[1], got.method, "step " .. i)
        assert.equal(step[2] or "", got.body, "step " .. i)
        assert.equal(step[3], got.headers["content-length"], "step " .. i)
        assert.is_nil(got.headers["content-type"], "step " .. i)
        assert.equal(i, got.connectionRequests, "step " .. i)
      end
    end)

    it("submitted requests keep their headers and bodies after the caller's strings are collected", function()
      local ids = {}
      for i = 1, 4 do
        local body = ("b%d"):format(i):rep(3000 * i)
        ids[assert(t:submit({ method = "PUT", url = srv.http_url .. "/echo",
          headers = { "X-Step: " .. ("s"):rep(i) .. i } , body = body }))] = i
      end
      for _ = 1, 3 do collectgarbage("collect") end
      local seen = 0
      while seen < 4 do
        for _, r in ipairs(t:poll(1)) do
          local i = ids[r.id]
          assert.is_nil(r.err)
          local got = cjson.decode(r.res.body)
          assert.equal(("b%d"):format(i):rep(3000 * i), got.body)
          assert.equal(("s"):rep(i) .. i, got.headers["x-step"])
          seen = seen + 1
        end
      end
    end)

    it("sends request headers", function()
      local got = echo(t, { method = "GET", url = srv.http_url .. "/echo", headers = {
        "Authorization: SharedAccessSignature sr=x&sig=y", "X-Custom: one", "User-Agent: iothub-jobs-test",
      } })
      assert.equal("SharedAccessSignature sr=x&sig=y", got.headers["authorization"])
      assert.equal("one", got.headers["x-custom"])
      assert.equal("iothub-jobs-test", got.headers["user-agent"])
    end)

    it("returns status, lower-cased headers (repeats joined) and body", function()
      local res = assert(t:request({ method = "GET",
        url = srv.http_url .. "/status/418?body=short%20and%20stout&header=X-One:a&header=X-Rep:1&header=X-Rep:2" }))
      assert.equal(418, res.status)
      assert.equal("short and stout", res.body)
      assert.equal("a", res.headers["x-one"])
      assert.equal("1, 2", res.headers["x-rep"])
      assert.is_string(res.headers["date"])
      assert.is_nil(res.headers["X-One"])
    end)

    it("returns an empty body for 204", function()
      local res = assert(t:request({ method = "DELETE", url = srv.http_url .. "/status/204" }))
      assert.equal(204, res.status)
      assert.equal("", res.body)
    end)

    it("keeps only the final response's headers after 100 Continue", function()
      local got, res = echo(t, { method = "POST", url = srv.http_url .. "/echo",
        headers = { "Expect: 100-continue", "Content-Type: text/plain" }, body = "payload" })
      assert.equal("payload", got.body)
      assert.equal("100-continue", got.headers["expect"])
      assert.equal("application/json", res.headers["content-type"])
    end)

    it("handles binary bodies", function()
      local body = "a\0b\255\r\n"
      local e = curl.easy()
      local status, _, resp = e:perform({ method = "PUT", url = srv.http_url .. "/echo", body = body, proxy = "" })
      e:close()
      assert.equal(200, status)
      assert.equal(#body, tonumber(cjson.decode(resp).headers["content-length"]))
    end)
  end)

  describe("TLS", function()
    it("succeeds with the private CA", function()
      local t = transport({ caFile = srv.ca_file })
      local got = echo(t, { method = "GET", url = srv.https_url .. "/echo" })
      assert.equal("GET", got.method)
      t:close()
    end)

    it("verifies by default: without the CA it fails with kind 'tls'", function()
      local t = transport()
      local res, err = t:request({ method = "GET", url = srv.https_url .. "/echo" })
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.equal("CURLE_PEER_FAILED_VERIFICATION", err.code)
      assert.matches("GET https://localhost:" .. srv.ports.https, err.message, 1, true)
      t:close()
    end)

    it("reports an unreadable CA file as a tls error", function()
      local t = transport({ caFile = srv.dir .. "/missing.pem" })
      local res, err = t:request({ method = "GET", url = srv.https_url .. "/echo" })
      assert.is_nil(res)
      assert.equal("tls", err.kind)
      assert.equal("CURLE_SSL_CACERT_BADFILE", err.code)
      t:close()
    end)

    it("verify = false skips verification", function()
      local t = transport({ verify = false })
      echo(t, { method = "GET", url = srv.https_url .. "/echo" })
      t:close()
    end)
  end)

  describe("keep-alive", function()
    it("reuses one connection for sequential requests", function()
      local t = transport()
      local first
      for i = 1, 10 do
        local got = echo(t, { method = i % 2 == 0 and "POST" or "GET", url = srv.http_url .. "/echo", body = i % 2 == 0 and "x" or nil })
        first = first or got.connection
        assert.equal(first, got.connection)
        assert.equal(i, got.connectionRequests)
        assert.equal(i == 1 and 1 or 0, t:stats().connects)
      end
      t:close()
    end)

    it("reuses the TLS connection too", function()
      local t = transport({ caFile = srv.ca_file })
      local first
      for i = 1, 5 do
        local got = echo(t, { method = "GET", url = srv.https_url .. "/echo" })
        first = first or got.connection
        assert.equal(first, got.connection)
        assert.equal(i == 1 and 1 or 0, t:stats().connects)
      end
      t:close()
    end)

    it("reuses connections inside the multi handle", function()
      local t = transport()
      local seen = {}
      for _ = 1, 5 do
        t:submit({ method = "GET", url = srv.http_url .. "/echo" })
        local results = {}
        while #results == 0 do results = t:poll(1) end
        assert.is_nil(results[1].err)
        seen[#seen + 1] = cjson.decode(results[1].res.body).connection
      end
      for i = 2, 5 do assert.equal(seen[1], seen[i]) end
      t:close()
    end)
  end)

  describe("concurrency", function()
    before_each(function() srv:reset_stats() end)

    it("multi: 20 concurrent slow requests overlap on the server", function()
      local m = curl.multi()
      local ids = {}
      for i = 1, 20 do
        local id = assert(m:add({ method = "GET", url = srv.http_url .. "/slow?seconds=0.3", proxy = "" }))
        ids[id] = i
      end
      assert.equal(20, m:pending())
      local results = {}
      while m:pending() > 0 do
        m:perform()
        for _, r in ipairs(m:completed()) do results[#results + 1] = r end
        if m:pending() > 0 then m:wait(1) end
      end
      assert.equal(20, #results)
      for _, r in ipairs(results) do
        assert.is_not_nil(ids[r.id])
        assert.is_nil(r.error)
        assert.equal(200, r.status)
        assert.equal("application/json", r.headers["content-type"])
      end
      assert.is_true(srv:stats().maxInflight > 1)
      assert.same({}, m:completed())
      m:close()
    end)

    it("transport submit/poll runs requests concurrently", function()
      local t = transport()
      local pending = {}
      for _ = 1, 20 do pending[assert(t:submit({ method = "GET", url = srv.http_url .. "/slow?seconds=0.3" }))] = true end
      local n = 0
      while next(pending) do
        for _, r in ipairs(t:poll(0.5)) do
          assert.is_true(pending[r.id])
          pending[r.id] = nil
          assert.is_nil(r.err)
          assert.equal(200, r.res.status)
          n = n + 1
        end
      end
      assert.equal(20, n)
      assert.is_true(srv:stats().maxInflight > 1)
      assert.same({}, t:poll(0))
      t:close()
    end)

    it("multi reports failures per transfer and supports cancel", function()
      local m = curl.multi()
      local bad = m:add({ method = "GET", url = "http://127.0.0.1:1/x?sig=secret", proxy = "" })
      local slow = m:add({ method = "GET", url = srv.http_url .. "/slow?seconds=5&track=0", proxy = "" })
      assert.equal(2, m:pending())
      assert.is_true(m:cancel(slow))
      assert.is_false(m:cancel(slow))
      assert.is_false(m:cancel(12345))
      assert.equal(1, m:pending())
      local results = {}
      while m:pending() > 0 do
        m:perform()
        for _, r in ipairs(m:completed()) do results[#results + 1] = r end
        if m:pending() > 0 then m:wait(1) end
      end
      assert.equal(1, #results)
      assert.equal(bad, results[1].id)
      assert.equal("CURLE_COULDNT_CONNECT", results[1].code)
      assert.matches("127.0.0.1:1", results[1].error, 1, true)
      assert.not_matches("secret", results[1].error, 1, true)
      assert.is_number(m:timeout())
      m:close()
    end)

    it("multi:close frees transfers still in flight", function()
      local m = curl.multi()
      for _ = 1, 3 do m:add({ method = "GET", url = srv.http_url .. "/slow?seconds=5&track=0", proxy = "" }) end
      m:perform()
      m:close()
      assert.equal("iothub.curl.multi (closed)", tostring(m))
    end)

    it("requestCooperative completes and calls sleep between polls", function()
      local t = transport()
      local sleeps = {}
      local res, err = t:requestCooperative({ method = "GET", url = srv.http_url .. "/slow?seconds=0.2" },
        function(s) sleeps[#sleeps + 1] = s; os.execute("sleep " .. s) end)
      assert.is_nil(err)
      assert.equal(200, res.status)
      assert.is_true(#sleeps >= 1)
      for _, s in ipairs(sleeps) do assert.is_true(s > 0 and s <= 0.05) end
      t:close()
    end)

    it("requestCooperative under a coroutine scheduler overlaps requests", function()
      local t = transport()
      local results, threads = {}, {}
      for i = 1, 5 do
        threads[i] = coroutine.create(function()
          local res, err = t:requestCooperative({ method = "GET", url = srv.http_url .. "/slow?seconds=0.2" },
            coroutine.yield)
          results[i] = { res = res, err = err }
        end)
      end
      local alive = #threads
      while alive > 0 do
        alive = 0
        for _, co in ipairs(threads) do
          if coroutine.status(co) ~= "dead" then
            assert(coroutine.resume(co))
            alive = alive + 1
          end
        end
        t:poll(0.01) -- the scheduler's idle wait
      end
      for i = 1, 5 do
        assert.is_nil(results[i].err)
        assert.equal(200, results[i].res.status)
      end
      assert.is_true(srv:stats().maxInflight > 1)
      t:close()
    end)

    local has_cqueues = pcall(require, "cqueues")
    if has_cqueues then
      it("requestCooperative runs under cqueues", function()
        local cqueues = require "cqueues"
        local t = transport()
        local cq = cqueues.new()
        local statuses = {}
        for i = 1, 4 do
          cq:wrap(function()
            local res, err = t:requestCooperative({ method = "GET", url = srv.http_url .. "/slow?seconds=0.2" },
              cqueues.sleep)
            statuses[i] = res and res.status or err.message
          end)
        end
        assert(cq:loop())
        assert.same({ 200, 200, 200, 200 }, statuses)
        assert.is_true(srv:stats().maxInflight > 1)
        t:close()
      end)
    end
  end)

  describe("failures", function()
    it("a total timeout is kind 'timeout'", function()
      local t = transport({ timeout = 0.2 })
      local res, err = t:request({ method = "GET", url = srv.http_url .. "/slow?seconds=3&track=0" })
      assert.is_nil(res)
      assert.equal("timeout", err.kind)
      assert.equal("CURLE_OPERATION_TIMEDOUT", err.code)
      t:close()
    end)

    it("a per-request timeout overrides the transport's", function()
      local t = transport({ timeout = 60 })
      local _, err = t:request({ method = "GET", url = srv.http_url .. "/slow?seconds=3&track=0", timeout = 0.2 })
      assert.equal("timeout", err.kind)
      local _, err2 = t:requestCooperative({ method = "GET", url = srv.http_url .. "/slow?seconds=3&track=0",
        timeout = 0.2 }, function(s) os.execute("sleep " .. s) end)
      assert.equal("timeout", err2.kind)
      t:close()
    end)

    it("connection refused is kind 'network' with host:port and no query string", function()
      local t = transport()
      local res, err = t:request({ method = "POST", url = "http://127.0.0.1:1/jobs?sig=topsecret", body = "{}" })
      assert.is_nil(res)
      assert.equal("network", err.kind)
      assert.equal("CURLE_COULDNT_CONNECT", err.code)
      assert.matches("POST http://127.0.0.1:1", err.message, 1, true)
      assert.not_matches("topsecret", err.message, 1, true)
      t:close()
    end)

    it("the raw API returns nil, message, code", function()
      local e = curl.easy()
      local status, msg, code = e:perform({ method = "GET", url = "http://127.0.0.1:1/", proxy = "" })
      assert.is_nil(status)
      assert.is_string(msg)
      assert.equal("CURLE_COULDNT_CONNECT", code)
      e:close()
    end)

    it("maxBody exceeded is ResponseTooLarge (Content-Length and chunked)", function()
      local t = transport({ maxBody = 10 })
      local _, err = t:request({ method = "GET", url = srv.http_url .. "/status/200?body=" .. ("x"):rep(50) })
      assert.equal("ResponseTooLarge", err.code)
      assert.equal("network", err.kind)
      local _, err2 = t:request({ method = "GET", url = srv.http_url .. "/echo" }) -- chunked
      assert.equal("ResponseTooLarge", err2.code)
      assert.matches("maxBody", err2.message)
      local res = assert(t:request({ method = "GET", url = srv.http_url .. "/status/200?body=0123456789" }))
      assert.equal("0123456789", res.body)
      local e = curl.easy()
      local status, msg, code = e:perform({ method = "GET", url = srv.http_url .. "/echo", maxBody = 5, proxy = "" })
      assert.is_nil(status)
      assert.is_string(msg)
      assert.equal("ResponseTooLarge", code)
      -- the handle stays usable afterwards
      assert.equal(200, (e:perform({ method = "GET", url = srv.http_url .. "/echo", proxy = "" })))
      e:close()
      t:close()
    end)
  end)

  describe("proxies", function()
    it("uses the proxy option", function()
      local t = CurlTransport.new({ proxy = srv.proxy_url })
      local got = echo(t, { method = "GET", url = PROXY_TARGET })
      assert.is_true(got.proxied)
      assert.equal("GET " .. PROXY_TARGET .. " HTTP/1.1", got.requestLine)
      t:close()
    end)

    it("noProxy bypasses the proxy option", function()
      local t = CurlTransport.new({ proxy = srv.proxy_url, noProxy = "127.0.0.1" })
      local got = echo(t, { method = "GET", url = srv.http_url .. "/echo" })
      assert.is_nil(got.proxied)
      assert.equal("GET", got.method)
      t:close()
    end)

    -- Lua cannot setenv, so the environment cases run in a child interpreter.
    local function child(opts_literal, url)
      local script = srv.dir .. "/child.lua"
      local f = assert(io.open(script, "w"))
      f:write(("package.path = %q\npackage.cpath = %q\n"):format(package.path, package.cpath))
      f:write(([[
local cjson = require "cjson"
local t = require("iothub.transport.curl").new(%s)
local res, err = t:request({ method = "GET", url = %q })
t:close()
io.write(cjson.encode(res and { status = res.status, body = res.body } or { err = err }))
]]):format(opts_literal, url))
      f:close()
      local cmd = "env -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy -u NO_PROXY -u no_proxy"
        .. " -u https_proxy http_proxy=" .. srv.proxy_url .. " " .. (IS_JIT and "luajit" or "lua5.4")
        .. " " .. script .. " 2>&1"
      local p = assert(io.popen(cmd))
      local out = p:read("*a")
      p:close()
      local ok, decoded = pcall(cjson.decode, out)
      assert(ok, "child output: " .. out)
      assert.is_nil(decoded.err)
      return cjson.decode(decoded.body)
    end

    it("honours http_proxy from the environment when proxy is nil", function()
      local got = child("{}", PROXY_TARGET)
      assert.is_true(got.proxied)
      assert.equal("GET " .. PROXY_TARGET .. " HTTP/1.1", got.requestLine)
    end)

    it('proxy = "" ignores the environment proxy', function()
      local got = child('{ proxy = "" }', srv.http_url .. "/echo?direct=1")
      assert.is_nil(got.proxied)
      assert.equal("/echo?direct=1", got.uri)
    end)
  end)

  describe("fake hub", function()
    before_each(function() srv:reset() end)

    it("plays scripted responses in order and logs requests", function()
      srv:script({
        { status = 201, headers = { ["ETag"] = '"1"', ["Content-Type"] = "application/json" }, body = '{"jobId":"a"}' },
        { status = 429, headers = { ["Retry-After"] = "2" }, body = "" },
      })
      local t = transport()
      local r1 = assert(t:request({ method = "PUT", url = srv.http_url .. "/hub/jobs/v2/a?api-version=2021-04-12",
        headers = { "Content-Type: application/json", "Authorization: SharedAccessSignature x" }, body = '{"x":1}' }))
      assert.equal(201, r1.status)
      assert.equal('"1"', r1.headers["etag"])
      assert.equal('{"jobId":"a"}', r1.body)
      local r2 = assert(t:request({ method = "GET", url = srv.http_url .. "/hub/jobs/v2/a" }))
      assert.equal(429, r2.status)
      assert.equal("2", r2.headers["retry-after"])
      local r3 = assert(t:request({ method = "DELETE", url = srv.http_url .. "/hub/jobs/v2/a" }))
      assert.equal(599, r3.status)
      assert.matches("no scripted response", r3.body)

      local log = srv:request_log()
      assert.equal(3, #log)
      assert.equal("PUT", log[1].method)
      assert.equal("/hub/jobs/v2/a?api-version=2021-04-12", log[1].uri)
      assert.equal('{"x":1}', log[1].body)
      assert.equal("SharedAccessSignature x", log[1].headers["authorization"])
      assert.equal("GET", log[2].method)
      assert.equal("DELETE", log[3].method)
      t:close()

      srv:reset()
      assert.same({}, srv:request_log())
    end)

    it("can delay and drop responses", function()
      srv:script({ { status = 200, delay = 0.1, body = "late" }, { drop = true } })
      local t = transport()
      local r1 = assert(t:request({ method = "GET", url = srv.http_url .. "/hub/a" }))
      assert.equal("late", r1.body)
      t:close()
      -- a fresh connection: on a reused one libcurl retries once when it gets nothing back
      local fresh = transport()
      local res, err = fresh:request({ method = "GET", url = srv.http_url .. "/hub/b" })
      assert.is_nil(res)
      assert.equal("network", err.kind)
      assert.equal("CURLE_GOT_NOTHING", err.code)
      assert.equal(2, #srv:request_log())
      fresh:close()
    end)
  end)
end)
