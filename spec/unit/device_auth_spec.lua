-- Device authentication for the emulator's MQTT endpoint (emulator/auth.lua check_device):
-- device SAS tokens as the device SDKs sign them, and policy tokens with DeviceConnect.
local core = require "iothub.core"
local auth = require "emulator.auth"

local NOW = 1800000000
local PRIMARY, SECONDARY = core.base64_encode("primary-key-0123456789"), core.base64_encode("secondary-key-0123456789")
local KEYS = { primary = PRIMARY, secondary = SECONDARY }

-- A token the way azure-iot-device signs one: sr url-encoded, no skn unless a policy's.
local function token(resource, key_b64, se, skn)
  local sr = core.url_encode(resource)
  local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(key_b64), sr .. "\n" .. se))
  return "SharedAccessSignature sr=" .. sr .. "&sig=" .. core.url_encode(sig) .. "&se=" .. se ..
    (skn and "&skn=" .. skn or "")
end

describe("device authentication", function()
  before_each(function() auth.configure({}) end)

  it("accepts a device token signed with the primary or the secondary key", function()
    assert.is_true(auth.check_device(token("localhost/devices/door1", PRIMARY, NOW + 3600), "door1", KEYS, NOW))
    assert.is_true(auth.check_device(token("localhost/devices/door1", SECONDARY, NOW + 3600), "door1", KEYS, NOW))
  end)

  it("refuses a wrong key, another device's token, an expired token and garbage, saying why", function()
    local other = core.base64_encode("some-other-key-0123456789")
    local ok, why = auth.check_device(token("localhost/devices/door1", other, NOW + 3600), "door1", KEYS, NOW)
    assert.is_nil(ok)
    assert.matches("device 'door1'", why, 1, true)
    ok, why = auth.check_device(token("localhost/devices/door2", PRIMARY, NOW + 3600), "door1", KEYS, NOW)
    assert.is_nil(ok)
    assert.matches("does not cover", why, 1, true)
    ok, why = auth.check_device(token("localhost/devices/door1", PRIMARY, NOW - 3600), "door1", KEYS, NOW)
    assert.is_nil(ok)
    assert.matches("expired", why, 1, true)
    ok, why = auth.check_device("not a token", "door1", KEYS, NOW)
    assert.is_nil(ok)
    assert.is_string(why)
    ok = auth.check_device(nil, "door1", KEYS, NOW)
    assert.is_nil(ok)
    ok, why = auth.check_device(token("localhost/devices/door1", PRIMARY, NOW + 3600), "door1", {}, NOW)
    assert.is_nil(ok)
    assert.matches("no symmetric keys", why, 1, true)
  end)

  it("never puts a key or the signature in its reason", function()
    local t = token("localhost/devices/door1", core.base64_encode("wrong-key-0123456789"), NOW + 3600)
    local _, why = auth.check_device(t, "door1", KEYS, NOW)
    assert.is_nil(why:find(t:match("sig=([^&]+)"), 1, true))
    assert.is_nil(why:find(PRIMARY, 1, true))
  end)

  it("accepts a policy token with DeviceConnect and refuses one without", function()
    local policies = {}
    for _, p in ipairs(auth.policies()) do policies[p.name] = p end
    local device = token("localhost/devices/door1", policies.device.primaryKey, NOW + 3600, "device")
    assert.is_true(auth.check_device(device, "door1", KEYS, NOW))
    local service = token("localhost/devices/door1", policies.service.primaryKey, NOW + 3600, "service")
    local ok, why = auth.check_device(service, "door1", KEYS, NOW)
    assert.is_nil(ok)
    assert.matches("lacks DeviceConnect", why, 1, true)
  end)
end)
