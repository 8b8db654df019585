-- bin/iothub-emulator with a devices file that hits a sandbox limit (csrc/sandbox.c): refused
-- before nginx starts with "file:line: what" and a non-zero exit, never a traceback or a hung
-- start; and a devices file's handlers inside nginx, whose loops fail the call instead of
-- holding the worker. spec/unit/sandbox_spec.lua covers the limits in-process.
--   busted --lua=lua5.4 spec/emulator/sandbox_spec.lua
local emulator = require "support.emulator_process"
local shell = require "support.shell"

local LAUNCHER = shell.quote(emulator.ROOT .. "/bin/iothub-emulator")

describe("iothub-emulator with a devices file past a sandbox limit", function()
  local tmp
  setup(function() tmp = shell.temp_dir("iothub-emu-sandbox") end)
  teardown(function() shell.run("rm -rf " .. shell.quote(tmp)) end)

  -- Runs the launcher on a devices file with src in it; returns its exit code and output.
  -- `timeout` ends a launcher that hangs (exit code 124 then fails the spec).
  local function launch(src, args, env)
    local path = tmp .. "/devices.lua"
    shell.write_file(path, src)
    local _, out, rc = shell.run("cd " .. shell.quote(tmp) .. " && " .. (env or "") .. " timeout 60 " .. LAUNCHER ..
      " --http-port " .. math.random(20000, 60000) .. " --https-port 0 --devices devices.lua " .. (args or "") ..
      " </dev/null")
    return rc, out
  end

  local function refused(rc, out)
    assert.equal(2, rc, out)
    assert.is_nil(out:find("traceback", 1, true), out)
    assert.is_nil(out:find("ready", 1, true), out)
    assert.is_nil(out:find("IOTHUB_CONNECTION_STRING", 1, true), out)
  end

  it("refuses an endless loop at the instruction cap, naming file:line and how to raise it", function()
    local rc, out = launch("local n = 0\nwhile true do n = n + 1 end\n")
    refused(rc, out)
    assert.equal("iothub-emulator: devices.lua:2: the file ran too long: stopped after 500,000,000 instructions " ..
      "(the devices-file limit; an endless loop?); raise it with --sandbox-instructions 1000000000 or " ..
      "IOTHUB_SANDBOX_INSTRUCTIONS=1000000000\n", out)
  end)

  it("refuses a file growing past the memory cap, and one of heavy instructions at the wall-clock cap", function()
    local rc, out = launch("local t = {}\nfor i = 1, 1e9 do t[i] = string.rep('x', 1e6) .. i end\n",
      "--sandbox-memory 32M")
    refused(rc, out)
    assert.matches("^iothub%-emulator: devices%.lua:2: stopped after using 32 MB of memory %(the devices%-file limit%); " ..
      "raise it with %-%-sandbox%-memory 64M or IOTHUB_SANDBOX_MEMORY=64M\n$", out)
    rc, out = launch("local s = string.rep('x', 1e6)\nwhile true do local t = s .. s end\n", nil,
      "IOTHUB_SANDBOX_SECONDS=1")
    refused(rc, out)
    assert.matches("^iothub%-emulator: devices%.lua:2: the file ran too long: stopped after 1 s", out)
  end)

  it("refuses a bad limit, and starts with a raised one", function()
    local rc, out = launch("return { devices = { { id = 'a' } } }", "--sandbox-seconds never")
    refused(rc, out)
    assert.equal("iothub-emulator: --sandbox-seconds 'never' is not a number of seconds; write e.g. 30\n", out)
    -- 40 MB kept while loading: over a 32M cap, within the default
    local src = "local keep = {}\nfor i = 1, 40 do keep[i] = string.rep('k', 1e6) .. i end\n" ..
      "return { devices = { { id = 'big', tags = { n = #keep } } } }"
    rc, out = launch(src, "--sandbox-memory 32M")
    refused(rc, out)
    assert.matches("stopped after using 32 MB", out, 1, true)
    local emu = emulator.start({ devices_source = src })
    local status, twin = emu:api("GET", "/twins/big")
    emu:cleanup()
    assert.equal(200, status)
    assert.equal(40, twin.tags.n)
  end)

  it("is stopped by nginx's own load, as limited, when the file passed the check", function()
    -- a luajit that accepts everything stands in for a file changed after the check
    shell.run("mkdir -p " .. shell.quote(tmp .. "/bin"))
    shell.write_file(tmp .. "/bin/luajit", "#!/bin/sh\nexit 0\n")
    shell.run("chmod +x " .. shell.quote(tmp .. "/bin/luajit"))
    local rc, out = launch("local n = 0\nwhile true do n = n + 1 end\n", "--sandbox-instructions 1e7",
      "PATH=" .. shell.quote(tmp .. "/bin") .. ":\"$PATH\"")
    assert.are_not.equal(0, rc)
    assert.is_nil(out:find("traceback", 1, true), out)
    assert.matches("iothub-emulator: devices file " .. tmp .. "/devices.lua:2: the file ran too long: stopped after " ..
      "10,000,000 instructions", out, 1, true)
    assert.matches("iothub-emulator: nginx did not start: it stopped; its messages are above\n", out, 1, true)
  end)
end)

