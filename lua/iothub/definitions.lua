--- Job definition files: a sandboxed Lua file declares jobs (and optional staged rollouts);
-- loading validates every field before anything is sent and reports each problem with
-- file:line and the field.
--
--     job "lock-doors" {
--       method = "lockDoor", payload = { force = true }, responseTimeout = 15,
--       query = "tags.location.building = '43'",
--       ttl = "1h",
--       stages = {
--         { count = 1, gate = { minSuccessRatio = 1 } },
--         { percent = 25, gate = { minSuccessRatio = 0.9, maxFailures = 2 } },
--         { percent = 100 },
--       },
--     }
--
--     local defs, problems = definitions.load("rollout.lua")
--     if not defs then io.stderr:write(definitions.format(problems)) end
--
-- The file can use `job`, `ids(format, first, last)`, `json_file(path)`, `null`, `array`,
-- `string`, `table`, `math`, `os.time`, `os.date` and the basic functions; nothing else.
-- It runs under the C core's sandbox limits (memory, instructions, seconds, and their defaults:
-- csrc/sandbox.c); `opts.limits` (from core.sandbox_limits) changes them, and without it the
-- IOTHUB_SANDBOX_* variables do.
-- @module iothub.definitions
local core = require "iothub.core"
local job_request = require "iothub.job_request"
local Registry = require "iothub.registry"

local M = {}

M.MAX_NAME_LENGTH = 40      -- leaves room in the 64-character job id for "-<hash>-sNN-cNNN"
M.MAX_STAGES = 20
-- A staged job's query targets are listed (iothub.rollout) with this SELECT around the
-- condition, and the whole query must fit the hub's limit.
local LISTING_SELECT = "SELECT deviceId FROM devices WHERE "
M.MAX_STAGED_QUERY_LENGTH = core.query_max_length - #LISTING_SELECT
local HASH_KEY = "iothub-jobs definitions v1"
local LIMIT_NAME = "definitions-file" -- "(the definitions-file limit)" in a limit's message

local unpack = table.unpack or unpack -- luacheck: ignore 143

