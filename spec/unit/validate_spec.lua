local core = require "iothub.core"

local function contains(s, sub) return s:find(sub, 1, true) ~= nil end

-- V.f(...) calls core.f and packs all its results, so they survive being a non-last argument.
local V = setmetatable({}, { __index = function(_, name)
  return function(...) return { core[name](...) } end
end })

local function invalid(res, ...)
  local ok, msg, code = res[1], res[2], res[3]
  assert.is_nil(ok)
  assert.equal("InvalidArgument", code)
  for _, want in ipairs({ ... }) do
    assert.truthy(contains(msg, want), msg)
  end
  return msg
end

-- JSON null as lua-cjson represents it.
local null = (function()
  local ok, cjson = pcall(require, "cjson")
  if ok and cjson.null then return cjson.null end
  return nil
end)()

describe("check_job_id", function()
  it("accepts letters, digits and '-' up to 64 characters", function()
    assert.is_true(core.check_job_id("job01"))
    assert.is_true(core.check_job_id("a"))
    assert.is_true(core.check_job_id("Reboot-Wave-2-" .. string.rep("x", 50)))
    assert.is_true(core.check_job_id(string.rep("9", 64)))
  end)

  it("rejects an empty id", function()
    invalid(V.check_job_id(""), "empty", "letters, digits and '-'")
  end)

  it("rejects ids longer than 64", function()
    local msg = invalid(V.check_job_id(string.rep("a", 70)), "jobId is 70 characters long; IoT Hub allows at most 64")
    assert.is_false(contains(msg, string.rep("a", 65)))
    invalid(V.check_job_id(string.rep("a", 65)), "65 characters")
  end)

  it("names the offending character and its position", function()
    invalid(V.check_job_id("my job"),
      "jobId 'my job' is invalid: character 3 (' ') is not allowed; use only letters, digits and '-'")
    invalid(V.check_job_id("job_1"), "character 4 ('_')")
    invalid(V.check_job_id("job.1"), "character 4 ('.')")
    invalid(V.check_job_id("j\195\169"), "character 2", "non-ASCII")
    invalid(V.check_job_id("a\nb"), "character 2", "control")
  end)

  it("raises for a non-string", function()
    assert.has_error(function() core.check_job_id(nil) end)
  end)
end)

