-- The IoT Hub query language of the C core (csrc/query.c) and the emulator's wrapper
-- (emulator/query.lua): grammar, evaluation semantics, errors with columns, projections,
-- aggregates and paging.
--   busted --lua=lua5.4 spec/unit/query_spec.lua
--   busted --lua=luajit -r luajit spec/unit/query_spec.lua
local core = require "iothub.core"
local equery = require "emulator.query"

local function contains(s, sub) return type(s) == "string" and s:find(sub, 1, true) ~= nil end

local function cond(c) return assert(core.query_condition(c)) end
local function compile(sql) return assert(core.query_compile(sql)) end
local function match(c, doc) return cond(c):match(doc) end

-- Returns the message of a compile failure after checking the nil, message, code shape.
local function refused(fn, src, ...)
  local q, msg, code = fn(src)
  assert.is_nil(q, src)
  assert.equal("InvalidArgument", code)
  for _, want in ipairs({ ... }) do assert.truthy(contains(msg, want), msg) end
  return msg
end
local function bad_condition(src, ...) return refused(core.query_condition, src, ...) end
local function bad_query(src, ...) return refused(core.query_compile, src, ...) end

local DOC = assert(core.json_decode([[{
  "deviceId": "door-1", "status": "enabled", "version": 3, "connectionState": "Connected",
  "tags": { "building": "43", "floor": 1, "ratio": 0.5, "enabled": true, "off": false, "nothing": null,
            "list": [1, 2], "empty": [], "obj": { "a": 1 }, "Group": { "name": "x" }, "my-prop": "dash",
            "where": "w", "café": "yes" },
  "properties": { "reported": { "fw": "1.2.3", "temp": 21.5, "$version": 4 },
                  "desired": { "temp": 21.5, "mode": "eco" } }
}]]))

describe("query conditions", function()
  it("accepts the documented job conditions", function()
    assert.is_true(match("*", DOC))
    assert.is_true(match("  *  ", DOC))
    assert.is_true(match("deviceId IN ['a','door-1']", DOC))
    assert.is_false(match("deviceId IN ['a','b']", DOC))
    assert.is_true(match("tags.building = '43'", DOC))
    assert.is_true(match("deviceId = 'door-1'", DOC))
    assert.is_true(match("DeviceId in ['door-1']", DOC))
    assert.is_true(match("FROM devices WHERE tags.floor = 1", DOC))
    assert.is_true(cond("*"):info().all)
    assert.is_false(cond("tags.floor = 1"):info().all)
  end)

  it("refuses what is not a condition, with the reason", function()
    bad_condition("", "empty", "*")
    bad_condition("   \t", "empty")
    bad_condition("SELECT * FROM devices WHERE x = 1", "column 1", "not a full SELECT")
    bad_condition("WHERE x = 1", "column 1", "leading WHERE")
    bad_condition("FROM devices.jobs WHERE jobId = 'j'", "devices.jobs")
    bad_condition("* AND x = 1", "expected a value")
    assert.has_error(function() core.query_condition(nil) end)
    assert.has_error(function() core.query_compile({}) end)
  end)

  it("combines with AND, OR, NOT and parentheses with the usual precedence", function()
    assert.is_true(match("tags.floor = 1 AND tags.building = '43'", DOC))
    assert.is_false(match("tags.floor = 2 AND tags.building = '43'", DOC))
    assert.is_true(match("tags.floor = 2 OR tags.building = '43'", DOC))
    assert.is_true(match("NOT tags.floor = 2", DOC))
    assert.is_true(match("NOT NOT tags.floor = 1", DOC))
    assert.is_true(match("tags.floor = 2 AND tags.x = 1 OR tags.floor = 1", DOC)) -- AND binds tighter
    assert.is_false(match("tags.floor = 2 AND (tags.x = 1 OR tags.floor = 1)", DOC))
    assert.is_true(match("a = 1 OR b = 2 OR c = 3 OR tags.floor = 1", DOC))
    assert.is_true(match("tags.enabled", DOC))   -- a boolean property is a condition
    assert.is_false(match("tags.off", DOC))
    assert.is_false(match("tags.building", DOC)) -- only true matches; a string does not
  end)
end)