---------------------------------------------------------------------------
-- Durations and start times (shared with the CLI's --ttl, --timeout and --start)

local UNIT_SECONDS = { s = 1, m = 60, h = 3600, d = 86400 }

--- Seconds from a number or a string such as "90", "90s", "10m", "1h30m", "2d".
-- Returns an integer, or nil and why.
function M.parse_duration(value)
  if type(value) == "number" then
    if value ~= value or value < 0 or value % 1 ~= 0 then
      return nil, "must be a whole number of seconds, got " .. tostring(value)
    end
    return math.floor(value)
  end
  if type(value) ~= "string" then
    return nil, "must be seconds (e.g. 600) or a duration such as \"10m\" or \"1h30m\", got " .. type(value)
  end
  if value:match("^%d+$") then return math.floor(tonumber(value)) end
  local total, rest = 0, value
  while rest ~= "" do
    local digits, unit, after = rest:match("^(%d+)([smhd])(.*)$")
    if not digits then
      return nil, "'" .. value .. "' is not a duration; write seconds (600) or e.g. \"90s\", \"10m\", \"1h30m\", \"2d\""
    end
    total = total + tonumber(digits) * UNIT_SECONDS[unit]
    rest = after
  end
  if value == "" then return nil, "is empty; write seconds (600) or e.g. \"10m\"" end
  return math.floor(total)
end

--- A start time: nil or "now" (start at once), epoch seconds, an ISO-8601 string, or
-- "+DURATION" (relative to when the job is created). Returns a start spec
-- { epoch = n } | { iso = s } | { after = seconds } | {} (now), or nil and why.
function M.parse_start(value)
  if value == nil or value == "now" then return {} end
  if type(value) == "number" then
    if value ~= value or value < 0 or value > 253402300799 then
      return nil, "epoch seconds " .. tostring(value) .. " are out of range"
    end
    return { epoch = value }
  end
  if type(value) ~= "string" then
    return nil, "must be \"now\", \"+10m\", an ISO-8601 time such as \"2030-01-31T08:00:00Z\" or epoch seconds, got "
      .. type(value)
  end
  if value:sub(1, 1) == "+" then
    local seconds, why = M.parse_duration(value:sub(2))
    if not seconds then return nil, "relative start " .. why end
    return { after = seconds }
  end
  local epoch, why = core.parse_time(value)
  if not epoch then return nil, "'" .. value .. "' is not a time: " .. why end
  return { iso = value, epoch = epoch }
end

--- The startTime argument for the client at wall time `now`: nil (now), epoch seconds or ISO.
function M.resolve_start(spec, now)
  if not spec then return nil end
  if spec.after then return now + spec.after end
  return spec.iso or spec.epoch
end

---------------------------------------------------------------------------
-- Problems

local Problem = {}
Problem.__index = Problem
function Problem.__tostring(p)
  local where = p.file .. (p.line and (":" .. p.line) or "")
  local what = p.job and ("job '" .. p.job .. "'") or nil
  if p.field then what = (what and (what .. ", ") or "") .. "field '" .. p.field .. "'" end
  return where .. ": " .. (what and (what .. ": ") or "") .. p.message
end

--- One problem per line, ready to print.
function M.format(problems)
  local out = {}
  for _, p in ipairs(problems) do out[#out + 1] = tostring(p) end
  return table.concat(out, "\n") .. "\n"
end

---------------------------------------------------------------------------
-- Source positions: fields have no line info at run time, so find `field =` in the
-- declaration's lines of source (the declaration's own line comes from debug info).

local function field_line(src_lines, from, to, key, nth)
  nth = nth or 1
  local pattern = "%f[%w_]" .. key:gsub("%p", "%%%0") .. "%s*="
  for i = from, math.min(to, #src_lines) do
    local line = src_lines[i]:gsub("%-%-.*$", "") -- ignore comments
    local pos = 1
    while true do
      local s, e = line:find(pattern, pos)
      if not s then break end
      if line:sub(e + 1, e + 1) ~= "=" then -- not "=="
        nth = nth - 1
        if nth == 0 then return i end
      end
      pos = e + 1
    end
  end
  return nil
end

---------------------------------------------------------------------------
-- Suggestions for misspelt names

-- Edit distance counting a swap of neighbours as one edit ("jbo" is one edit from "job").
local function distance(a, b)
  a, b = a:lower(), b:lower()
  if a == b then return 0 end
  local d = {}
  for i = 0, #a do d[i] = { [0] = i } end
  for j = 0, #b do d[0][j] = j end
  for i = 1, #a do
    for j = 1, #b do
      local cost = a:sub(i, i) == b:sub(j, j) and 0 or 1
      d[i][j] = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
      if i > 1 and j > 1 and a:sub(i, i) == b:sub(j - 1, j - 1) and a:sub(i - 1, i - 1) == b:sub(j, j) then
        d[i][j] = math.min(d[i][j], d[i - 2][j - 2] + 1)
      end
    end
  end
  return d[#a][#b]
end

--- The closest of `names` to `word` when it is plausibly a typo, else nil.
function M.suggest(word, names, aliases)
  if aliases and aliases[word] then return aliases[word] end
  for alias, name in pairs(aliases or {}) do
    if distance(word, alias) <= 1 then return name end
  end
  local best, best_d
  for _, name in ipairs(names) do
    local d = distance(word, name)
    if d <= math.max(1, math.floor(#name / 4)) and (not best_d or d < best_d) then best, best_d = name, d end
  end
  return best
end

---------------------------------------------------------------------------
-- Field checks

local JOB_FIELDS = { "method", "payload", "responseTimeout", "connectTimeout", "patch", "query", "devices",
  "start", "ttl", "stages", "gate", "revision", "description" }
local JOB_FIELD_SET = {}
for _, f in ipairs(JOB_FIELDS) do JOB_FIELD_SET[f] = true end
-- Wire and SDK names people will reach for, mapped to ours.
local JOB_ALIASES = { methodName = "method", responseTimeoutInSeconds = "responseTimeout",
  connectTimeoutInSeconds = "connectTimeout", timeoutInSeconds = "responseTimeout",
  queryCondition = "query", condition = "query", startTime = "start",
  maxExecutionTimeInSeconds = "ttl", updateTwin = "patch", twin = "patch", devicesIds = "devices",
  deviceIds = "devices", targets = "devices", stage = "stages" }
-- The job request's fields (iothub.job_request's err.field) by the definition's names.
local REQUEST_FIELDS = { ["methodParams.methodName"] = "method", ["methodParams.payload"] = "payload",
  ["methodParams.responseTimeoutInSeconds"] = "responseTimeout",
  ["methodParams.connectTimeoutInSeconds"] = "connectTimeout", maxExecutionTimeInSeconds = "ttl" }
local METHOD_PARAMS = { payload = "payload", responseTimeout = "responseTimeoutInSeconds",
  connectTimeout = "connectTimeoutInSeconds" }
local STAGE_FIELDS = { "count", "percent", "gate", "name" }
local STAGE_FIELD_SET = { count = true, percent = true, gate = true, name = true }
local GATE_FIELDS = { "minSuccessRatio", "maxFailures" }
local GATE_FIELD_SET = { minSuccessRatio = true, maxFailures = true }
local GATE_ALIASES = { minSuccess = "minSuccessRatio", minSuccessRate = "minSuccessRatio",
  successRatio = "minSuccessRatio", maxFailed = "maxFailures", maxFailureCount = "maxFailures" }

local function is_array(t)
  if type(t) ~= "table" then return false end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  for i = 1, n do if t[i] == nil then return false end end
  return true
end

-- Device ids follow the Registry's rules, kept in one place.
local check_device_id = Registry.checkDeviceId
--- Checks a device id (Registry's rules). Returns true or nil, why.
M.check_device_id = check_device_id

--- Checks a job name (it becomes the prefix of every job id the definition creates).
function M.check_name(name)
  if type(name) ~= "string" then return nil, "a job name must be a string, got " .. type(name) end
  if name == "" then return nil, "a job name must not be empty" end
  if #name > M.MAX_NAME_LENGTH then
    return nil, ("job name '%s' is %d characters; at most %d (it prefixes the job ids)"):format(name, #name,
      M.MAX_NAME_LENGTH)
  end
  local bad = name:find("[^%w%-]")
  if bad then
    return nil, ("job name '%s' has '%s' at position %d; use letters, digits and '-' (it becomes part of the job ids)")
      :format(name, name:sub(bad, bad), bad)
  end
  return true
end

-- The job request's own checks (iothub.job_request) of what the definition does (out.methodParams
-- or out.patch, as written) and its ttl, one problem at a time: each refusal names the request
-- field, which maps to the definition's; the faulty value is dropped and the rest checked again.
-- Leaves the normalised action and the ttl (default: the request's) in out.
local function check_request(out, ttl, report, name)
  local kind = out.methodParams and "method" or out.patch and "twin"
  local action = out.methodParams or out.patch
  out.methodParams, out.patch = nil, nil
  while kind do
    local normalised, err = job_request.action(kind, action, "definition", name, ttl)
    if normalised then
      if kind == "method" then out.methodParams = normalised else out.patch = normalised end
      break
    end
    local field = REQUEST_FIELDS[err.field] or (kind == "twin" and "patch" or "method")
    if field == "ttl" then
      report("ttl", (err.detail or err.message) .. " (it is maxExecutionTimeInSeconds)")
      ttl = nil
    elseif field == "method" or field == "patch" then -- the action itself: nothing more to learn
      if field == "patch" or action.methodName then report(field, field == "patch" and err.message or err.detail or err.message) end
      break
    else
      report(field, err.detail or err.message)
      action[METHOD_PARAMS[field]] = nil
    end
  end
  out.ttl = ttl or job_request.DEFAULT_MAX_EXECUTION
end

-- Validates one declaration; adds problems through report(field, message[, key, nth]).
local function validate_job(decl, report)
  local t = decl.fields
  local out = { name = decl.name, line = decl.line }
  for key in pairs(t) do
    if type(key) ~= "string" then
      report(nil, "has an entry without a name (" .. tostring(key) .. "); every entry is field = value")
    elseif not JOB_FIELD_SET[key] then
      local hint = M.suggest(key, JOB_FIELDS, JOB_ALIASES)
      report(key, "unknown field" .. (hint and ("; did you mean '" .. hint .. "'?") or
        ("; known fields: " .. table.concat(JOB_FIELDS, ", "))))
    end
  end

  -- What the job does: a method or a twin patch, never both.
  if t.method ~= nil and t.patch ~= nil then
    report("patch", "a job has either method (a direct-method job) or patch (a twin-update job), not both")
  elseif t.method == nil and t.patch == nil then
    report(nil, "says nothing to do: give method = \"name\" (direct method) or patch = { ... } (twin update)")
  end
  if t.method ~= nil then
    out.type = "method"
    if type(t.method) ~= "string" then
      report("method", "must be the method name as a string, got " .. type(t.method))
    end
    local params = { methodName = type(t.method) == "string" and t.method or nil, payload = t.payload }
    for _, f in ipairs({ { "responseTimeout", "responseTimeoutInSeconds" }, { "connectTimeout", "connectTimeoutInSeconds" } }) do
      if t[f[1]] ~= nil then
        local seconds, why = M.parse_duration(t[f[1]])
        if seconds then params[f[2]] = seconds else report(f[1], why) end
      end
    end
    if type(t.payload) == "function" or type(t.payload) == "userdata" and t.payload ~= core.null then
      report("payload", "must be JSON data (a table, string, number, boolean or null), got " .. type(t.payload))
      params.payload = nil
    end
    out.methodParams = params
  else
    for _, f in ipairs({ "payload", "responseTimeout", "connectTimeout" }) do
      if t[f] ~= nil and t.patch ~= nil then report(f, "belongs to method jobs; this job has a patch (twin update)") end
    end
  end
  if t.patch ~= nil then
    out.type = "twin"
    if type(t.patch) ~= "table" then
      report("patch", "must be a table such as { tags = {...}, desired = {...} }, got " .. type(t.patch))
    else
      out.patch = t.patch
    end
  end

  -- Whom it targets: a query condition or a device list, never both.
  if t.query ~= nil and t.devices ~= nil then
    report("devices", "a job targets either query (a WHERE condition) or devices (a list of ids), not both")
  elseif t.query == nil and t.devices == nil then
    report(nil, "targets nobody: give query = \"<WHERE condition>\" (\"*\" for all devices) or devices = { \"id\", ... }")
  end
  if t.query ~= nil then
    if type(t.query) ~= "string" then
      report("query", "must be a WHERE condition as a string, got " .. type(t.query))
    else
      local ok, why = core.check_query_condition(t.query)
      if ok then out.query = t.query else report("query", why) end
    end
  end
  if t.devices ~= nil then
    if not is_array(t.devices) then
      report("devices", "must be a list of device ids such as { \"door-001\", \"door-002\" } (or ids(\"door-%03d\", 1, 50))")
    elseif #t.devices == 0 then
      report("devices", "is empty; list at least one device id")
    else
      local seen, ids, bad = {}, {}, 0
      for i, id in ipairs(t.devices) do
        if type(id) ~= "string" then
          report("devices", ("entry %d must be a device id string, got %s"):format(i, type(id)), id)
          bad = bad + 1
        else
          local ok, why = check_device_id(id)
          if not ok then
            report("devices", ("entry %d: %s"):format(i, why), id)
            bad = bad + 1
          elseif seen[id] then
            report("devices", ("'%s' is listed twice (entries %d and %d)"):format(id, seen[id], i), id)
            bad = bad + 1
          else
            seen[id] = i
            ids[#ids + 1] = id
          end
        end
        if bad >= 10 then
          report("devices", "more invalid entries follow; fix these first")
          break
        end
      end
      out.devices = ids
    end
  end

  if t.start ~= nil then
    local spec, why = M.parse_start(t.start)
    if spec then out.start = spec else report("start", why) end
  end
  local ttl
  if t.ttl ~= nil then
    local seconds, why = M.parse_duration(t.ttl)
    if seconds then ttl = seconds else report("ttl", why) end
  end
  check_request(out, ttl, report, decl.name)
  if t.revision ~= nil and type(t.revision) ~= "string" and type(t.revision) ~= "number" then
    report("revision", "must be a string or a number (change it to run the same job again), got " .. type(t.revision))
  end
  out.revision = t.revision
  if t.description ~= nil and type(t.description) ~= "string" then
    report("description", "must be a string, got " .. type(t.description))
  end
  out.description = t.description

  local function check_gate(gate, field, stage_index)
    if type(gate) ~= "table" or is_array(gate) and #gate > 0 then
      report(field, "must be a table such as { minSuccessRatio = 0.9, maxFailures = 2 }, got " .. type(gate),
        stage_index and "gate", stage_index)
      return nil
    end
    local out_gate = {}
    for key, value in pairs(gate) do
      if not GATE_FIELD_SET[key] then
        local hint = type(key) == "string" and M.suggest(key, GATE_FIELDS, GATE_ALIASES)
        report(field, "unknown gate field '" .. tostring(key) .. "'" ..
          (hint and ("; did you mean '" .. hint .. "'?") or "; a gate has minSuccessRatio and/or maxFailures"),
          tostring(key), stage_index)
      elseif key == "minSuccessRatio" then
        if type(value) ~= "number" or value ~= value or value < 0 or value > 1 then
          report(field .. ".minSuccessRatio", "must be a number from 0 to 1 (0.95 = 95% of the stage's devices succeed), got "
            .. tostring(value), "minSuccessRatio", stage_index)
        else
          out_gate.minSuccessRatio = value
        end
      elseif type(value) ~= "number" or value < 0 or value % 1 ~= 0 then
        report(field .. ".maxFailures", "must be a whole number of devices (0 or more), got " .. tostring(value),
          "maxFailures", stage_index)
      else
        out_gate.maxFailures = math.floor(value)
      end
    end
    return out_gate
  end

  if t.gate ~= nil then out.gate = check_gate(t.gate, "gate") end
  if t.stages ~= nil then
    if not is_array(t.stages) or #t.stages == 0 then
      report("stages", "must be a list of stages such as { { count = 1 }, { percent = 50 }, { percent = 100 } }")
    elseif #t.stages > M.MAX_STAGES then
      report("stages", ("has %d stages; at most %d"):format(#t.stages, M.MAX_STAGES))
    else
      out.stages = {}
      local last_count, last_percent = 0, 0
      for i, s in ipairs(t.stages) do
        local field = "stages[" .. i .. "]"
        if type(s) ~= "table" then
          report(field, "must be a table such as { percent = 10, gate = { minSuccessRatio = 0.9 } }, got " .. type(s),
            nil, i)
        else
          local stage = { index = i, name = s.name }
          for key in pairs(s) do
            if not STAGE_FIELD_SET[key] then
              local hint = type(key) == "string" and M.suggest(key, STAGE_FIELDS, { pct = "percent", n = "count" })
              report(field, "unknown stage field '" .. tostring(key) .. "'" ..
                (hint and ("; did you mean '" .. hint .. "'?") or "; a stage has count or percent, and optionally gate and name"),
                tostring(key), i)
            end
          end
          if s.count ~= nil and s.percent ~= nil then
            report(field, "has both count and percent; give one (each is the total reached by the end of the stage)", nil, i)
          elseif s.count == nil and s.percent == nil then
            report(field, "needs count (devices) or percent (of the targets) reached by the end of this stage", nil, i)
          elseif s.count ~= nil then
            if type(s.count) ~= "number" or s.count < 1 or s.count % 1 ~= 0 then
              report(field .. ".count", "must be a whole number of devices (1 or more), got " .. tostring(s.count), "count", i)
            elseif s.count <= last_count then
              report(field .. ".count", ("is %d, not more than the previous stage's %d; counts are cumulative totals")
                :format(s.count, last_count), "count", i)
            else
              stage.count, last_count = math.floor(s.count), s.count
            end
          else
            if type(s.percent) ~= "number" or not (s.percent > 0 and s.percent <= 100) then
              report(field .. ".percent", "must be a number above 0 and at most 100, got " .. tostring(s.percent), "percent", i)
            elseif s.percent <= last_percent then
              report(field .. ".percent", ("is %g, not more than the previous stage's %g; percents are cumulative totals")
                :format(s.percent, last_percent), "percent", i)
            else
              stage.percent, last_percent = s.percent, s.percent
            end
          end
          if s.name ~= nil and type(s.name) ~= "string" then
            report(field .. ".name", "must be a string, got " .. type(s.name), "name", i)
          end
          if s.gate ~= nil then stage.gate = check_gate(s.gate, field .. ".gate", i) else stage.gate = out.gate end
          out.stages[#out.stages + 1] = stage
        end
      end
    end
  elseif t.gate ~= nil then
    report("gate", "applies between stages; add stages = { ... } or remove the gate")
  end
  if out.stages and out.query and #out.query > M.MAX_STAGED_QUERY_LENGTH then
    report("query", ("is %d characters; stages need the devices listed with %s<query>, which IoT Hub accepts " ..
      "only up to %d characters in all: keep the query within %d characters, or list the devices in devices = { ... }")
      :format(#out.query, LISTING_SELECT, core.query_max_length, M.MAX_STAGED_QUERY_LENGTH))
  end
  return out
end

-- The identity of a job for its ids: everything that changes what is sent or how it rolls
-- out (not its description). The JSON encoder sorts keys, so this is canonical.
local function content_hash(job)
  local target = job.query and { query = job.query } or { devices = job.devices }
  if target.devices then
    local sorted = {}
    for i, id in ipairs(target.devices) do sorted[i] = id end
    table.sort(sorted)
    target.devices = sorted
  end
  local stages
  if job.stages then
    stages = {}
    for i, s in ipairs(job.stages) do stages[i] = { count = s.count, percent = s.percent, gate = s.gate } end
  end
  local start = job.start and (job.start.iso or job.start.epoch or (job.start.after and ("+" .. job.start.after)))
  local identity = { type = job.type, method = job.methodParams, patch = job.patch, target = target,
    start = start, ttl = job.ttl, stages = stages, revision = job.revision }
  local text = assert(core.json_encode(identity))
  local digest = core.hmac_sha256(HASH_KEY, text)
  return (digest:sub(1, 4):gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

---------------------------------------------------------------------------
-- Loading

--- Is path a directory?
function M.is_dir(path)
  local f = io.open(path .. "/.", "rb")
  if f then f:close() return true end
  return false
end

--- The whole file at path (for the CLI's @file values too), or nil and why.
function M.read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  -- A directory opens on Linux; reading it is what fails.
  local s, rerr = f:read("*a")
  f:close()
  if not s then return nil, path .. ": " .. (M.is_dir(path) and "is a directory" or tostring(rerr)) end
  return s
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

-- The sandbox the file runs in. Reading an unknown name is an error at its line (a typo
-- such as `jbo` would otherwise be a confusing "attempt to call a nil value"). The libraries
-- are copies: a file that replaces string.format changes only its own.
local function sandbox(declare, base_dir)
  local env = {
    string = copy(string), table = copy(table), math = copy(math),
    os = { time = os.time, date = os.date, clock = os.clock },
    pairs = pairs, ipairs = ipairs, next = next, select = select, type = type, tostring = tostring,
    tonumber = tonumber, error = error, assert = assert, pcall = pcall, unpack = unpack,
    null = core.null,
    array = core.json_array,
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      io.stderr:write(table.concat(parts, "\t"), "\n")
    end,
  }
  env.job = declare
  --- ids("door-%03d", 1, 50): the ids door-001 .. door-050.
  env.ids = function(format, first, last)
    if type(format) ~= "string" or type(first) ~= "number" or type(last) ~= "number" then
      error("ids(format, first, last) needs a format string such as \"door-%03d\" and two numbers", 2)
    end
    if last - first > 1000000 then error("ids(): at most 1,000,000 ids at once", 2) end
    local out = {}
    for i = first, last do out[#out + 1] = format:format(i) end
    return out
  end
  --- json_file("payload.json"): JSON data from a file next to the definitions file.
  env.json_file = function(path)
    if type(path) ~= "string" then error("json_file(path) needs a file name", 2) end
    local full = path:sub(1, 1) == "/" and path or (base_dir .. "/" .. path)
    local text, err = M.read_file(full)
    if not text then error("json_file: cannot read " .. full .. ": " .. tostring(err), 2) end
    local value, why = core.json_decode(text)
    if value == nil then error("json_file: " .. full .. " is not valid JSON: " .. tostring(why), 2) end
    return value
  end
  local known = {}
  for k in pairs(env) do known[#known + 1] = k end
  table.sort(known)
  return setmetatable(env, {
    __index = function(_, name)
      local hint = type(name) == "string" and M.suggest(name, known)
      error("unknown name '" .. tostring(name) .. "'" .. (hint and ("; did you mean '" .. hint .. "'?") or
        ("; a definitions file can use " .. table.concat(known, ", "))), 2)
    end,
  })
end

--- Loads definitions from Lua source. Returns { file=, jobs = { job... } } or nil, problems
-- (an array of problems, each printing as "file:line: job 'x', field 'y': message").
-- @param source the file's text
-- @param file the name to report (and to resolve json_file paths against)
-- @param opts optional { limits = core.sandbox_limits(...) } (default: the IOTHUB_SANDBOX_*
--   variables, else the defaults)
function M.load_string(source, file, opts)
  file = file or "definitions"
  local problems = {}
  local function add(line, job, field, message)
    problems[#problems + 1] = setmetatable({ file = file, line = line, job = job, field = field, message = message }, Problem)
  end
  local decls = {}
  local chunkname = "@" .. file

  local function declare(name)
    local line = debug.getinfo(2, "l").currentline
    local ok, why = M.check_name(name)
    if not ok then
      add(line, type(name) == "string" and name or nil, nil,
        type(name) == "string" and why or (why .. " (declare a job as job \"name\" { ... })"))
    end
    return function(fields)
      if type(fields) ~= "table" then
        error("job \"" .. tostring(name) .. "\" must be followed by a table: job \"" .. tostring(name) .. "\" { ... }", 2)
      end
      decls[#decls + 1] = { name = tostring(name), line = line, fields = fields, valid_name = ok }
    end
  end

  local limits = opts and opts.limits
  if not limits then
    local why
    limits, why = core.sandbox_limits()
    if not limits then
      add(nil, nil, nil, why)
      return nil, problems
    end
  end
  local chunk, err = core.sandbox_load(source, chunkname, sandbox(declare, dirname(file)))
  if not chunk then
    local line, msg = tostring(err):match("^[^\n]-:(%d+): (.*)$")
    add(tonumber(line), nil, nil, "syntax error: " .. (msg or tostring(err)))
    return nil, problems
  end
  local ok, run_err = core.sandbox_run(chunk, setmetatable({ name = LIMIT_NAME, source = chunkname },
    { __index = limits }))
  if not ok then
    -- "file:line: what", or "file: what" when a limit fired where no line is known
    local line, msg = run_err:match("^[^\n]-:(%d+): (.*)$")
    if not line and run_err:sub(1, #file + 2) == file .. ": " then msg = run_err:sub(#file + 3) end
    add(tonumber(line), nil, nil, msg or run_err)
    return nil, problems
  end
  if #decls == 0 then
    add(nil, nil, nil, "declares no jobs; declare one with job \"name\" { method = ..., query = ... }")
    return nil, problems
  end

  local src_lines = {}
  for l in (source .. "\n"):gmatch("([^\n]*)\n") do src_lines[#src_lines + 1] = l end
  local jobs, names = {}, {}
  for i, decl in ipairs(decls) do
    local next_line = decls[i + 1] and decls[i + 1].line - 1 or #src_lines
    if next_line < decl.line then next_line = #src_lines end
    if names[decl.name] then
      add(decl.line, decl.name, nil, "a job with this name is already declared at line " .. names[decl.name])
    end
    names[decl.name] = names[decl.name] or decl.line
    -- report(field, message, key, stage): the line is where `field =` (or, inside stage n,
    -- where its `key =`) is written.
    local function report(field, message, key, stage)
      local line
      if stage then
        -- Stage n is found by its count/percent entry: the k-th "percent =" after "stages =".
        local stages_line = field_line(src_lines, decl.line, next_line, "stages") or decl.line
        local list, anchor, nth = decl.fields.stages, nil, 0
        local s = list[stage]
        if type(s) == "table" then
          anchor = s.percent ~= nil and "percent" or s.count ~= nil and "count" or nil
          for k = 1, stage do
            if type(list[k]) == "table" and list[k][anchor] ~= nil then nth = nth + 1 end
          end
        end
        line = anchor and field_line(src_lines, stages_line, next_line, anchor, nth) or stages_line
        if key and key ~= anchor then line = field_line(src_lines, line, next_line, key) or line end
      elseif field then
        local top = field:match("^[%w_]+") or field
        line = field_line(src_lines, decl.line, next_line, top) or decl.line
        if key and type(decl.fields[top]) == "table" then
          -- an entry of a list (e.g. a device id): find it quoted after the field
          local needle = "[\"']" .. tostring(key):gsub("%p", "%%%0") .. "[\"']"
          for l = line, math.min(next_line, #src_lines) do
            if src_lines[l]:find(needle) then line = l break end
          end
        end
      else
        line = decl.line
      end
      add(line, decl.name, field, message)
    end
    local job = validate_job(decl, report)
    jobs[#jobs + 1] = job
  end
  if #problems > 0 then
    table.sort(problems, function(a, b) return (a.line or 0) < (b.line or 0) end)
    return nil, problems
  end
  for _, job in ipairs(jobs) do job.hash = content_hash(job) end
  return { file = file, jobs = jobs }
end

--- Loads a definitions file. Returns the definitions or nil, problems. opts: as load_string's.
function M.load(path, opts)
  if type(path) ~= "string" then error("definitions.load: path must be a string", 2) end
  local source, err = M.read_file(path)
  if not source then
    local why = M.is_dir(path) and "is a directory; give the definitions file in it (a .lua file that declares jobs)"
      or ("cannot read the file: " .. tostring(err))
    return nil, { setmetatable({ file = path, message = why }, Problem) }
  end
  return M.load_string(source, path, opts)
end

M.JOB_FIELDS = JOB_FIELDS

return M
