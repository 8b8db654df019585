-- In-process checks of the emulator's devices file, registry, simulation knobs and auth
-- policies (no nginx: a fake clock drives waits and latencies, so these run in
-- milliseconds). The same modules run inside nginx; spec/emulator/registry_spec.lua
-- checks them over the wire.
--   busted --lua=lua5.4 spec/unit/devices_file_spec.lua
local core = require "iothub.core"
local registry = require "emulator.registry"
local methods = require "emulator.methods"
local devices_file = require "emulator.devices_file"
local auth = require "emulator.auth"
local util = require "emulator.util"

local null = core.null
util.set_log_path("/dev/null") -- device output ([id] ...) is not under test here, but for onDesired = "report"

-- A clock that only moves when the emulator sleeps.
local function fake_clock(t0)
  local c = { t = t0 or 1700000000, slept = 0 }
  c.now = function() return c.t end
  c.sleep = function(s) c.t = c.t + s; c.slept = c.slept + s end
  return c
end

-- Each test of the enclosing describe block starts from an empty registry, without a change
-- hook, on a fresh fake clock (fixture.clock); the real clock is back after it.
local function fresh_registry()
  local fixture = {}
  before_each(function()
    registry.reset()
    registry.on_change = nil
    fixture.saved_clock = registry.clock
    fixture.clock = fake_clock()
    registry.clock = fixture.clock
  end)
  after_each(function()
    registry.clock = fixture.saved_clock
    registry.on_change = nil
  end)
  return fixture
end

local function load(src)
  local defs, err = devices_file.from_string(src, "spec-devices")
  assert(defs, err)
  for _, def in ipairs(defs) do assert(registry.add(def)) end
  return defs
end

local function load_error(src)
  local defs, err = devices_file.from_string(src, "spec-devices")
  assert.is_nil(defs)
  assert.is_string(err)
  return err
end

local function call(id, req)
  local m = assert(methods.validate(req))
  return methods.invoke(assert(registry.get(id)), m)
end

describe("emulator devices file", function()
  fresh_registry()

  it("builds devices and fleets with ids, tags and reported properties", function()
    local defs = load([[
      return {
        devices = { { id = "one", tags = { site = "a" }, reported = { fw = "1.0" } } },
        fleets = {
          { count = 3, id = "door-%03d", start = 7, tags = function(i, id) return { n = i, name = id } end },
          { count = 2, id = function(i) return "gate" .. (i * 10) end },
        },
      }]])
    assert.equal(6, #defs)
    local ids = {}
    for _, dev in ipairs(registry.list()) do ids[#ids + 1] = dev.id end
    assert.same({ "one", "door-007", "door-008", "door-009", "gate10", "gate20" }, ids)
    local twin = registry.twin_doc(registry.get("door-008"))
    assert.same({ n = 8, name = "door-008" }, twin.tags)
    assert.equal("1.0", registry.twin_doc(registry.get("one")).properties.reported.fw)
    assert.equal("Connected", twin.connectionState)
  end)

  it("refuses bad files with a message naming the entry and the fix", function()
    assert.truthy(load_error("return { devices = { { id = 'x', colour = 1 } } }"):find("unknown field 'colour'", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'bad id' } } }"):find("position 4", 1, true))
    assert.truthy(load_error("return { devices = { { id = ('x'):rep(129) } } }"):find("at most 128", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a' }, { id = 'a' } } }"):find("defined twice", 1, true))
    assert.truthy(load_error("return { fleets = { { count = 2, id = 'same' } } }"):find("format string", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', latency = { 2, 1 } } } }"):find("min <= max", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', failure = 'sometimes' } } }"):find("'timeout'", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', failureRate = 2 } } }"):find("[0, 1]", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', offline = 'yes' } } }"):find("fraction", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', tags = { ['a.b'] = 1 } } } }"):find("'a.b'", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', reported = { x = ('y'):rep(4097) } } } }")
      :find("4096", 1, true))
    assert.truthy(load_error("return { sede = 1 }"):find("unknown top-level field 'sede'", 1, true))
    assert.truthy(load_error("return { devices = { { id = 'a', onDesired = 'echo' } } }")
      :find('devices[1].onDesired must be a function(patch, ctx) or "report"', 1, true))
    assert.truthy(load_error("return { fleets = { { count = 1, id = 'f%d', tags = function() error('no tags') end } } }")
      :find("no tags", 1, true))
  end)

  it("picks an offline fraction from the seed, the same way every time", function()
    local src = [[return { seed = 42, fleets = { { count = 200, id = "d%03d", offline = 0.25 } } }]]
    local function offline_set()
      registry.reset()
      load(src)
      local set, n = {}, 0
      for _, dev in ipairs(registry.list()) do
        if not registry.is_connected(dev) then set[dev.id] = true; n = n + 1 end
      end
      return set, n
    end
    local a, na = offline_set()
    local b, nb = offline_set()
    assert.same(a, b)
    assert.equal(na, nb)
    assert.is_true(na > 25 and na < 75, "about a quarter offline, got " .. na)
  end)

  it("gives the file a reproducible math.random", function()
    local src = [[
      local picks = {}
      for i = 1, 5 do picks[i] = math.random(1, 1000) end
      return { devices = { { id = "r", tags = { picks = picks } } } }]]
    load(src)
    local first = registry.twin_doc(registry.get("r")).tags.picks
    registry.reset()
    load(src)
    assert.same(first, registry.twin_doc(registry.get("r")).tags.picks)
  end)
