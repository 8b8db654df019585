-- bin/iothub-emulator itself: readiness that cannot be fooled by another server on the port,
-- secrets kept owner-only in --dir, and api-version checking.
local emulator = require "support.emulator_process"
local shell = require "support.shell"

describe("iothub-emulator launcher", function()
  local emu

  setup(function() emu = emulator.start({}) end)
  teardown(function() if emu then emu:cleanup() end end)

  it("refuses to report ready when its port belongs to another server", function()
    local port = emu.base:match(":(%d+)$")
    local ok, out = shell.run(shell.quote(emulator.ROOT .. "/bin/iothub-emulator") .. " --http-port " .. port ..
      " --https-port 0 2>&1")
    assert.is_false(ok)
    assert.is_nil(out:find("\nready\n", 1, true))
    assert.is_nil(out:find("IOTHUB_CONNECTION_STRING=", 1, true))
    assert.matches("did not start", out, 1, true)
  end)

  it("keeps its dir, nginx.conf (which holds the key) and the connection file owner-only", function()
    local want = { [emu.dir] = "700", [emu.dir .. "/nginx.conf"] = "600", [emu.dir .. "/connection"] = "600" }
    for path, mode in pairs(want) do
      local _, out = shell.run("stat -c %a " .. shell.quote(path))
      assert.equal(mode, (out:gsub("%s+$", "")), path)
    end
  end)

  it("accepts dated api-versions and refuses one that is not a date", function()
    assert.equal(200, (emu:request("GET", "/devices/myDeviceId?api-version=2018-06-30")))
    assert.equal(200, (emu:request("GET", "/devices/myDeviceId?api-version=2020-06-30-preview")))
    local status, body, headers = emu:request("GET", "/devices/myDeviceId?api-version=banana")
    assert.equal(400, status)
    assert.equal("InvalidProtocolVersion", headers["iothub-errorcode"])
    assert.matches("banana", body.Message, 1, true)
  end)

  it("answers requests nginx refuses with the hub's error envelope, not an HTML page", function()
    local status, body, headers = emu:api("GET", "/devices/..%2F..%2Fx")
    assert.equal(400, status)
    assert.equal("GenericBadRequest", headers["iothub-errorcode"])
    assert.equal(400000, emulator.inner_error(body).errorCode)
    status, body, headers = emu:api("PUT", "/devices/too-big", ("x"):rep(5 * 1024 * 1024))
    assert.equal(413, status)
    assert.equal("MessageTooLarge", headers["iothub-errorcode"])
    assert.equal(413001, emulator.inner_error(body).errorCode)
  end)
end)
