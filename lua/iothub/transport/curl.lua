-- HTTP transport for the request pipeline, on top of iothub.curl.
--
--   local t = require("iothub.transport.curl").new{ caFile = "...", timeout = 30 }
--   local res, err = t:request{ method = "GET", url = "...", headers = { "A: b" } }
--   -- res = { status, headers, body }; err = { kind = "timeout"|"tls"|"network"|"protocol", code, message }
--
-- request() blocks on one reused easy handle (keep-alive). submit()/poll() share one
-- multi handle for concurrent transfers; requestCooperative() drives that multi
-- handle between calls to a caller-supplied sleep(seconds), so a scheduler
-- (cqueues, ...) can run other coroutines while a request is in flight.
--
-- Per request costs matter (a monitor polls for hours): the transport's options are given to
-- each handle once, when it is created; a request passes only its own fields, positionally,
-- and the C side reuses its header list and buffers.
local curl = require "iothub.curl"

local CurlTransport = {}
CurlTransport.__index = CurlTransport

local OPTION_TYPES = {
  caFile = "string", verify = "boolean", proxy = "string", noProxy = "string",
  timeout = "number", connectTimeout = "number", maxBody = "number", verbose = "boolean",
}
local METHODS = { GET = true, PUT = true, POST = true, PATCH = true, DELETE = true }

local function check_options(opts, what, level)
  for k, v in pairs(opts) do
    local want = OPTION_TYPES[k]
    if want and type(v) ~= want then
      error(("%s: option '%s' must be a %s, got %s"):format(what, k, want, type(v)), level + 1)
    end
    if want == "number" and (v < 0 or v ~= v) then -- v ~= v: NaN
      error(("%s: option '%s' must be a non-negative number"):format(what, k), level + 1)
    end
  end
end

