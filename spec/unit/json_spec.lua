-- Exact-number JSON codec (csrc/json.c).
local core = require "iothub.core"
local cjson = require "cjson"

local encode, decode = core.json_encode, core.json_decode
local is54 = math.type ~= nil -- Lua 5.3+ has integers; LuaJIT does not
local MAXINT, MININT = math.maxinteger, math.mininteger -- luacheck: ignore 143 (nil on LuaJIT)

-- Asserts a nil, message, code failure and returns the message.
local function fails(code, ok, msg, got_code, ...)
  assert.is_nil(ok, "expected a failure, got " .. tostring(ok))
  assert.equal(code, got_code)
  assert.is_string(msg)
  assert.equal(0, select("#", ...))
  return msg
end

-- Deep equality; numbers compare by value (3 == 3.0), metatables are ignored.
local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do
    if not same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function nested(depth, leaf)
  local v = leaf
  for _ = 1, depth do v = { v } end
  return v
end

describe("core.null and core.json_array", function()
  it("core.null is a NULL light userdata, the same value as cjson.null", function()
    assert.equal("userdata", type(core.null))
    assert.equal(cjson.null, core.null)
    assert.is_nil(getmetatable(core.null))
  end)

  it("json_array marks the given table and returns it", function()
    local t = { 1, 2 }
    assert.equal(t, core.json_array(t))
    assert.equal(core.json_array_mt, getmetatable(t))
    assert.equal("table", type(core.json_array_mt))
  end)

  it("json_array() creates an empty marked table that encodes as []", function()
    local t = core.json_array()
    assert.equal(core.json_array_mt, getmetatable(t))
    assert.is_nil(next(t))
    assert.equal("[]", encode(t))
    assert.equal("[]", encode(core.json_array(nil)))
  end)

  it("json_array raises on a non-table argument", function()
    assert.has_error(function() core.json_array(5) end)
    assert.has_error(function() core.json_array("x") end)
  end)
end)

