local core = require "iothub.core"

local function contains(s, sub) return s:find(sub, 1, true) ~= nil end

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local KEY = "cGFzc3dvcmQ=" -- base64("password")
local HUB = "myhub.azure-devices.net"
local HUB_TOKEN = "SharedAccessSignature sr=myhub.azure-devices.net"
  .. "&sig=QSsTq4hIq8YzaKkHvHYM34vUvXN2XD%2FX%2Byr4pyjF%2ByY%3D&se=1700000000&skn=iothubowner"
-- A realistic-looking 32-byte key used to check that messages never leak it.
local SECRET_KEY = "Zm9vYmFyLXNlY3JldC1rZXktbWF0ZXJpYWwtMTIzNDU2Nzg="

describe("hmac_sha256", function()
  it("matches the Node SDK test vector", function()
    local mac = core.hmac_sha256(core.base64_decode(KEY), "string-to-sign")
    assert.equal(32, #mac)
    assert.equal("o1n1hiIVgzVA2+krq9ty1Z4xsIJKJZP3dYT8MOi65Y4=", core.base64_encode(mac))
  end)

  it("matches RFC 4231 test case 2 and the empty-key value", function()
    assert.equal("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
      hex(core.hmac_sha256("Jefe", "what do ya want for nothing?")))
    assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
      hex(core.hmac_sha256("", "")))
  end)

  it("raises for non-string arguments", function()
    assert.has_error(function() core.hmac_sha256(nil, "x") end)
    assert.has_error(function() core.hmac_sha256("k", {}) end)
  end)
end)

