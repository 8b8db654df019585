-- Request handlers for the nginx test server (spec/support/server.lua).
-- Runs inside nginx's LuaJIT; state lives in one lua_shared_dict so it is
-- shared by every request (and would survive more workers).
local cjson = require "cjson"

local M = {}
local dict = ngx.shared.iothub_test

local function json(status, value)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.print(cjson.encode(value))
end

-- Lower-cased header map; repeated headers joined like an HTTP client would.
local function headers()
  local out = {}
  for k, v in pairs(ngx.req.get_headers(0)) do
    out[k:lower()] = type(v) == "table" and table.concat(v, ", ") or v
  end
  return out
end

local function body()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if data then return data end
  local path = ngx.req.get_body_file() -- only when nginx spilled a big body to disk
  if not path then return "" end
  local f = assert(io.open(path, "rb"))
  data = f:read("*a")
  f:close()
  return data
end

function M.echo()
  json(200, {
    method = ngx.req.get_method(),
    uri = ngx.var.request_uri,
    headers = headers(),
    body = body(),
    connection = tonumber(ngx.var.connection),
    connectionRequests = tonumber(ngx.var.connection_requests),
  })
end

-- /status/NNN?body=...&header=Name:Value (repeatable)
function M.status()
  local code = tonumber(ngx.var.uri:match("^/status/(%d%d%d)$"))
  if not code then return json(400, { error = "expected /status/NNN" }) end
  local args = ngx.req.get_uri_args(0)
  local list = args.header
  if type(list) == "string" then list = { list } end
  local byName, order = {}, {}
  for _, h in ipairs(type(list) == "table" and list or {}) do
    local name, value = tostring(h):match("^([^:]+):%s*(.*)$")
    if name then
      if not byName[name] then byName[name] = {}; order[#order + 1] = name end
      table.insert(byName[name], value)
    end
  end
  for _, name in ipairs(order) do
    local values = byName[name]
    ngx.header[name] = #values == 1 and values[1] or values
  end
  body()
  ngx.status = code
  if type(args.body) == "string" then ngx.print(args.body) end
end

-- /slow?seconds=S: the inflight/maxInflight counters prove overlap without timing.
-- track=0 leaves the counters alone (for requests a test abandons, e.g. timeouts).
function M.slow()
  local seconds = tonumber(ngx.var.arg_seconds) or 0
  if ngx.var.arg_track == "0" then
    ngx.sleep(seconds)
    return json(200, { slept = seconds })
  end
  local now = dict:incr("inflight", 1, 0)
  if now > (dict:get("maxInflight") or 0) then dict:set("maxInflight", now) end
  dict:incr("slowTotal", 1, 0)
  ngx.sleep(seconds)
  dict:incr("inflight", -1, 0)
  json(200, { slept = seconds, inflightAtStart = now })
end

function M.stats()
  json(200, {
    maxInflight = dict:get("maxInflight") or 0,
    inflight = dict:get("inflight") or 0,
    slowTotal = dict:get("slowTotal") or 0,
  })
end

function M.stats_reset()
  dict:set("maxInflight", 0)
  dict:set("inflight", 0)
  dict:set("slowTotal", 0)
  json(200, { reset = true })
end

-- Fake hub: POST /_script appends scripted responses to a FIFO queue.
function M.script()
  if ngx.req.get_method() ~= "POST" then return json(405, { error = "POST a JSON array" }) end
  local ok, list = pcall(cjson.decode, body())
  if not ok or type(list) ~= "table" then return json(400, { error = "body must be a JSON array" }) end
  for _, item in ipairs(list) do
    local added, err = dict:rpush("queue", cjson.encode(item))
    if not added then return json(500, { error = "queue: " .. tostring(err) }) end
  end
  json(200, { queued = dict:llen("queue") or 0 })
end

function M.requests()
  local n = dict:get("requests:n") or 0
  local parts = {}
  for i = 1, n do parts[#parts + 1] = dict:get("requests:" .. i) end
  -- built by hand: cjson would encode an empty list as {}
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.print("[" .. table.concat(parts, ",") .. "]")
end

function M.reset()
  local n = dict:get("requests:n") or 0
  for i = 1, n do dict:delete("requests:" .. i) end
  dict:set("requests:n", 0)
  dict:delete("queue")
  json(200, { reset = true })
end

function M.hub()
  local method, uri = ngx.req.get_method(), ngx.var.request_uri
  local n = dict:incr("requests:n", 1, 0)
  dict:set("requests:" .. n, cjson.encode({ method = method, uri = uri, headers = headers(), body = body() }))
  local item = dict:lpop("queue")
  if not item then
    ngx.status = 599
    ngx.header["Content-Type"] = "text/plain"
    ngx.print("fake hub: no scripted response queued for " .. method .. " " .. uri)
    return
  end
  local r = cjson.decode(item)
  if type(r.delay) == "number" and r.delay > 0 then ngx.sleep(r.delay) end
  if r.drop then return ngx.exit(444) end -- close without any response
  ngx.status = tonumber(r.status) or 200
  if type(r.headers) == "table" then
    for k, v in pairs(r.headers) do ngx.header[k] = v end
  end
  if type(r.body) == "string" and r.body ~= "" then ngx.print(r.body) end
end

-- Forward-proxy stand-in: proves that the client sent an absolute-URI request here.
-- A simulated hub for concurrency specs and benchmarks (client endpoint ".../sim"):
--   GET  /sim/jobs/v2/poll<N>-<rest>   "running" for the first N-1 reads of that id, then
--        "completed"; each read waits 50 ms and is counted in the inflight statistics, so a
--        spec can see that many monitors overlapped.
--   GET  /sim/jobs/v2/<other id>       a completed job at once (benchmarks)
--   PUT  /sim/jobs/v2/<id>             the job request echoed back, status "queued"
--   POST /sim/devices/query            devices.jobs rows for jobId 'rows<N>', paged by the
--        x-ms-max-item-count / x-ms-continuation headers (continuation = next offset)
local SIM_JOB = '{"jobId":"%s","type":"scheduleDeviceMethod","status":"%s","queryCondition":"*",' ..
  '"createdTime":"2026-11-22T10:00:00.0000000Z","startTime":"2026-11-22T10:00:00.0000000Z",' ..
  '"maxExecutionTimeInSeconds":3600,"cloudToDeviceMethod":{"methodName":"lockDoor","payload":null,' ..
  '"responseTimeoutInSeconds":30},"deviceJobStatistics":{"deviceCount":%d,"failedCount":0,' ..
  '"succeededCount":%d,"runningCount":0,"pendingCount":%d}}'
local SIM_ROW = '{"deviceId":"door-%07d","jobId":"%s","jobType":"scheduleDeviceMethod","status":"completed",' ..
  '"startTimeUtc":"2026-11-22T10:00:00.1234567","endTimeUtc":"2026-11-22T10:00:01.1234567",' ..
  '"createdDateTimeUtc":"2026-11-22T10:00:00.0000000Z","lastUpdatedDateTimeUtc":"2026-11-22T10:00:01.0000000Z",' ..
  '"outcome":{"deviceMethodResponse":{"status":200,"payload":{"locked":true,"attempt":%d}}}}'

function M.sim()
  local uri = ngx.var.uri
  ngx.header["Content-Type"] = "application/json; charset=utf-8"
  local id = uri:match("^/sim/jobs/v2/([^/]+)$")
  if id and ngx.req.get_method() == "PUT" then -- the job as asked, queued (benchmarks)
    local job = cjson.decode(body())
    job.status, job.createdTime = "queued", "2026-11-22T10:00:00.0000000Z"
    ngx.print(cjson.encode(job))
    return
  end
  if id and ngx.req.get_method() == "GET" then
    local polls = tonumber(id:match("^poll(%d+)%-"))
    if not polls then
      ngx.print(SIM_JOB:format(id, "completed", 10, 10, 0))
      return
    end
    local inflight = dict:incr("inflight", 1, 0)
    local max = dict:get("maxInflight") or 0
    if inflight > max then dict:set("maxInflight", inflight) end
    ngx.sleep(0.05)
    dict:incr("inflight", -1, 0)
    local seen = dict:incr("sim:" .. id, 1, 0)
    local done = seen >= polls
    ngx.print(SIM_JOB:format(id, done and "completed" or "running", 10, done and 10 or 0, done and 0 or 10))
    return
  end
  if uri == "/sim/devices/query" and ngx.req.get_method() == "POST" then
    local query = cjson.decode(body()).query or ""
    local job = query:match("jobId = '([^']+)'") or "rows0"
    local total = tonumber(job:match("^rows(%d+)")) or 0
    local size = tonumber(ngx.var.http_x_ms_max_item_count) or 100
    local from = tonumber(ngx.var.http_x_ms_continuation) or 0
    local last = math.min(total, from + size)
    local parts = {}
    for i = from + 1, last do parts[#parts + 1] = SIM_ROW:format(i, job, i) end
    ngx.header["x-ms-item-type"] = "DeviceJob"
    if last < total then ngx.header["x-ms-continuation"] = tostring(last) end
    ngx.print("[" .. table.concat(parts, ",") .. "]")
    return
  end
  ngx.status = 404
  ngx.print('{"Message":"ErrorCode:NotFound;no simulated route for ' .. uri .. '"}')
end

function M.proxy()
  json(200, { proxied = true, requestLine = ngx.var.request, host = ngx.var.http_host, headers = headers() })
end

return M