describe("check_query_condition", function()
  it("accepts the documented forms", function()
    for _, q in ipairs({
      "*",
      "deviceId = 'MyDevice1'",
      "deviceId IN ['MyDevice1','MyDevice2']",
      "tags.building = '43' AND (properties.reported.fw < 2 OR tags.ring = \"canary\")",
      "tags.note = 'it\\'s (odd]'",
      "tags.[[where]] = 'x'",
      "DeviceId in ['d1']",
      "FROM devices.modules WHERE moduleId = 'AwareMonitoring'",
      "STARTSWITH(deviceId, 'door-') AND properties.reported.fw * 10 >= 15",
    }) do
      assert.is_true(core.check_query_condition(q), q)
    end
  end)

  it("compiles with the service's grammar and names the column of a mistake", function()
    invalid(V.check_query_condition("deviceId = AND tags.x = 1"), "queryCondition: syntax error at column 12",
      "expected a value after '=' but found 'AND'")
    invalid(V.check_query_condition("STARTS_WITH(deviceId, 'a')"), "column 1", "STARTSWITH")
    invalid(V.check_query_condition("tags.group.name = 'x'"), "column 6", "reserved", "[[group]]")
    invalid(V.check_query_condition("deviceId == 'a'"), "single '='")
    invalid(V.check_query_condition("tags.a = 1 tags.b = 2"), "column 12", "expected AND, OR")
  end)

  it("rejects an empty condition and suggests '*'", function()
    invalid(V.check_query_condition(""), "empty", '"*"')
    invalid(V.check_query_condition("   "), "empty", '"*"')
  end)

  it("rejects conditions over 8192 characters with a way out", function()
    local q = "deviceId IN [" .. string.rep("'d',", 2100) .. "'d']"
    assert.is_true(#q > 8192)
    invalid(V.check_query_condition(q), "8192", "tag", "split")
    local ok8192 = "deviceId = '" .. string.rep("x", 8192 - 13) .. "'"
    assert.equal(8192, #ok8192)
    assert.is_true(core.check_query_condition(ok8192))
  end)

  it("turns a full SELECT into a hint with only the WHERE condition", function()
    invalid(V.check_query_condition("SELECT * FROM devices WHERE tags.building = '43'"),
      "WHERE", "tags.building = '43'")
    local msg = invalid(V.check_query_condition("  select * from devices where deviceId = 'a where b'"),
      "SELECT", "deviceId = 'a where b'")
    assert.is_false(contains(msg, "from devices"))
    invalid(V.check_query_condition("SELECT * FROM devices"), "SELECT", '"*"')
  end)

  it("skips a WHERE inside brackets or strings when building the hint", function()
    local msg = invalid(V.check_query_condition("SELECT * FROM devices WHERE x IN [' WHERE '] AND y = 1"),
      "x IN [' WHERE '] AND y = 1")
    assert.truthy(msg)
  end)

  it("tells to drop a leading WHERE", function()
    invalid(V.check_query_condition("WHERE deviceId = 'x'"), "drop the leading WHERE", "deviceId = 'x'")
    invalid(V.check_query_condition("  where\ttags.a = 1"), "drop the leading WHERE", "tags.a = 1")
  end)

  it("detects unterminated string literals with their column", function()
    invalid(V.check_query_condition("deviceId = 'abc"), "unterminated", "column 12")
    invalid(V.check_query_condition("tags.x = \"abc"), "unterminated", "column 10")
    invalid(V.check_query_condition("tags.x = 'it\\'s"), "unterminated", "column 10")
  end)

  it("detects unbalanced brackets with their column", function()
    invalid(V.check_query_condition("deviceId IN ['a','b'"), "'['", "column 13", "never closed")
    invalid(V.check_query_condition("(a = 1"), "'('", "column 1", "never closed")
    invalid(V.check_query_condition("a = 1)"), "')'", "column 6", "no matching")
    invalid(V.check_query_condition("(a IN [1)]"), "')'", "column 9", "'['", "column 7")
  end)

  it("raises for a non-string", function()
    assert.has_error(function() core.check_query_condition({}) end)
  end)
end)

describe("check_properties", function()
  local P = "updateTwin.properties.desired"

  it("accepts plain nested properties, arrays, numbers and booleans", function()
    assert.is_true(core.check_properties({
      floor = 3, building = "b43", enabled = true, nested = { a = { b = { c = 1 } } }, list = { 1, "two", { x = 1 } },
      empty = {}, ["Name-With_Dashes!"] = "ok",
    }, P, true))
  end)

  it("rejects a space in a name, naming the full path", function()
    invalid(V.check_properties({ ["floor no"] = 1 }, P),
      "updateTwin.properties.desired['floor no'] has a space in its name; job property names may only contain")
  end)

  it("rejects each forbidden character, '.', tab and non-ASCII in names", function()
    for c in ("$()<>@,;:\\\"/[]?={}."):gmatch(".") do
      invalid(V.check_properties({ ["a" .. c .. "b"] = 1 }, P), "in its name")
    end
    invalid(V.check_properties({ ["a.b"] = 1 }, P), "'.'", "nest")
    invalid(V.check_properties({ ["a\tb"] = 1 }, P), "a tab")
    invalid(V.check_properties({ ["caf\195\169"] = 1 }, P), "non-ASCII")
    invalid(V.check_properties({ ["a\1"] = 1 }, P), "control")
  end)

  it("rejects empty and over-long names", function()
    invalid(V.check_properties({ [""] = 1 }, P), "empty name")
    assert.is_true(core.check_properties({ [string.rep("n", 1024)] = 1 }, P))
    invalid(V.check_properties({ [string.rep("n", 1025)] = 1 }, P), "1025 bytes", "1024")
  end)

  it("reports nested paths", function()
    invalid(V.check_properties({ a = { b = { ["x y"] = 1 } } }, "tags"), "tags.a.b['x y'] has a space")
    invalid(V.check_properties({ list = { { ok = 1 }, { ["$bad"] = 1 } } }, "p"), "p.list[2]['$bad']", "'$'")
  end)

  it("defaults the path prefix", function()
    invalid(V.check_properties({ ["a b"] = 1 }), "properties['a b']")
  end)

  it("checks string values only when asked", function()
    local t = { note = "two words" }
    assert.is_true(core.check_properties(t, P))
    invalid(V.check_properties(t, P, true), P .. ".note has a space at position 4 of its value")
    assert.is_true(core.check_properties({ version = "1.2.3", id = "a-b_c!~" }, P, true))
    for c in ("$()<>@,;:\\\"/[]?={}\t"):gmatch(".") do
      invalid(V.check_properties({ v = "x" .. c }, P, true), "its value")
    end
    invalid(V.check_properties({ list = { "ok", "not ok" } }, P, true), P .. ".list[2] has a space")
  end)

  -- The devguide's valid example nests objects "one" .. "ten" below tags, with a value inside "ten".
  it("allows ten nested objects below the path, not eleven", function()
    local function nest(levels)
      local t = "leaf"
      for i = levels, 1, -1 do t = { ["l" .. i] = t } end
      return t
    end
    assert.is_true(core.check_properties(nest(11), P))
    invalid(V.check_properties(nest(12), P), "10 levels", P .. ".l1.l2.l3.l4.l5.l6.l7.l8.l9.l10.l11")
    local cyclic = {}
    cyclic.self = cyclic
    invalid(V.check_properties(cyclic, P), "10 levels")
  end)

  it("allows non-string keys only in sequences", function()
    assert.is_true(core.check_properties({ a = { "x", "y", "z" } }, P))
    invalid(V.check_properties({ a = { [1] = "x", [3] = "z" } }, P), P .. ".a has a number key 3")
    invalid(V.check_properties({ a = { "x", b = 1 } }, P), "number key 1")
    invalid(V.check_properties({ a = { [1.5] = 1 } }, P), "number key 1.5")
    invalid(V.check_properties({ a = { [true] = 1 } }, P), "boolean key")
  end)

  it("ignores JSON null (light userdata) and rejects other value types", function()
    if null then
      assert.is_true(core.check_properties({ a = null, b = { null } }, P, true))
    end
    invalid(V.check_properties({ f = print }, P), P .. ".f is a function")
    invalid(V.check_properties({ n = 0 / 0 }, P), "NaN")
    invalid(V.check_properties({ n = math.huge }, P), "infinite")
  end)

  it("raises for a non-table", function()
    assert.has_error(function() core.check_properties("x", P) end)
  end)
end)

describe("check_integer_range", function()
  it("accepts whole numbers within the bounds", function()
    assert.is_true(core.check_integer_range("responseTimeoutInSeconds", 5, 5, 300))
    assert.is_true(core.check_integer_range("responseTimeoutInSeconds", 300, 5, 300))
    assert.is_true(core.check_integer_range("responseTimeoutInSeconds", 30.0, 5, 300))
  end)

  it("explains out-of-range values with the bounds and the value", function()
    invalid(V.check_integer_range("responseTimeoutInSeconds", 400, 5, 300),
      "responseTimeoutInSeconds must be a whole number of seconds between 5 and 300 (got 400)")
    invalid(V.check_integer_range("responseTimeoutInSeconds", 4, 5, 300), "(got 4)")
    invalid(V.check_integer_range("pageSize", 0, 1, 100), "pageSize must be a whole number between 1 and 100 (got 0)")
  end)

  it("rejects fractions, NaN and infinities", function()
    invalid(V.check_integer_range("maxExecutionTimeInSeconds", 2.5, 1, 3600), "(got 2.5)")
    invalid(V.check_integer_range("maxExecutionTimeInSeconds", 0 / 0, 1, 3600), "(got NaN)")
    invalid(V.check_integer_range("maxExecutionTimeInSeconds", math.huge, 1, 3600), "(got inf)")
  end)

  it("states the type received for non-numbers", function()
    invalid(V.check_integer_range("responseTimeoutInSeconds", "30", 5, 300),
      "responseTimeoutInSeconds must be a whole number of seconds between 5 and 300 (got a string)")
    invalid(V.check_integer_range("responseTimeoutInSeconds", nil, 5, 300), "(got nil)")
    invalid(V.check_integer_range("responseTimeoutInSeconds", {}, 5, 300), "(got a table)")
  end)

  it("raises on misuse", function()
    assert.has_error(function() core.check_integer_range(nil, 1, 1, 2) end)
    assert.has_error(function() core.check_integer_range("x", 1, "a", 2) end)
    assert.has_error(function() core.check_integer_range("x", 1, 3, 2) end)
  end)
end)
