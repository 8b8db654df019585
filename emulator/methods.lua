-- Simulated devices: direct-method invocation through the devices file's handlers, the
-- simulation knobs (latency, failure rate), connection waits, and desired-property
-- notifications (hub-behavior.md §4). A handler is
--   function(payload, ctx) return status, payload end
-- ctx: deviceId, methodName, log(fmt, ...), json(v), twin(), report(patch), sleep(s), now(),
--      random(), disconnect([seconds]).
-- A devices file's handlers run under the file's sandbox limits (csrc/sandbox.c sessions):
-- every stretch of a handler between two ctx.sleep calls (from its start to the first, from
-- the last to its return) may allocate at most the memory limit and run at most the
-- instruction and seconds limits, so a handler that loops without sleeping fails with
-- "file:line: the handler ran too long ..." instead of holding the nginx worker for ever.
-- Not limited: the total of a handler that sleeps in between (a method handler is abandoned at
-- its responseTimeoutInSeconds; an onDesired handler may run on), memory kept across sleeps,
-- and the emulator's own work for ctx.log/twin/report (its memory counts, its time too).
local util = require "emulator.util"
local errors = require "emulator.errors"
local registry = require "emulator.registry"
local devices_file = require "emulator.devices_file"

local null = util.null
local M = {}

M.MAX_PAYLOAD_BYTES = 128 * 1024 -- request and response payloads (hub-behavior.md §4)

local function hms(seconds)
  seconds = math.floor(seconds or 0)
  return string.format("%02d:%02d:%02d", math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60)
end

local function int_in(v, lo, hi)
  return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi
end

local function json_size(v)
  local text = util.json_encode(v)
  return text and #text
end

-- Normalizes a method request body (also used for a job's cloudToDeviceMethod).
function M.validate(req)
  if not util.is_object(req) then
    return nil, errors.new("ArgumentInvalid", "The method request must be a JSON object.")
  end
  if type(req.methodName) ~= "string" or req.methodName == "" then
    return nil, errors.new("ArgumentInvalid", "methodName is required.")
  end
  local rt = req.responseTimeoutInSeconds
  if rt == nil or rt == null then rt = req.timeoutInSeconds end -- legacy field name
  if rt == nil or rt == null then rt = 30 end
  if not int_in(rt, 5, 300) then
    return nil, errors.new("ArgumentInvalid", "responseTimeoutInSeconds must be within [5; 300].")
  end
  local ct = req.connectTimeoutInSeconds
  if ct == nil or ct == null then ct = 0 end
  if not int_in(ct, 0, 300) then
    return nil, errors.new("ArgumentInvalid", "connectTimeoutInSeconds must be within [0; 300].")
  end
  local payload = req.payload
  if payload == nil then payload = null end
  local size = json_size(payload)
  if not size then
    return nil, errors.new("ArgumentInvalid", "The method payload is not valid JSON.")
  end
  if size > M.MAX_PAYLOAD_BYTES then
    return nil, errors.new("ArgumentInvalid", ("'payload' size should be at most %d bytes; it is %d.")
      :format(M.MAX_PAYLOAD_BYTES, size))
  end
  return {
    methodName = req.methodName, payload = payload,
    responseTimeoutInSeconds = rt, connectTimeoutInSeconds = ct,
  }
end

-- The device's seeded stream for a purpose ("knobs": the simulation's draws, "user":
-- ctx.random), made on first use; devices outside a devices file use the seed 1.
local function stream(dev, purpose)
  local streams = dev.streams
  if not streams then
    streams = {}
    dev.streams = streams
  end
  local s = streams[purpose]
  if not s then
    s = devices_file.random_stream(dev.sim and dev.sim.seed or 1, dev.id, purpose)
    streams[purpose] = s
  end
  return s
end