describe("literals", function()
  it("reads strings in either quote with JSON escapes", function()
    local d = { s = "it's \"q\" \\ é 😀\n/" }
    assert.is_true(match([[s = 'it\'s "q" \\ \u00e9 \uD83D\uDE00\n\/']], d))
    assert.is_true(match([[s = "it's \"q\" \\ é 😀\n/"]], d))
    bad_condition([[s = 'a\qb']], "column 7", "unknown escape '\\q'")
    bad_condition([[s = '\u12']], "column 6", "4 hexadecimal digits")
    bad_condition([[s = '\uD83D']], "surrogate")
  end)

  it("reads integers, decimals, exponents, hexadecimals and signs", function()
    local d = { i = 42, f = 0.25, e = 1500, h = 31, n = -7, m = -0.5 }
    for _, c in ipairs({ "i = 42", "i = 42.0", "f = .25", "f = 0.25", "f = 25e-2", "e = 1.5E3", "h = 0x1F",
      "h = 0X1f", "n = -7", "n = - 7", "m = -.5", "i = +42" }) do
      assert.is_true(match(c, d), c)
    end
    bad_condition("i = 12abc", "column 5", "malformed number")
    bad_condition("i = 0x", "hexadecimal")
  end)

  it("has true, false, null and undefined", function()
    assert.is_true(match("tags.enabled = true", DOC))
    assert.is_true(match("tags.off = FALSE", DOC))
    assert.is_true(match("tags.nothing = null", DOC))
    assert.is_false(match("tags.missing = null", DOC))
    assert.is_false(match("IS_DEFINED(undefined)", DOC))
    assert.is_false(match("tags.missing = undefined", DOC)) -- undefined never compares
  end)

  it("keeps 64-bit integers exact where the interpreter does", function()
    if math.type then -- Lua 5.4 integers; LuaJIT's JSON refuses numbers beyond 2^53
      local big = assert(core.json_decode('{"n": 9007199254740993}'))
      assert.is_true(match("n = 9007199254740993", big))
      assert.is_false(match("n = 9007199254740992", big))
      assert.is_true(match("n > 9007199254740992", big))
      assert.is_true(match("n - 1 = 9007199254740992", big))
    end
    assert.is_true(match("n = 9007199254740992", { n = 2 ^ 53 }))
  end)
end)

describe("comparisons", function()
  it("orders numbers and strings, and compares every primitive for equality", function()
    local yes = { "tags.floor = 1", "tags.floor != 2", "tags.floor <> 2", "tags.floor < 2", "tags.floor <= 1",
      "tags.floor > 0", "tags.floor >= 1", "tags.building < '5'", "tags.building > '4'", "tags.building >= '43'",
      "properties.reported.temp = properties.desired.temp", "tags.enabled = true", "tags.enabled != false",
      "tags.nothing = null", "tags.ratio = 0.5", "tags.floor = 1.0" }
    for _, c in ipairs(yes) do assert.is_true(match(c, DOC), c) end
    local no = { "tags.floor = 2", "tags.floor < 1", "tags.building < '4'", "tags.nothing != null" }
    for _, c in ipairs(no) do assert.is_false(match(c, DOC), c) end
  end)

  it("treats comparisons across types, with objects or arrays, and orderings of booleans as undefined", function()
    for _, c in ipairs({ "tags.floor = '1'", "tags.building = 43", "tags.floor != '1'", "tags.enabled = 1",
      "tags.nothing = 0", "tags.obj = tags.obj", "tags.list = tags.list", "tags.enabled > false",
      "tags.nothing < null", "tags.obj != 1" }) do
      assert.is_false(match(c, DOC), c)
      assert.is_false(match("NOT (" .. c .. ")", DOC), "NOT (" .. c .. ")") -- undefined, not false
    end
  end)

  it("compares values case-sensitively", function()
    assert.is_false(match("status = 'Enabled'", DOC))
    assert.is_true(match("status = 'enabled'", DOC))
  end)
end)