describe("json_encode", function()
  it("encodes scalars", function()
    assert.equal("true", encode(true))
    assert.equal("false", encode(false))
    assert.equal("null", encode(core.null))
    assert.equal('"abc"', encode("abc"))
    assert.equal('""', encode(""))
    assert.equal("3", encode(3))
    assert.equal("-17", encode(-17))
    assert.equal("0", encode(0))
  end)

  it("refuses nil, naming the path", function()
    local msg = fails("UnsupportedType", encode(nil))
    assert.matches("nil", msg)
    assert.matches("at %$", msg)
    fails("UnsupportedType", encode())
  end)

  it("refuses functions, threads and full userdata, naming the type and the path", function()
    local msg = fails("UnsupportedType", encode({ payload = { cb = print } }))
    assert.matches("cannot encode a function at $.payload.cb", msg, 1, true)
    msg = fails("UnsupportedType", encode({ a = { b = { 1, print } } }))
    assert.matches("$.a.b[2]", msg, 1, true)
    msg = fails("UnsupportedType", encode({ co = coroutine.create(print) }))
    assert.matches("thread at $.co", msg, 1, true)
    msg = fails("UnsupportedType", encode({ io.stdout }))
    assert.matches("userdata at $[1]", msg, 1, true)
  end)

  it("quotes odd keys in paths", function()
    local msg = fails("UnsupportedType", encode({ ["a b"] = { ['q"1'] = print } }))
    assert.matches('$["a b"]["q\\"1"]', msg, 1, true)
  end)

  describe("strings", function()
    it("escapes quote, backslash and control characters but not '/'", function()
      assert.equal([["a\"b\\c/d"]], encode('a"b\\c/d'))
      assert.equal([["\b\f\n\r\t"]], encode("\b\f\n\r\t"))
      assert.equal([["\u0000\u0001\u001f"]], encode("\0\1\31"))
      assert.equal('"\127"', encode("\127"))
    end)

    it("passes valid UTF-8 through unescaped, including the edges of each range", function()
      local valid = {
        "\194\128", "\223\191", "\224\160\128", "\237\159\191", "\238\128\128",
        "\239\191\191", "\240\144\128\128", "\244\143\191\191", "héllo 😀",
      }
      for _, s in ipairs(valid) do
        assert.equal('"' .. s .. '"', encode(s))
      end
    end)

    local invalid = {
      { "\128", "continuation byte" }, { "\191", "continuation byte" },
      { "\192\128", "overlong 2-byte" }, { "\193\191", "overlong 2-byte" },
      { "\224\128\128", "overlong 3-byte" }, { "\224\159\191", "overlong 3-byte" },
      { "\240\128\128\128", "overlong 4-byte" }, { "\240\143\191\191", "overlong 4-byte" },
      { "\237\160\128", "surrogate D800" }, { "\237\191\191", "surrogate DFFF" },
      { "\244\144\128\128", "above U+10FFFF" }, { "\245\128\128\128", "invalid lead" },
      { "\255", "invalid byte" }, { "\226\130", "truncated" }, { "\226\40\161", "bad continuation" },
    }
    for _, case in ipairs(invalid) do
      it("refuses invalid UTF-8 (" .. case[2] .. ") with the path", function()
        local msg = fails("InvalidUtf8", encode({ name = { "ok", "x" .. case[1] } }))
        assert.matches("$.name[2]", msg, 1, true)
        assert.matches("byte 2 of the string", msg, 1, true)
      end)
    end

    it("refuses invalid UTF-8 in object keys", function()
      local msg = fails("InvalidUtf8", encode({ outer = { ["k\255"] = 1 } }))
      assert.matches("key", msg)
      assert.matches("$.outer", msg, 1, true)
    end)

    it("handles long strings with many escapes", function()
      local s = string.rep('a"\n', 10000)
      local out = encode(s)
      assert.equal(2 + 10000 * 5, #out)
      assert.equal(s, decode(out))
    end)
  end)

  describe("numbers", function()
    it("encodes integral floats up to 2^53 without a fraction", function()
      assert.equal("3", encode(3.0))
      assert.equal("-42", encode(-42.0))
      assert.equal("9007199254740992", encode(2.0 ^ 53))
      assert.equal("-9007199254740992", encode(-(2.0 ^ 53)))
      local z = encode(-0.0)
      assert.is_true(z == "0" or z == "-0", z)
    end)

    it("uses the shortest of 15, 16 and 17 significant digits that round-trips", function()
      assert.equal("0.1", encode(0.1))
      assert.equal("1.5", encode(1.5))
      assert.equal("-2.5", encode(-2.5))
      assert.equal("0.3333333333333333", encode(1 / 3))
      assert.equal("0.30000000000000004", encode(0.1 + 0.2))
      assert.equal("3.141592653589793", encode(math.pi))
      assert.equal("1e-07", encode(1e-7))
      assert.equal("1.0000000000000002", encode(1.0000000000000002))
      assert.equal("4.94065645841247e-324", encode(2.0 ^ -1074)) -- 15 digits already read back
    end)

    it("round-trips floats exactly", function()
      math.randomseed(7)
      local values = { 0.1, 1 / 3, 2 / 3, 1e-300, 123456.789, -9.87654321e-5, 2.0 ^ -1074, 2.0 ^ -1022, 4503599627370495.5 }
      for _ = 1, 500 do
        values[#values + 1] = (math.random() - 0.5) * 10 ^ math.random(-30, 15)
      end
      for _, x in ipairs(values) do
        local text = assert(encode(x))
        if x ~= math.floor(x) then
          local back = decode(text)
          assert.equal(x, back, text)
          if is54 then assert.equal("float", math.type(back)) end
        end
      end
    end)

    it("refuses NaN and infinities", function()
      local msg = fails("NumberOutOfRange", encode({ x = 0 / 0 }))
      assert.matches("NaN", msg)
      assert.matches("$.x", msg, 1, true)
      fails("NumberOutOfRange", encode(math.huge))
      fails("NumberOutOfRange", encode({ -math.huge }))
    end)

    it("refuses integral floats beyond 2^53 and explains why", function()
      local msg = fails("NumberOutOfRange", encode({ big = 1e300 }))
      assert.matches("$.big", msg, 1, true)
      assert.matches("rounded", msg)
      assert.matches("string", msg)
      assert.matches("integer", msg)
      fails("NumberOutOfRange", encode(2.0 ^ 53 + 2))
      fails("NumberOutOfRange", encode(-(2.0 ^ 63)))
    end)

    if is54 then
      it("encodes Lua 5.4 integers exactly over the full int64 range", function()
        assert.equal("9223372036854775807", encode(MAXINT))
        assert.equal("-9223372036854775808", encode(MININT))
        assert.equal("9007199254740993", encode(9007199254740993))
        assert.equal("[1,-1,1234567890123]", encode({ 1, -1, 1234567890123 }))
      end)
    end
  end)

  describe("tables", function()
    it("encodes an empty plain table as {} and a marked one as []", function()
      assert.equal("{}", encode({}))
      assert.equal("[]", encode(core.json_array({})))
    end)

    it("encodes keys 1..n as an array and string keys as an object", function()
      assert.equal("[1,2,3]", encode({ 1, 2, 3 }))
      assert.equal('["a",true,null]', encode({ "a", true, core.null }))
      assert.equal('{"a":1}', encode({ a = 1 }))
      assert.equal("[[1],[[]],{}]", encode({ { 1 }, { core.json_array() }, {} }))
    end)

    it("encodes marked arrays as elements 1..#t with holes as null, ignoring other keys", function()
      local t = core.json_array({ 1, 2, 3, 4 })
      t[3] = nil
      assert.equal(4, #t) -- precondition: the border stays at 4
      assert.equal("[1,2,null,4]", encode(t))
      assert.equal("[1,2]", encode(core.json_array({ 1, 2, extra = "x" })))
    end)

    it("emits object keys sorted bytewise with no whitespace", function()
      assert.equal('{"a":2,"b":1,"c":{"y":2,"z":1}}', encode({ b = 1, a = 2, c = { z = 1, y = 2 } }))
      assert.equal('{"":0,"B":1,"_":2,"a":3,"a\\u0000":5,"aa":4,"é":6}',
        encode({ ["é"] = 6, a = 3, ["a\0"] = 5, aa = 4, _ = 2, B = 1, [""] = 0 }))
    end)

    it("sorts many keys and keeps nested values intact", function()
      local t, keys = {}, {}
      for i = 1, 300 do
        local k = string.format("k%03d", (i * 7919) % 1000)
        t[k] = { i, { inner = "v" .. i, zz = i, aa = -i } }
        keys[#keys + 1] = k
      end
      table.sort(keys)
      local parts = {}
      for _, k in ipairs(keys) do
        local i = t[k][1]
        parts[#parts + 1] = string.format('"%s":[%d,{"aa":%d,"inner":"v%d","zz":%d}]', k, i, -i, i, i)
      end
      assert.equal("{" .. table.concat(parts, ",") .. "}", encode(t))
    end)

    it("refuses sparse arrays, naming the path and the fix", function()
      local msg = fails("InvalidTable", encode({ rows = { [1] = "a", [3] = "c" } }))
      assert.matches("$.rows", msg, 1, true)
      assert.matches("core.null", msg, 1, true)
      assert.matches("core.json_array", msg, 1, true)
      fails("InvalidTable", encode({ [2] = 1 }))
      fails("InvalidTable", encode({ [0] = 1, 2 }))
      fails("InvalidTable", encode({ [-1] = 1 }))
      fails("InvalidTable", encode({ [1.5] = 1 }))
    end)

    it("refuses mixed and non-string keys", function()
      local msg = fails("InvalidTable", encode({ x = { 1, a = 2 } }))
      assert.matches("$.x", msg, 1, true)
      assert.matches("string", msg)
      fails("InvalidTable", encode({ a = 1, [5] = 2 }))
      msg = fails("InvalidTable", encode({ [true] = 1 }))
      assert.matches("boolean key", msg)
      fails("InvalidTable", encode({ [{}] = 1 }))
    end)

    it("allows 128 levels of nesting and refuses 129", function()
      assert.equal(string.rep("[", 128) .. "1" .. string.rep("]", 128), encode(nested(128, 1)))
      local msg = fails("JsonDepth", encode(nested(129, 1)))
      assert.matches("128", msg)
      assert.matches("[1]", msg, 1, true)
    end)

    it("reports a reference cycle as JsonDepth", function()
      local t = { name = "loop" }
      t.self = t
      local msg = fails("JsonDepth", encode({ root = t }))
      assert.matches("cycle", msg)
      assert.matches(".self.self", msg, 1, true)
    end)

    it("reuses the output buffer correctly across nested reordering", function()
      math.randomseed(3)
      local function bytewise(a, b)
        local n = math.min(#a, #b)
        for i = 1, n do
          local x, y = a:byte(i), b:byte(i)
          if x ~= y then return x < y end
        end
        return #a < #b
      end
      local function ref(v)
        if type(v) == "number" then return string.format("%d", v) end
        if type(v) == "string" then return '"' .. v .. '"' end
        if type(v) == "boolean" then return tostring(v) end
        if #v > 0 then
          local out = {}
          for i = 1, #v do out[i] = ref(v[i]) end
          return "[" .. table.concat(out, ",") .. "]"
        end
        local keys = {}
        for k in pairs(v) do keys[#keys + 1] = k end
        table.sort(keys, bytewise)
        local out = {}
        for i, k in ipairs(keys) do out[i] = '"' .. k .. '":' .. ref(v[k]) end
        return "{" .. table.concat(out, ",") .. "}"
      end
      local function gen(depth)
        local r = math.random(1, depth > 4 and 3 or 5)
        if r == 1 then return math.random(-1000, 1000) end
        if r == 2 then return "s" .. math.random(1, 99) end
        if r == 3 then return math.random() < 0.5 end
        local t = {}
        if r == 4 then
          for i = 1, math.random(1, 6) do t[i] = gen(depth + 1) end
        else
          for _ = 1, math.random(1, 12) do t["k" .. math.random(1, 40)] = gen(depth + 1) end
        end
        return t
      end
      for _ = 1, 200 do
        local v = gen(0)
        assert.equal(ref(v), encode(v))
      end
    end)
  end)
end)

describe("json_decode", function()
  it("raises when the argument is not a string", function()
    assert.has_error(function() decode(5) end)
    assert.has_error(function() decode(nil) end)
    assert.has_error(function() decode({}) end)
  end)

  it("decodes literals, strings and whitespace", function()
    assert.is_true(decode("true"))
    assert.is_false(decode("false"))
    assert.equal(core.null, decode("null"))
    assert.equal("x", decode(' \t\r\n"x" \t\r\n'))
    local t = decode(' { "a" : [ 1 , 2 ] , "b" : { } } ')
    assert.equal(2, t.a[2])
  end)

  it("gives integers as Lua integers", function()
    local t = decode('{"deviceCount":3}')
    assert.equal(3, t.deviceCount)
    assert.equal("3", tostring(t.deviceCount))
    if is54 then assert.equal("integer", math.type(t.deviceCount)) end
    assert.equal(-12, decode("-12"))
    assert.equal(0, decode("-0"))
  end)

  if is54 then
    it("decodes the full int64 range exactly under Lua 5.4", function()
      assert.equal(MAXINT, decode("9223372036854775807"))
      assert.equal(MININT, decode("-9223372036854775808"))
      local v = decode("9007199254740993")
      assert.equal("integer", math.type(v))
      assert.equal(9007199254740993, v)
      assert.equal("9007199254740993", encode(v))
      assert.equal('{"id":9007199254740993}', encode(decode('{"id":9007199254740993}')))
    end)

    it("refuses integers beyond int64 under Lua 5.4, naming the byte offset", function()
      local msg = fails("NumberOutOfRange", decode('{"n": 9223372036854775808}'))
      assert.matches("byte 7", msg, 1, true)
      assert.matches("64-bit", msg, 1, true)
      fails("NumberOutOfRange", decode("-9223372036854775809"))
      fails("NumberOutOfRange", decode("123456789012345678901234567890"))
    end)
  else
    it("decodes integers up to 2^53 under LuaJIT", function()
      assert.equal(9007199254740992, decode("9007199254740992"))
      assert.equal(-9007199254740992, decode("-9007199254740992"))
    end)

    it("refuses integers beyond 2^53 under LuaJIT, naming the byte offset", function()
      local msg = fails("NumberOutOfRange", decode("[9007199254740993]"))
      assert.matches("byte 2", msg, 1, true)
      assert.matches("LuaJIT", msg, 1, true)
      fails("NumberOutOfRange", decode("-9007199254740993"))
      fails("NumberOutOfRange", decode("9223372036854775808"))
    end)
  end

  it("decodes fractions and exponents as floats", function()
    local cases = {
      ["0.1"] = 0.1, ["1.5"] = 1.5, ["-2.5e-3"] = -2.5e-3, ["1E2"] = 100, ["1e+2"] = 100,
      ["1e-2"] = 0.01, ["0e0"] = 0, ["-0.0"] = 0, ["1.0"] = 1, ["12345678901234567890.5"] = 12345678901234567890.5,
      ["1e-400"] = 0,
    }
    for text, want in pairs(cases) do
      local v = decode(text)
      assert.equal(want, v, text)
      if is54 then assert.equal("float", math.type(v), text) end
    end
  end)

  it("refuses floats that overflow a double", function()
    local msg = fails("NumberOutOfRange", decode("[1, 1e400]"))
    assert.matches("byte 5", msg, 1, true)
    fails("NumberOutOfRange", decode("-1e999"))
  end)

  it("decodes escapes", function()
    assert.equal('"\\/\b\f\n\r\t', decode([["\"\\\/\b\f\n\r\t"]]))
    assert.equal("\0A", decode([["\u0000\u0041"]]))
    assert.equal("é€", decode([["\u00e9\u20AC"]]))
    assert.equal("😀", decode([["\ud83d\ude00"]]))
    assert.equal("\244\143\191\191", decode([["\uDBFF\uDFFF"]]))
    assert.equal(1, decode([[{"k\u0065y":1}]]).key)
  end)

  it("decodes long strings with escapes", function()
    local body = string.rep("abc\\n", 5000)
    assert.equal(string.rep("abc\n", 5000), decode('"' .. body .. '"'))
  end)

  it("refuses lone and mismatched surrogates", function()
    for _, text in ipairs({ [["\ud800"]], [["\udc00"]], [["\ud83d\u0041"]], [["\ud83dx"]], [["\ud83d\ud83d"]] }) do
      local msg = fails("JsonSyntax", decode(text))
      assert.matches("surrogate", msg)
    end
  end)

  it("refuses raw control characters in strings", function()
    local msg = fails("JsonSyntax", decode('"a\tb"'))
    assert.matches("byte 3", msg, 1, true)
    fails("JsonSyntax", decode('"a\0b"'))
    fails("JsonSyntax", decode('"a\nb"'))
  end)

  it("refuses invalid UTF-8 in strings, naming the byte offset", function()
    for _, bad in ipairs({ "\255", "\192\175", "\237\160\128", "\244\144\128\128", "\226\130" }) do
      local msg = fails("InvalidUtf8", decode('["ok", "x' .. bad .. '"]'))
      assert.matches("byte 10", msg, 1, true)
    end
    assert.equal("é😀", decode('"é😀"'))
  end)

  it("gives arrays the array metatable and objects none", function()
    local t = decode('{"a":[],"o":{},"l":[1,[2]]}')
    assert.equal(core.json_array_mt, getmetatable(t.a))
    assert.equal(core.json_array_mt, getmetatable(t.l[2]))
    assert.is_nil(getmetatable(t))
    assert.is_nil(getmetatable(t.o))
    assert.equal('{"a":[],"l":[1,[2]],"o":{}}', encode(t))
  end)

  it("keeps null elements so arrays have no holes", function()
    local t = decode("[1,null,3]")
    assert.equal(3, #t)
    assert.equal(core.null, t[2])
    assert.equal("[1,null,3]", encode(t))
  end)

  it("lets the last duplicate key win", function()
    assert.equal(2, decode('{"a":1,"a":2}').a)
  end)

  it("accepts exactly the RFC 8259 number grammar", function()
    for _, good in ipairs({ "0", "-0", "10", "0.5", "-0.5e10", "1E-2", "9e9" }) do
      assert.is_not_nil(decode(good), good)
    end
    local bad = { "01", "-01", "+1", ".5", "1.", "1.e5", "1e", "1e+", "-", "0x10", "NaN", "Infinity", "-Infinity", "1_000", "00" }
    for _, text in ipairs(bad) do
      local msg = fails("JsonSyntax", decode(text))
      assert.matches("^JSON syntax error at byte %d+: ", msg)
    end
  end)

  it("refuses malformed documents with the byte offset", function()
    local cases = {
      { "", 1 }, { "   ", 4 }, { "[1,]", 4 }, { "[1 2]", 4 }, { '{"a":1,}', 8 }, { '{"a" 1}', 6 },
      { "{a:1}", 2 }, { "'a'", 1 }, { '"abc', 5 }, { '"\\x"', 2 }, { '"\\u12"', 2 }, { '"\\u12G4"', 2 },
      { "tru", 1 }, { "nul", 1 }, { "true false", 6 }, { "[", 2 }, { "{", 2 }, { "[1]]", 4 },
      { "\239\187\191{}", 1 }, { "1 2", 3 }, { '{"a":}', 6 }, { "[,1]", 2 }, { "/* */1", 1 },
      { "{,}", 2 }, { '{"a":1 "b":2}', 8 }, { "[1,2", 5 }, { "nulls", 5 },
    }
    for _, case in ipairs(cases) do
      local msg = fails("JsonSyntax", decode(case[1]))
      assert.matches("^JSON syntax error at byte " .. case[2] .. ": ", msg)
    end
  end)

  it("never echoes more than about 20 bytes of input", function()
    local msg = fails("JsonSyntax", decode("[" .. string.rep("x", 1000) .. "]"))
    assert.is_nil(msg:find(string.rep("x", 21), 1, true))
    assert.is_true(#msg < 160, msg)
  end)

  it("allows 128 levels of nesting and refuses 129", function()
    local t = decode(string.rep("[", 128) .. string.rep("]", 128))
    assert.equal("table", type(t))
    local msg = fails("JsonDepth", decode(string.rep("[", 129) .. string.rep("]", 129)))
    assert.matches("byte 129", msg, 1, true)
    fails("JsonDepth", decode(string.rep('{"a":', 129) .. "1" .. string.rep("}", 129)))
    assert.is_not_nil(decode(string.rep('{"a":', 128) .. "1" .. string.rep("}", 128)))
  end)

  it("decodes a 1,000-row page and re-encodes it byte for byte", function()
    local rows = {}
    for i = 1, 1000 do
      rows[i] = string.format(
        '{"deviceId":"dev-%04d","etag":"AAAAAAAAAA%d=","properties":{"desired":{"fw":"1.2.%d","interval":%d},'
          .. '"reported":{"tags":["a","b\\n"],"temp":%d.25}},"status":"enabled","version":%d}',
        i, i, i, i * 10, i, i + 1)
    end
    local text = "[" .. table.concat(rows, ",") .. "]"
    local page = assert(decode(text))
    assert.equal(1000, #page)
    assert.equal("dev-0500", page[500].deviceId)
    assert.equal(500.25, page[500].properties.reported.temp)
    assert.is_true(text == encode(page)) -- not assert.equal: the text is 250 kB
  end)
end)

describe("cross-check with lua-cjson", function()
  local docs = {
    { name = "dev-1", count = 3, ratio = 0.25, on = true, off = false, nothing = core.null },
    { 1, 2, 3, "x", { nested = { deeper = { "y", 1.5 } } } },
    { text = 'quote " backslash \\ slash / tab \t nl \n ctl \1 utf8 é😀' },
    { big = 123456789012, neg = -987654, small = 1e-5, frac = 12345.5 },
    { list = { {}, { a = 1 }, { 1 } } },
  }

  it("cjson decodes our encoding to equal values", function()
    for _, doc in ipairs(docs) do
      local text = assert(encode(doc))
      assert.is_true(same(doc, cjson.decode(text)), text)
    end
  end)

  it("we decode cjson's encoding to the values cjson decodes (number typing aside)", function()
    for _, doc in ipairs(docs) do
      local text = cjson.encode(doc)
      local ours, theirs = decode(text), cjson.decode(text)
      assert.is_true(same(ours, theirs), text)
      assert.is_true(same(ours, doc), text)
    end
  end)

  it("unlike cjson, keeps integer typing and full precision", function()
    local text = '{"deviceCount":3,"ratio":0.1234567890123456}'
    local ours = decode(text)
    assert.equal(0.1234567890123456, ours.ratio)
    assert.equal(text, encode(ours))
    if is54 then assert.equal("integer", math.type(ours.deviceCount)) end
  end)
end)

describe("locale independence", function()
  it("uses '.' even when the C locale's decimal separator is ','", function()
    local found
    for _, name in ipairs({ "de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "de_DE", "fr_FR" }) do
      -- These locales all use ','; LuaJIT's string.format ignores the locale, so trust the name.
      if os.setlocale(name, "numeric") then found = name break end
    end
    if not found then
      pending("no locale with a ',' decimal separator is installed")
      return
    end
    local ok, err = pcall(function()
      assert.equal("[0.5,0.1,1e-07,2.5e-100]", encode({ 0.5, 0.1, 1e-7, 2.5e-100 }))
      local t = decode("[0.5,1.25e2,-3.75]")
      assert.equal(0.5, t[1])
      assert.equal(125, t[2])
      assert.equal(-3.75, t[3])
      local msg = fails("NumberOutOfRange", encode(1e300))
      assert.matches("1e+300", msg, 1, true)
    end)
    os.setlocale("C", "numeric")
    assert(ok, err)
  end)
end)
