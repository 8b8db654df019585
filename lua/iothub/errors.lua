--- Error values returned as the second result of every failing call.
-- An error is a table that prints as one readable line:
--   kind       "service" | "network" | "timeout" | "tls" | "auth" | "invalid_argument" | "protocol"
--              | "unavailable" (a monitor stopped because the hub kept failing; see JobClient:watchJob)
--   status     HTTP status (service errors)
--   code       error-code name, e.g. "ThrottlingMaxActiveJobCountExceeded"
--   errorCode  numeric code, e.g. 429004
--   message, trackingId, requestId, retryable, operation, target
-- @module iothub.errors
local core = require "iothub.core"

local M = {}

-- Numeric codes from the service's ErrorCode enumeration (see shared/reference §5.1, §6.2).
local NUMBERS = {
  InvalidProtocolVersion = 400001, InvalidOperation = 400003, ArgumentInvalid = 400004,
  ArgumentNull = 400005, IotHubFormatError = 400006, IotHubUnauthorizedAccess = 401002,
  IotHubQuotaExceeded = 403002, JobQuotaExceeded = 403003, DeviceNotFound = 404001,
  JobNotFound = 404002, ModuleNotFound = 404010, DeviceNotOnline = 404103,
  RequestTimeout = 408000, DeviceAlreadyExists = 409001, ModuleAlreadyExistsOnDevice = 409301,
  PreconditionFailed = 412001, MessageTooLarge = 413001, TooManyDevices = 413002,
  GenericTooManyRequests = 429000, ThrottlingException = 429001,
  ThrottleBacklogLimitExceeded = 429002, ThrottlingBacklogTimeout = 429003,
  ThrottlingMaxActiveJobCountExceeded = 429004, DeviceThrottlingLimitExceeded = 429005,
  ServerError = 500001, ServiceUnavailable = 503001, GatewayTimeout = 504101,
}
local NAMES = {}
for name, number in pairs(NUMBERS) do NAMES[number] = name end
M.NUMBERS, M.NAMES = NUMBERS, NAMES

local REASONS = {
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
  [408] = "Request Timeout", [409] = "Conflict", [412] = "Precondition Failed",
  [413] = "Payload Too Large", [429] = "Too Many Requests", [500] = "Internal Server Error",
  [502] = "Bad Gateway", [503] = "Service Unavailable", [504] = "Gateway Timeout",
}

--- Removes secrets (SAS signatures, keys, bearer tokens) from text meant for people.
function M.redact(text)
  if type(text) ~= "string" then return text end
  text = text:gsub("([Ss][Ii][Gg]=)[^&%s\"';]+", "%1<redacted>")
  text = text:gsub("([Ss]hared[Aa]ccess[Kk]ey=)[^;%s\"']+", "%1<redacted>")
  -- a token (sr=...&sig=...), not prose such as "the SharedAccessSignature expired at ..."
  text = text:gsub("([Ss]hared[Aa]ccess[Ss]ignature[=%s]+)[%w%%]+=[^;\"'%s]*", "%1<redacted>")
  text = text:gsub("(%a[%w+.-]*://)[^/@%s]+@", "%1<redacted>@") -- user:password@ in URLs
  text = text:gsub("([Bb]earer%s+)[%w%-%._~%+/]+=*", "%1<redacted>")
  return text
end

-- Library frames are skipped when blaming a misuse, so the message points at the caller's line.
local function in_library(source)
  return source:find("[/@\\]iothub[/\\][%w_/\\]*%.lua$") ~= nil
end

--- Raises for misuse (wrong argument types, unknown options): a programming error, not a
-- runtime failure. The position is the first frame outside the library, skipping C frames
-- such as pcall, so `file:line:` names the line the caller has to fix.
function M.misuse(message)
  local level = 2
  while true do
    local info = debug.getinfo(level, "S")
    if not info or (info.what ~= "C" and not in_library(info.source)) then break end
    level = level + 1
  end
  error(message, level)
end

local Error = {}
Error.__index = Error

