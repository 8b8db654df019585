local core = require "iothub.core"

local function contains(s, sub) return s:find(sub, 1, true) ~= nil end

local function all_bytes()
  local t = {}
  for i = 0, 255 do t[#t + 1] = string.char(i) end
  return table.concat(t)
end

describe("base64_encode", function()
  it("matches the RFC 4648 test vectors", function()
    local vectors = {
      [""] = "", f = "Zg==", fo = "Zm8=", foo = "Zm9v",
      foob = "Zm9vYg==", fooba = "Zm9vYmE=", foobar = "Zm9vYmFy",
    }
    for plain, encoded in pairs(vectors) do
      assert.equal(encoded, core.base64_encode(plain))
    end
  end)

  it("encodes the SAS test key and binary data", function()
    assert.equal("cGFzc3dvcmQ=", core.base64_encode("password"))
    assert.equal("AP8=", core.base64_encode("\0\255"))
    assert.equal("+/+/", core.base64_encode("\251\255\191"))
  end)

  it("raises for a non-string argument", function()
    assert.has_error(function() core.base64_encode({}) end)
  end)
end)

describe("base64_decode", function()
  it("decodes the RFC 4648 test vectors", function()
    assert.equal("", core.base64_decode(""))
    assert.equal("f", core.base64_decode("Zg=="))
    assert.equal("fo", core.base64_decode("Zm8="))
    assert.equal("foobar", core.base64_decode("Zm9vYmFy"))
    assert.equal("password", core.base64_decode("cGFzc3dvcmQ="))
  end)

  it("round-trips every byte value at every padding length", function()
    local data = all_bytes()
    for cut = 0, 2 do
      local s = data:sub(1, #data - cut)
      assert.equal(s, core.base64_decode(core.base64_encode(s)))
    end
  end)

  it("rejects a length that is not a multiple of 4", function()
    local v, msg, code = core.base64_decode("cGFzc3dvcmQ")
    assert.is_nil(v)
    assert.equal("InvalidBase64", code)
    assert.truthy(contains(msg, "multiple of 4"), msg)
  end)

  it("names the position of a bad character", function()
    local v, msg, code = core.base64_decode("cGF*c3dvcmQ=")
    assert.is_nil(v)
    assert.equal("InvalidBase64", code)
    assert.truthy(contains(msg, "position 4"), msg)
  end)

  it("rejects whitespace, url-safe alphabet and misplaced padding", function()
    for _, bad in ipairs({ "cGFz c3dv", "ab-_", "Zg==Zg==", "====", "Z===", "ab=c" }) do
      local v, msg, code = core.base64_decode(bad)
      assert.is_nil(v, bad)
      assert.equal("InvalidBase64", code, bad)
      assert.is_string(msg)
    end
  end)

  it("never echoes the input in its message", function()
    local secret = "c2VjcmV0LWtleS1tYXRlcmlhbA!!"
    local _, msg = core.base64_decode(secret)
    assert.is_false(contains(msg, secret))
    assert.is_false(contains(msg, "c2VjcmV0"))
  end)
end)

describe("url_encode", function()
  it("leaves only A-Z a-z 0-9 - _ . ~ unescaped", function()
    local unreserved = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~"
    assert.equal(unreserved, core.url_encode(unreserved))
    for i = 0, 255 do
      local c = string.char(i)
      if not unreserved:find(c, 1, true) then
        assert.equal(string.format("%%%02X", i), core.url_encode(c))
      end
    end
  end)

  it("escapes characters that encodeURIComponent would keep, in upper-case hex", function()
    assert.equal("%21%27%28%29%2A", core.url_encode("!'()*"))
    assert.equal("a%20b%2Fc%2Bd%3De", core.url_encode("a b/c+d=e"))
    assert.equal("encode%28%27Me%27%29", core.url_encode("encode('Me')"))
    assert.equal("%C3%A9", core.url_encode("\195\169"))
    assert.equal("", core.url_encode(""))
  end)
end)

describe("url_decode", function()
  it("round-trips every byte value", function()
    local data = all_bytes()
    assert.equal(data, core.url_decode(core.url_encode(data)))
  end)

  it("accepts lower-case hex and leaves '+' alone", function()
    assert.equal("a/b", core.url_decode("a%2fb"))
    assert.equal("a+b", core.url_decode("a+b"))
    assert.equal("plain", core.url_decode("plain"))
  end)

  it("rejects truncated or non-hex escapes with a position", function()
    local cases = { ["%"] = 1, ["%4"] = 1, ["%zz"] = 1, ["abc%g1"] = 4, ["ab%2"] = 3 }
    for input, pos in pairs(cases) do
      local v, msg, code = core.url_decode(input)
      assert.is_nil(v, input)
      assert.equal("InvalidEncoding", code)
      assert.truthy(contains(msg, "position " .. pos), msg)
    end
  end)
end)

describe("uuid4", function()
  it("returns a canonical lower-case version 4 UUID", function()
    for _ = 1, 50 do
      local u = core.uuid4()
      assert.equal(36, #u)
      assert.truthy(u:match("^%x%x%x%x%x%x%x%x%-%x%x%x%x%-4%x%x%x%-[89ab]%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"), u)
      assert.equal(u:lower(), u)
    end
  end)

  it("does not repeat", function()
    local seen = {}
    for _ = 1, 1000 do
      local u = core.uuid4()
      assert.is_nil(seen[u])
      seen[u] = true
    end
  end)
end)
