--- Client configuration: connection strings, options and their defaults.
-- @module iothub.config
local core = require "iothub.core"
local errors = require "iothub.errors"
local credentials = require "iothub.credentials"

local M = {}

M.DEFAULT_API_VERSION = "2021-04-12"
M.VERSION = "0.1.0"

-- Every option a client accepts, with the Lua type it must have. Unknown names raise, so a
-- typo such as `caFlie` is caught instead of silently ignored.
local OPTION_TYPES = {
  endpoint = "string", caFile = "string", verify = "boolean", proxy = "string",
  noProxy = "string", apiVersion = "string", timeout = "number", connectTimeout = "number",
  retry = "table|boolean", tokenTtl = "number", tokenRenewBefore = "number",
  userAgent = "string", transport = "table|string", sleep = "function", clock = "table",
  random = "function", onRetry = "function", pageSize = "number",
}

local RETRY_DEFAULTS = {
  maxAttempts = 5,     -- attempts in all, first included
  baseDelay = 1,       -- seconds before the first retry (doubles each time)
  maxDelay = 30,       -- cap on one delay
  throttleDelay = 10,  -- the hub asks throttled callers to wait about 10 s
  jitter = 0.5,        -- up to half of each delay is randomised away
  deadline = 120,      -- seconds one operation may spend on retries in total
}

local function check_options(opts)
  if opts == nil then return {} end
  if type(opts) ~= "table" then errors.misuse("options must be a table, got " .. type(opts)) end
  for name, value in pairs(opts) do
    local want = OPTION_TYPES[name]
    if not want then
      local known = {}
      for k in pairs(OPTION_TYPES) do known[#known + 1] = k end
      table.sort(known)
      errors.misuse("unknown option '" .. tostring(name) .. "' (known options: " .. table.concat(known, ", ") .. ")")
    end
    if not want:find(type(value), 1, true) then
      errors.misuse("option '" .. name .. "' must be a " .. want:gsub("|", " or ") .. ", got " .. type(value))
    end
  end
  if type(opts.retry) == "table" then
    for name, value in pairs(opts.retry) do
      if RETRY_DEFAULTS[name] == nil then
        errors.misuse("unknown retry option '" .. tostring(name) .. "'")
      end
      if type(value) ~= "number" or value < 0 then
        errors.misuse("retry option '" .. name .. "' must be a non-negative number")
      end
    end
  end
  return opts
end

-- Accepts "http(s)://host[:port][/base/path]" and returns it without a trailing slash.
local function check_endpoint(endpoint)
  if not endpoint:match("^https?://[^/?#]+[^?#]*$") then
    return nil, "endpoint '" .. endpoint .. "' must look like https://host[:port] or http://127.0.0.1:8080"
  end
  return (endpoint:gsub("/+$", ""))
end

-- Transports chosen by name; anything else must be an object with request(req).
local TRANSPORT_NAMES = { curl = true, cosocket = true }

-- The `transport` option: nil (chosen at the first request: cosocket inside nginx, curl
-- outside), "curl" (outside nginx only), "cosocket" (inside nginx only) or a transport
-- object (used as given). Returns object, name.
local function check_transport(t)
  if t == nil then return nil, nil end
  if type(t) == "string" then
    if not TRANSPORT_NAMES[t] then
      errors.misuse("option 'transport' must be \"curl\", \"cosocket\" or a transport object, got '" .. t .. "'")
    end
    local in_nginx = require("iothub.transport.cosocket").inNginx()
    if t == "cosocket" and not in_nginx then
      errors.misuse("option transport = \"cosocket\" needs nginx's ngx.socket.tcp (OpenResty or nginx's " ..
        "lua module); outside nginx leave 'transport' unset or use \"curl\"")
    end
    if t == "curl" and in_nginx then
      -- libcurl would block the whole worker on every request; it is never loaded in nginx.
      errors.misuse("option transport = \"curl\" is refused inside nginx: libcurl would block the " ..
        "worker; leave 'transport' unset (cosockets are used) or pass a transport object")
    end
    return nil, t
  end
  if type(t.request) ~= "function" then
    errors.misuse("option 'transport' must be \"curl\", \"cosocket\" or an object with a request(req) method")
  end
  return t, nil
end

local function monotime_clock()
  return { now = core.monotime, time = core.time }
end

--- Builds the shared configuration behind a JobClient or Registry.
-- @param credential an object with :authorization(now)
-- @param host the hub host name the SAS is signed for
function M.build(credential, host, opts)
  opts = check_options(opts)
  local endpoint = "https://" .. host
  if opts.endpoint then
    local checked, msg = check_endpoint(opts.endpoint)
    if not checked then return nil, errors.invalid(msg) end
    endpoint = checked
  end
  local retry
  if opts.retry == false then
    retry = { maxAttempts = 1 }
    for k, v in pairs(RETRY_DEFAULTS) do if k ~= "maxAttempts" then retry[k] = v end end
  else
    retry = {}
    for k, v in pairs(RETRY_DEFAULTS) do retry[k] = v end
    for k, v in pairs(type(opts.retry) == "table" and opts.retry or {}) do retry[k] = v end
  end
  local transport, transport_name = check_transport(opts.transport)
  local clock = opts.clock or monotime_clock()
  if type(clock.now) ~= "function" or type(clock.time) ~= "function" then
    errors.misuse("option 'clock' must have now() (monotonic seconds) and time() (epoch seconds) functions")
  end
  return {
    host = host,
    endpoint = endpoint,
    credential = credential,
    apiVersion = opts.apiVersion or M.DEFAULT_API_VERSION,
    userAgent = opts.userAgent or ("iothub-jobs-lua/" .. M.VERSION),
    timeout = opts.timeout or 60,
    connectTimeout = opts.connectTimeout or 15,
    caFile = opts.caFile, verify = opts.verify, proxy = opts.proxy, noProxy = opts.noProxy,
    transport = transport,          -- an object; else created on first use (iothub.pipeline)
    transportName = transport_name, -- "curl" | "cosocket" | nil (automatic)
    sleep = opts.sleep,
    clock = clock,
    random = opts.random or math.random,
    onRetry = opts.onRetry,
    pageSize = opts.pageSize,
    retry = retry,
    tokenTtl = opts.tokenTtl, tokenRenewBefore = opts.tokenRenewBefore,
  }
end

--- Parses a service connection string into a credential and the host it signs for.
-- Returns credential, host or nil, err. The key never appears in an error.
function M.credential_from_connection_string(cs, opts)
  if type(cs) ~= "string" then
    errors.misuse("connection string must be a string, got " .. type(cs))
  end
  local parts, msg = core.parse_connection_string(cs)
  if not parts then
    return nil, errors.new({ kind = "invalid_argument", code = "InvalidConnectionString", message = msg })
  end
  if parts.sharedAccessSignature then
    local cred, why = credentials.sas_token(parts.sharedAccessSignature)
    if not cred then
      return nil, errors.new({ kind = "invalid_argument", code = "InvalidConnectionString",
        message = "SharedAccessSignature: " .. tostring(why) })
    end
    return cred, parts.hostName
  end
  opts = opts or {}
  return credentials.sas_key(parts.hostName, parts.sharedAccessKeyName, parts.sharedAccessKey,
    { ttl = opts.tokenTtl, renewBefore = opts.tokenRenewBefore }), parts.hostName
end

return M
