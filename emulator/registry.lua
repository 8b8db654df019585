-- In-memory identity registry and device twins (hub-behavior.md §5). State lives in
-- this module, which works because nginx runs a single worker.
--
-- Interfaces other modules rely on:
--   M.twin_doc(dev)          the twin document, cached: the same table comes back until the
--                            twin changes (a connection or activity change swaps in a shallow
--                            copy). Read-only for callers; cheap enough to evaluate queries
--                            over 100,000 devices.
--   M.set_connected(dev, on) takes a device (record or id) online/offline at run time.
--   M.identity_record(dev), M.twin_record(dev), M.export_state() / M.import_state(t)
--                            one device's identity or twin, or every device, as plain
--                            JSON-ready tables (no simulation), as the state store
--                            (emulator/store.lua) keeps them; import keeps the simulation
--                            of devices already loaded, and a devices file loaded later
--                            only attaches its simulation to persisted devices (M.add).
-- Twin sections are copy-on-write: an update builds new tables and never changes stored
-- ones, so documents and exports share them instead of copying (100,000 devices' twins
-- cost one copy, not three). Never modify a table you get from this module.
--   M.on_change              optional fn(event, deviceId), called after every mutation:
--                            "create", "update" (identity), "delete", "twin" (tags/desired),
--                            "reported", "connection". Not for lastActivityTime alone.
local util = require "emulator.util"
local errors = require "emulator.errors"

local core = util.core
local null = util.null
local M = {}

local devices = {}   -- id -> device record
local order = {}     -- ids in creation order: queries and job targets are stable
local list_cache     -- M.list() result, until a device is created or deleted

-- Called after a desired-property change: fn(dev, patch_with_version). Set by the device
-- simulation (methods.lua) so this module does not depend on it. Also called when a
-- device connects and missed desired changes meanwhile (with the full desired document).
M.on_desired = nil
M.on_change = nil

-- Time source for connection schedules and waits; specs replace it with a fake clock.
M.clock = {
  now = function() return util.now() end,
  sleep = function(s) if ngx and s > 0 then ngx.sleep(s) end end,
}

local function changed(event, id)
  if M.on_change then
    local ok, err = pcall(M.on_change, event, id)
    if not ok then util.log("hub", "on_change(" .. event .. ") failed: " .. tostring(err)) end
  end
end

function M.reset()
  devices, order, list_cache = {}, {}, nil
end

---------------------------------------------------------------------------
-- Limits (hub-behavior.md §5.3)

M.LIMITS = {
  depth = 10,              -- nested objects/arrays below the section root
  key_bytes = 1024,
  value_bytes = 4096,      -- one string value
  tags_bytes = 8 * 1024,   -- sizes as JSON, without $metadata/$version
  desired_bytes = 32 * 1024,
  reported_bytes = 32 * 1024,
  max_int = 4503599627370495,
  min_int = -4503599627370496,
  device_id_chars = 128,
}
local LIMITS = M.LIMITS

local function valid_device_id(id)
  return type(id) == "string" and #id >= 1 and #id <= LIMITS.device_id_chars
    and not id:find("[^%w%-:%.%+%%_#%*%?!%(%),=@;%$']")
end
M.valid_device_id = valid_device_id

-- Why id is not a valid device id, or nil when it is.
function M.device_id_problem(id)
  if type(id) ~= "string" or id == "" then return "a device id must be a non-empty string" end
  if #id > LIMITS.device_id_chars then
    return "device id is " .. #id .. " characters long; the hub allows at most 128"
  end
  local bad = id:find("[^%w%-:%.%+%%_#%*%?!%(%),=@;%$']")
  if bad then
    return ("device id has a character the hub does not allow at position %d; use ASCII letters, digits "
      .. "and - : . + %% _ # * ? ! ( ) , = @ ; $ '"):format(bad)
  end
end

local function child_path(path, k)
  if k:find("^[%a_][%w_]*$") then return path .. "." .. k end
  return path .. "['" .. k:sub(1, 64):gsub("%c", "?") .. "']"
end

