-- Job definition files (iothub.definitions): the sandboxed DSL, validation with file:line
-- and field for every problem, durations/start times, and content hashes. Offline: a file
-- that does not load never reaches a client (cli_spec proves the same against the emulator).
--   busted --lua=lua5.4 spec/unit/definitions_spec.lua
local core = require "iothub.core"
local definitions = require "iothub.definitions"
local shell = require "support.shell"

local ROOT = shell.ROOT
local unpack = table.unpack or unpack -- luacheck: ignore 143

-- Loads source that must fail; returns the problems as "line: text" strings.
local function problems_of(src)
  local defs, problems = definitions.load_string(src, "f.lua")
  assert.is_nil(defs)
  local out = {}
  for i, p in ipairs(problems) do
    assert.equal("f.lua", p.file)
    out[i] = tostring(p)
  end
  return out
end

local function load_ok(src)
  local defs, problems = definitions.load_string(src, "f.lua")
  assert(defs, problems and definitions.format(problems))
  return defs
end

-- Asserts each expected problem, { line, fragment... }: a problem on that line contains
-- every plain fragment.
local function has(problems, expected)
  for _, e in ipairs(expected) do
    local line, fragments, found = e[1], { select(2, unpack(e)) }, false
    for _, p in ipairs(problems) do
      if p:find("^f%.lua:" .. line .. ": ") then
        local all = true
        for _, fragment in ipairs(fragments) do
          if not p:find(fragment, 1, true) then all = false end
        end
        found = found or all
      end
    end
    if not found then
      error("no problem at line " .. line .. " with " .. table.concat(fragments, " / ") .. " in:\n"
        .. table.concat(problems, "\n"), 2)
    end
  end
end

