-- The hub's error catalog and error objects. Modules return nil, errors.new(...);
-- http.lua renders them as envelope B plus the iothub-errorcode header.
local M = {}

-- name -> HTTP status, numeric code (numbers from the .NET ErrorCode enums; the
-- string-only names get the generic <status>000 code).
M.catalog = {
  GenericBadRequest = { 400, 400000 },
  InvalidProtocolVersion = { 400, 400001 },
  InvalidOperation = { 400, 400003 },
  ArgumentInvalid = { 400, 400004 },
  ArgumentNull = { 400, 400005 },
  IotHubFormatError = { 400, 400006 },
  IotHubUnauthorizedAccess = { 401, 401002 },
  DeviceNotFound = { 404, 404001 },
  JobNotFound = { 404, 404002 },
  DeviceNotOnline = { 404, 404103 },
  DeviceAlreadyExists = { 409, 409001 },
  JobAlreadyExists = { 409, 409000 },
  PreconditionFailed = { 412, 412001 },
  MessageTooLarge = { 413, 413001 },
  ThrottlingMaxActiveJobCountExceeded = { 429, 429004 },
  ServerError = { 500, 500001 },
  GatewayTimeout = { 504, 504101 },
  -- used by the control plane's fault injection
  RequestTimeout = { 408, 408000 },
  GenericTooManyRequests = { 429, 429000 },
  ThrottlingException = { 429, 429001 },
  ServiceUnavailable = { 503, 503001 },
}

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.name .. ": " .. e.message end

function M.new(name, message, info)
  local entry = M.catalog[name] or { 500, 500001 }
  return setmetatable({
    name = name, status = entry[1], code = entry[2], message = message or name, info = info,
  }, Error)
end

function M.is_error(v)
  return getmetatable(v) == Error
end

return M
