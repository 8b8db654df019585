-- Request building (csrc/request.c): build_request and job_request_body from fuzzed fields,
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

local function body(b)
  local req = { jobId = scalar(b), type = b:bool() and b:pick({ "scheduleDeviceMethod", "scheduleUpdateTwin" }) or scalar(b),
    queryCondition = scalar(b), startTime = scalar(b), maxExecutionTimeInSeconds = b:number() }
  local k = b:byte() % 4
  if k == 0 then
    req.cloudToDeviceMethod = { methodName = scalar(b), payload = b:value(), responseTimeoutInSeconds = b:number(),
      connectTimeoutInSeconds = b:number() }
  elseif k == 1 then
    req.updateTwin = b:value()
  elseif k == 2 then
    req.cloudToDeviceMethod = b:value() -- anything: a non-table raises
  end
  local mode = b:byte() % 4
  local given = req
  if mode > 0 then req = fz.proxy(req, mode == 3) end
  local ok, text, msg, code = pcall(core.job_request_body, req)
  if not ok then
    check(type(text) == "string" and text:find("cloudToDeviceMethod", 1, true), "job_request_body raised: %s", text)
    return
  end
  if not text then
    fz.check_failure("job_request_body", text, msg, code)
    check(BODY_CODES[code], "job_request_body code %s: %s", code, msg)
    return
  end
  local decoded, derr, dcode = core.json_decode(text)
  if dcode == "JsonDepth" then return end -- a field nested 128 deep is deeper still in the body
  check(type(decoded) == "table", "the body is not a JSON object (%s): %s", derr, text)
  if type(given.jobId) == "string" then check(decoded.jobId == given.jobId, "jobId did not survive: %s", text) end
end

return function(data)
  local b = fz.bytes(data)
  build(b)
  body(b)
end