-- Runs f(...) (the emulator's own work for a handler) with the handler's limits paused, so
-- that nothing is refused or stopped half-way; returns its first two results.
local function outside(ctx, f, ...)
  local session = ctx._session
  if not session then return f(...) end
  session:pause()
  local ok, a, b = pcall(f, ...)
  session:enter()
  if not ok then error(a, 0) end
  return a, b
end

local function twin_copy(dev) return util.deepcopy(registry.twin_doc(dev)) end

function M.make_ctx(dev, method_name)
  local clock = registry.clock
  local ctx
  ctx = {
    deviceId = dev.id,
    methodName = method_name,
    log = function(fmt, ...)
      local msg = select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt)
      outside(ctx, util.log, dev.id, msg)
    end,
    json = function(v)
      local s = util.json_encode(util.jsonify(v))
      return s or tostring(v)
    end,
    twin = function() return (outside(ctx, twin_copy, dev)) end,
    report = function(patch)
      local ok, err = outside(ctx, registry.report, dev, util.jsonify(patch))
      if not ok then error("ctx.report: " .. tostring(err), 2) end
    end,
    -- A sleep yields (under nginx): the limits are left before it, and a new stretch begins
    -- after it. A handler whose limit fired does not sleep; it stops at its next instruction.
    sleep = function(s)
      local session = ctx._session
      if not session then return clock.sleep(s) end
      local ok, err = true, nil
      if session:leave() then ok, err = pcall(clock.sleep, s) end
      session:restart()
      session:enter()
      if not ok then error(err, 2) end
    end,
    now = function() return clock.now() end,
    random = function() return stream(dev, "user")() end,
    -- Goes offline once the handler returns (the caller still gets this answer), and
    -- back online after `seconds` if given.
    disconnect = function(seconds)
      if seconds ~= nil and (type(seconds) ~= "number" or seconds < 0) then
        error("ctx.disconnect: seconds must be a number >= 0", 2)
      end
      ctx._disconnect = { seconds = seconds }
    end,
  }
  return ctx
end

-- Calls a handler fn(arg, ctx) like pcall, under its devices file's limits (dev.sim.sandbox;
-- handlers added without a devices file have none). A limit that fired gives false, message.
local function run_handler(dev, fn, arg, ctx)
  local box = dev.sim and dev.sim.sandbox
  if not box then return pcall(fn, arg, ctx) end
  local session = util.core.sandbox_session(box)
  ctx._session = session
  session:enter()
  local ok, a, b = pcall(fn, arg, ctx)
  local fine, why = session:leave()
  ctx._session = nil
  if not fine then return false, why end
  return ok, a, b
end

local function apply_disconnect(dev, ctx)
  local d = ctx._disconnect
  if not d then return end
  ctx._disconnect = nil
  if d.seconds then
    registry.schedule_online(dev, d.seconds)
    util.log(dev.id, string.format("disconnected; back online in %g s", d.seconds))
  else
    registry.set_connected(dev, false)
    util.log(dev.id, "disconnected")
  end
end

local function find_handler(methods, name)
  local fn = methods[name]
  if fn then return fn end
  local low = name:lower() -- method names match case-insensitively
  for k, f in pairs(methods) do
    if k:lower() == low then return f end
  end
end

local function no_response(dev, name, why)
  util.log(dev.id, "method " .. name .. ": " .. why)
  return nil, errors.new("GatewayTimeout", "Timed out waiting for the response from device.", {})
end

local function not_online(connect_timeout)
  return nil, errors.new("DeviceNotOnline", "Timed out waiting for device to connect.",
    { timeout = hms(connect_timeout) })
end

-- Runs fn() and returns its results as a table, or nil when it takes longer than timeout.
-- Under nginx fn runs in a light thread raced against a sleeper, so a handler that sleeps
-- past the timeout is abandoned when it expires, as the hub does.
local function call_with_timeout(fn, timeout)
  if not (ngx and ngx.thread) then
    local clock = registry.clock
    local t0 = clock.now()
    local res = { fn() }
    if clock.now() - t0 > timeout then return nil end
    return res
  end
  local worker = ngx.thread.spawn(function() return "done", { fn() } end)
  local sleeper = ngx.thread.spawn(function() ngx.sleep(timeout) end)
  local ok, tag, res = ngx.thread.wait(worker, sleeper)
  if ok and tag == "done" then
    ngx.thread.kill(sleeper)
    return res
  end
  ngx.thread.kill(worker)
  return nil
end

-- Waits up to `seconds` for the device to connect; true when it is connected.
local function wait_connected(dev, seconds)
  local clock = registry.clock
  local deadline = clock.now() + seconds
  while not registry.is_connected(dev) do
    local left = deadline - clock.now()
    if left <= 0 or dev.deleted then return false end
    clock.sleep(math.min(0.05, left))
  end
  return true
