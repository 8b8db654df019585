-- Request building (csrc/request.c, csrc/job_request.c): build_request and job_request from fuzzed fields,
-- sometimes read through a proxy table whose __index collects garbage and returns fresh strings
-- (C code must not lean on the table to keep what it read alive). Results must be well formed:
-- the URL starts with the endpoint, encoded segments stay encoded, header lines have no line
-- breaks, and a body is JSON that decodes with the fields given.
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local BODY_CODES = { NumberOutOfRange = true, InvalidTable = true, UnsupportedType = true, InvalidUtf8 = true,
  JsonDepth = true }

local function scalar(b)
  local k = b:byte() % 8
  if k < 5 then return b:string(40) end
  if k < 7 then return b:number() end
  return nil
end

local function pairs_list(b)
  local list = {}
  for i = 1, b:byte() % 5 do
    if b:byte() % 16 == 0 then list[i] = scalar(b) -- malformed entry: misuse
    else list[i] = { b:byte() % 16 == 0 and b:number() or b:string(20), scalar(b) } end
  end
  return list
end

local function build(b)
  local req = { endpoint = b:byte() % 8 == 0 and b:number() or b:string(40) }
  if b:bool() then
    req.path = b:string(60)
  else
    req.path = {}
    for i = 1, b:byte() % 4 do req.path[i] = scalar(b) end
  end
  if b:bool() then req.query = pairs_list(b) end
  if b:bool() then req.headers = pairs_list(b) end
  local given, mode = req, b:byte() % 4
  if mode > 0 then req = fz.proxy(req, mode == 3) end
  local ok, url, lines, code = pcall(core.build_request, req)
  if not ok then
    check(type(url) == "string" and (url:find("field '", 1, true) or url:find(" entry ", 1, true)),
      "build_request raised: %s", url)
    return
  end
  if not url then
    fz.check_failure("build_request", url, lines, code)
    return
  end
  check(type(url) == "string" and type(lines) == "table", "build_request returned %s, %s", type(url), type(lines))
  if type(given.endpoint) == "string" then
    local trimmed = given.endpoint:gsub("/+$", "")
    check(url:sub(1, #trimmed) == trimmed, "the URL %s does not start with the endpoint %s", url, trimmed)
    if type(given.path) == "table" then
      local path = url:sub(#trimmed + 1):match("^[^?]*")
      check(not path:find("[^%w%-_.~%%/]"), "a path segment escaped its encoding: %s", path)
    end
  end
  for _, line in ipairs(lines) do
    check(not line:find("[\r\n]"), "a header line has a line break: %s", line)
    check(line:find(": ", 1, true), "a header line is not 'name: value': %s", line)
  end
end

-- core.job_request(kind, jobId, condition, action, start, maxExec, now): fuzzed fields of
-- every type. A wrong Lua type raises (misuse); anything else is a body or a refusal that
-- names its field. A body decodes to the fields given, in the kind's shape.
local function body(b)
  local kind = b:bool() and b:pick({ "method", "twin" }) or scalar(b)
  local action
  local k = b:byte() % 4
  if k == 0 then
    action = { methodName = scalar(b), payload = b:value(), responseTimeoutInSeconds = b:number(),
      connectTimeoutInSeconds = b:number() }
  elseif k == 1 then
    action = { properties = { desired = b:value() }, tags = b:bool() and b:value() or nil }
  else
    action = b:value()
  end
  if type(action) == "table" and b:byte() % 4 == 0 then action = fz.proxy(action, b:bool()) end
  local jobId, condition = scalar(b), scalar(b)
  local start = b:bool() and scalar(b) or nil
  local maxExec = b:bool() and b:number() or nil
  local ok, text, msg, code, field = pcall(core.job_request, kind, jobId, condition, action, start, maxExec,
    1.8e9)
  if not ok then
    check(type(text) == "string", "job_request raised a %s", type(text))
    return
  end
  if not text then
    fz.check_failure("job_request", text, msg, code)
    check(code == "Misuse" or BODY_CODES[code] or code == "InvalidArgument", "job_request code %s: %s", code, msg)
    check(type(field) == "string", "job_request refused without naming a field: %s", msg)
    return
  end
  check(kind == "method" or kind == "twin", "job_request built a body for kind %s", tostring(kind))
  local decoded, derr, dcode = core.json_decode(text)
  if dcode == "JsonDepth" then return end -- a field nested 128 deep is deeper still in the body
  check(type(decoded) == "table", "the body is not a JSON object (%s): %s", derr, text)
  check(decoded.jobId == jobId, "jobId did not survive: %s", text)
  check(decoded.queryCondition == condition, "queryCondition did not survive: %s", text)
  check(decoded.type == (kind == "method" and "scheduleDeviceMethod" or "scheduleUpdateTwin"), "wrong type: %s", text)
  check(type(decoded.startTime) == "string" and type(decoded.maxExecutionTimeInSeconds) == "number",
    "startTime or maxExecutionTimeInSeconds missing: %s", text)
end

return function(data)
  local b = fz.bytes(data)
  build(b)
  body(b)
end