local function bad_name(k)
  if k == "" then return "is empty" end
  if #k > LIMITS.key_bytes then return "is longer than " .. LIMITS.key_bytes .. " bytes" end
  if k:find("[%.%$ ]") then return "contains '.', '$' or a space" end
  if k:find("%c") or k:find("\194[\128-\159]") then return "contains a control character" end
end

-- Walks a value being written into a twin section; returns true or nil, message.
local function check_value(v, path, depth)
  local t = type(v)
  if t == "string" then
    if #v > LIMITS.value_bytes then
      return nil, "Property or Tag value should be at most " .. LIMITS.value_bytes
        .. " bytes. Error in Property/Tag " .. path
    end
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      return nil, "Property or Tag value must be a finite number. Error in Property/Tag " .. path
    end
    if v % 1 == 0 and (v > LIMITS.max_int or v < LIMITS.min_int) then
      return nil, "Integer values must be within [" .. LIMITS.min_int .. "; " .. LIMITS.max_int
        .. "]. Error in Property/Tag " .. path
    end
  elseif t == "table" and v ~= null then
    if depth > LIMITS.depth then
      return nil, "The maximum depth of twin objects is " .. LIMITS.depth .. " levels. Error in Property/Tag " .. path
    end
    if util.is_array(v) then
      for i, x in ipairs(v) do
        if x == null then
          return nil, "Value of Property or Tag cannot be null inside an array. Error in Property/Tag " .. path
        end
        local ok, err = check_value(x, path .. "[" .. (i - 1) .. "]", depth + 1)
        if not ok then return nil, err end
      end
    else
      for k, x in pairs(v) do
        if type(k) ~= "string" then return nil, "Property names must be strings. Error in " .. path end
        local why = bad_name(k)
        if why then
          return nil, "Invalid property name '" .. k:sub(1, 64):gsub("%c", "?") .. "' in " .. path .. ": it " .. why
            .. " (names are 1 to 1024 bytes without '.', '$', spaces or control characters)"
        end
        local ok, err = check_value(x, child_path(path, k), depth + 1)
        if not ok then return nil, err end
      end
    end
  end
  return true
end

-- Checks a twin section (tags, properties.desired, properties.reported) or a patch to one:
-- names, values and depth (the section root is depth 0). Returns true or nil, message.
function M.check_section(section, where)
  return check_value(section, where, 0)
end

local SECTION_MAX = { tags = "tags_bytes", ["properties.desired"] = "desired_bytes",
  ["properties.reported"] = "reported_bytes" }

-- Size check on a whole section as it would be stored.
local function check_size(section, where)
  local max = LIMITS[SECTION_MAX[where]]
  local text = core.json_encode(section)
  local n = text and #text or 0
  if n > max then
    return nil, ("The %s would be %d bytes; the hub allows at most %d (%d KB)."):format(where, n, max, max / 1024)
  end
  return true
end

local function invalid(msg)
  return nil, errors.new("ArgumentInvalid", msg)
end

-- A whole section as it would be stored (names, values, depth and size); where is
-- "tags", "properties.desired" or "properties.reported". Returns true or nil, message.
function M.check_whole_section(section, where)
  local ok, err = check_value(section, where, 0)
  if ok then ok, err = check_size(section, where) end
  return ok, err
end

local function has_null(v)
  if type(v) ~= "table" then return false end
  for _, x in pairs(v) do
    if x == null or has_null(x) then return true end
  end
  return false
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

-- A fleet's devices start from the same section tables (a devices file's static values):
-- share them, and their metadata when stamped in the same millisecond (one memo per
-- section kind, as devices are added one after another).
local EMPTY = {}
local meta_memo = { desired = {}, reported = {} }

local function initial_section(v)
  if v == nil then return EMPTY end
  if has_null(v) then return without_nulls(v) end
  return v
end

local function initial_meta(kind, section, stamp, version)
  local memo = meta_memo[kind]
  if memo.section ~= section or memo.stamp ~= stamp then
    memo.section, memo.stamp, memo.meta = section, stamp, meta_for(section, stamp, version)
  end
  return memo.meta
end

