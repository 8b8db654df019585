-- The launcher's --policy flag: extra shared access policies with their own rights and keys.
local emulator = require "support.emulator_process"
local core = require "iothub.core"

describe("iothub-emulator --policy", function()
  local READER_KEY = core.base64_encode(("r"):rep(32))
  local emu = emulator.shared({ temp_dir = true,
    args = { "--policy", "dashboardReader:registryRead:" .. READER_KEY, "--policy", "ops:registryRead,registryWrite" } })

  it("lets a registryRead policy read the registry with its own key and nothing more", function()
    local auth = { Authorization = emulator.token({ skn = "dashboardReader", key = READER_KEY }) }
    assert.equal(200, (emu:api("GET", "/devices/myDeviceId", nil, auth)))
    local status, body = emu:api("PUT", "/devices/policy-spec-dev", { deviceId = "policy-spec-dev" }, auth)
    assert.equal(401, status)
    assert.equal(401002, emulator.inner_error(body).errorCode)
    assert.equal(401, (emu:api("PUT", "/jobs/v2/policy-spec-job", emulator.job("policy-spec-job"), auth)))
  end)

  it("refuses a token signed with a different key for the same policy", function()
    local auth = { Authorization = emulator.token({ skn = "dashboardReader" }) } -- the iothubowner key
    assert.equal(401, (emu:api("GET", "/devices/myDeviceId", nil, auth)))
  end)

  it("derives the key of a policy given without one from the iothubowner key", function()
    -- Not the owner's key, so a token signed with it must fail; the derived key is in emulator/README.md.
    local auth = { Authorization = emulator.token({ skn = "ops" }) }
    assert.equal(401, (emu:api("GET", "/devices/myDeviceId", nil, auth)))
  end)

  it("stops at start-up with a message naming a malformed policy", function()
    local ok, err = pcall(emulator.start, { temp_dir = true, args = { "--policy", "broken" } })
    assert.is_false(ok)
    assert.matches("broken", tostring(err), 1, true)
  end)
end)