end)

describe("emulator registry", function()
  local fixture = fresh_registry()

  it("caches twin documents until the twin changes", function()
    load([[return { devices = { { id = "d", tags = { a = 1 }, methods = { ping = function() return 200 end } } } }]])
    local dev = registry.get("d")
    local doc = registry.twin_doc(dev)
    assert.equal(doc, registry.twin_doc(dev))
    assert(registry.update_twin("d", { tags = { b = 2 } }))
    local after = registry.twin_doc(dev)
    assert.are_not.equal(doc, after)
    assert.is_nil(doc.tags.b) -- the old document is a snapshot
    assert.equal(2, after.tags.b)
    -- activity swaps in a shallow copy: the holder of the old one sees no change
    fixture.clock.t = fixture.clock.t + 5
    assert(call("d", { methodName = "ping" }))
    local touched = registry.twin_doc(dev)
    assert.are_not.equal(after, touched)
    assert.equal(after.tags, touched.tags)
    assert.are_not.equal(after.lastActivityTime, touched.lastActivityTime)
  end)

  it("reports every mutation through on_change", function()
    local events = {}
    registry.on_change = function(event, id) events[#events + 1] = event .. ":" .. id end
    load([[return { devices = { { id = "d", methods = { ping = function(_, ctx) ctx.report({ p = 1 }) return 200 end } } } }]])
    assert(registry.put_device("rest", {}))
    assert(registry.put_device("rest", { status = "disabled" }, "*"))
    assert(registry.update_twin("rest", { tags = { t = 1 } }))
    assert(call("d", { methodName = "ping" }))
    assert(registry.set_connected("d", false))
    assert(registry.delete_device("rest"))
    assert.same({ "create:d", "create:rest", "update:rest", "twin:rest", "reported:d", "connection:d", "delete:rest" },
      events)
  end)

  it("enforces depth, name, value and size limits with ArgumentInvalid", function()
    assert(registry.put_device("lim", {}))
    local function nest(levels)
      local root = {}
      local t = root
      for i = 1, levels do t["l" .. i] = {}; t = t["l" .. i] end
      t.leaf = 1
      return root
    end
    assert(registry.update_twin("lim", { tags = nest(10) }))
    local function refused(patch, fragment)
      local ok, err = registry.update_twin("lim", patch)
      assert.is_nil(ok)
      assert.equal("ArgumentInvalid", err.name)
      assert.equal(400004, err.code)
      assert.truthy(err.message:find(fragment, 1, true), err.message)
    end
    refused({ tags = nest(11) }, "depth")
    refused({ tags = { ["a.b"] = 1 } }, "'a.b'")
    refused({ tags = { ["$x"] = 1 } }, "'$x'")
    refused({ tags = { ["a b"] = 1 } }, "'a b'")
    refused({ tags = { ["c\194\133"] = 1 } }, "control character")
    refused({ properties = { desired = { v = ("x"):rep(4097) } } }, "4096 bytes")
    refused({ tags = { list = core.json_array({ 1, null }) } }, "cannot be null")
    refused({ tags = { big = 4503599627370496 } }, "Integer")
    -- sizes count the merged result
    assert(registry.update_twin("lim", { tags = { a = ("a"):rep(4000), b = ("b"):rep(3000) } }))
    refused({ tags = { c = ("c"):rep(1200) } }, "8 KB")
    local desired = {}
    for i = 1, 8 do desired["k" .. i] = ("d"):rep(3900) end
    assert(registry.update_twin("lim", { properties = { desired = desired } }))
    refused({ properties = { desired = { k9 = ("d"):rep(2000) } } }, "32 KB")
    local ok, err = registry.report(registry.get("lim"), { r = ("r"):rep(5000) })
    assert.is_nil(ok)
    assert.truthy(err:find("4096", 1, true))
  end)

  it("replaces tags and desired on PUT and ignores what only GET returns", function()
    assert(registry.put_device("rp", {}))
    assert(registry.update_twin("rp", { tags = { a = 1, b = 2 }, properties = { desired = { x = 1 } } }))
    local before = registry.twin_doc(registry.get("rp"))
    local body = core.json_decode(core.json_encode(before)) -- a full twin as a client would send it back
    body.tags = { c = 3 }
    body.properties.desired = { y = 2 }
    body.properties.reported = { sneaky = true }
    assert(registry.update_twin("rp", body, '"' .. before.etag .. '"', true))
    local after = registry.twin_doc(registry.get("rp"))
    assert.same({ c = 3 }, after.tags)
    assert.equal(2, after.properties.desired.y)
    assert.is_nil(after.properties.desired.x)
    assert.is_nil(after.properties.reported.sneaky)
    assert.equal(before.properties.desired["$version"] + 1, after.properties.desired["$version"])
    local ok, err = registry.update_twin("rp", { properties = { reported = { sneaky = true } } })
    assert.is_nil(ok)
    assert.equal("ArgumentInvalid", err.name)
  end)

  it("exports and imports identities and twins; a later devices file only adds its simulation", function()
    local src = [[return { devices = { { id = "sim", tags = { from = "file" },
      methods = { ping = function() return 200, "pong" end } } } }]]
    load(src)
    assert(registry.update_twin("sim", { tags = { from = "api" }, properties = { desired = { mode = "eco" } } }))
    assert(registry.put_device("rest", { authentication = { symmetricKey = {
      primaryKey = core.base64_encode(("k"):rep(32)) } } }))
    local text = assert(core.json_encode(registry.export_state()))
    local before = core.json_encode(registry.twin_doc(registry.get("sim")).properties)
    registry.reset()
    assert(registry.import_state(core.json_decode(text)))
    local sim = registry.get("sim")
    assert.is_nil(sim.sim)
    assert.is_false(registry.is_connected(sim))
    assert.equal(core.base64_encode(("k"):rep(32)), registry.get("rest").keys.primary)
    load(src) -- the devices file again, as at the next start
    sim = registry.get("sim")
    assert.equal("api", registry.twin_doc(sim).tags.from)
    assert.equal(before, core.json_encode(registry.twin_doc(sim).properties))
    assert.same({ status = 200, payload = "pong" }, call("sim", { methodName = "ping" }))
    -- and the other order: importing after the devices file keeps the simulation
    assert(registry.import_state(core.json_decode(text)))
    assert.same({ status = 200, payload = "pong" }, call("sim", { methodName = "ping" }))
    assert.is_nil(registry.import_state({ format = "something else" }))
  end)

  it("takes devices offline and online at run time", function()
    load([[return { devices = { { id = "d", methods = { ping = function() return 200 end } } } }]])
    assert(registry.set_connected("d", false))
    assert.equal("Disconnected", registry.twin_doc(registry.get("d")).connectionState)
    local _, err = call("d", { methodName = "ping" })
    assert.equal(404103, err.code)
    assert(registry.set_connected(registry.get("d"), true))
    assert.equal("Connected", registry.twin_doc(registry.get("d")).connectionState)
    assert.equal(200, call("d", { methodName = "ping" }).status)
    local none, nerr = registry.set_connected("nosuch", true)
    assert.is_nil(none)
    assert.equal("DeviceNotFound", nerr.name)
  end)
end)

describe("emulator simulated devices", function()
  local fixture = fresh_registry()

  it("waits connectTimeoutInSeconds for a device that comes online, else 404103", function()
    load([[return { devices = {
      { id = "late", onlineAfter = 3, methods = { ping = function() return 200, "pong" end } },
    } }]])
    local res, err = call("late", { methodName = "ping", connectTimeoutInSeconds = 2 })
    assert.is_nil(res)
    assert.equal("DeviceNotOnline", err.name)
    assert.same({ timeout = "00:00:02" }, err.info)
    res = assert(call("late", { methodName = "ping", connectTimeoutInSeconds = 5 }))
    assert.equal("pong", res.payload)
    assert.is_true(fixture.clock.slept >= 3 and fixture.clock.slept < 3.2, "slept " .. fixture.clock.slept)
  end)

  it("lets a handler disconnect its device once it has answered", function()
    load([[return { devices = { { id = "d", methods = {
      reboot = function(p, ctx) ctx.disconnect(p.seconds) return 200, { rebooting = true } end,
      ping = function() return 200 end } } } }]])
    assert.same({ status = 200, payload = { rebooting = true } }, call("d", { methodName = "reboot", payload = { seconds = 4 } }))
    assert.equal(404103, select(2, call("d", { methodName = "ping" })).code)
    assert.equal(200, call("d", { methodName = "ping", connectTimeoutInSeconds = 10 }).status)
  end)

  it("applies latency within the response timeout", function()
    load([[return { devices = {
      { id = "slow", latency = 6, methods = { ping = function() return 200 end } },
      { id = "range", latency = { 0.1, 0.3 }, methods = { ping = function() return 200 end } },
    } }]])
    local _, err = call("slow", { methodName = "ping", responseTimeoutInSeconds = 5 })
    assert.equal(504101, err.code)
    assert.equal(200, call("slow", { methodName = "ping", responseTimeoutInSeconds = 7 }).status)
    for _ = 1, 5 do
      local t0 = fixture.clock.t
      assert.equal(200, call("range", { methodName = "ping" }).status)
      assert.is_true(fixture.clock.t - t0 >= 0.1 and fixture.clock.t - t0 <= 0.3)
    end
  end)

  it("fails a seeded share of calls in the configured way, reproducibly", function()
    local src = [[return { seed = 9, devices = {
      { id = "flaky", failureRate = 0.4, methods = { ping = function() return 200 end } },
      { id = "down", failureRate = 1, failure = "offline", methods = { ping = function() return 200 end } },
      { id = "slow", failureRate = 1, failure = "timeout", methods = { ping = function() return 200 end } },
      { id = "busy", failureRate = 1, failure = { status = 503, payload = { busy = true } } },
    } }]]
    local function run()
      registry.reset()
      load(src)
      local statuses = {}
      for i = 1, 40 do statuses[i] = call("flaky", { methodName = "ping" }).status end
      return statuses
    end
    local a = run()
    assert.same(a, run())
    -- the same draws a test can predict from the documented stream
    local draw = devices_file.random_stream(9, "flaky", "knobs")
    local fails = 0
    for i = 1, 40 do
      local expected = draw() < 0.4 and 500 or 200
      assert.equal(expected, a[i])
      if expected == 500 then fails = fails + 1 end
    end
    assert.is_true(fails > 5 and fails < 30)
    assert.equal(404103, select(2, call("down", { methodName = "ping" })).code)
    assert.equal(504101, select(2, call("slow", { methodName = "ping" })).code)
    assert.same({ status = 503, payload = { busy = true } }, call("busy", { methodName = "anything" }))
  end)

  it("answers 501 for unknown methods, matches names case-insensitively, maps handler faults to 504", function()
    load([[return { devices = { { id = "d", methods = {
      lockDoor = function() return 200, "locked" end,
      broken = function() error("wires crossed") end,
      weird = function() return "ok" end,
      huge = function() return 200, ("x"):rep(128 * 1024) end,
    } } } }]])
    assert.equal(501, call("d", { methodName = "reboot" }).status)
    assert.equal("locked", call("d", { methodName = "LOCKDOOR" }).payload)
    for _, name in ipairs({ "broken", "weird", "huge" }) do
      local res, err = call("d", { methodName = name })
      assert.is_nil(res)
      assert.equal(504101, err.code)
    end
  end)

  it("validates timeouts and the 128 KB request payload", function()
    local function refused(req)
      local ok, err = methods.validate(req)
      assert.is_nil(ok)
      assert.equal(400004, err.code)
      return err
    end
    refused({ methodName = "m", responseTimeoutInSeconds = 4 })
    refused({ methodName = "m", responseTimeoutInSeconds = 301 })
    refused({ methodName = "m", responseTimeoutInSeconds = 5.5 })
    refused({ methodName = "m", connectTimeoutInSeconds = -1 })
    refused({ methodName = "m", connectTimeoutInSeconds = 301 })
    refused({ responseTimeoutInSeconds = 30 })
    assert(methods.validate({ methodName = "m", payload = ("p"):rep(128 * 1024 - 2) }))
    assert.truthy(refused({ methodName = "m", payload = ("p"):rep(128 * 1024 - 1) }).message:find("131072", 1, true))
  end)

  it("delivers desired changes to connected devices and catches up on reconnect", function()
    load([[return { devices = { { id = "d",
      onDesired = function(patch, ctx) ctx.report({ seen = patch["$version"], mode = patch.mode }) end } } }]])
    local dev = registry.get("d")
    assert(registry.update_twin("d", { properties = { desired = { mode = "eco" } } }))
    assert.equal(2, registry.twin_doc(dev).properties.reported.seen)
    assert(registry.set_connected(dev, false))
    assert(registry.update_twin("d", { properties = { desired = { mode = "boost" } } }))
    assert.equal(2, registry.twin_doc(dev).properties.reported.seen)
    assert(registry.set_connected(dev, true))
    local reported = registry.twin_doc(dev).properties.reported
    assert.equal(3, reported.seen)
    assert.equal("boost", reported.mode)
  end)

  it("has a built-in onDesired = \"report\" that logs each patch and reports its values back", function()
    load([[return { fleets = { { count = 2, id = "r%d", reported = { mode = "off", fw = "1.0" },
      onDesired = "report" } } }]])
    local lines = {}
    local log = stub(util, "log", function(source, msg) lines[#lines + 1] = source .. " " .. msg end)
    local ok, err = pcall(function()
      assert(registry.update_twin("r1", { properties = { desired = { mode = "eco", limits = { max = 3 } } } }))
      assert(registry.update_twin("r1", { properties = { desired = { limits = null } } }))
    end)
    log:revert()
    assert(ok, err)
    assert.same({
      'r1 desired properties changed: {"$version":2,"limits":{"max":3},"mode":"eco"}',
      'r1 desired properties changed: {"$version":3,"limits":null}',
    }, lines)
    local reported = registry.twin_doc(registry.get("r1")).properties.reported
    assert.equal("eco", reported.mode) -- applied; "$version" is not echoed (a reported name cannot start with $)
    assert.is_nil(reported.limits) -- null deletes, as on the device's side of a real hub
    assert.equal("1.0", reported.fw)
    assert.equal(3, reported["$version"]) -- two reports
    assert.equal("off", registry.twin_doc(registry.get("r2")).properties.reported.mode)
  end)
end)

describe("emulator auth policies", function()
  after_each(function() auth.configure({}) end)

  it("has the hub's default policies with well-known keys derived from iothubowner's", function()
    auth.configure({})
    local got = {}
    for _, p in ipairs(auth.policies()) do got[#got + 1] = { p.name, table.concat(p.rights, ","), p.primaryKey } end
    assert.same({
      { "iothubowner", "registryRead,registryWrite,serviceConnect,deviceConnect", auth.DEVELOPMENT_KEY },
      { "service", "serviceConnect", "pUpiL0xFxqFvYOeKXuKax4pZ2vsoEFwC6AXOpw5iZAA=" },
      { "device", "deviceConnect", "vViUNaYlhag261y8WNk/83FOllPw1/P7VQ+zifi9oKM=" },
      { "registryRead", "registryRead", "A19YFMY593hO7aeeC3RRkaKtFplcTqzd7YgH1Z9rwxI=" },
      { "registryReadWrite", "registryRead,registryWrite", "OgAuhxF4iYXa870VwFWqaJVHj2xE7TUnEbjhsbjScMY=" },
    }, got)
    -- another --key moves every derived key with it
    local other = core.base64_encode(("o"):rep(32))
    auth.configure({ policies = { iothubowner = other } })
    assert.equal(auth.derive_key(other, "service", "primary"), auth.policies()[2].primaryKey)
    assert.are_not.equal("pUpiL0xFxqFvYOeKXuKax4pZ2vsoEFwC6AXOpw5iZAA=", auth.policies()[2].primaryKey)
  end)

  it("maps routes to the rights they need", function()
    local function needs(method, path)
      local alts = {}
      for _, need in ipairs(auth.permission_for(method, path)) do alts[#alts + 1] = table.concat(need, "+") end
      return table.concat(alts, " | ")
    end
    assert.equal("registryRead", needs("GET", "/devices/d1"))
    assert.equal("registryWrite", needs("PUT", "/devices/d1"))
    assert.equal("registryWrite", needs("DELETE", "/devices/d1"))
    assert.equal("serviceConnect | registryRead", needs("POST", "/devices/query"))
    assert.equal("serviceConnect | registryRead", needs("GET", "/twins/d1"))
    assert.equal("serviceConnect | registryWrite", needs("PATCH", "/twins/d1"))
    assert.equal("serviceConnect", needs("POST", "/twins/d1/methods"))
    assert.equal("registryRead+registryWrite | serviceConnect+registryRead", needs("PUT", "/jobs/v2/j1"))
    assert.equal("registryWrite+serviceConnect", needs("POST", "/_emulator/reset"))
  end)

  it("checks signature, expiry, scope, policy and rights", function()
    auth.configure({ host = "myhub.example", policies_spec = "reader:registryRead;ops:serviceConnect,registryRead:"
      .. core.base64_encode(("s"):rep(32)) })
    local keys = {}
    for _, p in ipairs(auth.policies()) do keys[p.name] = p end
    local now = 1700000000
    local function tok(name, key, se, sr)
      return auth.token(sr or "myhub.example", key or keys[name].primaryKey, name, se or now + 60)
    end
    assert.is_true((auth.check(tok("ops"), "/twins/d", now, "POST")))
    assert.is_true((auth.check(tok("ops", keys.ops.secondaryKey), "/twins/d/methods", now, "POST")))
    assert.is_true((auth.check(tok("reader"), "/devices/d", now, "GET")))
    assert.is_true((auth.check(tok("reader", nil, now - 200), "/devices/d", now, "GET"))) -- within the 5 min skew
    local function refused(header, path, method, fragment)
      local ok, why = auth.check(header, path, now, method)
      assert.is_nil(ok)
      assert.truthy(why:find(fragment, 1, true), why)
      assert.is_nil(why:find(keys.reader.primaryKey, 1, true))
    end
    refused(tok("reader"), "/devices/d", "PUT", "lacks the rights")
    refused(tok("reader"), "/jobs/v2/j", "GET", "needs registryRead+registryWrite")
    refused(tok("reader", nil, now - 400), "/devices/d", "GET", "expired")
    refused(tok("reader", keys.ops.primaryKey), "/devices/d", "GET", "neither the primary nor the secondary")
    refused(tok("reader", nil, nil, "otherhub.example"), "/devices/d", "GET", "does not cover")
    refused(tok("reader"):gsub("skn=reader", "skn=nobody"), "/devices/d", "GET", "not configured")
    refused(nil, "/devices/d", "GET", "no Authorization")
    assert.is_nil(auth.parse_policy_spec("justaname"))
  end)
end)