describe("undefined and null", function()
  it("follows three-valued logic", function()
    assert.is_false(match("tags.missing = 1", DOC))
    assert.is_false(match("NOT (tags.missing = 1)", DOC))
    assert.is_false(match("tags.missing != 1", DOC))
    assert.is_true(match("tags.missing = 1 OR tags.floor = 1", DOC))
    assert.is_false(match("tags.missing = 1 OR tags.floor = 2", DOC))
    assert.is_false(match("tags.missing = 1 AND tags.floor = 1", DOC))
    assert.is_true(match("NOT (tags.missing = 1 AND tags.floor = 2)", DOC)) -- undefined AND false is false
    assert.is_false(match("NOT (tags.missing = 1 OR tags.floor = 2)", DOC))
  end)

  it("tells defined (even null) from missing, through non-objects too", function()
    assert.is_true(match("IS_DEFINED(tags.nothing)", DOC))
    assert.is_false(match("IS_DEFINED(tags.missing)", DOC))
    assert.is_false(match("IS_DEFINED(tags.building.x)", DOC))  -- into a string
    assert.is_false(match("IS_DEFINED(tags.list.x)", DOC))      -- into an array
    assert.is_false(match("IS_DEFINED(tags.nothing.x)", DOC))   -- into null
    assert.is_true(match("IS_DEFINED(tags.obj.a)", DOC))
  end)
end)