describe("iothub-emulator start-up failure message", function()
  local emu
  setup(function() emu = emulator.start({ devices = false }) end)
  teardown(function() if emu then emu:cleanup() end end)

  it("names only a log file that exists", function()
    local port = emu.base:match(":(%d+)$")
    local _, out = shell.run(LAUNCHER .. " --http-port " .. port .. " --https-port 0 </dev/null")
    local line = out:match("iothub%-emulator: nginx did not start: [^\n]*")
    assert(line, out)
    assert.matches("its messages are above", line, 1, true) -- nginx's bind() error, printed above
    local log = line:match("%(log: ([^)]+)%)")
    if log then
      assert.truthy(shell.read_file(log), log .. " does not exist")
      shell.run("rm -rf " .. shell.quote((log:gsub("/logs/error%.log$", ""))))
    end
  end)
end)

describe("devices file handlers inside nginx", function()
  local emu = emulator.shared({ args = { "--sandbox-instructions", "2e7", "--sandbox-seconds", "1" }, devices_source = [[
return { devices = { { id = "d", methods = {
  spin = function()
    while true do end
  end,
  heavy = function()
    local s = string.rep("x", 1e6)
    while true do local t = s .. s end
  end,
  steady = function(_, ctx)
    local n = 0
    for _ = 1, 5 do
      for i = 1, 6000000 do n = n + i end
      ctx.sleep(0.05)
    end
    return 200, { n = n }
  end,
  ok = function() return 200, { fine = true } end,
}, onDesired = function(_, ctx)
  ctx.sleep(0.05)
  while true do end
end } } }
]] })

  local function call(name)
    return emu:api("POST", "/twins/d/methods", { methodName = name, responseTimeoutInSeconds = 30 })
  end

  -- Waits for a line of the launcher's output containing text.
  local function logged(text)
    for _ = 1, 100 do
      if emu:output():find(text, 1, true) then return true end
      emulator.sleep(0.05)
    end
    return false, emu:output()
  end

  it("fails a method handler that loops, and the worker answers the next call", function()
    local status = call("spin")
    assert.equal(504, status)
    assert(logged("[d] method spin: handler failed: " .. emu.tmp .. "/devices.lua:3: the handler ran too long: " ..
      "stopped after 20,000,000 instructions (the devices-file limit; an endless loop?)"))
    local body
    status, body = call("ok")
    assert.equal(200, status)
    assert.same({ fine = true }, body.payload)
    status = call("heavy")
    assert.equal(504, status)
    assert(logged("[d] method heavy: handler failed: " .. emu.tmp .. "/devices.lua:7: the handler ran too long: " ..
      "stopped after 1 s (the devices-file limit)"))
  end)

  it("gives each stretch between ctx.sleep calls its own budget", function()
    -- five stretches of ~12 million instructions: 60 million in all, over the 20 million cap
    local status, body = call("steady")
    assert.equal(200, status)
    assert.equal(5 * 18000003000000, body.payload.n)
  end)

  it("stops an onDesired handler that loops after a sleep", function()
    local status = emu:api("PATCH", "/twins/d", { properties = { desired = { x = 1 } } })
    assert.equal(200, status)
    assert(logged("[d] onDesired failed: " .. emu.tmp .. "/devices.lua:20: the handler ran too long"))
    assert.equal(200, (call("ok")))
  end)
end)
