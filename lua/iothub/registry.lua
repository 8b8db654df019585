--- Registry: what an operator needs around jobs — device identities, twins, twin queries and
-- direct methods. Names follow the Node SDK's Registry and Client.
-- @classmod iothub.Registry
local core = require "iothub.core"
local errors = require "iothub.errors"
local Pager = require "iothub.pager"
local job_request = require "iothub.job_request"

local Registry = {}
Registry.__index = Registry
require("iothub.client").add_constructors(Registry)

-- Device ids follow IoT Hub's rule, which lives in the C core (core.check_device_id).
local function check_device_id(device_id, operation)
  if type(device_id) ~= "string" then errors.misuse("deviceId must be a string, got " .. type(device_id)) end
  local ok, message = core.check_device_id(device_id)
  if not ok then return nil, errors.invalid(message, { operation = operation, target = device_id }) end
  return true
end

local function send(self, op)
  return self.pipeline:call(op)
end

--- Reads a device twin.
--- Checks a device id against IoT Hub's rules without sending anything.
-- Returns true, or nil and a message saying what to fix.
function Registry.checkDeviceId(deviceId)
  if type(deviceId) ~= "string" then return nil, "deviceId must be a string, got " .. type(deviceId) end
  local ok, err = check_device_id(deviceId, "checkDeviceId")
  if not ok then return nil, err.message end
  return true
end

function Registry:getTwin(deviceId)
  local ok, err = check_device_id(deviceId, "getTwin")
  if not ok then return nil, err end
  return send(self, { operation = "getTwin", target = deviceId, method = "GET", path = { "twins", deviceId } })
end

--- Merges patch into the twin (tags, properties.desired; null deletes a key).
-- @param[opt] etag the twin's etag for optimistic concurrency; "*" (default) forces the update
function Registry:updateTwin(deviceId, patch, etag)
  local ok, err = check_device_id(deviceId, "updateTwin")
  if not ok then return nil, err end
  if type(patch) ~= "table" then errors.misuse("patch must be a table, got " .. type(patch)) end
  if etag ~= nil and type(etag) ~= "string" then errors.misuse("etag must be a string") end
  local body, msg = core.json_encode(patch)
  if not body then return nil, errors.invalid("patch cannot be sent: " .. msg, { operation = "updateTwin", target = deviceId }) end
  etag = etag or "*"
  -- Sent quoted, as the Node SDK does, unless the caller already quoted it.
  if etag:sub(1, 1) ~= '"' then etag = '"' .. etag .. '"' end
  return send(self, { operation = "updateTwin", target = deviceId, method = "PATCH",
    path = { "twins", deviceId }, body = body, headers = { { "If-Match", etag } } })
end

--- Iterates the results of a twin query (a full `SELECT … FROM devices …`), across pages.
-- Same iterator contract as JobClient:queryJobs.
function Registry:queryTwins(query, opts)
  if type(query) ~= "string" then errors.misuse("query must be a string, got " .. type(query)) end
  opts = opts or {}
  local page_size = opts.pageSize or self.cfg.pageSize
  if query == "" then
    local err = errors.invalid("query must not be empty, e.g. SELECT * FROM devices", { operation = "queryTwins" })
    return Pager.new(function() return nil, err end)
  end
  local body = core.json_encode({ query = query })
  return Pager.query(page_size, function(headers)
    return self.pipeline:send({ operation = "queryTwins", method = "POST", path = { "devices", "query" },
      headers = headers, body = body })
  end)
end

--- Invokes a direct method on one device and returns { status=, payload= } as the device
-- answered (the device's own status is inside; HTTP errors are hub-side failures).
function Registry:invokeDeviceMethod(deviceId, methodParams)
  local ok, err = check_device_id(deviceId, "invokeDeviceMethod")
  if not ok then return nil, err end
  local body, response_timeout, connect_timeout = job_request.method(methodParams, "invokeDeviceMethod", deviceId)
  if not body then return nil, response_timeout end
  -- The hub may hold the request for the connect plus response timeouts; wait a little longer.
  local wait = response_timeout + (connect_timeout or 0) + 10
  return send(self, { operation = "invokeDeviceMethod", target = deviceId, method = "POST",
    path = { "twins", deviceId, "methods" }, body = body,
    timeout = math.max(wait, self.cfg.timeout),
    -- Re-running a method is not ours to decide: only retry what surely never reached the device.
    retry = false })
end

-- The symmetric keys a device request gives, or nil.
local function given_keys(device)
  local auth = type(device.authentication) == "table" and device.authentication
  local keys = auth and type(auth.symmetricKey) == "table" and auth.symmetricKey
  if keys and (keys.primaryKey or keys.secondaryKey) then return keys end
  return nil
end

-- Is the device the hub holds the one `request` asked for? Every field the request set, as
-- far as it is the caller's (status, edge capability, keys).
local function same_device(held, request)
  if type(held) ~= "table" or held.deviceId ~= request.deviceId then return false end
  if request.status ~= nil and held.status ~= request.status then return false end
  local caps = type(request.capabilities) == "table" and request.capabilities
  if caps and caps.iotEdge ~= nil then
    local held_caps = type(held.capabilities) == "table" and held.capabilities or {}
    if (held_caps.iotEdge == true) ~= (caps.iotEdge == true) then return false end
  end
  local keys = given_keys(request)
  if keys then
    local held_keys = given_keys(held) or {}
    if held_keys.primaryKey ~= keys.primaryKey or held_keys.secondaryKey ~= keys.secondaryKey then return false end
  end
  return true
end

--- Creates a device identity. device = { deviceId = "…", status = "enabled", … }; the hub
-- generates symmetric keys when none are given. Returns the device as created.
-- A retried create that meets 409 reads the device back: after an attempt whose answer was
-- lost it is ours when it is what we asked for; otherwise only when it has the keys we gave.
function Registry:create(device)
  if type(device) ~= "table" then errors.misuse("device must be a table, got " .. type(device)) end
  local ok, err = check_device_id(device.deviceId, "create")
  if not ok then return nil, err end
  local body, msg = core.json_encode(device)
  if not body then return nil, errors.invalid("device cannot be sent: " .. msg, { operation = "create", target = device.deviceId }) end
  return send(self, { operation = "create", target = device.deviceId, method = "PUT",
    path = { "devices", device.deviceId }, body = body,
    onConflict = function(conflict, uncertain)
      if uncertain or given_keys(device) then
        local held = self:get(device.deviceId)
        if same_device(held, device) then return held end
      end
      conflict.message = (conflict.message or "") .. " (a device with this id already exists" ..
        (uncertain and " and differs from the one asked for)" or ")")
      return nil, conflict
    end })
end

--- Reads a device identity.
function Registry:get(deviceId)
  local ok, err = check_device_id(deviceId, "get")
  if not ok then return nil, err end
  return send(self, { operation = "get", target = deviceId, method = "GET", path = { "devices", deviceId } })
end

--- Deletes a device identity (unconditionally, If-Match "*"). Returns true or nil, err.
-- A retried delete that meets 404 after an attempt whose answer was lost is done: that
-- attempt deleted it.
function Registry:delete(deviceId)
  local ok, err = check_device_id(deviceId, "delete")
  if not ok then return nil, err end
  local result
  result, err = send(self, { operation = "delete", target = deviceId, method = "DELETE",
    path = { "devices", deviceId }, headers = { { "If-Match", '"*"' } },
    onNotFound = function(not_found, uncertain)
      if uncertain then return true end
      return nil, not_found
    end })
  if result == nil then return nil, err end
  return true
end

return Registry
