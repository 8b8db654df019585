-- Hostile clients against the emulator: oversized headers and bodies, 1,000 idle connections,
-- requests that drip in a byte at a time, malformed, forged and replayed SAS tokens, and deep
-- or huge queries. Each is refused with the hub's error envelope (emulator/README.md, "Hostile
-- clients", says which status and code, and why), never echoes a token or a key, and the
-- project's own client keeps getting correct getJob answers in between. Latency during each
-- attack is measured by bench/emulator_hostile.lua, never asserted here.
-- Raw sockets come from cqueues (support/hostile.lua); everything talks to 127.0.0.1 only.
local core = require "iothub.core"
local iothub = require "iothub"
local E = require "support.emulator_process"
local hostile = require "support.hostile"
local shell = require "support.shell"

-- IOTHUB_EMU_CLIENT_TIMEOUT for this emulator: low, so the drips below run into it soon.
local CLIENT_TIMEOUT = 2
local V = E.API_VERSION
local JOB = "/jobs/v2/steady?" .. V
local OTHER_KEY = core.base64_encode("a key of the right size, not ours")

describe("emulator against hostile clients", function()
  local emu = E.shared({ env = { IOTHUB_EMU_CLIENT_TIMEOUT = tostring(CLIENT_TIMEOUT) } })
  local client
  local secrets = { E.KEY, OTHER_KEY } -- none of these may come back in an answer or a log

  lazy_setup(function()
    local cs = emu:output():match("IOTHUB_CONNECTION_STRING=([^\n]+)")
    client = assert(iothub.JobClient.fromConnectionString(cs, { endpoint = emu.base, proxy = "" }))
    assert(client:scheduleTwinUpdate("steady", "deviceId = 'myDeviceId'", { tags = { steady = 1 } }))
    local job = assert(client:monitorJob("steady", { interval = 0.05, maxInterval = 0.1, timeout = 15 }))
    assert.equal("completed", job.status)
  end)

  -- The normal client meanwhile: one getJob, answered correctly.
  local function steady()
    local job, err = client:getJob("steady")
    assert(job, "getJob failed next to a hostile client: " .. tostring(err))
    assert.equal("steady", job.jobId)
    assert.equal("completed", job.status)
    assert.equal("scheduleUpdateTwin", job.type)
    assert.equal(1, job.deviceJobStatistics.succeededCount)
  end

  local function assert_no_secret(raw, also)
    for _, s in ipairs(secrets) do assert.is_nil(raw:find(s, 1, true), "a key came back") end
    for _, s in ipairs(also or {}) do
      assert.is_nil(raw:find(s, 1, true), "token text came back: " .. s:sub(1, 40))
    end
  end

  -- The first response: status, hub envelope B, iothub-errorcode, numeric code, message
  -- fragment; returns the inner error.
  local function assert_refused(responses, status, name, code, fragment)
    local r = responses[1]
    assert(r, "no response at all")
    assert.equal(status, r.status)
    assert.equal(name, r.headers["iothub-errorcode"])
    assert.equal("application/json; charset=utf-8", r.headers["content-type"])
    local inner = assert(hostile.inner_error(r))
    assert.equal(code, inner.errorCode)
    assert.is_string(inner.trackingId)
    assert.is_string(inner.timestampUtc)
    if fragment then
      assert(inner.message:find(fragment, 1, true), "message '" .. inner.message .. "' lacks '" .. fragment .. "'")
    end
    return inner
  end

  local function send(text, opts)
    local responses, how, raw = hostile.exchange(emu.http_port, text, opts or { responses = 1 })
    assert_no_secret(raw)
    return responses, how, raw
  end

  describe("oversized request headers", function()
    local cases = {
      { "one 20 KB header", { "X-Big: " .. ("b"):rep(20000) }, "headers are larger" },
      { "a 20 KB Authorization header", { "Authorization: SharedAccessSignature sr=localhost&sig="
        .. ("s"):rep(20000) .. "&se=1&skn=iothubowner" }, "headers are larger" },
      { "8,000 headers (over 64 KB together)", (function()
        local t = {}
        for i = 1, 8000 do t[i] = "X-H" .. i .. ": v" end
        return t
      end)(), "headers are larger" },
      -- nginx refuses a repeated Authorization (like Host and Content-Length) itself
      { "two Authorization headers", { "Authorization: " .. E.token(), "Authorization: " .. E.token() }, "malformed" },
      { "150 headers (under 64 KB)", (function()
        local t = {}
        for i = 1, 150 do t[i] = "X-H" .. i .. ": v" end
        t[#t + 1] = "Authorization: " .. E.token()
        return t
      end)(), "more than 100 headers" },
    }
    for _, case in ipairs(cases) do
      it("refuses " .. case[1] .. " with 400 GenericBadRequest", function()
        local responses = send(hostile.request("GET", JOB, case[2]))
        assert_refused(responses, 400, "GenericBadRequest", 400000, case[3])
        steady()
      end)
    end

    it("refuses a 20 KB request URI with 400 GenericBadRequest", function()
      local responses = send(hostile.request("GET", "/twins/" .. ("u"):rep(20000) .. "?" .. V,
        { "Authorization: " .. E.token() }))
      assert_refused(responses, 400, "GenericBadRequest", 400000, "URI is longer")
      steady()
    end)
  end)

  describe("oversized bodies", function()
    local auth = "Authorization: " .. E.token()
    local five_mb = ("x"):rep(5 * 1024 * 1024)

    it("refuses a declared 10 GB body before reading it, with 413 MessageTooLarge", function()
      local responses = send(hostile.request("PUT", "/devices/hostile-big?" .. V,
        { auth, "Content-Length: 10000000000" }))
      assert_refused(responses, 413, "MessageTooLarge", 413001, "4 MB")
      steady()
    end)

    it("refuses an actual 5 MB body, declared or chunked, with 413 MessageTooLarge", function()
      assert_refused(send(hostile.request("PUT", "/devices/hostile-big?" .. V, { auth }, five_mb)),
        413, "MessageTooLarge", 413001, "4 MB")
      steady()
      local chunked = string.format("%x", #five_mb) .. "\r\n" .. five_mb .. "\r\n0\r\n\r\n"
      assert_refused(send(hostile.request("PUT", "/devices/hostile-big?" .. V,
        { auth, "Transfer-Encoding: chunked" }, chunked)), 413, "MessageTooLarge", 413001, "4 MB")
      steady()
      assert.equal(404, (emu:api("GET", "/devices/hostile-big")))
    end)

    it("answers a body shorter than what follows it, then refuses the rest as a malformed request", function()
      local text = hostile.request("GET", JOB, { auth, "Content-Length: 2" }) .. "{}" .. five_mb
      local responses, how = send(text, { timeout = 30 })
      assert.equal(200, responses[1].status)
      assert.equal("steady", core.json_decode(responses[1].body).jobId)
      assert_refused({ responses[2] }, 400, "GenericBadRequest", 400000, "malformed")
      assert.equal(2, #responses)
      assert.truthy(how == "eof" or how == "reset", how)
      steady()
    end)
  end)

  describe("idle connections", function()
    lazy_setup(function()
      hostile.raise_open_files(1200)
    end)

    it("holds 1,000 idle keep-alive connections at once and answers the normal client meanwhile", function()
      local conns = {}
      for i = 1, 1000 do
        local c = hostile.connect(emu.http_port)
        conns[i] = c
        assert(c:send(hostile.request("GET", "/_emulator/health")))
        local r, how = c:read_response()
        assert(r, "no answer on connection " .. i .. ": " .. tostring(how))
        assert.equal(200, r.status)
        if i % 100 == 0 then steady() end
      end
      local status, health = emu:control("GET", "/_emulator/health")
      assert.equal(200, status)
      assert(health.connections > 1000, "the emulator holds " .. tostring(health.connections) .. " connections")
      for _ = 1, 20 do steady() end
      for _, c in ipairs(conns) do
        local _, closed = c:poll()
        assert.is_nil(closed, "an idle keep-alive connection was closed early")
        c:close()
      end
      steady()
    end)

    it("closes 1,000 connections that never send a byte once the client timeout passes", function()
      local conns = {}
      for i = 1, 1000 do conns[i] = hostile.connect(emu.http_port) end
      for _ = 1, 20 do steady() end
      for _, c in ipairs(conns) do
        local raw, how = c:read_until_closed(30)
        assert.equal("", raw)
        assert.truthy(how == "eof" or how == "reset", "a silent connection stayed open: " .. how)
        c:close()
      end
      steady()
    end)
  end)

  describe("slow drip", function()
    -- Sends bytes one at a time, 50 ms apart, with a getJob by the normal client after each,
    -- until the emulator closes the connection or all are sent; returns how many were sent
    -- and how the connection ended (nil: still open).
    local function drip(c, bytes)
      for sent = 1, #bytes do
        local ok, why = c:send(bytes:sub(sent, sent))
        steady()
        core.sleep(0.05)
        local _, closed = c:poll()
        if closed or not ok then return sent, closed or why end
      end
      return #bytes, nil
    end

    it("closes a request whose headers drip in a byte at a time, without an answer", function()
      local text = hostile.request("GET", JOB, { "Authorization: " .. E.token() })
      local c = hostile.connect(emu.http_port)
      local sent, how = drip(c, text)
      local raw = c:poll()
      c:close()
      assert(how, "the whole request went through a byte at a time")
      assert(sent < #text, "the whole request went through a byte at a time")
      -- nginx answers nothing to headers that never arrived (as HTTP.sys drops them)
      assert.equal("", raw)
      steady()
    end)

    it("refuses a body that drips in a byte at a time with 408 RequestTimeout, then closes", function()
      -- long enough that a byte every 50 ms cannot finish it within the client timeout
      local body = core.json_encode({ query = "SELECT * FROM devices WHERE deviceId = 'myDeviceId'" .. (" "):rep(200) })
      local c = hostile.connect(emu.http_port)
      assert(c:send(hostile.request("POST", "/devices/query?" .. V,
        { "Authorization: " .. E.token(), "Content-Length: " .. #body })))
      local sent = drip(c, body)
      local raw = c:read_until_closed(10)
      c:close()
      assert(sent < #body, "the whole body went through a byte at a time")
      local responses = hostile.parse(raw)
      assert.equal(1, #responses)
      assert_refused(responses, 408, "RequestTimeout", 408000, "did not arrive in time")
      steady()
    end)

    it("answers a GET whose unneeded body drips in, then closes once the client timeout passes", function()
      local c = hostile.connect(emu.http_port)
      assert(c:send(hostile.request("GET", JOB, { "Authorization: " .. E.token(), "Content-Length: 1000" })))
      local sent, how = drip(c, ("x"):rep(1000))
      local responses = hostile.parse(c:poll())
      c:close()
      assert(how and sent < 1000, "the whole body went through a byte at a time")
      assert.equal(1, #responses)
      assert.equal(200, responses[1].status)
      steady()
    end)
  end)

  describe("malformed and forged SAS tokens", function()
    local now = os.time()
    local function sig_for(key, sr, se)
      return core.base64_encode(core.hmac_sha256(core.base64_decode(key), core.url_encode(sr) .. "\n" .. se))
    end
    local good_sig = core.url_encode(sig_for(E.KEY, "localhost", now + 3600))
    local old_sig = core.url_encode(sig_for(E.KEY, "localhost", now - 3600))
    local function tok(fields)
      return "SharedAccessSignature " .. table.concat(fields, "&")
    end
    local fresh = now + 3600
    -- { what, Authorization header value(s), fragment of the reason in info.reason }
    local cases = {
      { "no Authorization header", {}, "no Authorization header" },
      { "another scheme", { "Bearer " .. good_sig }, "must start with 'SharedAccessSignature '" },
      { "no sig", { tok({ "sr=localhost", "se=" .. fresh, "skn=iothubowner" }) }, "no sig field" },
      { "no se", { tok({ "sr=localhost", "sig=" .. good_sig, "skn=iothubowner" }) }, "no se field" },
      { "no sr", { tok({ "sig=" .. good_sig, "se=" .. fresh, "skn=iothubowner" }) }, "no sr field" },
      { "no skn", { tok({ "sr=localhost", "sig=" .. good_sig, "se=" .. fresh }) }, "no skn field" },
      { "se twice", { tok({ "sr=localhost", "sig=" .. good_sig, "se=" .. fresh, "se=" .. fresh,
        "skn=iothubowner" }) }, "field 'se' more than once" },
      { "sig twice", { tok({ "sr=localhost", "sig=" .. good_sig, "sig=" .. good_sig, "se=" .. fresh,
        "skn=iothubowner" }) }, "field 'sig' more than once" },
      { "a sig that is not base64", { tok({ "sr=localhost", "sig=not*base64!", "se=" .. fresh,
        "skn=iothubowner" }) }, "sig is not the base64 of a 32-byte HMAC-SHA256" },
      { "a sig of the wrong size", { tok({ "sr=localhost", "sig=" .. core.url_encode(core.base64_encode(("k"):rep(16))),
        "se=" .. fresh, "skn=iothubowner" }) }, "sig is not the base64 of a 32-byte HMAC-SHA256" },
      { "a bad percent-escape", { tok({ "sr=localhost", "sig=%zz", "se=" .. fresh, "skn=iothubowner" }) },
        "invalid percent-escape" },
      { "a 12 KB sig", { tok({ "sr=localhost", "sig=" .. ("QUFB"):rep(3000), "se=" .. fresh, "skn=iothubowner" }) },
        "sig is not the base64 of a 32-byte HMAC-SHA256" },
      { "a 10 KB skn", { tok({ "sr=localhost", "sig=" .. good_sig, "se=" .. fresh, "skn=" .. ("p"):rep(10000) }) },
        "(10000 bytes, not a policy name) is not configured" },
      { "a 10 KB sr", { tok({ "sr=" .. ("h"):rep(10000), "sig=" .. good_sig, "se=" .. fresh, "skn=iothubowner" }) },
        "(10000 bytes, not a host name or path) does not cover" },
      { "a 40-digit se", { tok({ "sr=localhost", "sig=" .. good_sig, "se=" .. ("9"):rep(40), "skn=iothubowner" }) },
        "must be an integer" },
      { "an se that is not a number", { tok({ "sr=localhost", "sig=" .. good_sig, "se=soon", "skn=iothubowner" }) },
        "must be an integer" },
      { "another hub's sr", { E.token({ sr = "otherhub.azure-devices.net" }) }, "does not cover localhost/jobs/v2/steady" },
      { "a policy that does not exist", { E.token({ skn = "nosuchpolicy" }) }, "'nosuchpolicy' is not configured" },
      { "an expired token", { E.token({ se = now - 3600 }) }, "token expired" },
      { "an expiry 20 years ahead", { E.token({ se = now + 20 * 366 * 86400 }) }, "at most 10 years" },
      { "a token signed with another key", { E.token({ key = OTHER_KEY }) }, "matches neither" },
      { "a real policy with another policy's key", { E.token({ skn = "service" }) }, "matches neither" },
      -- the old check read se for the signature with a pattern, which found "se=" inside another
      -- field's value: an expired token's sig and se, plus a fresh se the expiry test saw
      { "an expired signature beside a smuggled fresh se", { tok({ "sr=localhost", "sig=" .. old_sig,
        "x=a se=" .. (now - 3600), "se=" .. fresh, "skn=iothubowner" }) }, "matches neither" },
    }
    for _, case in ipairs(cases) do
      it("refuses " .. case[1] .. " with 401 IotHubUnauthorizedAccess, saying why", function()
        local headers, texts = {}, {}
        for i, v in ipairs(case[2]) do
          headers[i] = "Authorization: " .. v
          texts[#texts + 1] = v
          local sig = v:match("sig=([^&]+)")
          if sig and #sig > 8 then texts[#texts + 1] = sig; texts[#texts + 1] = core.url_decode(sig) or sig end
        end
        for _, s in ipairs(texts) do if #s > 16 then secrets[#secrets + 1] = s end end
        local responses, _, raw = send(hostile.request("GET", JOB, headers))
        assert_no_secret(raw, texts)
        local inner = assert_refused(responses, 401, "IotHubUnauthorizedAccess", 401002)
        assert.equal("Unauthorized", inner.message) -- what the hub says; the reason is in info
        assert.is_table(inner.info)
        assert(inner.info.reason:find(case[3], 1, true), "reason '" .. inner.info.reason .. "' lacks '" .. case[3] .. "'")
        steady()
      end)
    end

    it("accepts a token inside the 5-minute skew, then refuses the same token once that has passed", function()
      local se = os.time() - 298
      local token = E.token({ se = se })
      secrets[#secrets + 1] = token
      assert.equal(200, (emu:api("GET", "/jobs/v2/steady", nil, { Authorization = token })))
      while os.time() <= se + 301 do core.sleep(0.2) end
      local responses = send(hostile.request("GET", JOB, { "Authorization: " .. token }))
      local inner = assert_refused(responses, 401, "IotHubUnauthorizedAccess", 401002)
      assert.truthy(inner.info.reason:find("token expired", 1, true))
      steady()
    end)
  end)

  describe("deep and huge queries", function()
    local function query(sql)
      return emu:api("POST", "/devices/query", { query = sql })
    end
    local function assert_query_refused(status, body, headers, name, code, fragment)
      assert.equal(math.floor(code / 1000), status)
      assert.equal(name, headers["iothub-errorcode"])
      local inner = E.inner_error(body)
      assert.equal(code, inner.errorCode)
      assert(inner.message:find(fragment, 1, true), inner.message)
    end

    it("refuses parentheses and NOTs nested 300 deep with 400 ArgumentInvalid", function()
      local status, body, h = query("SELECT * FROM devices WHERE " .. ("("):rep(300) .. "deviceId = 'x'"
        .. (")"):rep(300))
      assert_query_refused(status, body, h, "ArgumentInvalid", 400004, "nested too deeply")
      steady()
      status, body, h = query("SELECT * FROM devices WHERE " .. ("NOT "):rep(300) .. "deviceId = 'x'")
      assert_query_refused(status, body, h, "ArgumentInvalid", 400004, "nested too deeply")
      steady()
    end)

    it("refuses a body whose JSON nests 200 deep with 400 IotHubFormatError", function()
      local text = '{"query":"SELECT * FROM devices","x":' .. ("["):rep(200) .. ("]"):rep(200) .. "}"
      local status, body, h = emu:api("POST", "/devices/query", text)
      assert_query_refused(status, body, h, "IotHubFormatError", 400006, "nesting deeper than")
      steady()
    end)

    it("answers an IN list that fills the 8,192-character limit, and refuses a longer one", function()
      local ids = { "'myDeviceId'", "'door-001'" }
      local sql
      repeat
        ids[#ids + 1] = string.format("'filler-%05d'", #ids)
        sql = "SELECT * FROM devices WHERE deviceId IN [" .. table.concat(ids, ",") .. "]"
      until #sql > 8192 - 20
      local status, rows = query(sql)
      assert.equal(200, status)
      local got = {}
      for _, r in ipairs(rows) do got[#got + 1] = r.deviceId end
      table.sort(got)
      assert.same({ "door-001", "myDeviceId" }, got)
      steady()
      local body, h
      for _ = 1, 10 do ids[#ids + 1] = "'more'" end
      status, body, h = query("SELECT * FROM devices WHERE deviceId IN [" .. table.concat(ids, ",") .. "]")
      assert_query_refused(status, body, h, "ArgumentInvalid", 400004, "8192")
      steady()
    end)

    it("refuses a 1 MB query body with 413 MessageTooLarge before decoding it", function()
      local text = core.json_encode({ query = "SELECT * FROM devices WHERE deviceId = '" .. ("q"):rep(1024 * 1024) .. "'" })
      local status, body, h = emu:api("POST", "/devices/query", text)
      assert_query_refused(status, body, h, "MessageTooLarge", 413001, "at most 131072")
      steady()
    end)
  end)

  it("keeps keys and signatures out of its logs", function()
    local logs = (shell.read_file(emu.dir .. "/logs/error.log") or "") .. (shell.read_file(emu.dir .. "/logs/access.log") or "")
      .. (shell.read_file(emu.dir .. "/logs/emulator.log") or "")
    assert(logs:find("401 for GET", 1, true), "the 401 reasons were not logged")
    for _, s in ipairs(secrets) do
      assert.is_nil(logs:find(s, 1, true), "a secret is in the logs: " .. s:sub(1, 12) .. "...")
    end
  end)
end)
