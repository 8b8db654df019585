-- The sandbox untrusted Lua runs in (csrc/sandbox.c): a memory cap enforced by the allocator,
-- an instruction cap and a wall-clock cap, each firing with a message that names the file, the
-- limit and how to raise it; definitions files (iothub.definitions, the CLI) and devices files
-- (emulator/devices_file.lua, their handlers in emulator/methods.lua) both run in it.
-- spec/emulator/sandbox_spec.lua covers bin/iothub-emulator and handlers inside nginx.
--   busted --lua=lua5.4 spec/unit/sandbox_spec.lua
local core = require "iothub.core"
local definitions = require "iothub.definitions"
local devices_file = require "emulator.devices_file"
local registry = require "emulator.registry"
local methods = require "emulator.methods"
local util = require "emulator.util"
local shell = require "support.shell"

local ROOT = shell.ROOT
local MB = 1024 * 1024
local INTERPRETER = jit and "luajit" or "lua5.4"

-- Runs src (a file's text, named f.lua) under limits; returns what sandbox_run returns.
local function run(src, limits, env)
  local fn = assert(core.sandbox_load(src, "@f.lua", env or { string = string, pcall = pcall, table = table }))
  limits = limits or {}
  limits.name, limits.source = limits.name or "spec", "@f.lua"
  return core.sandbox_run(fn, limits)
end

-- Each loop on one line, so the line a limit names does not depend on where it fired.
local GROW = "local t = {}\nfor i = 1, 1e9 do t[i] = string.rep('x', 1e6) .. i end\n"
local HEAVY = "local s = string.rep('x', 1e6)\nwhile true do local t = s .. s end\n"

-- Runs Lua code in a fresh process of this interpreter (the project's paths set), under a
-- 2 GB address-space limit so a sandbox that failed to stop a file cannot take the machine
-- (not under a preloaded ASan runtime, which reserves terabytes of address space).
-- Returns ok, output, exit code.
local function lua_process(code, env)
  local prelude = ("package.path = %q .. package.path; package.cpath = %q .. package.cpath"):format(
    ROOT .. "/lua/?.lua;" .. ROOT .. "/lua/?/init.lua;" .. ROOT .. "/?.lua;",
    ROOT .. "/build/" .. (jit and "luajit" or "5.4") .. "/?.so;")
  return shell.run('[ -n "${LD_PRELOAD:-}" ] || ulimit -v 2000000; ' .. (env or "") .. " " .. INTERPRETER ..
    " -e " .. shell.quote(prelude) .. " -e " .. shell.quote(code))
end

-- The peak resident set size a lua_process printed as "maxrss=<KiB>".
local function maxrss_mb(out)
  local kb = tonumber(out:match("maxrss=(%d+)"))
  assert(kb, "no maxrss in: " .. out)
  return kb / 1024
end

describe("sandbox runner", function()
  it("returns the function's results, or nil, message, code for an error", function()
    assert.same({ true, 1, "two" }, { run("return 1, 'two'") })
    local ok, message, code = run("local x = nil\nreturn x.y\n")
    assert.is_nil(ok)
    assert.matches("^f%.lua:2: attempt to index", message)
    assert.equal("error", code)
    ok, message, code = run("error({})", nil, { error = error })
    assert.is_nil(ok)
    assert.equal("f.lua:1: error (a table value)", message)
    assert.equal("error", code)
  end)

  it("stops an endless loop at the instruction cap, even one that pcalls its way on", function()
    local ok, message, code = run("local n = 0\nwhile true do n = n + 1 end\n", { instructions = 2e6 })
    assert.is_nil(ok)
    assert.equal("instructions", code)
    assert.equal("f.lua:2: the file ran too long: stopped after 2,000,000 instructions (the spec limit; an endless " ..
      "loop?); raise it with --sandbox-instructions 4000000 or IOTHUB_SANDBOX_INSTRUCTIONS=4000000", message)
    ok, message, code = run("local n = 0\nwhile true do pcall(function() while true do n = n + 1 end end) end\n",
      { instructions = 2e6 })
    assert.is_nil(ok)
    assert.equal("instructions", code)
    assert.matches("^f%.lua:2: the file ran too long", message)
  end)

  it("stops a loop of heavy instructions at the wall-clock cap", function()
    -- ~10 instructions per 2 MB concatenation: far from the instruction cap, and the garbage
    -- is collected, so only the clock can stop it
    local ok, message, code = run(HEAVY, { seconds = 0.5 })
    assert.is_nil(ok)
    assert.equal("seconds", code)
    assert.equal("f.lua:2: the file ran too long: stopped after 0.5 s (the spec limit); raise it with " ..
      "--sandbox-seconds 1 or IOTHUB_SANDBOX_SECONDS=1", message)
  end)

  it("stops at the memory cap, then puts the allocator back", function()
    local ok, message, code = run(GROW, { memory = 16 * MB })
    assert.is_nil(ok)
    assert.equal("memory", code)
    assert.equal("f.lua:2: stopped after using 16 MB of memory (the spec limit); raise it with --sandbox-memory 32M " ..
      "or IOTHUB_SANDBOX_MEMORY=32M", message)
    -- a memory error caught by the file's pcall still ends the run
    ok, message, code = run("local t = {}\nwhile true do pcall(function() t[#t + 1] = string.rep('x', 1e6) .. #t end) end\n",
      { memory = 16 * MB })
    assert.is_nil(ok)
    assert.equal("memory", code, message)
    -- ... and so does one caught once, after which the file returns normally
    ok, message, code = run("local t = {}\nlocal ok = pcall(function() while true do t[#t + 1] = string.rep('x', 1e6) .. #t end end)\n" ..
      "t = nil\nreturn ok\n", { memory = 16 * MB })
    assert.is_nil(ok)
    assert.equal("memory", code, message)
    assert.matches("stopped after using 16 MB of memory", message)
    -- outside the sandbox the same allocation succeeds
    local big = string.rep("y", 32 * MB)
    assert.equal(32 * MB, #big)
    big = nil -- luacheck: ignore 311
    collectgarbage()
  end)

  it("does not let the file use the room of garbage made before it ran", function()
    collectgarbage("stop")
    for i = 1, 64 do local _ = string.rep("g", MB) .. i end
    collectgarbage("restart")
    -- 24 MB kept: over the cap, however much older garbage the collector frees meanwhile
    local ok, message, code = run("local t = {}\nfor i = 1, 24 do t[i] = string.rep('x', 1e6) .. i end\nreturn #t\n",
      { memory = 16 * MB })
    assert.is_nil(ok)
    assert.equal("memory", code, message)
  end)

  it("keeps the hook that was set before it, after a run that ends well or not", function()
    local hook = function() end
    for _, src in ipairs({ "local n = 0\nfor i = 1, 1e5 do n = n + i end\nreturn n\n", "while true do end" }) do
      debug.sethook(hook, "", 1e9)
      run(src, { instructions = 1e6 })
      local f, mask, count = debug.gethook()
      debug.sethook()
      assert.equal(hook, f)
      assert.equal("", mask)
      assert.equal(1e9, count)
    end
  end)

  it("refuses a file that yields, and bytecode", function()
    local ok, message, code = core.sandbox_run(function() coroutine.yield(1) end, { source = "@f.lua" })
    assert.is_nil(ok)
    assert.equal("yield", code)
    assert.matches("must not yield", message)
    local fn, err = core.sandbox_load(string.dump(function() return 1 end), "@f.lua", {})
    assert.is_nil(fn)
    -- "attempt to load a binary chunk" (5.4), "attempt to load chunk with wrong mode" (LuaJIT)
    assert.is_truthy(err:find("binary", 1, true) or err:find("wrong mode", 1, true), err)
  end)

  it("reads limits from flags, then IOTHUB_SANDBOX_*, then the defaults", function()
    local env = { IOTHUB_SANDBOX_MEMORY = "1G", IOTHUB_SANDBOX_SECONDS = "2.5" }
    local function getenv(name) return env[name] end
    assert.same({ memory = 1024 * MB, instructions = 5e8, seconds = 2.5 }, core.sandbox_limits({}, getenv))
    assert.same({ memory = 512 * MB, instructions = 2e9, seconds = 2.5 },
      core.sandbox_limits({ memory = "512M", instructions = "2e9" }, getenv))
    assert.same({ memory = 256 * MB, instructions = 5e8, seconds = 10 }, core.sandbox_limits({ memory = "" }, function() end))
    assert.equal(256 * MB, core.sandbox_knobs.memory.default)
    local limits, why, code = core.sandbox_limits({ memory = "lots" })
    assert.is_nil(limits)
    assert.equal("--sandbox-memory 'lots' is not a size; write e.g. 512M or 2G", why)
    assert.equal("InvalidSandboxLimit", code)
    assert.equal("IOTHUB_SANDBOX_SECONDS must be a number of seconds from 0.01 to 86400, e.g. 30",
      select(2, core.sandbox_limits({}, function(name) return name == "IOTHUB_SANDBOX_SECONDS" and "0" or nil end)))
    why = select(2, core.sandbox_limits({ instructions = "1.5" }))
    assert.matches("^%-%-sandbox%-instructions '1.5' is not a whole number", why)
  end)
end)

describe("definitions file sandbox", function()
  local tmp
  setup(function() tmp = shell.temp_dir("iothub-sandbox-spec") end)
  teardown(function() shell.run("rm -rf " .. shell.quote(tmp)) end)

  local function problem(src, limits)
    local defs, problems = definitions.load_string(src, "f.lua", { limits = limits })
    assert.is_nil(defs)
    return tostring(problems[1])
  end

  it("stops a file growing a table of 1 MB strings at the memory cap, with the process's RSS bounded", function()
    local path = tmp .. "/grow.lua"
    shell.write_file(path, GROW .. 'job "x" { method = "m", query = "*" }\n')
    local ok, out, rc = lua_process(([[
      local rc = require("iothub.cli").main({ "plan", "--sandbox-memory", "64M", %q })
      io.stderr:write("maxrss=", require("iothub.core").maxrss(), "\n")
      os.exit(rc)]]):format(path))
    assert.is_false(ok)
    assert.equal(2, rc, out) -- a bad definitions file: nothing was sent
    assert.matches(path .. ":2: stopped after using 64 MB of memory (the definitions-file limit); raise it with " ..
      "--sandbox-memory 128M or IOTHUB_SANDBOX_MEMORY=128M\n", out, 1, true)
    assert.is_true(maxrss_mb(out) < 64 + 48, out) -- the cap plus the interpreter and the project
  end)

  it("stops an endless loop and a loop of heavy instructions", function()
    assert.matches("^f%.lua:2: the file ran too long: stopped after 3,000,000 instructions",
      problem("local n = 0\nwhile true do n = n + 1 end\n", { instructions = 3e6 }))
    assert.matches("^f%.lua:2: the file ran too long: stopped after 0.5 s %(the definitions%-file limit%)",
      problem(HEAVY, { seconds = 0.5 }))
  end)

  it("lets a legitimately large file pass when the limit is raised", function()
    local src = "local keep = {}\nfor i = 1, 40 do keep[i] = string.rep('k', 1e6) .. i end\n" ..
      'job "big" { method = "m", query = "*", description = tostring(#keep) }\n'
    assert.matches("^f%.lua:2: stopped after using 16 MB of memory", problem(src, { memory = 16 * MB }))
    local defs = assert(definitions.load_string(src, "f.lua", { limits = { memory = 128 * MB } }))
    assert.equal("40", defs.jobs[1].description)
  end)

  it("reads the limits from IOTHUB_SANDBOX_* and says which value is wrong", function()
    local path = tmp .. "/loop.lua"
    shell.write_file(path, "while true do end\n")
    local _, out, rc = lua_process(("os.exit(require('iothub.cli').main({ 'plan', %q }))"):format(path),
      "IOTHUB_SANDBOX_INSTRUCTIONS=2e6")
    assert.equal(2, rc)
    assert.matches(path .. ":1: the file ran too long: stopped after 2,000,000 instructions", out, 1, true)
    _, out, rc = lua_process(("os.exit(require('iothub.cli').main({ 'plan', '--sandbox-seconds', 'soon', %q }))")
      :format(path))
    assert.equal(2, rc)
    assert.matches("--sandbox-seconds 'soon' is not a number of seconds", out, 1, true)
  end)

  it("gives the file copies of the libraries", function()
    local defs = assert(definitions.load_string('string.format = nil\ntable.concat = nil\njob "x" { method = "m", query = "*" }\n',
      "f.lua"))
    assert.equal(1, #defs.jobs)
    assert.is_function(string.format)
    assert.is_function(table.concat)
  end)
end)

describe("devices file sandbox", function()
  local function load_error(src, limits)
    local defs, err = devices_file.from_string(src, "d.lua", { limits = limits })
    assert.is_nil(defs)
    return err
  end

  it("stops an endless loop, in the file or in a fleet's function", function()
    assert.matches("^d%.lua:2: the file ran too long: stopped after 2,000,000 instructions %(the devices%-file limit",
      load_error("local n = 0\nwhile true do n = n + 1 end\n", { instructions = 2e6 }))
    assert.matches("^d%.lua:3: the file ran too long",
      load_error("return { fleets = { { count = 2, id = 'f%d',\n  tags = function()\n    while true do end\n  end } } }\n",
        { instructions = 2e6 }))
  end)

  it("stops at the memory and wall-clock caps, and a raised limit lets a large file pass", function()
    assert.equal("d.lua:2: stopped after using 16 MB of memory (the devices-file limit); raise it with " ..
      "--sandbox-memory 32M or IOTHUB_SANDBOX_MEMORY=32M", load_error(GROW, { memory = 16 * MB }))
    assert.matches("^d%.lua:2: the file ran too long: stopped after 0.5 s", load_error(HEAVY, { seconds = 0.5 }))
    -- 60,000 devices with a table each: over 16 MB, within 96 MB
    local fleet = "return { fleets = { { count = 60000, id = 'sim-%05d', tags = function(i) return { n = i } end } } }"
    assert.matches("^d%.lua:?%d*: stopped after using 16 MB of memory", load_error(fleet, { memory = 16 * MB }))
    -- the wall-clock cap raised too: under valgrind this file takes longer than the default 10 s
    local defs = assert(devices_file.from_string(fleet, "d.lua", { limits = { memory = 96 * MB, seconds = 300 } }))
    assert.equal(60000, #defs)
  end)

  it("offers no finalizers and no way to the strings' metatable", function()
    assert.matches("__gc is not available", load_error("setmetatable({}, { __gc = function() end })"))
    local defs = assert(devices_file.from_string("assert(getmetatable('') == nil)\nreturn { devices = { { id = 'a' } } }",
      "d.lua"))
    assert.equal(1, #defs)
  end)
end)

describe("devices file handlers at request time", function()
  local saved_clock
  before_each(function()
    registry.reset()
    registry.on_change = nil
    saved_clock = registry.clock
    local c = { t = 1700000000 }
    c.now = function() return c.t end
    c.sleep = function(s) c.t = c.t + s end
    registry.clock = c
  end)
  after_each(function() registry.clock = saved_clock end)

  local logged
  setup(function()
    logged = os.tmpname()
    util.set_log_path(logged)
  end)
  teardown(function()
    util.set_log_path("/dev/null")
    os.remove(logged)
  end)

  local function device(src, limits)
    for _, def in ipairs(assert(devices_file.from_string(src, "h.lua", { limits = limits }))) do assert(registry.add(def)) end
  end

  local function call(id, name)
    return methods.invoke(assert(registry.get(id)), assert(methods.validate({ methodName = name })))
  end

  it("stops a handler that loops, and the next call still works", function()
    device([[
return { devices = { { id = "d", methods = {
  spin = function()
    while true do end
  end,
  catch = function()
    while true do pcall(function() while true do end end) end
  end,
  ok = function() return 200, { fine = true } end,
} } } }]], { instructions = 2e6 })
    for _, name in ipairs({ "spin", "catch" }) do
      local res, err = call("d", name)
      assert.is_nil(res)
      assert.equal("GatewayTimeout", err.name)
    end
    local log = shell.read_file(logged)
    assert.matches("[d] method spin: handler failed: h.lua:3: the handler ran too long: stopped after 2,000,000 " ..
      "instructions (the devices-file limit; an endless loop?)", log, 1, true)
    assert.matches("[d] method catch: handler failed: h.lua:6: the handler ran too long", log, 1, true)
    assert.same({ status = 200, payload = { fine = true } }, call("d", "ok"))
  end)

  it("gives each stretch between ctx.sleep calls its own budget", function()
    -- 10 stretches of ~600,000 instructions each: 6 million in all, over a 2 million cap
    device([[
return { devices = { { id = "d", methods = {
  steady = function(_, ctx)
    local n = 0
    for _ = 1, 10 do
      for i = 1, 300000 do n = n + i end
      ctx.sleep(1)
      ctx.report({ n = n })
    end
    return 200, { n = n }
  end,
} } } }]], { instructions = 2e6 })
    local res = assert(call("d", "steady"))
    assert.equal(200, res.status)
    assert.equal(10 * 45000150000, res.payload.n)
  end)

  it("stops an onDesired handler that loops, and one that grows past the memory cap", function()
    device([[
return { devices = {
  { id = "spin", onDesired = function(_, ctx)
      ctx.sleep(1)
      while true do end
    end },
  { id = "grow", onDesired = function()
      local t = {}
      while true do t[#t + 1] = string.rep("y", 1e6) .. #t end
    end },
} }]], { instructions = 2e6, memory = 32 * MB })
    for _, id in ipairs({ "spin", "grow" }) do
      assert(registry.update_twin(id, { properties = { desired = { x = 1 } } }))
    end
    local log = shell.read_file(logged)
    assert.matches("[spin] onDesired failed: h.lua:4: the handler ran too long: stopped after 2,000,000 instructions",
      log, 1, true)
    assert.matches("%[grow%] onDesired failed: h%.lua:%d+: stopped after using 32 MB of memory", log)
  end)
end)