function CurlTransport.new(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("CurlTransport.new: options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k in pairs(opts) do
    if not OPTION_TYPES[k] then error("CurlTransport.new: unknown option '" .. tostring(k) .. "'", 2) end
  end
  check_options(opts, "CurlTransport.new", 2)
  local self = setmetatable({
    -- what each iothub.curl handle is created with (its defaults for every request)
    handleOptions = {
      caFile = opts.caFile, verify = opts.verify ~= false, proxy = opts.proxy, noProxy = opts.noProxy,
      verbose = opts.verbose, timeout = opts.timeout, connectTimeout = opts.connectTimeout,
      maxBody = opts.maxBody,
    },
    ready = {},        -- completed submit() transfers not yet returned by poll()
    claimed = {},      -- ids owned by requestCooperative() callers
    claimedDone = {},  -- their results, keyed by id
    inflight = 0,      -- submitted, not yet completed, not claimed
    closed = false,
  }, CurlTransport)
  return self
end

-- Classifies a libcurl failure for retry policies.
local TLS_CODES = {
  CURLE_PEER_FAILED_VERIFICATION = true, CURLE_USE_SSL_FAILED = true,
}
-- An answer came but is broken (cut short before its Content-Length, undecodable).
local PROTOCOL_CODES = {
  CURLE_PARTIAL_FILE = "the answer was cut short: ",
  CURLE_BAD_CONTENT_ENCODING = "the answer's body cannot be decoded: ",
}
local function make_error(message, code)
  local kind = "network"
  if code == "CURLE_OPERATION_TIMEDOUT" then
    kind = "timeout"
  elseif TLS_CODES[code] or (type(code) == "string" and code:find("^CURLE_SSL")) then
    kind = "tls"
  elseif PROTOCOL_CODES[code] then
    kind, message = "protocol", PROTOCOL_CODES[code] .. tostring(message)
  end
  return { kind = kind, code = code, message = message }
end
CurlTransport.classify = make_error

-- Raises on a malformed request (a bug in the caller). Plain comparisons only: this runs on
-- every request, so it allocates nothing.
local function check_number(v, name, level)
  if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then -- v ~= v: NaN
    error(("CurlTransport: request.%s must be a non-negative number"):format(name), level + 1)
  end
end

function CurlTransport:_check(req, level)
  if self.closed then error("CurlTransport: transport is closed", level + 1) end
  if type(req) ~= "table" then error("CurlTransport: request must be a table, got " .. type(req), level + 1) end
  local method = req.method
  if type(method) ~= "string" or not METHODS[method] then
    error("CurlTransport: request.method must be GET, PUT, POST, PATCH or DELETE, got " .. tostring(method), level + 1)
  end
  if type(req.url) ~= "string" then error("CurlTransport: request.url must be a string", level + 1) end
  local headers, body = req.headers, req.body
  if headers ~= nil and type(headers) ~= "table" then
    error("CurlTransport: request.headers must be an array of strings", level + 1)
  end
  if body ~= nil and type(body) ~= "string" then
    error("CurlTransport: request.body must be a string or nil", level + 1)
  end
  check_number(req.timeout, "timeout", level + 1)
  check_number(req.connectTimeout, "connectTimeout", level + 1)
  check_number(req.maxBody, "maxBody", level + 1)
end

function CurlTransport:request(req)
  self:_check(req, 2)
  local e = self.easy
  if not e then
    local msg, code
    e, msg, code = curl.easy(self.handleOptions)
    if not e then return nil, make_error(msg, code) end
    self.easy = e
  end
  local res, msg, code = e:request(req.method, req.url, req.headers, req.body, req.timeout,
    req.connectTimeout, req.maxBody)
  if not res then return nil, make_error(msg, code) end
  return res
end

function CurlTransport:_multi()
  if not self.multi then
    local m, msg, code = curl.multi(self.handleOptions)
    if not m then return nil, make_error(msg, code) end
    self.multi = m
  end
  return self.multi
end

-- A completed() record { id, status, headers, body } serves as the response itself.
local function to_entry(r)
  if r.error then return { id = r.id, err = make_error(r.error, r.code) } end
  return { id = r.id, res = r }
end

-- Moves finished transfers out of the multi handle, routing claimed ids aside.
function CurlTransport:_drain()
  for _, r in ipairs(self.multi:completed()) do
    local entry = to_entry(r)
    if self.claimed[r.id] then
      self.claimedDone[r.id] = entry
    else
      self.inflight = self.inflight - 1
      self.ready[#self.ready + 1] = entry
    end
  end
end

function CurlTransport:_add(req)
  local m, err = self:_multi()
  if not m then return nil, err end
  local id, msg, code = m:submit(req.method, req.url, req.headers, req.body, req.timeout,
    req.connectTimeout, req.maxBody)
  if not id then return nil, make_error(msg, code) end
  return id
end

-- Queues a request on the multi handle; returns its id (or nil, err).
function CurlTransport:submit(req)
  self:_check(req, 2)
  local id, err = self:_add(req)
  if id then self.inflight = self.inflight + 1 end
  return id, err
end

-- Drives transfers; waits at most waitSeconds when nothing has finished yet.
-- Returns { { id =, res = } | { id =, err = } ... } for submit()ted requests.
function CurlTransport:poll(waitSeconds)
  if self.closed then error("CurlTransport: transport is closed", 2) end
  if waitSeconds ~= nil and (type(waitSeconds) ~= "number" or waitSeconds < 0 or waitSeconds ~= waitSeconds) then
    error("CurlTransport:poll: waitSeconds must be a non-negative number", 2)
  end
  if self.multi then
    self.multi:perform()
    self:_drain()
    if #self.ready == 0 and self.inflight > 0 and (waitSeconds or 0) > 0 then
      self.multi:wait(waitSeconds)
      self.multi:perform()
      self:_drain()
    end
  end
  local out = self.ready
  self.ready = {}
  return out
end

-- Abandons a submit()ted request; true if it was still pending.
function CurlTransport:cancel(id)
  if self.closed or not self.multi or self.claimed[id] then return false end
  for i, entry in ipairs(self.ready) do
    if entry.id == id then table.remove(self.ready, i); return true end
  end
  local ok = self.multi:cancel(id)
  if ok then self.inflight = self.inflight - 1 end
  return ok
end

local MIN_SLEEP, MAX_SLEEP = 0.01, 0.05

-- Like request(), but never blocks inside C: polls the multi handle and calls
-- sleep(seconds) in between, so sleep may yield to a scheduler.
function CurlTransport:requestCooperative(req, sleep)
  if type(sleep) ~= "function" then
    error("CurlTransport:requestCooperative: sleep must be a function", 2)
  end
  self:_check(req, 2)
  local id, err = self:_add(req)
  if not id then return nil, err end
  self.claimed[id] = true
  local interval = MIN_SLEEP
  while true do
    local m = self.multi
    if not m or self.closed then
      self.claimed[id] = nil
      return nil, make_error("transport closed while a request was in flight", "Closed")
    end
    m:perform()
    self:_drain()
    local entry = self.claimedDone[id]
    if entry then
      self.claimed[id], self.claimedDone[id] = nil, nil
      return entry.res, entry.err
    end
    local want = m:timeout()
    local pause = interval
    if want >= 0 and want < pause then pause = math.max(want, MIN_SLEEP) end
    local ok, e = pcall(sleep, pause)
    if not ok then -- the caller is being torn down: do not leave the transfer behind
      if self.multi then self.multi:cancel(id) end
      self.claimed[id], self.claimedDone[id] = nil, nil
      error(e, 0)
    end
    interval = math.min(interval * 2, MAX_SLEEP)
  end
end

function CurlTransport:stats()
  if not self.easy then return nil end
  return self.easy:stats()
end

function CurlTransport:close()
  if self.closed then return end
  self.closed = true
  if self.easy then self.easy:close(); self.easy = nil end
  if self.multi then self.multi:close(); self.multi = nil end
  self.ready, self.claimed, self.claimedDone, self.inflight = {}, {}, {}, 0
end

return CurlTransport