end

-- The knobs' verdict for one call: failing (boolean) and latency (seconds), drawn from the
-- device's seeded stream in a fixed order (failure first, then latency).
local function roll(dev, sim)
  local failing = false
  if sim.failureRate and sim.failureRate > 0 then failing = stream(dev, "knobs")() < sim.failureRate end
  local latency = 0
  local range = sim.latency
  if range then
    latency = range[1]
    if range[2] > range[1] then latency = range[1] + (range[2] - range[1]) * stream(dev, "knobs")() end
  end
  return failing, latency
end

local NO_SIM = { methods = {}, failure = "error" }

-- req is a validated request (M.validate). opts.connect_wait = false: do not wait for an
-- offline device (the caller already waited). Returns { status, payload } or nil, error.
function M.invoke(dev, req, opts)
  local ct = req.connectTimeoutInSeconds or 0
  if not registry.is_connected(dev) then
    local waited = ct > 0 and not (opts and opts.connect_wait == false) and wait_connected(dev, ct)
    if dev.deleted then return nil, errors.new("DeviceNotFound", "Device " .. dev.id .. " not found.") end
    if not waited then return not_online(ct) end
  end
  registry.touch(dev)
  local sim = dev.sim or NO_SIM
  local name = req.methodName
  local failing, latency = roll(dev, sim)
  if failing and sim.failure == "offline" then
    util.log(dev.id, "method " .. name .. ": simulated connection drop")
    return not_online(ct)
  end
  local ctx = M.make_ctx(dev, name)
  local function device_side()
    if latency > 0 then registry.clock.sleep(latency) end
    if failing then
      if sim.failure == "timeout" then
        registry.clock.sleep(req.responseTimeoutInSeconds + 1)
        return true, 200, null
      end
      local f = type(sim.failure) == "table" and sim.failure or { status = 500, payload = { message = "simulated failure" } }
      return true, f.status, util.deepcopy(f.payload)
    end
    local handler = find_handler(sim.methods, name)
    if not handler then return true, 501, { message = "method not implemented" } end
    return run_handler(dev, handler, util.deepcopy(req.payload), ctx)
  end
  local res = call_with_timeout(device_side, req.responseTimeoutInSeconds)
  apply_disconnect(dev, ctx)
  if not res then
    return no_response(dev, name, failing and "simulated timeout" or "no answer within responseTimeoutInSeconds")
  end
  local ok, status, payload = res[1], res[2], res[3]
  if not ok then return no_response(dev, name, "handler failed: " .. tostring(status)) end
  if status == nil then status = 200 end
  if type(status) ~= "number" or status % 1 ~= 0 then
    return no_response(dev, name, "handler returned a non-integer status " .. tostring(status))
  end
  if payload == nil then payload = null end
  payload = util.jsonify(payload)
  local size = json_size(payload)
  if not size then
    return no_response(dev, name, "handler returned a payload that is not JSON")
  end
  if size > M.MAX_PAYLOAD_BYTES then
    return no_response(dev, name, ("handler returned %d bytes of payload; the limit is %d")
      :format(size, M.MAX_PAYLOAD_BYTES))
  end
  return { status = status, payload = payload }
end

-- Desired-property notification, delivered asynchronously as the hub does over MQTT,
-- and only to a connected device (it catches up when it reconnects: registry.lua).
function M.notify_desired(dev, patch)
  local sim = dev.sim
  if not (sim and sim.onDesired) or not registry.is_connected(dev) then return end
  local function deliver()
    if dev.deleted or not registry.is_connected(dev) then return end
    dev.desired_delivered = math.max(dev.desired_delivered or 0, patch["$version"] or 0)
    local ctx = M.make_ctx(dev)
    local ok, err = run_handler(dev, sim.onDesired, patch, ctx)
    if not ok then util.log(dev.id, "onDesired failed: " .. tostring(err)) end
    apply_disconnect(dev, ctx)
  end
  if ngx and ngx.timer and ngx.get_phase() ~= "init" then
    local ok, err = ngx.timer.at(0, function(premature) if not premature then deliver() end end)
    if not ok then util.log("hub", "cannot schedule desired notification: " .. tostring(err)) end
  else
    deliver()
  end
end

registry.on_desired = M.notify_desired

return M