describe("definitions", function()
  it("loads examples/rollout.lua: a staged method rollout and a twin job on a device list", function()
    local defs = assert(definitions.load(ROOT .. "/examples/rollout.lua"))
    assert.equal(2, #defs.jobs)
    local lock, tag = defs.jobs[1], defs.jobs[2]
    assert.equal("lock-b7", lock.name)
    assert.equal("method", lock.type)
    assert.same({ methodName = "lockDoor", payload = { force = true }, responseTimeoutInSeconds = 15 }, lock.methodParams)
    assert.equal("tags.location.building = '7'", lock.query)
    assert.equal(1800, lock.ttl)
    assert.equal(3, #lock.stages)
    assert.same({ minSuccessRatio = 1 }, lock.stages[1].gate)
    assert.equal("canary", lock.stages[1].name)
    assert.equal(2, lock.stages[1].count)
    assert.equal(50, lock.stages[2].percent)
    assert.equal("twin", tag.type)
    assert.equal(60, #tag.devices)
    assert.equal("b7-door-001", tag.devices[1])
    -- the patch as the client will send it: desired under properties, etag "*"
    assert.equal("*", tag.patch.etag)
    assert.same({ mode = "auto", relockAfter = 30 }, tag.patch.properties.desired.lockPolicy)
    assert.matches("^%x%x%x%x%x%x%x%x$", lock.hash)
  end)

  it("gives the same content hash on every load; what is sent changes it, a description does not", function()
    local base = [[job "j" { method = "m", payload = { a = 1 }, query = "*", description = "%s", ttl = %d }]]
    local h1 = load_ok(base:format("one", 60)).jobs[1].hash
    assert.equal(h1, load_ok(base:format("one", 60)).jobs[1].hash)
    assert.equal(h1, load_ok(base:format("a different description", 60)).jobs[1].hash)
    assert.are_not.equal(h1, load_ok(base:format("one", 61)).jobs[1].hash)
    assert.are_not.equal(h1, load_ok([[job "j" { method = "m", payload = { a = 2 }, query = "*", ttl = 60 }]]).jobs[1].hash)
    -- device order does not matter; a revision does
    local a = load_ok([[job "j" { method = "m", devices = { "x", "y" } }]]).jobs[1].hash
    assert.equal(a, load_ok([[job "j" { method = "m", devices = { "y", "x" } }]]).jobs[1].hash)
    assert.are_not.equal(a, load_ok([[job "j" { method = "m", devices = { "x", "y" }, revision = 2 }]]).jobs[1].hash)
  end)

  it("reports every problem of a file, each with file:line and the field", function()
    local p = problems_of([[
job "lock doors" {
  method = 42,
  responseTimeout = 2,
  query = "SELECT * FROM devices WHERE tags.x = 1",
  ttl = true,
  colour = "red",
  stages = {
    { count = 5, gate = { minSucess = 0.5 } },
    { percent = 120 },
    { count = 3 },
  },
}
job "tw" {
  patch = { desired = { ["a.b"] = 1 } },
  devices = { "ok-1", "bad id", "ok-1", 7 },
  startTime = "x",
}
]])
    has(p, {
      { 1, "job 'lock doors'", "letters, digits and '-'" },
      { 2, "field 'method'", "must be the method name as a string, got number" },
      { 3, "field 'responseTimeout'", "between 5 and 300 (got 2)" },
      { 4, "field 'query'", "not a full SELECT", "tags.x = 1" },
      { 5, "field 'ttl'", "got boolean" },
      { 6, "field 'colour'", "unknown field" },
      { 8, "stages[1].gate", "unknown gate field 'minSucess'", "did you mean 'minSuccessRatio'?" },
      { 9, "stages[2].percent", "above 0 and at most 100, got 120" },
      { 10, "stages[3].count", "cumulative" },
      { 14, "job 'tw', field 'patch'", "'.'" },
      { 15, "field 'devices'", "entry 2", "bad id" },
      { 15, "field 'devices'", "'ok-1' is listed twice (entries 1 and 3)" },
      { 15, "field 'devices'", "entry 4 must be a device id string, got number" },
      { 16, "field 'startTime'", "did you mean 'start'?" },
    })
    assert.equal(14, #p)
  end)

  it("reports a syntax error at its line", function()
    local p = problems_of('job "x" {\n  method = "m",\n  query = "*"\n  ttl = 5,\n}\n')
    assert.equal(1, #p)
    assert.matches("^f%.lua:4: syntax error: '}' expected %(to close '{' at line 1%) near 'ttl'", p[1])
  end)

  it("reports unknown names and runtime errors at their line, with a suggestion", function()
    local p = problems_of('local n = 1\njbo "x" { method = "m", query = "*" }\n')
    assert.matches("^f%.lua:2: unknown name 'jbo'; did you mean 'job'%?", p[1])
    p = problems_of('job "x" { method = "m", query = "*" }\nerror("stop here")\n')
    assert.matches("^f%.lua:2: stop here", p[1])
    p = problems_of('job "x" "y"')
    assert.matches("^f%.lua:1: job \"x\" must be followed by a table", p[1])
  end)

  it("runs in a sandbox: no io, os.execute or require", function()
    for _, name in ipairs({ "io", "require", "dofile", "loadfile", "load", "debug", "package" }) do
      local p = problems_of("local x = " .. name .. "\n")
      assert.matches("^f%.lua:1: unknown name '" .. name .. "'", p[1])
    end
    local p = problems_of('os.execute("true")\n')
    assert.matches("^f%.lua:1: .*execute", p[1])
  end)

  it("stops a file that loops forever", function()
    local p = problems_of("while true do end\n")
    assert.matches("^f%.lua:1: the file ran too long", p[1])
  end)

  it("needs at least one job, and says how to declare one", function()
    local p = problems_of("local x = 1\n")
    assert.matches("declares no jobs; declare one with job", p[1])
    local defs, problems = definitions.load("/nonexistent/defs.lua")
    assert.is_nil(defs)
    assert.matches("^/nonexistent/defs.lua: cannot read the file", tostring(problems[1]))
  end)

  it("checks what a job does and whom it targets", function()
    local p = problems_of('job "a" { query = "*" }\njob "b" { method = "m", patch = { tags = { x = 1 } }, query = "*" }\n'
      .. 'job "c" { method = "m" }\njob "d" { method = "m", query = "*", devices = { "x" } }\n'
      .. 'job "e" { patch = { tags = {} }, query = "*", payload = 1 }\njob "f" { method = "m", devices = {} }\n'
      .. 'job "a" { method = "m", query = "" }\n')
    has(p, {
      { 1, "job 'a'", "says nothing to do" },
      { 2, "job 'b', field 'patch'", "not both" },
      { 3, "job 'c'", "targets nobody" },
      { 4, "job 'd', field 'devices'", "not both" },
      { 5, "job 'e', field 'payload'", "belongs to method jobs" },
      { 6, "job 'f', field 'devices'", "is empty" },
      { 7, "job 'a'", "already declared at line 1" },
      { 7, "job 'a', field 'query'", "is empty" },
    })
  end)

  it("checks job names: they prefix the job ids", function()
    local long = ("n"):rep(41)
    local p = problems_of('job "' .. long .. '" { method = "m", query = "*" }\njob "x_y" { method = "m", query = "*" }\n')
    has(p, {
      { 1, "is 41 characters; at most 40" },
      { 2, "has '_' at position 2" },
    })
    p = problems_of('job(7) { method = "m", query = "*" }\n')
    has(p, { { 1, "must be a string, got number", 'job "name"' } })
  end)

  it("checks stages and gates", function()
    local p = problems_of([[
job "s" {
  method = "m", query = "*",
  stages = {
    { count = 1, percent = 10 },
    { name = "x" },
    { percent = 50, gate = { minSuccessRatio = 2, maxFailures = -1 }, wait = 5 },
    "oops",
  },
}
job "g" { method = "m", query = "*", gate = { maxFailures = 0 } }
job "h" { method = "m", query = "*", stages = {} }
]])
    has(p, {
      { 4, "stages[1]", "both count and percent" },
      { 3, "stages[2]", "needs count (devices) or percent" },
      { 6, "stages[3].gate.minSuccessRatio", "from 0 to 1" },
      { 6, "stages[3].gate.maxFailures", "whole number" },
      { 6, "stages[3]", "unknown stage field 'wait'" },
      { 3, "stages[4]", "must be a table" },
      { 10, "job 'g', field 'gate'", "applies between stages" },
      { 11, "job 'h', field 'stages'", "must be a list of stages" },
    })
  end)

  it("refuses a staged query too long to list its devices with, and says how to fix it", function()
    local quoted = {}
    for i = 1, 908 do quoted[i] = ("'d%05d'"):format(i) end
    local long = "deviceId IN [" .. table.concat(quoted, ",") .. "]" -- 8185 characters
    local p = problems_of('job "s" {\n  method = "m",\n  query = "' .. long .. '",\n'
      .. '  stages = { { count = 1 }, { percent = 100 } },\n}\n')
    has(p, { { 3, "job 's', field 'query'", "is 8185 characters", "within 8157 characters", "devices = { ... }" } })
    -- without stages nothing is listed, and a job takes the condition as it is
    load_ok('job "s" { method = "m", query = "' .. long .. '" }')
  end)

  it("says that a directory is not a definitions file", function()
    local defs, problems = definitions.load(ROOT .. "/examples")
    assert.is_nil(defs)
    assert.equal(ROOT .. "/examples: is a directory; give the definitions file in it (a .lua file that declares jobs)",
      tostring(problems[1]))
    local text, err = definitions.read_file(ROOT .. "/examples")
    assert.is_nil(text)
    assert.equal(ROOT .. "/examples: is a directory", err)
  end)

  it("gives jobs their default ttl, parses durations and start times", function()
    local defs = load_ok([[
      job "a" { method = "m", query = "*" }
      job "b" { method = "m", query = "*", ttl = "1h30m", start = "+10m", responseTimeout = "1m" }
      job "c" { patch = { desired = { x = null } }, query = "*", start = "2030-01-31T08:00:00Z" }
    ]])
    assert.equal(3600, defs.jobs[1].ttl)
    assert.equal(5400, defs.jobs[2].ttl)
    assert.same({ after = 600 }, defs.jobs[2].start)
    assert.equal(60, defs.jobs[2].methodParams.responseTimeoutInSeconds)
    assert.equal(1000 + 600, definitions.resolve_start(defs.jobs[2].start, 1000))
    assert.equal("2030-01-31T08:00:00Z", definitions.resolve_start(defs.jobs[3].start, 1000))
    assert.equal(core.null, defs.jobs[3].patch.properties.desired.x)
    assert.equal(90, definitions.parse_duration("90s"))
    assert.equal(172800, definitions.parse_duration("2d"))
    assert.is_nil((definitions.parse_duration("10x")))
    assert.is_nil((definitions.parse_duration(-1)))
    assert.is_nil((definitions.parse_start("yesterday")))
    assert.same({}, definitions.parse_start("now"))
  end)

  it("offers ids() and json_file() (relative to the file) in the sandbox", function()
    local dir = shell.temp_dir("iothub-defs-spec")
    shell.write_file(dir .. "/payload.json", '{"firmware":"2.0.1","size":123456789012}')
    shell.write_file(dir .. "/defs.lua", 'job "fw" { method = "update", payload = json_file("payload.json"),\n'
      .. '  devices = ids("door-%03d", 1, 3) }\njob "bad" { method = "m", payload = json_file("missing.json"), query = "*" }\n')
    local defs, problems = definitions.load(dir .. "/defs.lua")
    assert.is_nil(defs)
    assert.matches(":3: json_file: cannot read .*missing.json", tostring(problems[1]))
    shell.write_file(dir .. "/defs.lua", 'job "fw" { method = "update", payload = json_file("payload.json"),\n'
      .. '  devices = ids("door-%03d", 1, 3) }\n')
    defs = assert(definitions.load(dir .. "/defs.lua"))
    assert.same({ "door-001", "door-002", "door-003" }, defs.jobs[1].devices)
    assert.equal("2.0.1", defs.jobs[1].methodParams.payload.firmware)
    assert.equal(123456789012, defs.jobs[1].methodParams.payload.size)
    shell.run("rm -rf " .. shell.quote(dir))
  end)
end)
