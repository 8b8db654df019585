--- Constructors shared by JobClient and Registry: each client is a config plus a request
-- pipeline, built from a connection string, a SAS token or a bearer-token callback.
-- @module iothub.client
local core = require "iothub.core"
local errors = require "iothub.errors"
local config = require "iothub.config"
local credentials = require "iothub.credentials"
local Pipeline = require "iothub.pipeline"

local M = {}

local function new_client(class, credential, host, opts)
  local cfg, err = config.build(credential, host, opts)
  if not cfg then return nil, err end
  return setmetatable({ cfg = cfg, pipeline = Pipeline.new(cfg) }, class)
end

--- Adds fromConnectionString, fromSharedAccessSignature and fromTokenCredential to class.
function M.add_constructors(class)
  --- From a service connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`
  -- or `HostName=…;SharedAccessSignature=…`).
  function class.fromConnectionString(cs, opts)
    local credential, host = config.credential_from_connection_string(cs, opts)
    if not credential then return nil, host end
    return new_client(class, credential, host, opts)
  end

  --- From a ready SAS token; the host is the token's `sr`.
  function class.fromSharedAccessSignature(sas, opts)
    if type(sas) ~= "string" then errors.misuse("shared access signature must be a string") end
    local credential, msg = credentials.sas_token(sas)
    if not credential then
      return nil, errors.new({ kind = "invalid_argument", code = "InvalidToken", message = msg })
    end
    return new_client(class, credential, core.parse_sas_token(sas).sr, opts)
  end

  --- With bearer tokens (Microsoft Entra ID): getToken() returns token, expiresOnEpochSeconds
  -- (or nil, message) and is called from Lua when the cached token is near expiry.
  function class.fromTokenCredential(hostName, getToken, opts)
    if type(hostName) ~= "string" then errors.misuse("hostName must be a string") end
    if type(getToken) ~= "function" then errors.misuse("getToken must be a function") end
    return new_client(class, credentials.bearer(getToken, opts and { renewBefore = opts.tokenRenewBefore }),
      hostName, opts)
  end
  return class
end

return M
