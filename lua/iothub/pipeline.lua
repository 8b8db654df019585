--- The request pipeline shared by JobClient and Registry:
-- authorize -> build (C core) -> send (transport) -> retry decision (C core) -> decode.
-- @module iothub.pipeline
local core = require "iothub.core"
local errors = require "iothub.errors"
local Scheduler = require "iothub.scheduler"

local Pipeline = {}
Pipeline.__index = Pipeline

local CONTENT_TYPE = "application/json; charset=utf-8"

function Pipeline.new(cfg)
  -- The api-version pair is the whole query of most requests: built once per client.
  return setmetatable({ cfg = cfg, api_query = { { "api-version", cfg.apiVersion } } }, Pipeline)
end

-- Inside nginx (the `ngx` API is present) the cosocket transport module, else nil. Loaded
-- only there, so plain Lua never touches it and nginx never loads libcurl.
local function nginx_support()
  if rawget(_G, "ngx") == nil then return nil end
  local cosocket = require "iothub.transport.cosocket"
  return cosocket.inNginx() and cosocket or nil
end

-- The transport, created on first use so requiring the module does no I/O. Unless the
-- `transport` option names one: cosocket inside nginx (never libcurl, which is not even
-- loaded there: it would block the worker), curl elsewhere.
function Pipeline:transport()
  local cfg = self.cfg
  local t = cfg.transport
  if t then return t end
  local name = cfg.transportName or (nginx_support() and "cosocket" or "curl")
  if name == "cosocket" then
    if cfg.proxy and cfg.proxy ~= "" then
      errors.misuse("option 'proxy' is not supported by the cosocket transport (inside nginx); " ..
        "reach the hub directly or leave 'proxy' unset")
    end
    t = require("iothub.transport.cosocket").new({ caFile = cfg.caFile, verify = cfg.verify,
      timeout = cfg.timeout, connectTimeout = cfg.connectTimeout })
  else
    t = require("iothub.transport.curl").new({ caFile = cfg.caFile, verify = cfg.verify,
      proxy = cfg.proxy, noProxy = cfg.noProxy,
      timeout = cfg.timeout, connectTimeout = cfg.connectTimeout })
  end
  cfg.transport = t
  return t
end

--- How to wait right now: inside an iothub Scheduler task its timers; else a caller-supplied
-- sleep (cqueues.sleep, ...); inside nginx ngx.sleep (raising in phases that cannot yield,
-- since a blocking sleep would stall the worker); else a plain blocking sleep.
function Pipeline:sleep(seconds, override)
  local sched = Scheduler.current()
  if sched then return sched:sleep(seconds) end
  local sleep = override or self.cfg.sleep
  if sleep then return sleep(seconds) end
  local cosocket = nginx_support()
  if cosocket then return cosocket.checkPhase("sleeping between polls or retries").sleep(seconds) end
  return core.sleep(seconds)
end

function Pipeline:now()
  return self.cfg.clock.now()
end

-- One HTTP exchange, chosen to suit the caller: scheduler task -> curl multi; caller sleep
-- -> cooperative polling; otherwise transport:request (a blocking keep-alive request with
-- curl; with cosockets it yields the nginx request or timer until the answer is in).
function Pipeline:exchange(req, sleep)
  local transport = self:transport()
  local sched = Scheduler.current()
  if sched and transport.submit then return sched:http(transport, req) end
  sleep = sleep or self.cfg.sleep
  if sleep and transport.requestCooperative then return transport:requestCooperative(req, sleep) end
  return transport:request(req)
end

-- What an error names: built only when a request fails.
local function error_context(op, request_id)
  return { operation = op.operation, target = op.target, requestId = request_id }
end

-- A 2xx answer whose body cannot be read: the request may well have been done, but its
-- answer is lost, as with a dropped connection (so it is retried like one).
local function unreadable(res, op, request_id, msg)
  return errors.new({ kind = "protocol", code = "InvalidResponse", status = res.status,
    operation = op.operation, target = op.target, requestId = request_id, retryable = core.retryable(nil, "protocol"),
    message = "the hub answered " .. res.status .. " with a body that is not valid JSON (" .. msg ..
      (errors.is_html(res) and "; it is an HTML page, as a proxy in between sends" or "") .. ")" })
end

