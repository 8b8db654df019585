-- In-memory identity registry and device twins (hub-behavior.md §5). State lives in
-- this module, which works because nginx runs a single worker.
local util = require "emulator.util"
local errors = require "emulator.errors"

local null = util.null
local M = {}

local devices = {}   -- id -> device record
local order = {}     -- ids in creation order: queries and job targets are stable

-- Called after a desired-property change: fn(dev, patch_with_version). Set by the device
-- simulation (methods.lua) so this module does not depend on it.
M.on_desired = nil

function M.reset()
  devices, order = {}, {}
end

---------------------------------------------------------------------------
-- Validation

local MAX_DEPTH = 10

local function valid_device_id(id)
  return type(id) == "string" and #id >= 1 and #id <= 128
    and not id:find("[^%w%-:%.%+%%_#%*%?!%(%),=@;%$']")
end
M.valid_device_id = valid_device_id

local function check_keys(v, where, depth)
  if depth > MAX_DEPTH then
    return nil, "the maximum depth of a twin object is " .. MAX_DEPTH .. " (in " .. where .. ")"
  end
  if util.is_array(v) then
    for _, x in ipairs(v) do
      if x == null then return nil, "Value of Property or Tag cannot be null. Error in " .. where end
      local ok, err = check_keys(x, where, depth + 1)
      if not ok then return nil, err end
    end
  elseif util.is_object(v) then
    for k, x in pairs(v) do
      if type(k) ~= "string" or k == "" or #k > 1024 or k:find("[%.%$ %c]") then
        return nil, "invalid property name '" .. tostring(k) .. "' in " .. where
          .. ": names must not be empty or contain '.', '$', spaces or control characters"
      end
      local ok, err = check_keys(x, where .. "." .. k, depth + 1)
      if not ok then return nil, err end
    end
  end
  return true
end

-- Removes nulls from a value being created (there is nothing under a new key to delete).
local function without_nulls(v)
  if not util.is_object(v) then return util.deepcopy(v) end
  local out = {}
  for k, x in pairs(v) do
    if x ~= null then out[k] = without_nulls(x) end
  end
  return out
end

---------------------------------------------------------------------------
-- Twin merge with $metadata bookkeeping

local function meta_for(value, stamp, version)
  local m = { ["$lastUpdated"] = stamp, ["$lastUpdatedVersion"] = version }
  if util.is_object(value) then
    for k, x in pairs(value) do m[k] = meta_for(x, stamp, version) end
  end
  return m
end

-- JSON merge patch: null deletes, objects merge recursively, anything else replaces.
-- meta (optional) mirrors dst with $lastUpdated[/$lastUpdatedVersion] at every level.
local function merge(dst, patch, meta, stamp, version)
  for k, v in pairs(patch) do
    if v == null then
      dst[k] = nil
      if meta then meta[k] = nil end
    elseif util.is_object(v) and util.is_object(dst[k]) then
      if meta and not util.is_object(meta[k]) then meta[k] = meta_for(dst[k], stamp, version) end
      merge(dst[k], v, meta and meta[k], stamp, version)
    else
      dst[k] = without_nulls(v)
      if meta then meta[k] = meta_for(dst[k], stamp, version) end
    end
  end
  if meta then
    meta["$lastUpdated"] = stamp
    meta["$lastUpdatedVersion"] = version
  end
end
M.merge = merge

---------------------------------------------------------------------------
-- Records

local function new_twin(def, stamp)
  local tw = {
    tags = without_nulls(def.tags or {}),
    desired = without_nulls(def.desired or {}),
    reported = without_nulls(def.reported or {}),
    desired_version = 1, reported_version = 1, version = 1, etag_n = 1,
  }
  tw.desired_meta = meta_for(tw.desired, stamp, 1)
  tw.reported_meta = meta_for(tw.reported, stamp, nil)
  return tw
end

local function generation_id()
  return tostring(math.random(100000000, 999999999)) .. tostring(math.random(100000000, 999999999))
end

local function device_etag()
  return util.core.base64_encode(tostring(math.random(100000000, 2147483647)))
end