local function new_twin(def, stamp)
  local tw = {
    tags = initial_section(def.tags),
    desired = initial_section(def.desired),
    reported = initial_section(def.reported),
    desired_version = 1, reported_version = 1, version = 1, etag_n = 1,
  }
  tw.desired_meta = initial_meta("desired", tw.desired, stamp, 1)
  tw.reported_meta = initial_meta("reported", tw.reported, stamp, nil)
  return tw
end

-- Symmetric keys: 32 random bytes each, read from the system in batches (a fleet of
-- 100,000 devices needs 200,000 of them at start-up).
local key_pool, key_pos = "", 1
local function new_key()
  if key_pos + 32 > #key_pool + 1 then key_pool, key_pos = util.random_bytes(32 * 512), 1 end
  local raw = key_pool:sub(key_pos, key_pos + 31)
  key_pos = key_pos + 32
  return core.base64_encode(raw)
end

local function generation_id()
  return tostring(math.random(100000000, 999999999)) .. tostring(math.random(100000000, 999999999))
end

-- The hub's device etags are base64 of a decimal number ("MTA2NTU1MDM2Mw==").
local function device_etag()
  return core.base64_encode(tostring(math.random(100000000, 2147483647)))
end

-- A device can take methods and desired notifications when connected and enabled.
local function connected(dev)
  return dev.connected and dev.status == "enabled"
end

local function connection_state(dev)
  return connected(dev) and "Connected" or "Disconnected"
end

-- Swaps in a shallow copy of the cached twin with some root fields changed, so a caller
-- holding the previous document still sees a consistent snapshot.
local function patch_doc(dev, fields)
  local doc = dev.doc
  if not doc then return end
  local copy = {}
  for k, v in pairs(doc) do copy[k] = v end
  for k, v in pairs(fields) do copy[k] = v end
  dev.doc = copy
end

local function invalidate(dev)
  dev.doc = nil
end

-- Connects (flag true) or disconnects a device, given as a record or an id. Returns the
-- record, or nil and DeviceNotFound. A disabled device stays "Disconnected" either way.
function M.set_connected(dev, flag)
  if type(dev) ~= "table" then
    local found = devices[dev]
    if not found then
      return nil, errors.new("DeviceNotFound", "Device " .. tostring(dev) .. " not found.")
    end
    dev = found
  end
  flag = flag and true or false
  dev.online_at = nil -- an explicit change cancels a scheduled one
  if dev.connected == flag then return dev end
  local stamp = util.iso(M.clock.now())
  dev.connected = flag
  dev.connectionStateUpdatedTime = stamp
  if flag then dev.lastActivityTime = stamp end
  patch_doc(dev, { connectionState = connection_state(dev), lastActivityTime = dev.lastActivityTime })
  changed("connection", dev.id)
  if flag and dev.sim and dev.sim.onDesired and M.on_desired
    and dev.twin.desired_version > (dev.desired_delivered or 0) then
    -- A device fetches its twin when it (re)connects: hand it what it missed.
    local full = util.deepcopy(dev.twin.desired)
    full["$version"] = dev.twin.desired_version
    M.on_desired(dev, full)
  end
  return dev
end

-- Takes the device offline now (unless already) and back online after `seconds`.
function M.schedule_online(dev, seconds)
  M.set_connected(dev, false)
  dev.online_at = M.clock.now() + seconds
end

-- Applies a scheduled connection once its time has come.
local function refresh(dev)
  local at = dev.online_at
  if at and M.clock.now() >= at then M.set_connected(dev, true) end
end

function M.is_connected(dev)
  if dev.online_at then refresh(dev) end
  return connected(dev)
end

-- Attaches a devices-file simulation (handlers, knobs, connectivity) to a record; a new
-- record (not yet registered) takes its connection state silently.
local function attach_simulation(dev, def, new)
  local sim = def.sim or {}
  sim.methods = sim.methods or def.methods or {}
  sim.onDesired = sim.onDesired or def.onDesired
  dev.sim = sim
  dev.desired_delivered = dev.twin.desired_version
  local online = not def.offline and not def.onlineAfter
  if new then
    dev.connected = online
    if online then dev.lastActivityTime = dev.connectionStateUpdatedTime end
  else
    M.set_connected(dev, online)
  end
  if def.onlineAfter then dev.online_at = M.clock.now() + def.onlineAfter end
