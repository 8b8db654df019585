-- Service-side SAS checks (hub-behavior.md §7). Every failure is the same 401 to the
-- client ("Unauthorized", as the real hub says); the reason goes to the nginx error log.
local core = require "iothub.core"
local util = require "emulator.util"

local M = {}

local MAX_CLOCK_SKEW = 300 -- seconds, the service's MaxClockSkew

local settings = { host = "localhost", policies = {} }

-- opts.host: the HostName tokens are signed for; opts.policies: name -> base64 key
-- (a key may also be a list { primary, secondary }).
function M.configure(opts)
  settings.host = (opts.host or "localhost"):lower()
  settings.policies = {}
  for name, keys in pairs(opts.policies or {}) do
    if type(keys) == "string" then keys = { keys } end
    local raw = {}
    for _, k in ipairs(keys) do
      local decoded, err = core.base64_decode(k)
      if not decoded then error("policy " .. name .. ": key is not base64: " .. tostring(err)) end
      raw[#raw + 1] = decoded
    end
    settings.policies[name] = raw
  end
end

-- Field value exactly as written in the token (the signature covers se's text).
local function raw_field(token, name)
  return token:match("[%s&]" .. name .. "=([^&]*)")
end

-- True when sr names the hub itself or a path-segment prefix of the requested resource.
local function scope_ok(sr, path)
  sr = sr:lower():gsub("^https?://", ""):gsub("/+$", "")
  local target = settings.host .. (path or ""):lower()
  if target == sr then return true end
  return target:sub(1, #sr + 1) == sr .. "/"
end

-- Returns true, or nil and the reason the request is not authorized.
function M.check(header, path, now)
  if type(header) == "table" then header = header[1] end
  if type(header) ~= "string" or header == "" then
    return nil, "no Authorization header"
  end
  local tok, perr = core.parse_sas_token(header)
  if not tok then return nil, perr end
  local keys = settings.policies[tok.skn or ""]
  if not keys then
    return nil, "policy '" .. tostring(tok.skn) .. "' is not configured (skn)"
  end
  now = now or util.now()
  local se = tonumber(tok.se)
  if not se then return nil, "se is not a number" end
  if se + MAX_CLOCK_SKEW < now then
    return nil, string.format("token expired %d s ago", math.floor(now - se))
  end
  if not scope_ok(tok.sr, path) then
    return nil, "sr '" .. tok.sr .. "' does not cover " .. settings.host .. (path or "")
  end
  -- Peers differ in whether sr is URL-encoded before signing; all are accepted by the
  -- real service, so accept the encoded, decoded and as-written forms.
  local se_text = raw_field(header, "se") or tostring(tok.se)
  local forms, seen = {}, {}
  for _, f in ipairs({ core.url_encode(tok.sr), tok.sr, raw_field(header, "sr") }) do
    if f and not seen[f] then seen[f] = true; forms[#forms + 1] = f end
  end
  for _, key in ipairs(keys) do
    for _, form in ipairs(forms) do
      local expected = core.base64_encode(core.hmac_sha256(key, form .. "\n" .. se_text))
      if core.constant_time_equals(expected, tok.sig) then return true end
    end
  end
  return nil, "signature does not match the key of policy '" .. tok.skn .. "'"
end

-- Builds a token the way clients do (handy for curl experiments and tests).
function M.token(host, key_b64, policy, se)
  local sr = core.url_encode(host)
  local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(key_b64), sr .. "\n" .. se))
  return "SharedAccessSignature sr=" .. sr .. "&sig=" .. core.url_encode(sig) .. "&se=" .. se .. "&skn=" .. policy
end

return M