--- Sends one operation, retrying transient failures.
-- op = { operation=, target=, method=, path=, query={{k,v}}, headers={{k,v}}, body=,
--        retry=(false disables), timeout=, raw=true to return the response instead of decoded
--        JSON, sleep=, activeJobLimitFinal=true to get a 429004 at once (core.retry_decision),
--        onConflict=function(err, uncertain) -> value | nil, err (a 409 answer),
--        onNotFound=function(err, uncertain) -> value | nil, err (a 404 answer) }
-- `uncertain` is true when an earlier attempt of this call got no usable answer (connection
-- lost, timed out, unreadable, or a 5xx): it may have been done, so a 409 can be our own
-- work, and a 404 after a delete the delete itself.
-- Returns decoded, response | nil, err.
function Pipeline:send(op)
  local cfg = self.cfg
  local transport = self:transport()
  -- Fail fast, naming the operation, where nginx cannot run it (init, init_worker, log, ...).
  if transport.checkPhase then transport.checkPhase(op.operation) end
  local policy = cfg.retry
  local max_attempts = op.retry == false and 1 or policy.maxAttempts
  -- One attempt needs no deadline (and no clock read).
  local deadline = max_attempts > 1 and self:now() + policy.deadline or math.huge
  local attempt = 0
  local uncertain = false
  local query = self.api_query
  if op.query then
    query = { query[1] }
    for _, pair in ipairs(op.query) do query[#query + 1] = pair end
  end

  while true do
    attempt = attempt + 1
    local authorization, auth_err = cfg.credential:authorization(cfg.clock.time())
    if not authorization then
      auth_err.operation, auth_err.target = op.operation, op.target
      return nil, auth_err
    end
    local request_id = core.uuid4()
    local headers = {
      { "Authorization", authorization },
      { "Request-Id", request_id },
      { "User-Agent", cfg.userAgent },
      { "Accept", "application/json" },
    }
    if op.body then headers[#headers + 1] = { "Content-Type", CONTENT_TYPE } end
    if op.headers then
      for _, pair in ipairs(op.headers) do headers[#headers + 1] = pair end
    end
    local url, lines = core.build_request({ endpoint = cfg.endpoint, path = op.path,
      query = query, headers = headers })
    if not url then
      return nil, errors.invalid(lines, op)
    end
    local res, terr = self:exchange({ method = op.method, url = url, headers = lines, body = op.body,
      timeout = op.timeout or cfg.timeout, connectTimeout = cfg.connectTimeout }, op.sleep)

    local err, answered
    if res and res.status >= 200 and res.status < 300 then
      if op.raw then return res, res end
      if res.body == nil or res.body == "" then return true, res end
      local decoded, msg = core.json_decode(res.body)
      if decoded ~= nil then return decoded, res end
      err = unreadable(res, op, request_id, msg)
    elseif res then
      answered = true
      err = errors.from_response(res, error_context(op, request_id))
      err.retryAfter = core.retry_after(res.headers and res.headers["retry-after"], cfg.clock.time())
      -- The request may have landed before: an earlier attempt whose response was lost, or
      -- libcurl's own silent resend when a kept-alive connection drops. Find out instead of
      -- reporting a false failure.
      if res.status == 409 and op.onConflict then return op.onConflict(err, uncertain) end
      if res.status == 404 and op.onNotFound then return op.onNotFound(err, uncertain) end
    else
      err = errors.transport(terr, error_context(op, request_id))
    end
    err.attempts = attempt
    if not answered or res.status >= 500 then uncertain = true end

    local delay = core.retry_decision({
      status = answered and res.status or nil, kind = not answered and err.kind or nil,
      errorCode = err.errorCode, activeJobLimitFinal = op.activeJobLimitFinal,
      attempt = attempt, maxAttempts = max_attempts, now = self:now(), deadline = deadline,
      retryAfter = err.retryAfter,
      base = policy.baseDelay, cap = policy.maxDelay, throttleBase = policy.throttleDelay,
      jitter = policy.jitter, random = cfg.random(),
    })
    -- err.retryable is core.retryable's word on the failure itself; running out of attempts
    -- or time does not change it.
    if not delay then return nil, err end
    if cfg.onRetry then
      cfg.onRetry({ operation = op.operation, target = op.target, attempt = attempt,
        delay = delay, error = err })
    end
    self:sleep(delay, op.sleep)
  end
end

--- How long to wait before trying `err`'s request again for the `attempt`th time by this
-- client's retry policy, for callers that keep trying past its attempts and deadline (a
-- rollout waiting for a job slot). nil when err is not worth retrying.
function Pipeline:retry_delay(err, attempt)
  local policy = self.cfg.retry
  return core.retry_decision({ status = err.status, kind = err.status == nil and err.kind or nil,
    attempt = attempt, maxAttempts = math.huge, retryAfter = err.retryAfter,
    base = policy.baseDelay, cap = policy.maxDelay, throttleBase = policy.throttleDelay,
    jitter = policy.jitter, random = self.cfg.random() })
end

--- Like send, but returns just the value, or nil, err (what public methods hand back).
function Pipeline:call(op)
  local value, err = self:send(op)
  if value == nil then return nil, err end
  return value
end

return Pipeline