describe("sas_token", function()
  it("produces the Node SDK signature for uri/12345", function()
    local tok = core.sas_token { resource = "uri", key = KEY, expiry = 12345 }
    assert.equal("SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&se=12345", tok)
  end)

  it("produces the worked hub example exactly", function()
    assert.equal(HUB_TOKEN,
      core.sas_token { resource = HUB, key = KEY, expiry = 1700000000, keyName = "iothubowner" })
  end)

  it("url-encodes the key name strictly", function()
    local tok = core.sas_token { resource = "uri", key = KEY, expiry = 12345, keyName = "encode('Me')" }
    assert.equal("&skn=encode%28%27Me%27%29", tok:sub(-#"&skn=encode%28%27Me%27%29"))
  end)

  it("keeps the field order sr, sig, se, skn and omits skn without a key name", function()
    local tok = core.sas_token { resource = HUB, key = KEY, expiry = 1, keyName = "service" }
    assert.truthy(tok:match("^SharedAccessSignature sr=[^&]+&sig=[^&]+&se=1&skn=service$"), tok)
    local bare = core.sas_token { resource = HUB, key = KEY, expiry = 1 }
    assert.is_false(contains(bare, "skn="))
    assert.truthy(bare:match("&se=1$"), bare)
    assert.equal(bare, core.sas_token { resource = HUB, key = KEY, expiry = 1, keyName = "" })
  end)

  it("signs the url-encoded resource and encodes it in sr", function()
    local res = HUB .. "/devices/d 1"
    local tok = core.sas_token { resource = res, key = KEY, expiry = 42 }
    local enc = core.url_encode(res)
    local sig = core.url_encode(core.base64_encode(core.hmac_sha256("password", enc .. "\n42")))
    assert.equal("SharedAccessSignature sr=" .. enc .. "&sig=" .. sig .. "&se=42", tok)
    assert.truthy(contains(tok, "sr=myhub.azure-devices.net%2Fdevices%2Fd%201&"), tok)
  end)

  it("returns InvalidKey for a key that is not base64, without echoing it", function()
    for _, bad in ipairs({ "not base64!", SECRET_KEY:sub(1, -2), "" }) do
      local tok, msg, code = core.sas_token { resource = HUB, key = bad, expiry = 1 }
      assert.is_nil(tok)
      assert.equal("InvalidKey", code)
      assert.truthy(contains(msg, "base64"), msg)
      if #bad > 0 then assert.is_false(contains(msg, bad)) end
    end
    local _, msg = core.sas_token { resource = HUB, key = SECRET_KEY .. "*", expiry = 1 }
    assert.is_false(contains(msg, SECRET_KEY:sub(1, 12)))
  end)

  it("raises on misuse", function()
    assert.has_error(function() core.sas_token("x") end)
    assert.has_error(function() core.sas_token { key = KEY, expiry = 1 } end)
    assert.has_error(function() core.sas_token { resource = "", key = KEY, expiry = 1 } end)
    assert.has_error(function() core.sas_token { resource = HUB, expiry = 1 } end)
    assert.has_error(function() core.sas_token { resource = HUB, key = KEY } end)
    assert.has_error(function() core.sas_token { resource = HUB, key = KEY, expiry = 1.5 } end)
    assert.has_error(function() core.sas_token { resource = HUB, key = KEY, expiry = "1" } end)
    assert.has_error(function() core.sas_token { resource = HUB, key = KEY, expiry = -1 } end)
    assert.has_error(function() core.sas_token { resource = HUB, key = KEY, expiry = 1, keyName = 5 } end)
  end)
end)

describe("parse_sas_token", function()
  it("parses a token made by sas_token", function()
    local t = core.parse_sas_token(HUB_TOKEN)
    assert.same({ sr = HUB, sig = "QSsTq4hIq8YzaKkHvHYM34vUvXN2XD/X+yr4pyjF+yY=", se = 1700000000,
      skn = "iothubowner" }, t)
    if math.type then assert.equal("integer", math.type(t.se)) end
  end)

  it("accepts fields in any order (Node puts skn before se) and ignores unknown fields", function()
    local t = core.parse_sas_token("SharedAccessSignature sr=bad&sig=XLU2ibNOYBbld3FpFIOHbPZv3Thp4wfK"
      .. "%2BcqZpJz66hE%3D&skn=keyName&se=1474440492")
    assert.equal("bad", t.sr)
    assert.equal("XLU2ibNOYBbld3FpFIOHbPZv3Thp4wfK+cqZpJz66hE=", t.sig)
    assert.equal(1474440492, t.se)
    assert.equal("keyName", t.skn)
    local u = core.parse_sas_token("SharedAccessSignature se=5&extra=1&sig=abc&sr=h")
    assert.same({ sr = "h", sig = "abc", se = 5 }, u)
    assert.is_nil(u.skn)
  end)

  it("rejects malformed tokens with InvalidToken and never echoes the signature", function()
    local sig = "Q2VjcmV0U2lnbmF0dXJlVmFsdWU"
    local cases = {
      { "sharedaccesssignature sr=h&sig=" .. sig .. "&se=1", "SharedAccessSignature " },
      { "SharedAccessSignature  sr=h&sig=" .. sig .. "&se=1", "sr" },
      { "Bearer " .. sig, "SharedAccessSignature " },
      { "SharedAccessSignature sig=" .. sig .. "&se=1", "sr" },
      { "SharedAccessSignature sr=h&se=1", "sig" },
      { "SharedAccessSignature sr=h&sig=" .. sig, "se" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&se=", "se" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&se=12a", "integer" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&se=1.5", "integer" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&se=-1", "integer" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&sig=" .. sig .. "&se=1", "more than once" },
      { "SharedAccessSignature sr=h&" .. sig .. "&se=1", "no '='" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "&se=1&", "empty" },
      { "SharedAccessSignature sr=h&sig=" .. sig .. "%zz&se=1", "percent" },
    }
    for _, c in ipairs(cases) do
      local t, msg, code = core.parse_sas_token(c[1])
      assert.is_nil(t, c[1])
      assert.equal("InvalidToken", code)
      assert.truthy(contains(msg, c[2]), msg)
      assert.is_false(contains(msg, sig), msg)
    end
  end)

  it("raises for a non-string argument", function()
    assert.has_error(function() core.parse_sas_token(nil) end)
  end)
end)

describe("constant_time_equals", function()
  it("compares contents and lengths", function()
    assert.is_true(core.constant_time_equals("abc", "abc"))
    assert.is_true(core.constant_time_equals("", ""))
    assert.is_false(core.constant_time_equals("abc", "abd"))
    assert.is_false(core.constant_time_equals("abc", "ab"))
    assert.is_false(core.constant_time_equals("ab", "abc"))
    assert.is_false(core.constant_time_equals("a\0b", "a\0c"))
    assert.is_true(core.constant_time_equals("a\0b", "a\0b"))
  end)

  it("raises for non-strings", function()
    assert.has_error(function() core.constant_time_equals("a", nil) end)
  end)
end)

describe("parse_connection_string", function()
  local GOOD = "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=" .. SECRET_KEY

  local function fails(cs, ...)
    local t, msg, code = core.parse_connection_string(cs)
    assert.is_nil(t, cs)
    assert.equal("InvalidConnectionString", code)
    for _, want in ipairs({ ... }) do
      assert.truthy(contains(msg, want), msg)
    end
    return msg
  end

  it("parses a service connection string", function()
    assert.same({ hostName = HUB, sharedAccessKeyName = "iothubowner", sharedAccessKey = SECRET_KEY },
      core.parse_connection_string(GOOD))
  end)

  it("splits at the first '=' so base64 padding survives", function()
    local t = core.parse_connection_string("HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. KEY)
    assert.equal(KEY, t.sharedAccessKey)
  end)

  it("matches keys case-insensitively, trims them and ignores empty parts", function()
    local t = core.parse_connection_string(" hostname = myhub.azure-devices.net ;; SHAREDACCESSKEYNAME=service;"
      .. "sharedaccesskey=" .. KEY .. ";")
    assert.same({ hostName = HUB, sharedAccessKeyName = "service", sharedAccessKey = KEY }, t)
  end)

  it("accepts a host with a port and a SharedAccessSignature instead of a key", function()
    local t = core.parse_connection_string("HostName=localhost:8443;SharedAccessSignature=" .. HUB_TOKEN)
    assert.equal("localhost:8443", t.hostName)
    assert.equal(HUB_TOKEN, t.sharedAccessSignature)
    assert.is_nil(t.sharedAccessKey)
    assert.is_nil(t.sharedAccessKeyName)
  end)

  it("reports a part without '=' by position and length only", function()
    local msg = fails("HostName=h.net;" .. SECRET_KEY:gsub("=", "") .. ";SharedAccessKeyName=x", "part 2", "no '='",
      "Key=Value")
    assert.is_false(contains(msg, SECRET_KEY:sub(1, 10)))
  end)

  it("reports duplicate keys", function()
    fails(GOOD .. ";hostname=other.net", "HostName", "twice", "parts 1 and 4")
  end)

  it("names an unknown key and lists the expected ones", function()
    fails(GOOD .. ";Foo=bar", "'Foo'", "part 4", "HostName", "SharedAccessKeyName", "SharedAccessKey")
  end)

  it("does not echo an unknown key that may be key material", function()
    local material = "Zm9vYmFyLXNl+Y3JldC1r"
    local msg = fails("HostName=h.net;" .. material .. "=;SharedAccessKeyName=x", "part 2", "unknown key")
    assert.is_false(contains(msg, material))
  end)

  it("explains that DeviceId/ModuleId mean a device connection string", function()
    local cs = "HostName=myhub.azure-devices.net;DeviceId=dev1;SharedAccessKey=" .. SECRET_KEY
    local msg = fails(cs, "DeviceId", "device", "iothubowner", "service", "registryReadWrite")
    assert.is_false(contains(msg, SECRET_KEY))
    fails("HostName=h.net;DeviceId=d;ModuleId=m;SharedAccessKey=" .. KEY, "device")
    fails("HostName=h.net;ModuleId=m;SharedAccessKey=" .. KEY, "ModuleId", "iothubowner")
  end)

  it("requires HostName", function()
    fails("SharedAccessKeyName=iothubowner;SharedAccessKey=" .. KEY, "no HostName", "HostName=")
  end)

  it("rejects implausible host names", function()
    local key = ";SharedAccessKeyName=s;SharedAccessKey=" .. KEY
    fails("HostName=https://myhub.azure-devices.net/" .. key, "https://")
    fails("HostName=my hub.net" .. key, "not a valid host name", "character 3")
    fails("HostName=myhub..net" .. key, "not a valid host name")
    fails("HostName=-myhub.net" .. key, "not a valid host name")
    fails("HostName=myhub.net:0" .. key, "port")
    fails("HostName=myhub.net:70000" .. key, "port")
    fails("HostName=myhub.net:" .. key, "port")
    fails("HostName=myhub.net." .. key, "not a valid host name")
    fails("HostName=" .. key, "HostName is empty")
  end)

  it("does not echo a secret glued onto HostName by a missing ';'", function()
    local msg = fails("HostName=myhub.azure-devices.net,SharedAccessKey=" .. SECRET_KEY .. ";SharedAccessKeyName=s",
      "myhub.azure-devices.net")
    assert.is_false(contains(msg, SECRET_KEY:sub(1, 10)))
  end)

  it("requires a key pair or a signature", function()
    fails("HostName=h.net", "neither", "SharedAccessSignature", "iothubowner")
    fails("HostName=h.net;SharedAccessKey=" .. KEY, "no SharedAccessKeyName")
    fails("HostName=h.net;SharedAccessKeyName=iothubowner", "'iothubowner'", "no SharedAccessKey")
    fails("HostName=h.net;SharedAccessKeyName=;SharedAccessKey=" .. KEY, "SharedAccessKeyName is empty")
    local msg = fails("HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY
      .. ";SharedAccessSignature=" .. HUB_TOKEN, "both")
    assert.is_false(contains(msg, SECRET_KEY))
    assert.is_false(contains(msg, "QSsTq4hIq8Yz"))
  end)

  it("rejects a SharedAccessKey that is not base64 or empty, without echoing it", function()
    local bad = SECRET_KEY:sub(1, -3) .. "!!"
    local msg = fails("HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. bad,
      "SharedAccessKey is not valid base64 (" .. #bad .. " characters)")
    assert.is_false(contains(msg, bad))
    assert.is_false(contains(msg, SECRET_KEY:sub(1, 10)))
    fails("HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=", "SharedAccessKey is not valid base64 (0 characters)")
  end)

  it("rejects an unparseable SharedAccessSignature without echoing it", function()
    local sigtext = "Q2VjcmV0U2lnbmF0dXJlVmFsdWU"
    local msg = fails("HostName=h.net;SharedAccessSignature=SharedAccessSignature sr=h&sig=" .. sigtext,
      "SharedAccessSignature is not a valid SAS token", "se")
    assert.is_false(contains(msg, sigtext))
    msg = fails("HostName=h.net;SharedAccessSignature=" .. sigtext, "SharedAccessSignature is not a valid SAS token")
    assert.is_false(contains(msg, sigtext))
  end)

  it("never includes key or signature text in any error", function()
    local bad_inputs = {
      "HostName=h.net;SharedAccessKey=" .. SECRET_KEY,
      "SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY,
      "HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY .. ";SharedAccessKey=" .. SECRET_KEY,
      "HostName=bad host;SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY,
      "HostName=h.net;SharedAccessKeyName=s;" .. SECRET_KEY,
      "HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY .. "#",
      "HostName=h.net;SharedAccessKeyName=s;SharedAccessKey=" .. SECRET_KEY .. ";Bogus=1",
    }
    for _, cs in ipairs(bad_inputs) do
      local t, msg = core.parse_connection_string(cs)
      assert.is_nil(t, cs)
      assert.is_false(contains(msg, SECRET_KEY:sub(1, 12)), msg)
    end
  end)

  it("raises for a non-string argument", function()
    assert.has_error(function() core.parse_connection_string(nil) end)
  end)
end)
