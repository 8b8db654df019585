-- Service-side SAS checks and shared access policies (hub-behavior.md §7). Every failure
-- is the same 401 to the client ("Unauthorized", as the real hub says); the reason goes
-- to the nginx error log and into the error's info, and never contains a key or a signature.
--
-- Policies: the hub's default set (iothubowner, service, device, registryRead,
-- registryReadWrite) with well-known development keys. iothubowner's primary key is the
-- configured key (--key); every other key is derived from it, so one --key changes all
-- of them and the defaults stay deterministic (emulator/README.md lists them).
local core = require "iothub.core"
local util = require "emulator.util"

local M = {}

local MAX_CLOCK_SKEW = 300 -- seconds, the service's MaxClockSkew

-- base64 of the 32 bytes "iothub-emulator-development-key!" (bin/iothub-emulator's default)
M.DEVELOPMENT_KEY = "aW90aHViLWVtdWxhdG9yLWRldmVsb3BtZW50LWtleSE="

M.RIGHTS = { "registryRead", "registryWrite", "serviceConnect", "deviceConnect" }
local KNOWN_RIGHT = {}
for _, r in ipairs(M.RIGHTS) do KNOWN_RIGHT[r:lower()] = r end

-- The hub's default policies, in the portal's order.
M.DEFAULT_POLICIES = {
  { name = "iothubowner", rights = { "registryRead", "registryWrite", "serviceConnect", "deviceConnect" } },
  { name = "service", rights = { "serviceConnect" } },
  { name = "device", rights = { "deviceConnect" } },
  { name = "registryRead", rights = { "registryRead" } },
  { name = "registryReadWrite", rights = { "registryRead", "registryWrite" } },
}

local settings = { host = "localhost", policies = {}, order = {} }

---------------------------------------------------------------------------
-- Configuration

-- Key `which` ("primary"/"secondary") of policy `name`, derived from iothubowner's raw key.
function M.derive_key(owner_key_b64, name, which)
  local raw = assert(core.base64_decode(owner_key_b64), "the iothubowner key is not base64")
  return core.base64_encode(core.hmac_sha256(raw, "iothub-emulator:" .. name .. ":" .. which))
end

-- Rights as a set; registryWrite implies registryRead (the SDKs' AccessRights flags).
local function rights_set(list, where)
  if type(list) == "string" then
    local t = {}
    for r in list:gmatch("[^,%s+]+") do t[#t + 1] = r end
    list = t
  end
  local set = {}
  for _, r in ipairs(list or {}) do
    local right = type(r) == "string" and KNOWN_RIGHT[r:lower()]
    if not right then
      error(where .. ": unknown right '" .. tostring(r) .. "'; use " .. table.concat(M.RIGHTS, ", "), 0)
    end
    set[right] = true
  end
  if set.registryWrite then set.registryRead = true end
  return set
end

local function decode_key(k, where)
  if type(k) ~= "string" or k == "" then error(where .. ": a key must be a non-empty base64 string", 0) end
  local raw = core.base64_decode(k)
  if not raw or raw == "" then
    error(where .. ": the key is not base64 (make one with `openssl rand -base64 32`)", 0)
  end
  return raw
end

-- Parses "name:right,right[:primaryKey[:secondaryKey]]" entries separated by ';' (the form
-- a repeated --policy flag would collect). Base64 never contains ':', ',' or ';'.
function M.parse_policy_spec(spec)
  local out = {}
  for entry in tostring(spec or ""):gmatch("[^;]+") do
    local name, rights, primary, secondary = entry:match("^%s*([^:]+):([^:]*):?([^:]*):?([^:]*)%s*$")
    if not name then
      return nil, "policy '" .. entry:gsub(":.*", ":...") .. "' is not name:rights[:primaryKey[:secondaryKey]]"
    end
    out[name] = { rights = rights, primary = primary ~= "" and primary or nil,
      secondary = secondary ~= "" and secondary or nil }
  end
  return out
end

-- opts.host: the HostName tokens are signed for.
-- opts.policies: name -> key | { key1, key2 } | { primary=, secondary=, rights = list or "a,b" }.
--   A default policy named without rights keeps its default rights; any other name without
--   rights gets all rights. Keys left out are derived from iothubowner's primary key.
-- opts.policies_spec: more policies as M.parse_policy_spec text.
-- opts.defaults = false: only the named policies exist (no default set).
function M.configure(opts)
  opts = opts or {}
  local given = {}
  for name, v in pairs(opts.policies or {}) do
    if type(v) == "string" then v = { primary = v } end
    if type(v) ~= "table" then error("policy " .. tostring(name) .. ": expected a key or a table", 0) end
    given[name] = { primary = v.primary or v[1], secondary = v.secondary or v[2], rights = v.rights }
  end
  if opts.policies_spec and opts.policies_spec ~= "" then
    local parsed, err = M.parse_policy_spec(opts.policies_spec)
    if not parsed then error(err, 0) end
    for name, v in pairs(parsed) do given[name] = v end
  end
  local owner = given.iothubowner and given.iothubowner.primary or M.DEVELOPMENT_KEY
  decode_key(owner, "policy iothubowner")

  local defaults = {}
  for _, p in ipairs(M.DEFAULT_POLICIES) do defaults[p.name] = p.rights end
  local names = {}
  if opts.defaults ~= false then
    for _, p in ipairs(M.DEFAULT_POLICIES) do names[#names + 1] = p.name end
  end
  local extra = {}
  for name in pairs(given) do
    if not (opts.defaults ~= false and defaults[name]) then extra[#extra + 1] = name end
  end
  table.sort(extra)
  for _, name in ipairs(extra) do names[#names + 1] = name end

  local policies, order = {}, {}
  for _, name in ipairs(names) do
    local g = given[name] or {}
    local where = "policy " .. name
    local primary = g.primary or (name == "iothubowner" and owner) or M.derive_key(owner, name, "primary")
    local secondary = g.secondary or M.derive_key(owner, name, "secondary")
    local rights = g.rights or defaults[name] or M.RIGHTS
    policies[name] = {
      name = name, primary = primary, secondary = secondary,
      raw = { decode_key(primary, where), decode_key(secondary, where) },
      rights = rights_set(rights, where),
    }
    order[#order + 1] = name
  end
  settings.host = (opts.host or "localhost"):lower()
  settings.policies, settings.order = policies, order
end

-- The configured policies: { name, rights (list), primaryKey, secondaryKey }, in order.
-- For printing connection strings (launcher, control routes); these are secrets of the
-- emulator's user, so never log them.
function M.policies()
  local out = {}
  for _, name in ipairs(settings.order) do
    local p = settings.policies[name]
    local rights = {}
    for _, r in ipairs(M.RIGHTS) do if p.rights[r] then rights[#rights + 1] = r end end
    out[#out + 1] = { name = name, rights = rights, primaryKey = p.primary, secondaryKey = p.secondary }
  end
  return out
end

function M.connection_string(name)
  local p = settings.policies[name]
  if not p then return nil, "no policy named '" .. tostring(name) .. "'" end
  return "HostName=" .. settings.host .. ";SharedAccessKeyName=" .. name .. ";SharedAccessKey=" .. p.primary
end

---------------------------------------------------------------------------
-- Permissions per route

local READ_REGISTRY = { { "registryRead" } }
local WRITE_REGISTRY = { { "registryWrite" } }
local READ_TWIN = { { "serviceConnect" }, { "registryRead" } }
local WRITE_TWIN = { { "serviceConnect" }, { "registryWrite" } }
local SERVICE = { { "serviceConnect" } }
-- Docs disagree: "registry read and registry write" (current) vs "service connect and
-- registry read" (2019); either combination is accepted.
local JOBS = { { "registryRead", "registryWrite" }, { "serviceConnect", "registryRead" } }
local OWNER = { { "registryWrite", "serviceConnect" } }

-- The rights a request needs: a list of alternatives, each a list of rights that must all
-- be held. Twins follow the devguide (ServiceConnect) and also accept the registry rights
-- that SDK users rely on; unknown paths (e.g. /_emulator control routes) need owner rights.
function M.permission_for(method, path)
  method = (method or "GET"):upper()
  local segs = {}
  for s in (path or ""):gsub("%?.*$", ""):gmatch("[^/]+") do segs[#segs + 1] = s end
  local top = segs[1]
  if top == "devices" then
    if #segs == 2 and segs[2] == "query" and method == "POST" then return READ_TWIN end
    if method == "GET" then return READ_REGISTRY end
    return WRITE_REGISTRY
  elseif top == "twins" then
    if segs[#segs] == "methods" then return SERVICE end
    if method == "GET" then return READ_TWIN end
    return WRITE_TWIN
  elseif top == "jobs" then
    return JOBS
  end
  return OWNER
end

local function allowed(rights, alternatives)
  for _, need in ipairs(alternatives) do
    local ok = true
    for _, r in ipairs(need) do
      if not rights[r] then ok = false; break end
    end
    if ok then return true end
  end
  return false
end

local function describe(alternatives)
  local parts = {}
  for _, need in ipairs(alternatives) do parts[#parts + 1] = table.concat(need, "+") end
  return table.concat(parts, " or ")
end

---------------------------------------------------------------------------
-- Token checks

-- Token fields exactly as written, by name (the signature covers se's and sr's text). Only
-- called on a header core.parse_sas_token accepted: "SharedAccessSignature " then key=value
-- fields separated by '&', each key once. Splitting the same way as that parser matters: a
-- pattern search could find "se=" inside another field's value and check the signature
-- against a different expiry than the one tested.
local function raw_fields(header)
  local out = {}
  for field in header:sub(#"SharedAccessSignature " + 1):gmatch("[^&]+") do
    local k, v = field:match("^([^=]*)=(.*)$")
    if k then out[k] = v end
  end
  return out
end

-- Text from a token for a log line or an error, only when it looks like what it should be;
-- otherwise a description of it. Never the signature, and never long.
local function shown(value, pattern, max, what)
  if #value <= max and value:match(pattern) then return "'" .. value .. "'" end
  return "(" .. #value .. " bytes, not a " .. what .. ")"
end

local function policy_text(name)
  return shown(name, "^[%w%-%._]+$", 64, "policy name")
end

-- True when sr names the hub itself or a path-segment prefix of the requested resource.
local function scope_ok(sr, path)
  sr = sr:lower():gsub("^https?://", ""):gsub("/+$", "")
  local target = settings.host .. (path or ""):lower()
  if target == sr then return true end
  return target:sub(1, #sr + 1) == sr .. "/"
end

-- The longest lifetime a token may have: ten years, the maximum the service supports
-- (an Azure IoT SDK maintainer in Azure/azure-iot-sdk-c#714).
M.MAX_LIFETIME = 3652.5 * 86400
local SIG_BYTES = 32 -- HMAC-SHA256

-- The checks every token gets, whoever signed it. fresh: not expired and not valid for longer
-- than the hub allows. signed_by: signed with one of keys (raw bytes); what names the keys'
-- owner in the reason. Each returns true, or nil and the reason.
local function fresh(tok, now)
  now = now or (util.real_now or util.now)() -- clients sign with their own (real) clock
  local se = tok.se
  if se + MAX_CLOCK_SKEW < now then
    return nil, string.format("token expired %d s ago (se %d)", math.floor(now - se), se)
  end
  if se > now + M.MAX_LIFETIME then
    return nil, string.format("token expires in %d days (se %d); the hub accepts at most 10 years",
      math.floor((se - now) / 86400), se)
  end
  return true
end

local function signed_by(tok, text, keys, what)
  local sig = core.base64_decode(tok.sig)
  if not sig or #sig ~= SIG_BYTES then
    return nil, "sig is not the base64 of a " .. SIG_BYTES .. "-byte HMAC-SHA256 (" .. #tok.sig .. " characters)"
  end
  -- Peers differ in whether sr is URL-encoded before signing; all are accepted by the
  -- real service, so accept the encoded, decoded and as-written forms.
  local raw = raw_fields(text)
  local forms, seen = {}, {}
  for _, f in ipairs({ core.url_encode(tok.sr), tok.sr, raw.sr }) do
    if f and not seen[f] then seen[f] = true; forms[#forms + 1] = f end
  end
  for _, key in ipairs(keys) do
    for _, form in ipairs(forms) do
      -- compared as text, as the service does: another spelling of the same bytes is refused
      local expected = core.base64_encode(core.hmac_sha256(key, form .. "\n" .. raw.se))
      if core.constant_time_equals(expected, tok.sig) then return true end
    end
  end
  return nil, "signature matches neither the primary nor the secondary key of " .. what
end

-- Returns true, policy name; or nil and the reason the request is not authorized (for the
-- log and the error's info: it names what is wrong and never holds a key or a signature).
-- method (default: the current nginx request's method) selects the rights the request
-- needs (M.permission_for); path is the decoded request path.
function M.check(header, path, now, method)
  if type(header) == "table" then
    return nil, #header .. " Authorization headers; send exactly one"
  end
  if type(header) ~= "string" or header == "" then
    return nil, "no Authorization header"
  end
  local tok, perr = core.parse_sas_token(header)
  if not tok then return nil, perr end
  if not tok.skn or tok.skn == "" then
    return nil, "the token has no skn field: service tokens name their shared access policy"
  end
  local policy = settings.policies[tok.skn]
  if not policy then
    return nil, "policy " .. policy_text(tok.skn) .. " is not configured (skn)"
  end
  local ok, why = fresh(tok, now)
  if not ok then return nil, why end
  if not scope_ok(tok.sr, path) then
    return nil, "sr " .. shown(tok.sr, "^[%w%-%._:/]+$", 256, "host name or path") .. " does not cover "
      .. settings.host .. (path or ""):sub(1, 200)
  end
  ok, why = signed_by(tok, header, policy.raw, "policy '" .. tok.skn .. "'")
  if not ok then return nil, why end
  if method == nil and ngx then method = ngx.req.get_method() end
  if method then
    local need = M.permission_for(method, path)
    if not allowed(policy.rights, need) then
      return nil, "policy '" .. tok.skn .. "' lacks the rights for " .. method .. " " .. tostring(path):sub(1, 200)
        .. " (needs " .. describe(need) .. ")"
    end
  end
  return true, tok.skn
end

--- A device's MQTT password: a device SAS token (sr = {host}/devices/{id}, no skn) signed
-- with one of the device's keys (base64, as the registry keeps them), or a token of a shared
-- access policy with DeviceConnect whose sr covers the device. Returns true, or nil and the
-- reason (for the log: never a key or a signature).
function M.check_device(password, device_id, keys_b64, now)
  if type(password) ~= "string" or password == "" then return nil, "no password (a SAS token)" end
  local tok, perr = core.parse_sas_token(password)
  if not tok then return nil, perr end
  local ok, why = fresh(tok, now)
  if not ok then return nil, why end
  if not scope_ok(tok.sr, "/devices/" .. device_id:lower()) then
    return nil, "sr " .. shown(tok.sr, "^[%w%-%._:/]+$", 256, "host name or path") .. " does not cover "
      .. settings.host .. "/devices/" .. device_id:sub(1, 128)
  end
  if tok.skn and tok.skn ~= "" then
    local policy = settings.policies[tok.skn]
    if not policy then return nil, "policy " .. policy_text(tok.skn) .. " is not configured (skn)" end
    if not allowed(policy.rights, { { "deviceConnect" } }) then
      return nil, "policy '" .. tok.skn .. "' lacks DeviceConnect"
    end
    return signed_by(tok, password, policy.raw, "policy '" .. tok.skn .. "'")
  end
  local keys = {}
  for _, which in ipairs({ "primary", "secondary" }) do
    local raw = keys_b64 and keys_b64[which] and core.base64_decode(keys_b64[which])
    if raw then keys[#keys + 1] = raw end
  end
  if #keys == 0 then return nil, "the device has no symmetric keys (its authentication is not SAS)" end
  return signed_by(tok, password, keys, "device '" .. device_id:sub(1, 128) .. "'")
end

-- Builds a token the way clients do (handy for curl experiments and tests).
function M.token(host, key_b64, policy, se)
  local sr = core.url_encode(host)
  local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(key_b64), sr .. "\n" .. se))
  return "SharedAccessSignature sr=" .. sr .. "&sig=" .. core.url_encode(sig) .. "&se=" .. se .. "&skn=" .. policy
end

M.configure({})

return M