end

local function insert(dev)
  devices[dev.id] = dev
  order[#order + 1] = dev.id
  list_cache = nil
end

-- def: { id, tags, desired, reported, status, keys = {primary, secondary}, auth_type,
--        thumbprints, iotEdge, simulated, offline, onlineAfter, sim = { methods, onDesired,
--        knobs... } }. A simulated def whose device already exists (restored from saved
-- state) keeps the saved identity and twin and gains the simulation: returns dev, nil, false.
-- The def's section tables become the registry's (shared, never modified): do not reuse them.
function M.add(def)
  local existing = devices[def.id]
  if existing then
    if def.simulated then
      attach_simulation(existing, def, false)
      return existing, nil, false
    end
    return nil, errors.new("DeviceAlreadyExists", "A device with ID '" .. def.id .. "' is already registered.")
  end
  local stamp = util.iso(M.clock.now())
  local auth_type = def.auth_type or "sas"
  local dev = {
    id = def.id,
    generationId = generation_id(),
    etag = device_etag(),
    status = def.status or "enabled",
    statusReason = def.statusReason,
    statusUpdatedTime = util.NEVER,
    auth_type = auth_type,
    keys = def.keys or (auth_type == "sas" and { primary = new_key(), secondary = new_key() } or {}),
    thumbprints = def.thumbprints or {},
    iotEdge = def.iotEdge or false,
    connected = false,
    connectionStateUpdatedTime = stamp,
    lastActivityTime = util.NEVER,
    twin = new_twin(def, stamp),
  }
  if def.simulated then attach_simulation(dev, def, true) end
  insert(dev)
  changed("create", dev.id)
  return dev, nil, true
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

function M.touch(dev)
  dev.lastActivityTime = util.iso(M.clock.now())
  patch_doc(dev, { lastActivityTime = dev.lastActivityTime })
end

-- Devices in creation order. The list is shared until a device is created or deleted:
-- do not modify it.
function M.list()
  if not list_cache then
    local out = {}
    for _, id in ipairs(order) do
      local dev = devices[id]
      if dev then out[#out + 1] = dev end
    end
    list_cache = out
  end
  return list_cache
end

function M.count()
  return #M.list()
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

local function or_null(v)
  if v == nil then return null end
  return v
end

function M.device_json(dev)
  local sas = dev.auth_type == "sas"
  return {
    deviceId = dev.id,
    moduleId = null,
    generationId = dev.generationId,
    etag = dev.etag,
    connectionState = connection_state(dev),
    status = dev.status,
    statusReason = or_null(dev.statusReason),
    connectionStateUpdatedTime = dev.connectionStateUpdatedTime,
    statusUpdatedTime = dev.statusUpdatedTime,
    lastActivityTime = dev.lastActivityTime,
    cloudToDeviceMessageCount = 0,
    authentication = {
      symmetricKey = { primaryKey = sas and or_null(dev.keys.primary) or null,
        secondaryKey = sas and or_null(dev.keys.secondary) or null },
      x509Thumbprint = { primaryThumbprint = or_null(dev.thumbprints.primary),
        secondaryThumbprint = or_null(dev.thumbprints.secondary) },
      type = dev.auth_type,
    },
    capabilities = { iotEdge = dev.iotEdge },
  }
end

local AUTH_TYPES = { sas = true, selfSigned = true, certificateAuthority = true, none = true }

local function str_field(t, k)
  local v = type(t) == "table" and t[k] or nil
  if v == null then v = nil end
  return v
end

-- Reads and checks authentication from a device body: type, keys, thumbprints.
local function auth_from_body(body)
  local auth = type(body.authentication) == "table" and body.authentication or {}
  local auth_type = str_field(auth, "type") or "sas"
  if not AUTH_TYPES[auth_type] then
    return invalid("authentication.type must be sas, selfSigned, certificateAuthority or none.")
  end
  local keys, prints = {}, {}
  for _, which in ipairs({ "primary", "secondary" }) do
    local k = str_field(auth.symmetricKey, which .. "Key")
    if k ~= nil and k ~= "" then
      local raw = type(k) == "string" and core.base64_decode(k)
      if not raw then return invalid(which .. "Key is not valid base64.") end
      if #raw < 16 or #raw > 64 then
        return invalid(which .. "Key must be base64 of 16 to 64 bytes (it decodes to " .. #raw .. ").")
      end
      keys[which] = k
    end
    local t = str_field(auth.x509Thumbprint, which .. "Thumbprint")
    if t ~= nil and t ~= "" then
      if type(t) ~= "string" or not (t:find("^%x+$") and (#t == 40 or #t == 64)) then
        return invalid(which .. "Thumbprint must be a SHA-1 (40) or SHA-256 (64) hex thumbprint.")
      end
      prints[which] = t
    end
  end
  if auth_type == "selfSigned" and not prints.primary then
    return invalid("A selfSigned device needs authentication.x509Thumbprint.primaryThumbprint.")
  end
  return { type = auth_type, keys = keys, thumbprints = prints }
end

-- PUT /devices/{id}: creates, or updates when If-Match is given (as the SDKs do).
-- Returns dev, nil, created.
function M.put_device(id, body, if_match)
  local problem = M.device_id_problem(id)
  if problem then return invalid("Device ID '" .. tostring(id):sub(1, 140) .. "' is invalid: " .. problem .. ".") end
  if body == nil or body == null then body = {} end
  if not util.is_object(body) then return invalid("The device must be a JSON object.") end
  if body.deviceId ~= nil and body.deviceId ~= id then
    return invalid("deviceId in the body does not match the URL.")
  end
  if body.status ~= nil and body.status ~= "enabled" and body.status ~= "disabled" then
    return invalid("status must be 'enabled' or 'disabled'.")
  end
  local reason = str_field(body, "statusReason")
  if reason ~= nil and type(reason) ~= "string" then return invalid("statusReason must be a string.") end
  local caps = type(body.capabilities) == "table" and body.capabilities or {}
  local edge = str_field(caps, "iotEdge")
  if edge ~= nil and type(edge) ~= "boolean" then return invalid("capabilities.iotEdge must be a boolean.") end
  local auth, aerr = auth_from_body(body)
  if not auth then return nil, aerr end
  local dev = devices[id]
  if not dev then
    local keys = {}
    if auth.type == "sas" then
      keys = { primary = auth.keys.primary or new_key(), secondary = auth.keys.secondary or new_key() }
    end
    return M.add({ id = id, status = body.status, statusReason = reason, auth_type = auth.type, keys = keys,
      thumbprints = auth.thumbprints, iotEdge = edge })
  end
  if if_match == nil then
    return nil, errors.new("DeviceAlreadyExists", "A device with ID '" .. id .. "' is already registered.")
  end
  if not etag_matches(if_match, dev.etag) then return nil, precondition_failed(dev.etag) end
  if body.status and body.status ~= dev.status then
    dev.status = body.status
    dev.statusUpdatedTime = util.iso(M.clock.now())
  end
  if reason ~= nil then dev.statusReason = reason end
  if edge ~= nil then dev.iotEdge = edge end
  if auth.type ~= dev.auth_type then
    dev.auth_type = auth.type
    dev.keys, dev.thumbprints = {}, {}
  end
  if auth.type == "sas" then
    dev.keys.primary = auth.keys.primary or dev.keys.primary or new_key()
    dev.keys.secondary = auth.keys.secondary or dev.keys.secondary or new_key()
  else
    dev.thumbprints.primary = auth.thumbprints.primary or dev.thumbprints.primary
    dev.thumbprints.secondary = auth.thumbprints.secondary or dev.thumbprints.secondary
  end
  dev.etag = device_etag()
  invalidate(dev) -- status, deviceEtag and authenticationType show in the twin
  changed("update", id)
  return dev, nil, false
end

function M.delete_device(id, if_match)
  local dev, err = M.lookup(id)
  if not dev then return nil, err end
  if not etag_matches(if_match, dev.etag) then return nil, precondition_failed(dev.etag) end
  devices[id] = nil
  for i, x in ipairs(order) do
    if x == id then table.remove(order, i); break end
  end
  list_cache = nil
  dev.deleted = true
  changed("delete", id)
  return true
end

---------------------------------------------------------------------------
-- Twins (/twins/{id})

-- The section's top level plus $metadata/$version; nested tables are shared.
local function with_meta(section, meta, version)
  local out = {}
  for k, v in pairs(section) do out[k] = v end
  out["$metadata"] = meta
  out["$version"] = version
  return out
end

local NO_THUMBPRINTS = { primaryThumbprint = null, secondaryThumbprint = null }
local NOT_EDGE, EDGE = { iotEdge = false }, { iotEdge = true }

local function build_doc(dev)
  local tw = dev.twin
  local desired = with_meta(tw.desired, tw.desired_meta, tw.desired_version)
  local reported = with_meta(tw.reported, tw.reported_meta, tw.reported_version)
  local prints = dev.thumbprints
  local x509 = NO_THUMBPRINTS
  if prints.primary or prints.secondary then
    x509 = { primaryThumbprint = or_null(prints.primary), secondaryThumbprint = or_null(prints.secondary) }
  end
  return {
    deviceId = dev.id,
    moduleId = null,
    etag = util.etag_of(tw.etag_n),
    deviceEtag = dev.etag,
    status = dev.status,
    statusReason = or_null(dev.statusReason),
    statusUpdateTime = dev.statusUpdatedTime,
    connectionState = connection_state(dev),
    lastActivityTime = dev.lastActivityTime,
    cloudToDeviceMessageCount = 0,
    authenticationType = dev.auth_type,
    x509Thumbprint = x509,
    modelId = "",
    version = tw.version,
    capabilities = dev.iotEdge and EDGE or NOT_EDGE,
    tags = tw.tags,
    properties = { desired = desired, reported = reported },
  }
end

-- The twin document (see the header): cached, read-only.
function M.twin_doc(dev)
  if dev.online_at then refresh(dev) end
  local doc = dev.doc
  if not doc then
    doc = build_doc(dev)
    dev.doc = doc
  end
  return doc
end

function M.twin_etag(dev)
  return util.etag_of(dev.twin.etag_n)
end

-- Splits a twin body into its tags and desired parts, validating both (names, values,
-- depth; sizes are checked on the merged result). replace: a PUT, where a full twin from
-- GET may be sent back: read-only fields and properties.reported are ignored.
local function split_patch(patch, replace)
  if not util.is_object(patch) then
    return invalid("The twin patch must be a JSON object.")
  end
  if patch.desired ~= nil or patch.reported ~= nil then
    return invalid("Desired properties belong under 'properties.desired' "
      .. "(top-level 'desired'/'reported' is not a twin field).")
  end
  local tags, desired = patch.tags, nil
  if tags == null then tags = nil end
  if tags ~= nil and not util.is_object(tags) then
    return invalid("'tags' must be a JSON object.")
  end
  local props = patch.properties
  if props ~= nil and props ~= null then
    if not util.is_object(props) then
      return invalid("'properties' must be a JSON object.")
    end
    local rep = props.reported
    if not replace and rep ~= nil and rep ~= null and not (util.is_object(rep) and next(rep) == nil) then
      return invalid("Reported properties can only be updated by the device.")
    end
    desired = props.desired
    if desired == null then desired = nil end
    if desired ~= nil then
      if not util.is_object(desired) then
        return invalid("'properties.desired' must be a JSON object.")
      end
      if desired["$metadata"] ~= nil or desired["$version"] ~= nil then
        desired = util.deepcopy(desired) -- echoed back by clients that GET then PATCH
        desired["$metadata"], desired["$version"] = nil, nil
      end
    end
  end
  if tags then
    local ok, err = M.check_section(tags, "tags")
    if not ok then return invalid(err) end
  end
  if desired then
    local ok, err = M.check_section(desired, "properties.desired")
    if not ok then return invalid(err) end
  end
  return { tags = tags, desired = desired }
end
M.split_patch = function(patch) return split_patch(patch, false) end

local function notify_desired(dev, patch)
  if patch and M.on_desired and dev.sim and dev.sim.onDesired then
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
  if util.is_object(patch) and patch.deviceId ~= nil and patch.deviceId ~= id then
    return invalid("deviceId in the body does not match the URL.")
  end
  local parts, perr = split_patch(patch, replace)
  if not parts then return nil, perr end
  if replace then
    parts.tags = parts.tags or {}
    parts.desired = parts.desired or {}
  end
  if parts.tags == nil and parts.desired == nil then return dev end
  local stamp = util.iso(M.clock.now())
  local new_tags, new_desired, new_meta
  local desired_version = tw.desired_version + (parts.desired and 1 or 0)
  if parts.tags then
    if replace then
      new_tags = without_nulls(parts.tags)
    else
      new_tags = util.deepcopy(tw.tags)
      merge(new_tags, parts.tags)
    end
    local ok, serr = check_size(new_tags, "tags")
    if not ok then return invalid(serr) end
  end
  if parts.desired then
    if replace then
      new_desired = without_nulls(parts.desired)
      new_meta = meta_for(new_desired, stamp, desired_version)
    else
      new_desired, new_meta = util.deepcopy(tw.desired), util.deepcopy(tw.desired_meta)
      merge(new_desired, parts.desired, new_meta, stamp, desired_version)
    end
    local ok, serr = check_size(new_desired, "properties.desired")
    if not ok then return invalid(serr) end
  end
  tw.version = tw.version + 1
  tw.etag_n = tw.etag_n + 1
  if new_tags then tw.tags = new_tags end
  if new_desired then
    tw.desired, tw.desired_meta, tw.desired_version = new_desired, new_meta, desired_version
  end
  invalidate(dev)
  changed("twin", id)
  if new_desired then notify_desired(dev, replace and new_desired or parts.desired) end
  return dev
end

-- Reported properties, written by simulated devices (ctx.report). Returns true or nil, message.
function M.report(dev, patch)
  if not util.is_object(patch) then return nil, "a reported patch must be a table" end
  local ok, err = M.check_section(patch, "properties.reported")
  if not ok then return nil, err end
  local tw = dev.twin
  local new_reported, new_meta = util.deepcopy(tw.reported), util.deepcopy(tw.reported_meta)
  local stamp = util.iso(M.clock.now())
  merge(new_reported, patch, new_meta, stamp, nil)
  ok, err = check_size(new_reported, "properties.reported")
  if not ok then return nil, err end
  tw.reported, tw.reported_meta = new_reported, new_meta
  tw.reported_version = tw.reported_version + 1
  tw.etag_n = tw.etag_n + 1
  dev.lastActivityTime = stamp
  invalidate(dev)
  changed("reported", dev.id)
  return true
end

---------------------------------------------------------------------------
-- Saved state

local STATE_FORMAT = "iothub-emulator-registry/1"

-- A device's identity, and its twin, as plain tables: the state store saves them apart, as a
-- twin changes far more often. The twin sections are the registry's own (copy-on-write,
-- never modified in place): encode them, do not modify them.
local function identity_state(dev)
  return {
    deviceId = dev.id,
    generationId = dev.generationId,
    etag = dev.etag,
    status = dev.status,
    statusReason = or_null(dev.statusReason),
    statusUpdatedTime = dev.statusUpdatedTime,
    connectionStateUpdatedTime = dev.connectionStateUpdatedTime,
    lastActivityTime = dev.lastActivityTime,
    authentication = {
      type = dev.auth_type,
      primaryKey = or_null(dev.keys.primary), secondaryKey = or_null(dev.keys.secondary),
      primaryThumbprint = or_null(dev.thumbprints.primary),
      secondaryThumbprint = or_null(dev.thumbprints.secondary),
    },
    iotEdge = dev.iotEdge,
  }
end

local function twin_state(dev)
  local tw = dev.twin
  return {
    deviceId = dev.id,
    tags = tw.tags,
    desired = tw.desired,
    reported = tw.reported,
    desiredMetadata = tw.desired_meta,
    reportedMetadata = tw.reported_meta,
    desiredVersion = tw.desired_version,
    reportedVersion = tw.reported_version,
    version = tw.version,
    etagNumber = tw.etag_n,
  }
end

-- One device's identity with its twin under "twin", the saved state's shape (M.import_state).
local function device_state(dev)
  local t = identity_state(dev)
  t.twin = twin_state(dev)
  return t
end

M.STATE_FORMAT = STATE_FORMAT
M.identity_record = identity_state
M.twin_record = twin_state

-- Every identity and twin as one plain table (JSON-ready through the core codec).
function M.export_state()
  local list = {}
  for i, dev in ipairs(M.list()) do list[i] = device_state(dev) end
  return { format = STATE_FORMAT, devices = util.array(list) }
end

local function opt_string(v)
  if v == null then return nil end
  return v
end

local function record_from_state(d, i)
  local where = "devices[" .. i .. "]"
  if type(d) ~= "table" then return nil, where .. " is not an object" end
  local problem = M.device_id_problem(d.deviceId)
  if problem then return nil, where .. ": " .. problem end
  local tw, a = d.twin, d.authentication
  if type(tw) ~= "table" or type(a) ~= "table" then return nil, where .. ": twin and authentication are required" end
  for _, k in ipairs({ "desiredVersion", "reportedVersion", "version", "etagNumber" }) do
    if type(tw[k]) ~= "number" then return nil, where .. ".twin." .. k .. " must be a number" end
  end
  local function obj(v) return util.is_object(v) and v or {} end
  return {
    id = d.deviceId,
    generationId = tostring(d.generationId or generation_id()),
    etag = tostring(d.etag or device_etag()),
    status = d.status == "disabled" and "disabled" or "enabled",
    statusReason = opt_string(d.statusReason),
    statusUpdatedTime = opt_string(d.statusUpdatedTime) or util.NEVER,
    connectionStateUpdatedTime = opt_string(d.connectionStateUpdatedTime) or util.NEVER,
    lastActivityTime = opt_string(d.lastActivityTime) or util.NEVER,
    auth_type = AUTH_TYPES[a.type] and a.type or "sas",
    keys = { primary = opt_string(a.primaryKey), secondary = opt_string(a.secondaryKey) },
    thumbprints = { primary = opt_string(a.primaryThumbprint), secondary = opt_string(a.secondaryThumbprint) },
    iotEdge = d.iotEdge == true,
    connected = false,
    twin = {
      tags = obj(tw.tags), desired = obj(tw.desired), reported = obj(tw.reported),
      desired_meta = obj(tw.desiredMetadata), reported_meta = obj(tw.reportedMetadata),
      desired_version = tw.desiredVersion, reported_version = tw.reportedVersion,
      version = tw.version, etag_n = tw.etagNumber,
    },
  }
end

-- Replaces every identity and twin with the saved ones (M.export_state's table). Devices
-- already simulated keep their simulation (attached to the saved record of the same id),
-- and those the saved state does not have are kept as they are (new in the devices file),
-- unless only_saved (the saved state is known to have every device that still exists).
-- Returns true or nil, message.
function M.import_state(t, only_saved)
  if type(t) ~= "table" or t.format ~= STATE_FORMAT or type(t.devices) ~= "table" then
    return nil, "not a registry state (format " .. STATE_FORMAT .. ")"
  end
  local records, seen = {}, {}
  for i, d in ipairs(t.devices) do
    local rec, err = record_from_state(d, i)
    if not rec then return nil, err end
    if seen[rec.id] then return nil, "device '" .. rec.id .. "' appears twice" end
    seen[rec.id] = true
    records[#records + 1] = rec
  end
  local simulated = {}
  for _, dev in ipairs(M.list()) do
    if dev.sim then simulated[#simulated + 1] = dev end
  end
  M.reset()
  for _, rec in ipairs(records) do insert(rec) end
  for _, old in ipairs(simulated) do
    local rec = devices[old.id]
    if rec then
      rec.sim, rec.desired_delivered = old.sim, rec.twin.desired_version
      rec.connected, rec.online_at = old.connected, old.online_at
    elseif not only_saved then
      insert(old)
    end
  end
  return true
end

return M
