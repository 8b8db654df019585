--- Credentials: each kind answers `cred:authorization(now)` with an Authorization header value,
-- cached and renewed before it expires.
-- @module iothub.credentials
local core = require "iothub.core"
local errors = require "iothub.errors"

local M = {}

--- Signs SAS tokens with a shared access policy key. A token lives `ttl` seconds and is reused
-- until `renewBefore` seconds before its expiry, so a long-running monitor never sends an
-- expired token and a busy one does not sign on every request.
local SasKey = {}
SasKey.__index = SasKey

function M.sas_key(host, key_name, key, opts)
  opts = opts or {}
  return setmetatable({
    host = host, key_name = key_name, key = key,
    ttl = opts.ttl or 3600, renew_before = opts.renewBefore or 300,
    token = nil, expiry = 0,
  }, SasKey)
end

function SasKey:authorization(now)
  if not self.token or now >= self.expiry - self.renew_before then
    local expiry = math.floor(now + self.ttl)
    local token, msg = core.sas_token({ resource = self.host, key = self.key, expiry = expiry,
      keyName = self.key_name })
    if not token then
      return nil, errors.new({ kind = "auth", code = "InvalidKey", message = msg })
    end
    self.token, self.expiry = token, expiry
  end
  return self.token
end

function SasKey:__tostring()
  return "SAS key credential for " .. self.host .. " (policy " .. tostring(self.key_name) .. ")"
end

--- A ready-made SAS token (connection string `SharedAccessSignature=`). It cannot be renewed,
-- so once expired every call fails with a clear auth error instead of a 401 round trip.
local SasToken = {}
SasToken.__index = SasToken

function M.sas_token(token)
  local parsed, msg = core.parse_sas_token(token)
  if not parsed then return nil, msg end
  return setmetatable({ token = token, expiry = parsed.se, policy = parsed.skn }, SasToken)
end

function SasToken:authorization(now)
  if now >= self.expiry then
    return nil, errors.new({ kind = "auth", code = "TokenExpired",
      message = "the SharedAccessSignature expired at " .. core.format_time(self.expiry) ..
        "; create a new one, or use a connection string with SharedAccessKey so tokens renew" })
  end
  return self.token
end

function SasToken:__tostring()
  return "SAS token credential (expires " .. core.format_time(self.expiry) .. ")"
end

--- A bearer token from a caller-supplied function (Microsoft Entra ID). The function is called
-- from Lua, never from C, so it may itself do I/O that yields (cosockets, cqueues).
-- getToken() must return token, expiresOn (epoch seconds) or nil, message.
local Bearer = {}
Bearer.__index = Bearer

function M.bearer(get_token, opts)
  opts = opts or {}
  return setmetatable({ get_token = get_token, renew_before = opts.renewBefore or 300,
    token = nil, expiry = 0 }, Bearer)
end

function Bearer:authorization(now)
  if not self.token or now >= self.expiry - self.renew_before then
    local ok, token, expires_on = pcall(self.get_token)
    if not ok or type(token) ~= "string" or token == "" then
      local reason = not ok and tostring(token) or tostring(expires_on or "no token returned")
      return nil, errors.new({ kind = "auth", code = "TokenUnavailable",
        message = "the token callback failed: " .. reason })
    end
    self.token = "Bearer " .. token
    -- Without an expiry, keep the token for ten minutes (Entra ID tokens live about an hour).
    self.expiry = tonumber(expires_on) or (now + self.renew_before + 600)
  end
  return self.token
end

function Bearer.__tostring()
  return "bearer token credential"
end

return M
