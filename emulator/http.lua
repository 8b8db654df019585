-- Request routing, auth, paging, error rendering, the request log and fault injection.
--   init_by_lua:        require("emulator.http").init{ host=, key=, policy=, devices=, log=, tier=, state_dir=, ... }
--   init_worker_by_lua: require("emulator.http").init_worker()
--   exit_worker_by_lua: require("emulator.http").exit_worker()
--   content_by_lua:     require("emulator.http").handle()
local util = require "emulator.util"
local errors = require "emulator.errors"
local auth = require "emulator.auth"
local registry = require "emulator.registry"
local methods = require "emulator.methods"
local jobs = require "emulator.jobs"
local query = require "emulator.query"
local devices_file = require "emulator.devices_file"
local control = require "emulator.control"
local store = require "emulator.store"
local limits = require "emulator.limits"

local core = util.core
local M = {}

local settings = { max_page = 1000, default_page = 100, devices = nil }

-- Registers the devices file's simulated devices (at start-up and on a control reset).
local function seed_devices()
  local path = settings.devices
  if not path or path == "" then return end
  local defs, err = devices_file.load(path, { limits = settings.sandbox })
  if not defs then error("devices file " .. tostring(err), 0) end
  for _, def in ipairs(defs) do assert(registry.add(def)) end
  util.log("hub", string.format("%d simulated device(s) from %s", #defs, path))
end

-- State kept across restarts when the launcher gives a state dir: the registry and the jobs,
-- plus the clock offset (emulator/store.lua).
local function setup_store(dir)
  local restored = store.init(dir)
  if restored then
    local s = jobs.summary()
    util.log("hub", string.format("state restored from %s (%s): %d job(s), %d active, %d device(s)",
      dir, restored, s.jobs, s.active, #registry.list()))
  end
end

function M.init(opts)
  local seed = 0
  for b in util.random_bytes(4):gmatch(".") do seed = seed * 256 + b:byte() end
  math.randomseed(seed)
  util.set_log_path(opts.log)
  auth.configure({ host = opts.host, policies = { [opts.policy or "iothubowner"] = opts.key },
    policies_spec = opts.policies_spec })
  local ok, err = jobs.configure({ rate = opts.job_rate, queue_delay = opts.queue_delay,
    max_active = opts.max_active_jobs, tier = opts.tier })
  if not ok then error(err, 0) end
  limits.configure({ client_timeout = opts.client_timeout })
  settings.devices = opts.devices
  settings.instance = opts.instance ~= "" and opts.instance or nil
  local why
  settings.sandbox, why = core.sandbox_limits({ memory = opts.sandbox_memory, instructions = opts.sandbox_instructions,
    seconds = opts.sandbox_seconds })
  if not settings.sandbox then error(why, 0) end
  local seeded, problem = pcall(seed_devices)
  if not seeded then
    -- A bad devices file ends the start with its message alone, not nginx's traceback (the
    -- launcher checks the file first, so this is for a file changed in between).
    io.stderr:write("iothub-emulator: ", tostring(problem), "\n")
    os.exit(2)
  end
  setup_store(opts.state_dir)
end

-- In the worker: the state store's connection (reloading the state when this worker
-- replaces one that crashed), then the timers (restored jobs resume). A worker that cannot
-- load the state answers every request with the reason rather than serve stale state.
function M.init_worker()
  local ok, res = pcall(store.start)
  if not ok then
    settings.broken = tostring(res)
    ngx.log(ngx.ALERT, "the state could not be loaded: ", settings.broken)
    return
  end
  if res then util.log("hub", res) end
  jobs.start_engine()
end

-- The worker is exiting (SIGTERM/SIGINT/reload): the last commit.
function M.exit_worker()
  store.stop()
end

---------------------------------------------------------------------------
-- Responses

local JSON_TYPE = "application/json; charset=utf-8"

local send_error
local send_faulted -- below: the answer of a request whose response a fault mangles
-- Requests in flight whose answer a fault mangles: while there are none, send() does not
-- touch ngx.ctx (whose first use costs a table per request).
local mangled_in_flight = 0

-- Every response commits the state changes made so far first (emulator/store.lua): what a
-- client is told or shown is on disk. When that fails, the answer is the failure.
local function send(status, value, headers)
  local saved, why = store.commit()
  if not saved and status < 400 then
    return send_error(errors.new("ServerError", "The change could not be saved: " .. why))
  end
  if mangled_in_flight > 0 and ngx.ctx.response_fault then return send_faulted(status, value, headers) end
  ngx.status = status
  ngx.header["Content-Type"] = JSON_TYPE
  ngx.header["x-ms-request-id"] = core.uuid4()
  for k, v in pairs(headers or {}) do ngx.header[k] = v end
  if value ~= nil then
    local body, err = util.json_encode(value)
    if not body then error("cannot encode the response: " .. tostring(err)) end
    ngx.header["Content-Length"] = #body
    ngx.print(body)
  end
end

-- The answer as send() would give it, handed to the fault that mangles it on the raw
-- connection (which is then closed: handle() ends the request with 444).
function send_faulted(status, value, headers)
  local fault = ngx.ctx.response_fault
  ngx.ctx.response_fault = nil -- one answer per request
  mangled_in_flight = mangled_in_flight - 1
  local all = { ["x-ms-request-id"] = core.uuid4() }
  for k, v in pairs(headers or {}) do all[k] = v end
  local body = ""
  if value ~= nil then
    local err
    body, err = util.json_encode(value)
    if not body then error("cannot encode the response: " .. tostring(err)) end
  end
  ngx.status = status -- for the access log and the request log
  ngx.req.read_body() -- the raw socket is only had once the request body is out of the way
  local authorization = ngx.req.get_headers()["authorization"]
  if type(authorization) == "table" then authorization = authorization[1] end
  local ok, err = control.send_faulted(fault, status, all, body, authorization)
  if not ok then ngx.log(ngx.ERR, err) end
  ngx.ctx.closed, ngx.ctx.answer_lost = true, fault.drop == "response"
end

local function tracking_id(t)
  return (core.uuid4():gsub("-", "")) .. "-G:0-TimeStamp:" .. os.date("!%m/%d/%Y %H:%M:%S", math.floor(t))
end

-- Envelope B inside Message, as the current service sends it, plus the header the
-- .NET SDK cross-checks against the numeric code.
function send_error(err)
  local t = util.now()
  local inner = { errorCode = err.code, trackingId = tracking_id(t), message = err.message, timestampUtc = util.iso(t) }
  if err.info then inner.info = err.info end
  local headers = { ["iothub-errorcode"] = err.name }
  for k, v in pairs(err.headers or {}) do headers[k] = v end -- e.g. an injected fault's Retry-After
  send(err.status, { Message = util.json_encode(inner), ExceptionMessage = "" }, headers)
end
M.send_error = send_error

-- Returns the decoded JSON body, nil for an empty optional body, or raises an error object.
-- max_bytes: a smaller limit than nginx's for this route, checked before decoding.
local function json_body(required, max_bytes)
  local data = limits.read_body()
  if max_bytes and data and #data > max_bytes then
    error(errors.new("MessageTooLarge", "The request body is " .. #data .. " bytes; this route accepts at most "
      .. max_bytes .. "."), 0)
  end
  if not data or data:match("^%s*$") then
    if required then error(errors.new("ArgumentNull", "The request body is empty."), 0) end
    return nil
  end
  local v, err = util.json_decode(data)
  if v == nil then error(errors.new("IotHubFormatError", "The request body is not valid JSON: " .. tostring(err)), 0) end
  return v
end

local function check(v, err)
  if v == nil then error(err, 0) end
  return v
end

---------------------------------------------------------------------------
-- Paging: x-ms-max-item-count / x-ms-continuation (an opaque base64 offset)

local function encode_token(offset)
  return core.base64_encode("emu1:" .. offset)
end

local function decode_token(tok)
  local raw = core.base64_decode(tok)
  local offset = raw and tonumber(raw:match("^emu1:(%d+)$"))
  if not offset then error(errors.new("ArgumentInvalid", "The continuation token is not valid."), 0) end
  return offset
end

-- items: an array paged by offset, or a pager fn(continuation|nil, size) that returns
-- page, next_continuation (nil on the last page) or nil, message for a token it does not know.
local function send_page(items, item_type, headers_in)
  local size = tonumber(headers_in["x-ms-max-item-count"]) or settings.default_page
  size = math.max(1, math.min(settings.max_page, math.floor(size)))
  local tok = headers_in["x-ms-continuation"]
  if type(tok) == "table" then tok = tok[1] end
  if tok == "" then tok = nil end
  local page, next_tok
  if type(items) == "function" then
    page, next_tok = items(tok, size)
    if not page then error(errors.new("ArgumentInvalid", next_tok), 0) end
  else
    local offset = tok and decode_token(tok) or 0
    page = {}
    for i = offset + 1, math.min(#items, offset + size) do page[#page + 1] = items[i] end
    if offset + size < #items then next_tok = encode_token(offset + size) end
  end
  local headers = { ["x-ms-item-type"] = item_type }
  if next_tok then headers["x-ms-continuation"] = next_tok end
  send(200, util.array(page), headers)
end

---------------------------------------------------------------------------
-- Handlers: fn(req) where req = { method, segs, params, headers, args }

local function if_match(req)
  local v = req.headers["if-match"]
  if type(v) == "table" then v = v[1] end
  return v
end

local H = {}

-- connections: the client connections nginx holds open right now (idle ones too).
function H.health()
  send(200, { status = "ok", devices = #registry.list(), instance = settings.instance,
    connections = tonumber(ngx.var.connections_active) })
end

-- Device identities carry their etag in an ETag header too (If-Match for updates).
local function send_device(dev)
  send(200, registry.device_json(dev), { ETag = '"' .. dev.etag .. '"' })
end

function H.put_device(req)
  send_device(check(registry.put_device(req.params[1], json_body(false), if_match(req))))
end

function H.get_device(req)
  send_device(check(registry.lookup(req.params[1])))
end

function H.delete_device(req)
  check(registry.delete_device(req.params[1], if_match(req)))
  send(204)
end

local function send_twin(dev)
  local twin = registry.twin_doc(dev)
  send(200, twin, { ETag = '"' .. twin.etag .. '"' })
end

function H.get_twin(req)
  send_twin(check(registry.lookup(req.params[1])))
end

function H.patch_twin(req)
  send_twin(check(registry.update_twin(req.params[1], json_body(true), if_match(req), false)))
end

function H.put_twin(req)
  send_twin(check(registry.update_twin(req.params[1], json_body(true), if_match(req), true)))
end

-- The device's answer comes back inside a 200 ({status, payload}); hub-side failures
-- (404103 offline, 504101 no answer in time, 400004 bad timeouts or payload) are errors.
function H.invoke_method(req)
  local dev = check(registry.lookup(req.params[1]))
  local m = check(methods.validate(json_body(true)))
  send(200, check(methods.invoke(dev, m)))
end

function H.query_devices(req)
  local body = json_body(true, query.MAX_BODY_BYTES)
  if not util.is_object(body) or type(body.query) ~= "string" then
    error(errors.new("ArgumentInvalid", "The body must be {\"query\": \"SELECT ...\"}."), 0)
  end
  local plan, perr = query.parse(body.query)
  if not plan then
    error(errors.new("ArgumentInvalid", "The query is invalid: " .. perr), 0)
  end
  local docs
  if plan.collection == "devices.jobs" then
    -- devices.jobs.jobId = 'x' can only match that job's rows (same order, so tokens hold)
    docs = jobs.device_rows(plan.equals.jobid)
  elseif plan.collection == "devices.modules" then
    docs = {} -- the emulator has no modules yet, so the module collection is empty
  else
    docs = {}
    for i, dev in ipairs(registry.list()) do docs[i] = registry.twin_doc(dev) end
  end
  send_page(function(tok, size)
    local items, item_type_or_err, next_tok = query.execute(plan, docs, tok, size)
    if not items then return nil, item_type_or_err end
    return items, next_tok
  end, query.item_type(plan), req.headers)
end

function H.create_job(req)
  send(200, check(jobs.create(req.params[1], json_body(true))))
end

function H.get_job(req)
  send(200, check(jobs.get(req.params[1])))
end

function H.cancel_job(req)
  send(200, check(jobs.cancel(req.params[1])))
end

-- A query-string argument (the first, when repeated), or nil.
local function query_arg(req, name)
  local v = req.args[name]
  if type(v) == "table" then v = v[1] end
  return type(v) == "string" and v or nil
end

function H.list_jobs(req)
  send_page(jobs.list(query_arg(req, "jobType"), query_arg(req, "jobStatus")), "JobResponse", req.headers)
end

-- { method, pattern (":id" captures a segment), handler, public = no auth, control = test route }
local ROUTES = {
  { "GET", "/_emulator/health", H.health, true },
  { "POST", "/devices/query", H.query_devices },
  { "PUT", "/devices/:id", H.put_device },
  { "GET", "/devices/:id", H.get_device },
  { "DELETE", "/devices/:id", H.delete_device },
  { "GET", "/twins/:id", H.get_twin },
  { "PATCH", "/twins/:id", H.patch_twin },
  { "PUT", "/twins/:id", H.put_twin },
  { "POST", "/twins/:id/methods", H.invoke_method },
  { "GET", "/jobs/v2/query", H.list_jobs },
  { "PUT", "/jobs/v2/:id", H.create_job },
  { "GET", "/jobs/v2/:id", H.get_job },
  { "POST", "/jobs/v2/:id/cancel", H.cancel_job },
}

-- Test controls: SAS auth like the hub API, no api-version, never faulted or logged.
for _, r in ipairs(control.routes({ send = send, json_body = json_body, arg = query_arg, reset_devices = seed_devices })) do
  ROUTES[#ROUTES + 1] = { r[1], r[2], r[3], false, true }
end

local function split(path)
  local segs = {}
  for s in path:gmatch("[^/]+") do segs[#segs + 1] = s end
  return segs
end

for _, r in ipairs(ROUTES) do r.segs = split(r[2]) end

local function match(method, segs)
  local path_known = false
  for _, r in ipairs(ROUTES) do
    if #r.segs == #segs then
      local params, ok = {}, true
      for i, p in ipairs(r.segs) do
        if p == ":id" then
          params[#params + 1] = segs[i]
        elseif p ~= segs[i] then
          ok = false
          break
        end
      end
      if ok then
        if r[1] == method then return r, params end
        path_known = true
      end
    end
  end
  return nil, path_known
end

-- Applies an injected fault: waits, then answers with its error, has send() hand the answer
-- to the fault (control.send_faulted) or asks handle() to drop the connection. Returns true
-- when the request is finished.
local function apply_fault(fault, label, rec)
  rec.fault = label
  if fault.delay then ngx.sleep(fault.delay) end
  if control.mangles_response(fault) then
    ngx.ctx.response_fault, rec.mangled = fault, true
    mangled_in_flight = mangled_in_flight + 1
  end
  if fault.drop == "request" then
    rec.drop = true
    return true
  end
  if fault.status then error(control.fault_error(fault), 0) end
  return false
end

local function dispatch(rec)
  local method = ngx.req.get_method()
  local raw_path = ngx.var.request_uri:match("^[^?]*")
  local segs = {}
  for i, s in ipairs(split(raw_path)) do segs[i] = ngx.unescape_uri(s) end
  rec.method, rec.path = method, "/" .. table.concat(segs, "/")
  local route, params = match(method, segs)
  if not route then
    local what = params and "is not supported on this path" or "is not an IoT Hub API the emulator knows"
    error(errors.new("InvalidOperation", method .. " " .. raw_path .. " " .. what .. "."), 0)
  end
  rec.route = route[2]
  rec.skip = route[4] or route[5] -- health and control routes stay out of the request log
  if settings.broken then
    error(errors.new("ServerError", "The emulator could not load its state: " .. settings.broken), 0)
  end
  local headers = limits.request_headers()
  local request_id = headers["request-id"] or headers["x-ms-client-request-id"]
  if type(request_id) == "table" then request_id = request_id[1] end
  rec.requestId = request_id
  -- Conditional headers are the emulator's business: left in place, nginx's
  -- not_modified filter would answer 412 itself when a response carries an ETag.
  for _, h in ipairs({ "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since" }) do
    ngx.req.clear_header(h)
  end
  if not route[4] then
    -- real time: clients sign with their own clock, whatever /_emulator/clock says
    local ok, why = auth.check(headers["authorization"], ngx.var.uri, util.real_now(), method)
    if not ok then
      ngx.log(ngx.WARN, "401 for ", method, " ", raw_path:sub(1, 200), ": ", why)
      error(errors.new("IotHubUnauthorizedAccess", "Unauthorized", { reason = why }), 0)
    end
  end
  local args = ngx.req.get_uri_args(100)
  if not route[4] and not route[5] then
    local v = args["api-version"]
    if type(v) == "table" then v = v[1] end
    if type(v) ~= "string" or v == "" then
      error(errors.new("InvalidProtocolVersion", "The api-version query parameter is required (for example 2021-04-12)."), 0)
    end
    -- Any plausible version is served the same way; one that is not a date is refused.
    if not (v:match("^%d%d%d%d%-%d%d%-%d%d$") or v:match("^%d%d%d%d%-%d%d%-%d%d%-preview$")) then
      error(errors.new("InvalidProtocolVersion", "The api-version '" .. v:sub(1, 40) ..
        "' is not supported; use a version such as 2021-04-12."), 0)
    end
    local fault, label = control.take_fault(method, route[2], rec.path)
    if fault and apply_fault(fault, label, rec) then return end
  end
  route[3]({ method = method, segs = segs, params = params, headers = headers, args = args })
end

-- error_page target (/_emulator/refused/<status>, internal) for requests nginx refuses
-- before Lua runs.
function M.refused()
  send_error(limits.refusal(tonumber(ngx.var.uri:match("(%d+)$")) or 400))
end

function M.handle()
  local started = core.monotime()
  local rec = {}
  local ok, err = xpcall(dispatch, function(e)
    if errors.is_error(e) then return e end
    ngx.log(ngx.ERR, debug.traceback(tostring(e), 2))
    return errors.new("ServerError", "Emulator internal error: " .. tostring(e))
  end, rec)
  if not ok then send_error(err) end
  if not rec.skip then
    control.record({
      method = rec.method or ngx.req.get_method(), path = rec.path or ngx.var.uri,
      query = ngx.var.args or util.null, route = rec.route or util.null,
      status = (rec.drop or rec.mangled and ngx.ctx.answer_lost) and util.null or ngx.status,
      requestId = rec.requestId or util.null,
      fault = rec.fault or util.null,
      durationMs = math.floor((core.monotime() - started) * 1e6 + 0.5) / 1000,
    })
  end
  -- closes the connection: without an answer, or after a faulted one written on the raw socket
  if rec.drop or rec.mangled and ngx.ctx.closed then return ngx.exit(444) end
  if not ok and err.close then -- answered, but what follows on this connection is not a request
    ngx.flush(true)
    return ngx.exit(444)
  end
end

return M
