-- Test controls under /_emulator/ (same SAS auth as the hub API, no api-version): reset,
-- the request log, fault injection, the job clock, run-time settings, device connection
-- and an explicit state save. http.lua mounts M.routes(io) and calls M.take_fault and
-- M.record around every hub API request.
local util = require "emulator.util"
local errors = require "emulator.errors"
local registry = require "emulator.registry"
local jobs = require "emulator.jobs"
local store = require "emulator.store"

local null = util.null
local M = {}

---------------------------------------------------------------------------
-- Request log: a ring of the last LOG_MAX hub API requests (control routes excluded).

local LOG_MAX = 1000
local log_ring, log_seq, log_cleared = {}, 0, 0

-- entry: method, path, query, route, status, durationMs, requestId, fault
function M.record(entry)
  log_seq = log_seq + 1
  entry.seq = log_seq
  entry.time = util.iso(util.real_now())
  log_ring[(log_seq - 1) % LOG_MAX + 1] = entry
end

local function requests_since(since, limit)
  local out = {}
  local first = math.max(since + 1, log_seq - LOG_MAX + 1, log_cleared + 1)
  for seq = first, log_seq do
    if #out >= limit then break end
    out[#out + 1] = log_ring[(seq - 1) % LOG_MAX + 1]
  end
  return out
end

local function clear_log()
  log_ring, log_cleared = {}, log_seq -- numbers keep growing so a reader's "since" stays meaningful
end

---------------------------------------------------------------------------
-- Faults: the next `count` requests matching method + path fail with a status, answer
-- after a delay, have their connection dropped (before the hub acts, or after it acted), or
-- get their answer mangled on the way out: cut short, not JSON, a proxy's HTML page, or
-- dripped out slowly.

local faults, fault_seq = {}, 0

-- Status -> the error name the hub uses for it (others get a generic <status>000 code).
local DEFAULT_ERROR = {
  [400] = "GenericBadRequest", [401] = "IotHubUnauthorizedAccess", [404] = "DeviceNotFound",
  [408] = "RequestTimeout", [409] = "DeviceAlreadyExists", [412] = "PreconditionFailed",
  [429] = "ThrottlingException", [500] = "ServerError", [503] = "ServiceUnavailable", [504] = "GatewayTimeout",
}

local FAULT_FIELDS = { method = 1, path = 1, count = 1, status = 1, errorCode = 1, message = 1,
  retryAfter = 1, delay = 1, drop = 1, body = 1, drip = 1 }
local FIELD_LIST = "method, path, count, status, errorCode, message, retryAfter, delay, drop, body, drip"

-- body = ...: how the answer's body is mangled.
local BODY_KINDS = { truncated = true, garbage = true, html = true }

local function normalize_path(p)
  -- "/jobs/v2/{jobId}" and "/jobs/v2/:id" both name the route pattern
  return (p:gsub("{[^}/]*}", ":id"))
end

local function bad(msg)
  return nil, errors.new("ArgumentInvalid", msg)
end

local function fault_view(f)
  return {
    id = f.id, method = f.method or "*", path = f.path, remaining = f.remaining,
    status = f.status or null, errorCode = f.errorCode or null, message = f.message or null,
    retryAfter = f.retryAfter or null, delay = f.delay or null, drop = f.drop or false,
    body = f.body or null, drip = f.drip or null,
  }
end

-- A fault's kind for the request log: what the client saw happen.
local function fault_label(f)
  if f.drop then return f.drop == "response" and "drop-response" or "drop" end
  return f.body or (f.drip and "drip") or (f.status and "status") or "delay"
end

local function seconds_field(body, name, lo, hi)
  local v = body[name]
  if v == nil then return true end
  if type(v) ~= "number" or v ~= v or v < lo or v > hi then
    return bad(name .. " must be a number of seconds between " .. lo .. " and " .. hi .. ".")
  end
  return true
end

local function add_fault(body)
  if not util.is_object(body) then return bad("The fault must be a JSON object.") end
  for k in pairs(body) do
    if not FAULT_FIELDS[k] then
      return bad("Unknown fault field '" .. tostring(k) .. "'; use " .. FIELD_LIST .. ".")
    end
  end
  local f = {}
  if body.method ~= nil then
    if type(body.method) ~= "string" or not body.method:match("^[%a*]+$") then
      return bad("method must be an HTTP method such as \"PUT\", or \"*\" for any.")
    end
    if body.method ~= "*" then f.method = body.method:upper() end
  end
  if type(body.path) ~= "string" or body.path:sub(1, 1) ~= "/" and body.path ~= "*" then
    return bad("path is required: a request path (\"/jobs/v2/job1\"), a route (\"/jobs/v2/{id}\"), "
      .. "a prefix ending in '*' (\"/jobs/v2/*\") or \"*\" for every hub API request.")
  end
  if body.path:match("^/_emulator") then return bad("The control routes under /_emulator/ cannot be faulted.") end
  f.path = normalize_path(body.path)
  local count = body.count == nil and 1 or body.count
  if type(count) ~= "number" or count % 1 ~= 0 or count < 1 then
    return bad("count must be a positive integer (the number of requests that fail).")
  end
  f.remaining = count
  if body.status ~= nil then
    if type(body.status) ~= "number" or body.status % 1 ~= 0 or body.status < 400 or body.status > 599 then
      return bad("status must be an HTTP error status between 400 and 599.")
    end
    f.status = body.status
  end
  if body.errorCode ~= nil then
    if f.status == nil then return bad("errorCode needs a status.") end
    if type(body.errorCode) ~= "string" or not errors.catalog[body.errorCode] then
      return bad("errorCode must be an error name the emulator knows, such as ThrottlingException.")
    end
    f.errorCode = body.errorCode
  end
  if body.message ~= nil then
    if type(body.message) ~= "string" or f.status == nil then return bad("message must be a string, with a status.") end
    f.message = body.message
  end
  if body.retryAfter ~= nil then
    local ra = body.retryAfter
    local ok_number = type(ra) == "number" and ra >= 0 and ra <= 86400
    local ok_text = type(ra) == "string" and #ra >= 1 and #ra <= 100 and not ra:find("[%c\128-\255]")
    if not (ok_number or ok_text) or f.status == nil then
      return bad("retryAfter must be seconds (0 to 86400, sent rounded up) or the header's text (e.g. an HTTP-date "
        .. "such as \"Wed, 21 Oct 2015 07:28:00 GMT\", sent as is), with a status.")
    end
    f.retryAfter = ra
  end
  local ok, err = seconds_field(body, "delay", 0, 300)
  if not ok then return nil, err end
  f.delay = body.delay
  ok, err = seconds_field(body, "drip", 0, 300)
  if not ok then return nil, err end
  f.drip = body.drip
  if body.body ~= nil then
    if not BODY_KINDS[body.body] then
      return bad("body must be \"truncated\" (Content-Length promises more than is sent, then the connection "
        .. "closes), \"garbage\" (not JSON) or \"html\" (a proxy's error page, with a status).")
    end
    if body.body == "html" and not f.status then
      return bad("body \"html\" is a proxy's error page: give it a status, e.g. 502 or 503.")
    end
    f.body = body.body
  end
  if body.drop ~= nil then
    local d = body.drop
    if d ~= true and d ~= false and d ~= "request" and d ~= "response" then
      return bad("drop must be true or \"request\" (the request is lost before the hub acts) or \"response\" "
        .. "(the hub acts, then its answer is lost).")
    end
    if d and (f.status or f.body or f.drip) then
      return bad("A fault either answers (status, body, drip) or drops the connection, not both.")
    end
    f.drop = d == true and "request" or d or nil
  end
  if not (f.status or f.delay or f.drop or f.body or f.drip) then
    return bad("Give the fault a kind: status (answer with an error), delay (seconds), drop (close the connection), "
      .. "body (truncated, garbage, html) and/or drip (seconds).")
  end
  fault_seq = fault_seq + 1
  f.id = fault_seq
  faults[#faults + 1] = f
  return f
end

local function fault_matches(f, method, pattern, path)
  if f.method and f.method ~= method then return false end
  local p = f.path
  if p == "*" or p == pattern or p == path then return true end
  return p:sub(-1) == "*" and path:sub(1, #p - 1) == p:sub(1, -2)
end

-- The first fault matching this request, with one use consumed; nil if none.
-- pattern is the route ("/jobs/v2/:id"), path the decoded request path.
function M.take_fault(method, pattern, path)
  for i, f in ipairs(faults) do
    if fault_matches(f, method, pattern, path) then
      f.remaining = f.remaining - 1
      if f.remaining <= 0 then table.remove(faults, i) end
      return f, fault_label(f)
    end
  end
end

-- Does this fault change how the answer goes out (so the response must pass through
-- M.send_faulted instead of nginx's own output)?
function M.mangles_response(f)
  return f.body ~= nil or f.drip ~= nil or f.drop == "response"
end

-- The error object a status fault answers with.
function M.fault_error(f)
  local name = f.errorCode or DEFAULT_ERROR[f.status] or "InjectedFault"
  local err = errors.new(name, f.message or ("Injected fault: HTTP " .. f.status .. " (" .. name .. ")."))
  if not errors.catalog[name] then err.code = f.status * 1000 end
  err.status = f.status
  if f.retryAfter then
    local ra = f.retryAfter
    err.headers = { ["Retry-After"] = type(ra) == "number" and tostring(math.ceil(ra)) or ra }
  end
  return err
end

local DRIP_PIECES = 10

local REASONS = { [200] = "OK", [204] = "No Content", [400] = "Bad Request", [404] = "Not Found",
  [409] = "Conflict", [412] = "Precondition Failed", [429] = "Too Many Requests",
  [500] = "Internal Server Error", [502] = "Bad Gateway", [503] = "Service Unavailable",
  [504] = "Gateway Timeout" }

-- Bodies of the mangling faults. Both echo the request's Authorization header, as some
-- debugging proxies do, so specs can check the client never repeats a secret it is shown.
local function garbage_body(authorization)
  return "<<emulator: this is not JSON>> {\"status\": \"runn\0\1\2\255 Authorization: " .. authorization
end

local function html_body(status, authorization)
  local title = status .. " " .. (REASONS[status] or "Error")
  return "<html>\r\n<head><title>" .. title .. "</title></head>\r\n<body>\r\n<center><h1>" .. title
    .. "</h1></center>\r\n<hr><center>nginx</center>\r\n<!-- upstream request header: Authorization: "
    .. authorization .. " -->\r\n</body>\r\n</html>\r\n"
end

-- Writes the answer (status, header name -> value, body) as the fault says, on the raw
-- connection: nginx's own output would fix the framing the fault means to break. The
-- connection is closed afterwards; returns true when that is done (the caller ends the
-- request with 444), or nil, message when the raw socket could not be had.
function M.send_faulted(f, status, headers, body, authorization)
  body = body or ""
  if f.drop == "response" then return true end -- the hub acted; its answer is lost
  local content_type = "application/json; charset=utf-8"
  if f.body == "garbage" then
    body = garbage_body(authorization or "")
  elseif f.body == "html" then
    -- A proxy answered, not the hub: none of the hub's headers, but a Retry-After if asked.
    body, content_type = html_body(status, authorization or ""), "text/html"
    headers = { ["Retry-After"] = headers["Retry-After"] }
  end
  local lines = { "HTTP/1.1 " .. status .. " " .. (REASONS[status] or "Unknown") }
  for k, v in pairs(headers) do
    local lk = k:lower()
    if lk ~= "content-type" and lk ~= "content-length" and lk ~= "connection" then
      lines[#lines + 1] = k .. ": " .. tostring(v)
    end
  end
  lines[#lines + 1] = "Content-Type: " .. content_type
  -- An empty answer (204) has no body to cut or replace: it goes out whole (clients accept
  -- even a 204 whose headers stop short, so there is nothing else to break).
  local sent_body = status == 204 and "" or body
  if status ~= 204 then
    lines[#lines + 1] = "Content-Length: " .. #body
    if f.body == "truncated" then sent_body = body:sub(1, math.floor(#body / 2)) end
  end
  lines[#lines + 1] = "Connection: close"
  local data = table.concat(lines, "\r\n") .. "\r\n\r\n" .. sent_body
  local sock, err = ngx.req.socket(true)
  if not sock then return nil, "no raw socket for the faulted answer: " .. tostring(err) end
  if f.drip and f.drip > 0 then
    -- DRIP_PIECES pieces with equal pauses between them: the last byte leaves after `drip` s.
    local size = math.ceil(#data / DRIP_PIECES)
    local pause = f.drip / math.max(1, math.ceil(#data / size) - 1)
    for i = 1, #data, size do
      if i > 1 then ngx.sleep(pause) end
      local ok, serr = sock:send(data:sub(i, i + size - 1))
      if not ok then return nil, "dripping the answer: " .. tostring(serr) end -- the client left
    end
  else
    sock:send(data)
  end
  return true
end

---------------------------------------------------------------------------
-- Handlers. api: send(status, value), json_body(required), arg(req, name), reset_devices()

local function clock_view()
  return {
    now = util.iso(util.now()),
    realNow = util.iso(util.real_now()),
    offsetSeconds = util.clock_offset(),
  }
end

local function check(v, err)
  if v == nil then error(err, 0) end
  return v
end

local CONFIG_FIELDS = { jobRate = "rate", maxActiveJobs = "max_active", tier = "tier" }

function M.routes(api)
  local send, json_body, arg = api.send, api.json_body, api.arg

  local function reset()
    jobs.reset()
    registry.reset()
    api.reset_devices()
    util.set_clock_offset(0)
    faults = {}
    clear_log()
    store.mark("registry")
    store.mark("jobs")
    util.log("hub", "reset to the initial state")
    send(200, { status = "ok" })
  end

  local function get_requests(req)
    local since = tonumber(arg(req, "since") or "0")
    local limit = tonumber(arg(req, "limit") or tostring(LOG_MAX))
    if not since or since < 0 or not limit or limit < 1 then
      error(errors.new("ArgumentInvalid", "since must be a sequence number >= 0 and limit a count >= 1."), 0)
    end
    send(200, { requests = util.array(requests_since(math.floor(since), math.floor(limit))), last = log_seq })
  end

  local function get_faults()
    local list = {}
    for i, f in ipairs(faults) do list[i] = fault_view(f) end
    send(200, { faults = util.array(list) })
  end

  local function post_fault()
    send(200, fault_view(check(add_fault(json_body(true)))))
  end

  local function delete_fault(req)
    local id = tonumber(req.params[1])
    for i, f in ipairs(faults) do
      if f.id == id then
        table.remove(faults, i)
        return send(204)
      end
    end
    error(errors.new("InvalidOperation", "No fault with id '" .. tostring(req.params[1]) .. "' is pending."), 0)
  end

  local function post_clock()
    local body = json_body(true)
    if not util.is_object(body) then error(errors.new("ArgumentInvalid", "The body must be a JSON object."), 0) end
    local seconds = body.advanceSeconds
    if body.to ~= nil then
      local t = type(body.to) == "string" and util.core.parse_time(body.to)
      if not t then error(errors.new("ArgumentInvalid", "to must be an ISO-8601 date-time."), 0) end
      seconds = t - util.now()
      if seconds < 0 then
        error(errors.new("ArgumentInvalid", "The clock only moves forward; 'to' is " .. string.format("%.3f", -seconds)
          .. " s before the emulator's now (" .. util.iso(util.now()) .. ")."), 0)
      end
    end
    local ok, err = util.advance_clock(seconds)
    if not ok then
      error(errors.new("ArgumentInvalid", "Give advanceSeconds (a number >= 0) or to (an ISO-8601 time): " .. err), 0)
    end
    store.mark("jobs") -- the offset is saved with the jobs
    util.log("hub", string.format("clock advanced by %.3f s (offset %.3f s)", seconds, util.clock_offset()))
    send(200, clock_view())
  end

  local function get_config()
    local t = jobs.describe_settings()
    t.stateDir = store.dir() or null
    send(200, t)
  end

  local function patch_config()
    local body = json_body(true)
    if not util.is_object(body) then error(errors.new("ArgumentInvalid", "The body must be a JSON object."), 0) end
    local opts = {}
    for k, v in pairs(body) do
      local name = CONFIG_FIELDS[k]
      if not name then
        error(errors.new("ArgumentInvalid", "Unknown setting '" .. tostring(k) .. "'; use jobRate, maxActiveJobs or tier."), 0)
      end
      opts[name] = v
    end
    local ok, err = jobs.configure(opts)
    if not ok then error(errors.new("ArgumentInvalid", err), 0) end
    get_config()
  end

  local function post_connection(req)
    local body = json_body(true)
    if not util.is_object(body) or type(body.connected) ~= "boolean" then
      error(errors.new("ArgumentInvalid", "The body must be {\"connected\": true|false}."), 0)
    end
    local dev = check(registry.lookup(req.params[1]))
    check(registry.set_connected(dev, body.connected))
    util.log("hub", "device " .. dev.id .. (body.connected and " connected" or " disconnected"))
    send(200, { deviceId = dev.id, connectionState = registry.is_connected(dev) and "Connected" or "Disconnected" })
  end

  local function save_state()
    local written, err = store.flush(true)
    if not written then error(errors.new("ServerError", err), 0) end
    send(200, { stateDir = store.dir() or null, saved = util.array(written) })
  end

  return {
    { "POST", "/_emulator/reset", reset },
    { "GET", "/_emulator/requests", get_requests },
    { "DELETE", "/_emulator/requests", function() clear_log(); send(204) end },
    { "GET", "/_emulator/faults", get_faults },
    { "POST", "/_emulator/faults", post_fault },
    { "DELETE", "/_emulator/faults", function() faults = {}; send(204) end },
    { "DELETE", "/_emulator/faults/:id", delete_fault },
    { "GET", "/_emulator/clock", function() send(200, clock_view()) end },
    { "POST", "/_emulator/clock", post_clock },
    { "GET", "/_emulator/config", get_config },
    { "PATCH", "/_emulator/config", patch_config },
    { "POST", "/_emulator/devices/:id/connection", post_connection },
    { "POST", "/_emulator/state/save", save_state },
  }
end

return M