-- def: { id, tags, desired, reported, keys = {primary, secondary}, status,
--        simulated, offline, methods, onDesired }
function M.add(def)
  if devices[def.id] then
    return nil, errors.new("DeviceAlreadyExists", "A device with ID '" .. def.id .. "' is already registered.")
  end
  local now = util.now()
  local stamp = util.iso(now)
  local dev = {
    id = def.id,
    generationId = generation_id(),
    etag = device_etag(),
    status = def.status or "enabled",
    statusUpdatedTime = util.NEVER,
    keys = def.keys or { primary = util.random_key(), secondary = util.random_key() },
    simulated = def.simulated or false,
    offline = def.offline or false,
    methods = def.methods or {},
    onDesired = def.onDesired,
    connectionStateUpdatedTime = stamp,
    lastActivityTime = def.simulated and not def.offline and stamp or util.NEVER,
    twin = new_twin(def, stamp),
  }
  devices[dev.id] = dev
  order[#order + 1] = dev.id
  return dev
end

function M.get(id)
  return devices[id]
end

function M.lookup(id)
  local dev = devices[id]
  if not dev then
    return nil, errors.new("DeviceNotFound", "Device " .. tostring(id) .. " not found.")
  end
  return dev
end

-- A device can take methods and desired notifications when simulated, enabled and online.
function M.is_connected(dev)
  return dev.simulated and not dev.offline and dev.status == "enabled"
end

function M.touch(dev)
  dev.lastActivityTime = util.iso(util.now())
end

-- Devices in creation order.
function M.list()
  local out = {}
  for _, id in ipairs(order) do
    local dev = devices[id]
    if dev then out[#out + 1] = dev end
  end
  return out
end

local function etag_matches(if_match, current)
  if if_match == nil then return true end
  local v = util.unquote_etag(if_match)
  return v == "*" or v == current
end

local function precondition_failed(current)
  return errors.new("PreconditionFailed",
    "Precondition failed: the etag in the request does not match the current etag '" .. current .. "'.")
end

---------------------------------------------------------------------------
-- Identity registry (/devices/{id})

function M.device_json(dev)
  return {
    deviceId = dev.id,
    moduleId = null,
    generationId = dev.generationId,
    etag = dev.etag,
    connectionState = M.is_connected(dev) and "Connected" or "Disconnected",
    status = dev.status,
    statusReason = null,
    connectionStateUpdatedTime = dev.connectionStateUpdatedTime,
    statusUpdatedTime = dev.statusUpdatedTime,
    lastActivityTime = dev.lastActivityTime,
    cloudToDeviceMessageCount = 0,
    authentication = {
      symmetricKey = { primaryKey = dev.keys.primary, secondaryKey = dev.keys.secondary },
      x509Thumbprint = { primaryThumbprint = null, secondaryThumbprint = null },
      type = "sas",
    },
    capabilities = { iotEdge = false },
  }
end

local function keys_from_body(body)
  local auth = type(body.authentication) == "table" and body.authentication or {}
  local sk = type(auth.symmetricKey) == "table" and auth.symmetricKey or {}
  local keys = {}
  for _, which in ipairs({ "primary", "secondary" }) do
    local k = sk[which .. "Key"]
    if type(k) == "string" and k ~= "" then
      if not util.core.base64_decode(k) then
        return nil, errors.new("ArgumentInvalid", which .. "Key is not valid base64")
      end
      keys[which] = k
    end
  end
  return keys
end

-- PUT /devices/{id}: creates, or updates when If-Match is given (as the SDKs do).
function M.put_device(id, body, if_match)
  if not valid_device_id(id) then
    return nil, errors.new("ArgumentInvalid", "Device ID '" .. tostring(id) .. "' is invalid.")
  end
  if type(body) ~= "table" then body = {} end
  if body.deviceId ~= nil and body.deviceId ~= id then
    return nil, errors.new("ArgumentInvalid", "deviceId in the body does not match the URL.")
  end
  if body.status ~= nil and body.status ~= "enabled" and body.status ~= "disabled" then
    return nil, errors.new("ArgumentInvalid", "status must be 'enabled' or 'disabled'.")
  end
  local keys, kerr = keys_from_body(body)
  if not keys then return nil, kerr end
  local dev = devices[id]
  if not dev then
    local new, err = M.add({
      id = id, status = body.status,
      keys = { primary = keys.primary or util.random_key(), secondary = keys.secondary or util.random_key() },
    })
    if not new then return nil, err end
    return new, nil, true
  end
  if if_match == nil then
    return nil, errors.new("DeviceAlreadyExists", "A device with ID '" .. id .. "' is already registered.")
  end
  if not etag_matches(if_match, dev.etag) then return nil, precondition_failed(dev.etag) end
  if body.status and body.status ~= dev.status then
    dev.status = body.status
    dev.statusUpdatedTime = util.iso(util.now())
  end
  dev.keys.primary = keys.primary or dev.keys.primary
  dev.keys.secondary = keys.secondary or dev.keys.secondary
  dev.etag = device_etag()
  return dev
end

function M.delete_device(id, if_match)
  local dev, err = M.lookup(id)
  if not dev then return nil, err end
  if not etag_matches(if_match, dev.etag) then return nil, precondition_failed(dev.etag) end
  devices[id] = nil
  for i, x in ipairs(order) do
    if x == id then table.remove(order, i); break end
  end
  return true
end

---------------------------------------------------------------------------
-- Twins (/twins/{id})

function M.twin_json(dev)
  local tw = dev.twin
  local desired = util.deepcopy(tw.desired)
  desired["$metadata"] = util.deepcopy(tw.desired_meta)
  desired["$version"] = tw.desired_version
  local reported = util.deepcopy(tw.reported)
  reported["$metadata"] = util.deepcopy(tw.reported_meta)
  reported["$version"] = tw.reported_version
  return {
    deviceId = dev.id,
    etag = util.etag_of(tw.etag_n),
    deviceEtag = dev.etag,
    status = dev.status,
    statusUpdateTime = dev.statusUpdatedTime,
    connectionState = M.is_connected(dev) and "Connected" or "Disconnected",
    lastActivityTime = dev.lastActivityTime,
    cloudToDeviceMessageCount = 0,
    authenticationType = "sas",
    x509Thumbprint = { primaryThumbprint = null, secondaryThumbprint = null },
    modelId = "",
    version = tw.version,
    capabilities = { iotEdge = false },
    tags = util.deepcopy(tw.tags),
    properties = { desired = desired, reported = reported },
  }
end

function M.twin_etag(dev)
  return util.etag_of(dev.twin.etag_n)
end

-- Splits a twin patch body into its tags and desired parts, validating both.
local function split_patch(patch)
  if not util.is_object(patch) then
    return nil, errors.new("ArgumentInvalid", "The twin patch must be a JSON object.")
  end
  if patch.desired ~= nil or patch.reported ~= nil then
    return nil, errors.new("ArgumentInvalid",
      "Desired properties belong under 'properties.desired' (top-level 'desired'/'reported' is not a twin field).")
  end
  local tags, desired = patch.tags, nil
  if tags == null then tags = nil end
  if tags ~= nil and not util.is_object(tags) then
    return nil, errors.new("ArgumentInvalid", "'tags' must be a JSON object.")
  end
  local props = patch.properties
  if props ~= nil and props ~= null then
    if not util.is_object(props) then
      return nil, errors.new("ArgumentInvalid", "'properties' must be a JSON object.")
    end
    if props.reported ~= nil and props.reported ~= null then
      return nil, errors.new("ArgumentInvalid", "Reported properties can only be updated by the device.")
    end
    desired = props.desired
    if desired == null then desired = nil end
    if desired ~= nil then
      if not util.is_object(desired) then
        return nil, errors.new("ArgumentInvalid", "'properties.desired' must be a JSON object.")
      end
      desired = util.deepcopy(desired)
      desired["$metadata"], desired["$version"] = nil, nil -- echoed back by clients that GET then PATCH
    end
  end
  if tags then
    local ok, err = check_keys(tags, "tags", 1)
    if not ok then return nil, errors.new("ArgumentInvalid", err) end
  end
  if desired then
    local ok, err = check_keys(desired, "properties.desired", 1)
    if not ok then return nil, errors.new("ArgumentInvalid", err) end
  end
  return { tags = tags, desired = desired }
end
M.split_patch = split_patch

local function notify_desired(dev, patch)
  if patch and M.on_desired then
    local copy = util.deepcopy(patch)
    copy["$version"] = dev.twin.desired_version
    M.on_desired(dev, copy)
  end
end

-- PATCH /twins/{id} (replace = false) and PUT /twins/{id} (replace = true).
function M.update_twin(id, patch, if_match, replace)
  local dev, err = M.lookup(id)
  if not dev then return nil, err end
  local tw = dev.twin
  if not etag_matches(if_match, util.etag_of(tw.etag_n)) then
    return nil, precondition_failed(util.etag_of(tw.etag_n))
  end
  local parts, perr = split_patch(patch)
  if not parts then return nil, perr end
  local stamp = util.iso(util.now())
  if replace then
    parts.tags = parts.tags or {}
    parts.desired = parts.desired or {}
  end
  if parts.tags == nil and parts.desired == nil then return dev end
  tw.version = tw.version + 1
  tw.etag_n = tw.etag_n + 1
  if parts.tags then
    if replace then tw.tags = without_nulls(parts.tags) else merge(tw.tags, parts.tags) end
  end
  if parts.desired then
    tw.desired_version = tw.desired_version + 1
    if replace then
      tw.desired = without_nulls(parts.desired)
      tw.desired_meta = meta_for(tw.desired, stamp, tw.desired_version)
    else
      merge(tw.desired, parts.desired, tw.desired_meta, stamp, tw.desired_version)
    end
    notify_desired(dev, parts.desired)
  end
  return dev
end

-- Reported properties, written by simulated devices (ctx.report).
function M.report(dev, patch)
  if not util.is_object(patch) then return nil, "reported patch must be a table" end
  local ok, err = check_keys(patch, "properties.reported", 1)
  if not ok then return nil, err end
  local tw = dev.twin
  tw.reported_version = tw.reported_version + 1
  tw.etag_n = tw.etag_n + 1
  merge(tw.reported, patch, tw.reported_meta, util.iso(util.now()), nil)
  M.touch(dev)
  return true
end

return M