function Error.__tostring(e)
  local parts = { "iothub:" }
  if e.operation then
    parts[#parts + 1] = e.target and (e.operation .. " '" .. tostring(e.target) .. "'") or e.operation
    parts[#parts + 1] = "failed:"
  end
  if e.status then
    parts[#parts + 1] = "HTTP " .. tostring(e.status)
  end
  if e.code then
    parts[#parts + 1] = e.errorCode and (e.code .. " (" .. tostring(e.errorCode) .. ")") or e.code
  elseif e.errorCode then
    parts[#parts + 1] = tostring(e.errorCode)
  end
  local msg = table.concat(parts, " ")
  if e.message then
    msg = msg .. (msg:sub(-1) == ":" and " " or ": ") .. e.message
  end
  local extra = {}
  if e.trackingId then extra[#extra + 1] = "trackingId=" .. e.trackingId end
  if e.requestId then extra[#extra + 1] = "requestId=" .. e.requestId end
  if e.attempts and e.attempts > 1 then extra[#extra + 1] = "after " .. e.attempts .. " attempts" end
  if #extra > 0 then msg = msg .. " [" .. table.concat(extra, ", ") .. "]" end
  return M.redact(msg)
end

--- Builds an error value. Messages are redacted on the way in, so nothing that holds an
-- error can leak a secret through it.
function M.new(fields)
  fields.message = M.redact(fields.message)
  if fields.code and not fields.errorCode then fields.errorCode = NUMBERS[fields.code] end
  if fields.errorCode and not fields.code then fields.code = NAMES[fields.errorCode] end
  if fields.retryable == nil then fields.retryable = false end
  return setmetatable(fields, Error)
end

function M.is(value)
  return getmetatable(value) == Error
end

--- Bad input detected before any request is sent.
function M.invalid(message, context)
  return M.new({ kind = "invalid_argument", code = "InvalidArgument", message = message,
    operation = context and context.operation, target = context and context.target })
end

--- A transport failure ({kind, code, message} from the transport) in the context of an operation.
function M.transport(terr, context)
  return M.new({
    kind = terr.kind or "network", code = terr.code, message = terr.message,
    retryable = core.retryable(nil, terr.kind or "network"), operation = context.operation, target = context.target,
    requestId = context.requestId,
  })
end

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Fills e from one decoded envelope, descending into nested envelopes (the hub wraps
-- `{"errorCode":..}` or another `{"Message":"ErrorCode:X;..."}` inside Message strings).
local function read_envelope(e, body, depth)
  if type(body) ~= "table" or depth > 4 then return end
  local number = body.errorCode or body.ErrorCode
  if math.type and math.type(number) == "float" then number = math.tointeger(number) end
  if type(number) == "number" then e.errorCode = number end
  local tracking = body.trackingId or body.TrackingId
  if type(tracking) == "string" and tracking ~= "" then e.trackingId = tracking end
  local message = body.message or body.Message
  local exception = body.ExceptionMessage
  if type(exception) == "string" then
    local id = exception:match("Tracking ID:%s*(%S+)")
    if id and not e.trackingId then e.trackingId = id end
  end
  if type(message) ~= "string" then return end
  message = trim(message)
  if message:sub(1, 1) == "{" then
    local inner = core.json_decode(message)
    if type(inner) == "table" then return read_envelope(e, inner, depth + 1) end
  end
  local name, rest = message:match("^ErrorCode:%s*([%w_]+);?(.*)$")
  if name then
    e.code = e.code or name
    message = trim(rest)
  end
  -- "Error: 429 {...nested envelope...}" carries the innermost, most specific message.
  local nested = message:match("(%b{})")
  if nested then
    local inner = core.json_decode(nested)
    if type(inner) == "table" and (inner.Message or inner.message or inner.errorCode) then
      local before = e.message
      read_envelope(e, inner, depth + 1)
      if e.message ~= before then return end
    end
  end
  if message ~= "" then e.message = message end
end

--- Is this answer an HTML page (a proxy's or load balancer's error page, not the hub's JSON)?
function M.is_html(res)
  local content_type = res.headers and res.headers["content-type"]
  if type(content_type) == "string" and content_type:lower():find("text/html", 1, true) then return true end
  local body = res.body
  return type(body) == "string" and body:match("^%s*<[%a!]") ~= nil
end

local TEXT_MAX = 200

-- A body that is not JSON, as a readable message: an HTML page by its title (or its text),
-- anything else with control and non-ASCII bytes shown as '?', both cut to TEXT_MAX.
local function body_text(res)
  local body, prefix = res.body, ""
  if M.is_html(res) then
    local title = body:match("<[Tt][Ii][Tt][Ll][Ee][^>]*>(.-)</[Tt][Ii][Tt][Ll][Ee]>")
    body = title or body:gsub("<!%-%-.-%-%->", " "):gsub("<[^>]*>", " ")
    prefix = "an HTML page, as a proxy in between sends: "
  end
  body = trim(body:gsub("%s+", " "):gsub("[%z\1-\31\127-\255]", "?"))
  if #body > TEXT_MAX then body = body:sub(1, TEXT_MAX) .. "..." end
  return prefix .. body
end

--- Builds an error from a non-2xx HTTP response.
-- Sources, in order: the `iothub-errorcode` header, then envelope B
-- (`{"errorCode":404103,"trackingId":...,"message":...}`), then envelope A
-- (`{"Message":"ErrorCode:X;text","ExceptionMessage":"Tracking ID:..."}`), nested or not.
function M.from_response(res, context)
  local e = { kind = "service", status = res.status, operation = context.operation,
    target = context.target, requestId = context.requestId }
  local headers = res.headers or {}
  local header_code = headers["iothub-errorcode"]
  if header_code and header_code ~= "" then e.code = header_code end
  local body = res.body
  if type(body) == "string" and body ~= "" then
    local decoded = core.json_decode(body)
    if type(decoded) == "table" then
      read_envelope(e, decoded, 0)
    else
      e.message = body_text(res)
    end
  end
  if e.code and e.errorCode and NUMBERS[e.code] and NUMBERS[e.code] ~= e.errorCode then
    -- Header name and body number disagree: trust the number, it is the more specific.
    e.code = NAMES[e.errorCode] or e.code
  end
  if not e.message or e.message == "" then e.message = REASONS[res.status] or ("HTTP " .. tostring(res.status)) end
  e.retryable = core.retryable(res.status)
  return M.new(e)
end

return M
