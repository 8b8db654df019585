-- Simulated devices: direct-method invocation through the devices file's handlers and
-- desired-property notifications (hub-behavior.md §4). A handler is
--   function(payload, ctx) return status, payload end
-- ctx: deviceId, methodName, log(fmt, ...), json(v), twin(), report(patch), sleep(s), now().
local util = require "emulator.util"
local errors = require "emulator.errors"
local registry = require "emulator.registry"

local null = util.null
local unpack = unpack or rawget(table, "unpack")
local M = {}

local function hms(seconds)
  seconds = math.floor(seconds or 0)
  return string.format("%02d:%02d:%02d", math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60)
end

local function int_in(v, lo, hi)
  return type(v) == "number" and v % 1 == 0 and v >= lo and v <= hi
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
  return {
    methodName = req.methodName, payload = payload,
    responseTimeoutInSeconds = rt, connectTimeoutInSeconds = ct,
  }
end

function M.make_ctx(dev, method_name)
  return {
    deviceId = dev.id,
    methodName = method_name,
    log = function(fmt, ...)
      local msg = select("#", ...) > 0 and string.format(fmt, ...) or tostring(fmt)
      util.log(dev.id, msg)
    end,
    json = function(v)
      local s = util.json_encode(util.jsonify(v))
      return s or tostring(v)
    end,
    twin = function() return registry.twin_json(dev) end,
    report = function(patch)
      local ok, err = registry.report(dev, util.jsonify(patch))
      if not ok then error("ctx.report: " .. tostring(err), 2) end
    end,
    sleep = function(s)
      if ngx then ngx.sleep(s) end
    end,
    now = util.now,
  }
end

local function find_handler(dev, name)
  local fn = dev.methods[name]
  if fn then return fn end
  local low = name:lower() -- method names match case-insensitively
  for k, f in pairs(dev.methods) do
    if k:lower() == low then return f end
  end
end

local function no_response(dev, name, why)
  util.log(dev.id, "method " .. name .. ": " .. why)
  return nil, errors.new("GatewayTimeout", "Timed out waiting for the response from device.", {})
end

-- Runs fn(...) in a light thread so a handler that sleeps past the timeout is abandoned
-- (504) when the timeout expires, as the hub does. Returns { pcall results } or nil on timeout.
local function call_with_timeout(fn, timeout, ...)
  local args, n = { ... }, select("#", ...)
  if not (ngx and ngx.thread) then
    return { pcall(fn, unpack(args, 1, n)) }
  end
  local res
  local th = ngx.thread.spawn(function() res = { pcall(fn, unpack(args, 1, n)) } end)
  local deadline = util.now() + timeout
  while not res do -- a handler that never yields has already finished here
    local left = deadline - util.now()
    if left <= 0 then
      ngx.thread.kill(th)
      return nil
    end
    ngx.sleep(math.min(0.02, left))
  end
  ngx.thread.wait(th)
  return res
end

-- req is a validated request (M.validate). Returns { status, payload } or nil, error.
function M.invoke(dev, req)
  if not registry.is_connected(dev) then
    return nil, errors.new("DeviceNotOnline", "Timed out waiting for device to connect.",
      { timeout = hms(req.connectTimeoutInSeconds) })
  end
  registry.touch(dev)
  local handler = find_handler(dev, req.methodName)
  if not handler then
    return { status = 501, payload = { message = "method not implemented" } }
  end
  local res = call_with_timeout(handler, req.responseTimeoutInSeconds,
    util.deepcopy(req.payload), M.make_ctx(dev, req.methodName))
  if not res then
    return no_response(dev, req.methodName, "no answer within responseTimeoutInSeconds")
  end
  local ok, status, payload = res[1], res[2], res[3]
  if not ok then return no_response(dev, req.methodName, "handler failed: " .. tostring(status)) end
  if status == nil then status = 200 end
  if type(status) ~= "number" or status % 1 ~= 0 then
    return no_response(dev, req.methodName, "handler returned a non-integer status " .. tostring(status))
  end
  if payload == nil then payload = null end
  payload = util.jsonify(payload)
  if not util.json_encode(payload) then
    return no_response(dev, req.methodName, "handler returned a payload that is not JSON")
  end
  return { status = status, payload = payload }
end

-- Desired-property notification, delivered asynchronously as the hub does over MQTT.
function M.notify_desired(dev, patch)
  if not dev.onDesired or not registry.is_connected(dev) then return end
  local function deliver()
    local ok, err = pcall(dev.onDesired, patch, M.make_ctx(dev))
    if not ok then util.log(dev.id, "onDesired failed: " .. tostring(err)) end
  end
  if ngx and ngx.timer then
    local ok, err = ngx.timer.at(0, function(premature) if not premature then deliver() end end)
    if not ok then util.log("hub", "cannot schedule desired notification: " .. tostring(err)) end
  else
    deliver()
  end
end

registry.on_desired = M.notify_desired

return M