describe("IN and NIN", function()
  it("tests membership with constants of any primitive type", function()
    assert.is_true(match("tags.floor IN [3, 1, 'x']", DOC))
    assert.is_true(match("tags.building IN ['42', '43']", DOC))
    assert.is_false(match("tags.building IN [43]", DOC))
    assert.is_true(match("tags.enabled IN [true]", DOC))
    assert.is_true(match("tags.nothing IN [null, 1]", DOC))
    assert.is_true(match("tags.ratio IN [-1, 0.5]", DOC))
    assert.is_true(match("tags.floor in (1, 2)", DOC)) -- the older docs' parentheses
    assert.is_false(match("tags.floor IN []", DOC))
  end)

  it("negates with NIN and NOT IN, but stays undefined for undefined or non-primitive values", function()
    assert.is_true(match("tags.floor NIN [2, 3]", DOC))
    assert.is_false(match("tags.floor NIN [1]", DOC))
    assert.is_true(match("tags.floor NOT IN [2]", DOC))
    assert.is_true(match("tags.building NIN [43]", DOC)) -- a string is not the number 43
    assert.is_false(match("tags.missing NIN [1]", DOC))
    assert.is_false(match("tags.missing IN [1]", DOC))
    assert.is_false(match("tags.obj NIN [1]", DOC))
  end)

  it("finds members of long lists", function()
    local ids, docs = {}, {}
    for i = 1, 600 do ids[#ids + 1] = ("'d%d'"):format(i * 7) end
    local q = cond("deviceId IN [" .. table.concat(ids, ",") .. "]")
    for i = 1, 4200 do docs[i] = { deviceId = "d" .. i } end
    local hits = q:filter(docs)
    assert.equal(600, #hits)
    for _, d in ipairs(hits) do assert.equal(0, tonumber(d.deviceId:sub(2)) % 7) end
  end)

  it("needs a list of constants", function()
    bad_condition("deviceId IN 'a'", "column 13", "expected a list such as ['a', 'b'] for IN after 'IN'")
    bad_condition("deviceId IN [tags.x]", "column 14", "constant")
    bad_condition("deviceId IN ['a' 'b']", "column 18", "',' or ']'")
  end)
end)

describe("arithmetic", function()
  it("computes + - * / % with precedence and unary minus", function()
    for _, c in ipairs({ "tags.floor + 1 = 2", "tags.floor - 3 = -2", "tags.floor * 6 / 4 = 1.5",
      "7 % 4 = 3", "2 + 3 * 4 = 14", "(2 + 3) * 4 = 20", "-tags.floor = -1", "-(tags.floor + 1) = -2",
      "tags.ratio * 2 = tags.floor", "10 / 4 = 2.5", "properties.reported.temp - 0.5 > 20" }) do
      assert.is_true(match(c, DOC), c)
    end
  end)

  it("is undefined on non-numbers and division by zero", function()
    for _, c in ipairs({ "tags.building + 1 = 44", "tags.floor / 0 = 1", "tags.floor % 0 = 0",
      "tags.missing + 1 = 1", "tags.enabled * 1 = 1" }) do
      assert.is_false(match(c, DOC), c)
      assert.is_false(match("NOT (" .. c .. ")", DOC), c)
    end
  end)
end)

describe("functions", function()
  it("has the IS_* type checks", function()
    local cases = {
      { "IS_NULL", "tags.nothing", "tags.floor" }, { "IS_BOOL", "tags.off", "tags.floor" },
      { "IS_NUMBER", "tags.ratio", "tags.building" }, { "IS_STRING", "tags.building", "tags.floor" },
      { "IS_OBJECT", "tags.obj", "tags.list" }, { "IS_ARRAY", "tags.empty", "tags.obj" },
      { "IS_PRIMITIVE", "tags.nothing", "tags.obj" }, { "IS_DEFINED", "tags.nothing", "tags.missing" },
    }
    for _, c in ipairs(cases) do
      assert.is_true(match(c[1] .. "(" .. c[2] .. ")", DOC), c[1] .. " " .. c[2])
      assert.is_false(match(c[1] .. "(" .. c[3] .. ")", DOC), c[1] .. " " .. c[3])
      assert.is_false(match(c[1] .. "(tags.missing)", DOC) and c[1] ~= "IS_DEFINED", c[1])
    end
    assert.is_true(match("is_array(tags.list) AND Is_Object(properties)", DOC))
    assert.is_true(match("IS_ARRAY([1, 2])", DOC))
    assert.is_true(match("IS_PRIMITIVE('x') AND IS_NUMBER(1 + 1)", DOC))
    assert.is_true(match("IS_ARRAY(x)", { x = { 1, 2 } }))   -- a plain Lua sequence is an array
    assert.is_true(match("IS_OBJECT(x)", { x = {} }))        -- an empty plain table is an object
    assert.is_true(match("IS_ARRAY(x)", { x = core.json_array() }))
  end)

  it("has STARTSWITH and ENDSWITH, case-sensitive and for strings only", function()
    assert.is_true(match("STARTSWITH(deviceId, 'door-')", DOC))
    assert.is_true(match("startswith(deviceId, '')", DOC))
    assert.is_false(match("STARTSWITH(deviceId, 'Door')", DOC))
    assert.is_true(match("ENDSWITH(deviceId, '-1')", DOC))
    assert.is_false(match("ENDSWITH(deviceId, 'xdoor-1')", DOC))
    assert.is_false(match("STARTSWITH(tags.floor, '1')", DOC))
    assert.is_false(match("NOT STARTSWITH(tags.floor, '1')", DOC))
  end)

  it("refuses routing-only, unknown and misplaced functions, and wrong argument counts", function()
    bad_condition("STARTS_WITH(deviceId, 'a')", "column 1", "use STARTSWITH")
    bad_condition("x = 1 AND ends_with(deviceId, 'a')", "column 11", "ENDSWITH")
    bad_condition("LOWER(deviceId) = 'a'", "unknown function 'LOWER'", "IS_DEFINED")
    bad_condition("COUNT() > 1", "COUNT() is an aggregate", "SELECT list")
    bad_condition("IS_DEFINED()", "IS_DEFINED takes 1 argument but was given 0")
    bad_condition("IS_DEFINED(a, b)", "column 15", "takes 1 argument but was given 2")
    bad_condition("STARTSWITH(deviceId)", "STARTSWITH takes 2 arguments")
  end)
end)

describe("names", function()
  it("match property names exactly first, then ignoring case; keywords ignore case too", function()
    assert.is_true(match("TAGS.BUILDING = '43'", DOC))
    assert.is_true(match("Properties.Reported.FW = '1.2.3'", DOC))
    assert.is_true(match("tags.[[group]].name = 'x'", DOC))
    assert.is_true(match("tags.[[GROUP]].NAME = 'x'", DOC))
    assert.is_true(match("tags.floor = 1 and not tags.floor = 2 Or false", DOC))
    local q = cond("tags.Floor = 1")
    assert.is_true(q:match({ tags = { floor = 1, Floor = 2, FLOOR = 3 } }) == false) -- exact spelling wins
    -- one query over documents that spell a name differently (the remembered spelling must not stick)
    local docs = { { tags = { Floor = 1 } }, { tags = { floor = 1 } }, { tags = { FLOOR = 1 } }, { tags = { floor = 2 } },
      { tags = { fLoOr = 1 } } }
    assert.equal(4, #cond("tags.FLOOR = 1"):filter(docs))
    assert.equal(4, #cond("tags.floor = 1"):filter(docs))
  end)

  it("escapes reserved words and other names with [[ ]]", function()
    assert.is_true(match("tags.[[where]] = 'w'", DOC))
    assert.is_true(match("tags.[[my-prop]] = 'dash'", DOC))
    assert.is_true(match("[[tags]].[[building]] = '43'", DOC))
    assert.is_true(match("tags.café = 'yes'", DOC))
    assert.is_true(match("properties.reported.$version = 4", DOC))
    bad_condition("tags.group.name = 'x'", "column 6", "'group' is a reserved word", "[[group]]")
    bad_condition("tags.where = 'w'", "column 6", "[[where]]")
    bad_condition("group.name = 'x'", "column 1", "[[group]]")
    bad_condition("tags.[[x = 1", "column 6", "never closed with ']]'")
    bad_condition("tags.[[]] = 1", "empty property name")
    assert.is_false(match("tags.my-prop = 'dash'", DOC)) -- unescaped, that is tags.my minus prop
    bad_condition("tags.2nd = 1", "column 6", "[[2nd]]")
  end)
end)

describe("syntax errors", function()
  it("name the column (in characters) and what was expected", function()
    local cases = {
      { "deviceId = AND x = 1", 12, "expected a value after '=' but found 'AND'" },
      { "tags.x = 1 AND", 15, "expected a value after 'AND' but found the end of the condition" },
      { "tags.x = 'é' AND AND", 18, "found 'AND'" },
      { "tags.x = 1 = 2", 12, "expected AND, OR or the end of the condition but found '='" },
      { "tags.x = 1 'a'", 12, "found the string 'a'" },
      { "tags.x # 1", 8, "unexpected character '#'" },
      { "tags.x = 1 && y = 2", 12, "combine conditions with AND" },
      { "tags.x == 1", 8, "single '='" },
      { "tags.x ! 1", 8, "NOT" },
      { "(tags.x = 1", 1, "'(' is never closed" },
      { "tags.x = 1)", 11, "')' has no matching '('" },
      { "(a IN [1)]", 9, "innermost open bracket, '[' at column 7" },
      { "deviceId = 'abc", 12, "unterminated string" },
      { "tags.x.", 8, "expected a property name after '.'" },
      { "tags.x = (1 + )", 15, "expected a value after '+'" },
      { "\n\ttags.x = ", 12, "expected a value" }, -- a newline is one more character
    }
    for _, c in ipairs(cases) do
      bad_condition(c[1], "syntax error at column " .. c[2] .. ":", c[3])
    end
  end)

  it("in full queries", function()
    bad_query("SELECT * FROM devices WHERE", "column 28", "expected a value after 'WHERE'")
    bad_query("SELECT * devices", "column 10", "expected FROM")
    bad_query("SELECT * FROM things", "column 15", "devices, devices.jobs or devices.modules")
    bad_query("SELECT * FROM devices.twins", "column 23", "jobs or modules")
    bad_query("SELECT TOP x * FROM devices", "column 12", "whole number")
    bad_query("SELECT TOP 1.5 * FROM devices", "column 12", "whole number")
    bad_query("SELECT * FROM devices ORDER BY deviceId", "column 23", "ORDER BY is not supported")
    bad_query("SELECT * FROM devices WHERE x = 1 y", "column 35", "AND, OR, GROUP BY")
    bad_query("DELETE FROM devices", "column 1", "SELECT")
    bad_query("", "empty")
    bad_query("SELECT *, deviceId FROM devices", "column 9", "cannot be combined")
    bad_query("SELECT IS_DEFINED(x) FROM devices", "column 8", "cannot be selected")
    bad_query("SELECT COUNT(x) FROM devices", "column 14", "COUNT takes no argument")
  end)
end)

describe("the length limit", function()
  it("is 8192 characters", function()
    assert.equal(8192, core.query_max_length)
    local ok = "deviceId = '" .. string.rep("x", 8192 - 13) .. "'"
    assert.equal(8192, #ok)
    assert.truthy(core.query_condition(ok))
    bad_condition(ok .. " ", "8193 characters", "at most 8192")
    bad_query("SELECT * FROM devices WHERE deviceId = '" .. string.rep("x", 8200) .. "'", "query is", "8192")
    -- characters, not bytes: 4000 two-byte characters fit
    assert.truthy(core.query_condition("deviceId = '" .. string.rep("é", 4000) .. "'"))
  end)
end)

describe("full queries", function()
  it("report their collection, TOP and shape", function()
    local i = compile("select top 5 * from DEVICES where tags.floor = 1"):info()
    assert.equal("devices", i.collection)
    assert.equal(5, i.top)
    assert.is_true(i.star)
    assert.is_false(i.aggregate)
    assert.equal(3, compile("SELECT TOP(3) * FROM devices"):info().top)
    assert.is_nil(compile("SELECT * FROM devices"):info().top)
    assert.equal("devices.jobs", compile("SELECT * FROM devices.jobs"):info().collection)
    assert.equal("devices.modules", compile("SELECT * FROM Devices.Modules WHERE moduleId = 'm'"):info().collection)
    assert.same({ deviceid = "d", ["tags.x"] = 1 }, -- lower-case paths
      compile("SELECT * FROM devices WHERE DeviceId = 'd' AND 1 = tags.X AND tags.y > 2"):info().equals)
    assert.same({}, compile("SELECT * FROM devices WHERE a = 1 OR b = 2"):info().equals)
  end)

  it("read devices.jobs fields with or without the devices.jobs. prefix", function()
    local row = { jobId = "j1", deviceId = "d1", status = "completed", jobType = "scheduleDeviceMethod" }
    local q = compile("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j1' AND devices.jobs.status = 'completed'")
    assert.is_true(q:match(row))
    assert.is_true(compile("SELECT * FROM devices.jobs WHERE jobId = 'j1'"):match(row))
    assert.is_true(compile("SELECT * FROM devices.jobs WHERE DEVICES.JOBS.DEVICEID = 'd1'"):match(row))
    assert.is_false(compile("SELECT * FROM devices.jobs WHERE devices.jobs.status = 'Completed'"):match(row))
    assert.equal("j1", q:info().equals.jobid)
    assert.is_true(cond("devices.deviceId = 'door-1'"):match(DOC)) -- FROM devices' own prefix
    bad_query("SELECT deviceId FROM devices.jobs", "column 8", "only SELECT *")
    bad_query("SELECT * FROM devices.jobs GROUP BY status", "GROUP BY")
  end)
end)

describe("projections", function()
  it("return the document itself for SELECT *", function()
    assert.equal(DOC, compile("SELECT * FROM devices"):project(DOC))
  end)

  it("pick properties under the document's own spelling, or an alias; missing ones are left out", function()
    local q = compile("SELECT DeviceId, tags.location.floor, tags.obj, properties.reported.temp AS t, tags.missing FROM devices")
    local doc = { deviceId = "d1", tags = { location = { floor = 2 }, obj = { a = 1 } },
      properties = { reported = { temp = 20 } } }
    local p = q:project(doc)
    assert.same({ deviceId = "d1", floor = 2, obj = { a = 1 }, t = 20 }, p)
    assert.equal(doc.tags.obj, p.obj)
    assert.same({ "DeviceId", "floor", "obj", "t", "missing" }, q:info().columns)
    assert.is_false(q:info().star)
  end)

  it("refuse two columns with one name", function()
    bad_query("SELECT tags.x, properties.reported.x FROM devices", "column 16", "both named 'x'", "AS")
    bad_query("SELECT tags.a AS n, tags.b AS N FROM devices", "both named")
    assert.truthy(core.query_compile("SELECT tags.x, properties.reported.x AS rx FROM devices"))
  end)
end)

describe("aggregates", function()
  local fleet = {}
  for i, s in ipairs({ "Success", "Pending", "Success", "Error", "Success", "Pending" }) do
    fleet[i] = { deviceId = "d" .. i, tags = { n = i, w = i % 2 == 0 and i / 2 or "x" },
      properties = { reported = { telemetryConfig = { status = s } } } }
  end
  fleet[7] = { deviceId = "d7", tags = { n = 7 } } -- no status

  it("group and count as the docs' example shows", function()
    local q = compile("SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices "
      .. "FROM devices GROUP BY properties.reported.telemetryConfig.status")
    local i = q:info()
    assert.is_true(i.aggregate)
    assert.same({ "properties.reported.telemetryConfig.status" }, i.groupBy)
    assert.same({ "status", "numberOfDevices" }, i.columns)
    assert.same({
      { status = "Success", numberOfDevices = 3 }, { status = "Pending", numberOfDevices = 2 },
      { status = "Error", numberOfDevices = 1 }, { numberOfDevices = 1 }, -- the devices without a status
    }, q:aggregate(fleet))
  end)

  it("count everything, or what matches, in one row even when nothing matches", function()
    assert.same({ { totalNumberOfDevices = 7 } }, compile("SELECT COUNT() as totalNumberOfDevices FROM devices"):aggregate(fleet))
    assert.same({ { n = 0 } }, compile("SELECT COUNT() AS n FROM devices WHERE tags.n > 100"):aggregate(fleet))
    assert.same({ { ["$1"] = 3 } }, compile("SELECT COUNT() FROM devices WHERE tags.n <= 3"):aggregate(fleet))
    if math.type then assert.equal("integer", math.type(compile("SELECT COUNT() AS n FROM devices"):aggregate(fleet)[1].n)) end
  end)

  it("sum, average and take extremes over numbers; MIN/MAX order null < booleans < numbers < strings", function()
    local rows = compile("SELECT SUM(tags.n) AS s, AVG(tags.n) AS a, MIN(tags.n) AS lo, MAX(tags.n) AS hi, "
      .. "SUM(tags.w) AS sw, MAX(tags.w) AS mw, MIN(tags.w) AS lw, AVG(tags.missing) AS none FROM devices"):aggregate(fleet)
    assert.same({ { s = 28, a = 4, lo = 1, hi = 7, sw = 6, mw = "x", lw = 1 } }, rows)
    assert.same({ { s = 0 } }, compile("SELECT SUM(tags.missing) AS s FROM devices"):aggregate(fleet))
  end)

  it("apply TOP to the groups and allow GROUP BY without aggregates", function()
    local rows = compile("SELECT TOP 2 properties.reported.telemetryConfig.status AS s FROM devices "
      .. "GROUP BY properties.reported.telemetryConfig.status"):aggregate(fleet)
    assert.same({ { s = "Success" }, { s = "Pending" } }, rows)
    assert.same({}, compile("SELECT tags.n FROM devices WHERE tags.n > 99 GROUP BY tags.n"):aggregate(fleet))
  end)

  it("need every other column in GROUP BY", function()
    bad_query("SELECT deviceId, COUNT() FROM devices", "column 8", "'deviceId' is neither an aggregate nor in GROUP BY")
    bad_query("SELECT tags.a, COUNT() AS n FROM devices GROUP BY tags.b", "'tags.a'")
    bad_query("SELECT * FROM devices GROUP BY tags.a", "column 23", "instead of *")
    assert.truthy(core.query_compile("SELECT Tags.A, COUNT() AS n FROM devices GROUP BY tags.a"))
  end)

  it("are refused by select/project and vice versa", function()
    local agg = compile("SELECT COUNT() AS n FROM devices")
    assert.has_error(function() agg:project(DOC) end)
    assert.has_error(function() agg:select({ DOC }) end)
    assert.has_error(function() compile("SELECT * FROM devices"):aggregate({ DOC }) end)
  end)
end)

describe("scanning pages of documents", function()
  local docs = {}
  for i = 1, 20 do docs[i] = { deviceId = "d" .. i, tags = { even = i % 2 == 0 } } end
  local q = compile("SELECT deviceId FROM devices WHERE tags.even")

  it("returns at most limit items and where the next match is", function()
    local items, nxt = q:select(docs, 1, 3)
    assert.same({ { deviceId = "d2" }, { deviceId = "d4" }, { deviceId = "d6" } }, items)
    assert.equal(8, nxt)
    items, nxt = q:select(docs, nxt, 3)
    assert.same({ { deviceId = "d8" }, { deviceId = "d10" }, { deviceId = "d12" } }, items)
    assert.equal(14, nxt)
    items, nxt = q:select(docs, nxt, 4)
    assert.equal(4, #items)
    assert.is_nil(nxt) -- d20 was the last match: no empty page follows
    assert.equal(getmetatable(core.json_array()), getmetatable(q:select(docs, 21)))
  end)

  it("filters without projecting and stops where told", function()
    local hits, resume = q:filter(docs, 1, nil, 5)
    assert.same({ docs[2], docs[4] }, hits)
    assert.equal(6, resume)
    assert.equal(10, #q:filter(docs))
    assert.equal(0, #cond("tags.missing"):filter(docs))
    assert.has_error(function() q:filter(docs, 0) end)
    assert.has_error(function() q:filter(docs, 1, -1) end)
  end)
end)

describe("emulator.query", function()
  local docs = {}
  for i = 1, 25 do docs[i] = { deviceId = ("d%02d"):format(i), tags = { k = i % 3 } } end

  local function all_pages(plan, size)
    local out, pages, tok = {}, 0, nil
    repeat
      local items, item_type, nxt = equery.execute(plan, docs, tok, size)
      assert.is_table(items, item_type)
      pages = pages + 1
      for _, it in ipairs(items) do out[#out + 1] = it end
      if nxt then assert.equal(size, #items) end
      tok = nxt
    until not tok or pages > 50
    return out, pages
  end

  it("keeps the plan interface", function()
    local plan = assert(equery.parse("SELECT TOP 2 * FROM devices WHERE tags.k = 1"))
    assert.equal("devices", plan.collection)
    assert.equal(2, plan.top)
    assert.same({ docs[1], docs[4] }, equery.filter(plan, docs))
    local c = assert(equery.parse_condition("*"))
    assert.is_true(equery.matches(c, docs[1]))
    assert.equal(8192, equery.MAX_LENGTH)
    local p, err = equery.parse("SELECT * FROM devices WHERE")
    assert.is_nil(p)
    assert.truthy(contains(err, "column 28"))
    assert.is_nil(equery.parse(42))
    assert.is_nil(equery.parse_condition(false))
  end)

  it("pages by scan position, ending without a continuation", function()
    local plan = assert(equery.parse("SELECT * FROM devices WHERE tags.k = 0"))
    local items, pages = all_pages(plan, 3)
    assert.equal(8, #items)
    assert.equal(3, pages)
    items, pages = all_pages(plan, 4) -- 8 matches in pages of 4: exactly 2 pages
    assert.equal(8, #items)
    assert.equal(2, pages)
    local _, item_type = equery.execute(plan, docs, nil, 10)
    assert.equal("Twin", item_type)
  end)

  it("applies TOP across pages", function()
    local items, pages = all_pages(assert(equery.parse("SELECT TOP 7 deviceId FROM devices")), 3)
    assert.equal(7, #items)
    assert.equal(3, pages)
    assert.same({ deviceId = "d07" }, items[7])
    assert.equal(0, #(all_pages(assert(equery.parse("SELECT TOP 0 * FROM devices")), 3)))
  end)

  it("sets the item type and pages aggregate rows", function()
    local plan = assert(equery.parse("SELECT tags.k AS k, COUNT() AS n FROM devices GROUP BY tags.k"))
    local _, item_type = equery.execute(plan, docs, nil, 10)
    assert.equal("Raw", item_type)
    local rows, pages = all_pages(plan, 2)
    assert.same({ { k = 1, n = 9 }, { k = 2, n = 8 }, { k = 0, n = 8 } }, rows)
    assert.equal(2, pages)
    assert.equal("Raw", equery.item_type(assert(equery.parse("SELECT deviceId FROM devices"))))
    assert.equal("DeviceJob", equery.item_type(assert(equery.parse("SELECT * FROM devices.jobs"))))
    assert.equal("Twin", equery.item_type(assert(equery.parse("SELECT * FROM devices"))))
  end)

  it("refuses a continuation that is not its own", function()
    local plan = assert(equery.parse("SELECT * FROM devices"))
    for _, tok in ipairs({ "garbage", core.base64_encode("emu1:3"), core.base64_encode("emuq1:a:1:0"),
      core.base64_encode("emuq1:s:0:0") }) do
      local items, err = equery.execute(plan, docs, tok, 5)
      assert.is_nil(items)
      assert.equal("The continuation token is not valid.", err)
    end
  end)
end)
