-- Loads a devices file: a Lua chunk run in a sandbox that returns
--   { seed = 1,
--     devices = { { id=, tags=, desired=, reported=, methods={name=fn}, onDesired=fn|"report", status=,
--                   offline=, onlineAfter=, latency=, failureRate=, failure= } },
--     fleets  = { { count=, id="door-%03d" | fn(i), start=1, ...the same fields } } }
-- and turns it into registry definitions (registry.add). Handlers are plain functions (or a
-- built-in's name: DESIRED_HANDLERS); methods.lua calls them and applies the knobs. The file
-- and everything it runs while loading (its fleets' functions too) run under the C core's
-- sandbox limits (csrc/sandbox.c: memory, instructions, seconds); its handlers run under the
-- same limits at request time (methods.lua), each stretch between two ctx.sleep calls. Fields
-- other than id, count, start, methods and onDesired may be function(i, id) returning the
-- value (i is nil for entries of `devices`). Randomness (knobs, offline fractions, the
-- file's math.random) comes from seeded streams, so a run is reproducible: the same seed
-- gives the same outcomes.
local util = require "emulator.util"
local registry = require "emulator.registry"

local core = util.core
local M = {}

local LIMIT_NAME = "devices-file" -- "(the devices-file limit)" in a limit's message

---------------------------------------------------------------------------
-- Seeded random streams (Park-Miller "minimal standard", multiplier 48271). The state
-- stays below 2^31 and products below 2^47, so Lua 5.4 integers and LuaJIT doubles give
-- the same sequence; each (seed, device, purpose) gets its own stream via HMAC-SHA256.

local M31 = 2147483647

local function stream_state(seed, id, purpose)
  local h = core.hmac_sha256(tostring(seed), tostring(id) .. "\0" .. purpose)
  local b1, b2, b3, b4 = h:byte(1, 4)
  return ((b1 % 128) * 16777216 + b2 * 65536 + b3 * 256 + b4) % (M31 - 1) + 1
end

-- Returns a function giving numbers in [0, 1); seeded lazily (a large fleet pays nothing
-- for devices whose knobs never draw).
function M.random_stream(seed, id, purpose)
  local x
  return function()
    if not x then x = stream_state(seed, id, purpose) end
    x = (x * 48271) % M31
    return (x - 1) / (M31 - 1)
  end
end

-- math.random's calling conventions over a stream.
local function random_like_math(next_float)
  return function(m, n)
    local r = next_float()
    if m == nil then return r end
    if n == nil then m, n = 1, m end
    if type(m) ~= "number" or type(n) ~= "number" or m > n then
      error("bad arguments to math.random (interval is empty)", 2)
    end
    return m + math.floor(r * (n - m + 1))
  end
end

---------------------------------------------------------------------------
-- Sandbox

local function copy(t)
  local out = {}
  for k, v in pairs(t) do out[k] = v end
  return out
end

-- The file's math.random is a fixed, reproducible sequence; math.randomseed(x) picks another.
local function sandbox()
  local math_copy = copy(math)
  local stream = M.random_stream(1, "", "devices-file")
  math_copy.random = random_like_math(function() return stream() end)
  math_copy.randomseed = function(x) stream = M.random_stream(tostring(x), "", "devices-file") end
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
    select = select, tonumber = tonumber, tostring = tostring, type = type, unpack = unpack or rawget(table, "unpack"),
    -- No finalizers (Lua 5.4 would run them later, outside the limits) and no way to reach the
    -- strings' metatable, which the whole emulator shares.
    setmetatable = function(t, mt)
      if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
        error("setmetatable: __gc is not available in a devices file", 2)
      end
      return setmetatable(t, mt)
    end,
    getmetatable = function(v)
      if type(v) == "string" then return nil end
      return getmetatable(v)
    end,
    rawget = rawget, rawset = rawset,
    string = copy(string), table = copy(table), math = math_copy,
    os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime },
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      util.log("devices", table.concat(parts, "\t"))
    end,
  }
  env._G = env
  return env
end

---------------------------------------------------------------------------
-- Entries

local FIELDS = { id = 1, count = 1, start = 1, tags = 1, desired = 1, reported = 1, methods = 1, onDesired = 1,
  status = 1, offline = 1, onlineAfter = 1, latency = 1, failureRate = 1, failure = 1 }
local PER_DEVICE = { "tags", "desired", "reported", "status", "offline", "onlineAfter", "latency", "failureRate",
  "failure" }
local SECTIONS = { tags = "tags", desired = "properties.desired", reported = "properties.reported" }
local FAILURE_MODES = { error = true, timeout = true, offline = true }
local KNOBS = { "latency", "failureRate", "failure" }

-- Built-in desired-property handlers, named in place of a function (onDesired = "report").
local DESIRED_HANDLERS = {
  -- A well-behaved device: logs the patch and reports the values it applied.
  report = function(patch, ctx)
    ctx.log("desired properties changed: " .. ctx.json(patch))
    local applied = copy(patch)
    applied["$version"] = nil
    ctx.report(applied)
  end,
}

local function is_seconds(v)
  return type(v) == "number" and v >= 0 and v < math.huge
end

-- Checks one resolved field value; returns the normalised value, or nil, message.
local function field(name, v, where)
  if v == nil then return nil end
  local at = where .. "." .. name
  if SECTIONS[name] then
    if type(v) ~= "table" then return nil, at .. " must be a table (or a function(i, id) returning one)" end
    v = util.jsonify(v)
    local ok, err = registry.check_whole_section(v, SECTIONS[name])
    if not ok then return nil, at .. ": " .. err end
    return v
  elseif name == "status" then
    if v ~= "enabled" and v ~= "disabled" then return nil, at .. " must be 'enabled' or 'disabled'" end
  elseif name == "offline" then
    if type(v) == "number" then
      if v < 0 or v > 1 then return nil, at .. " as a number is the fraction of devices offline, within [0, 1]" end
    elseif type(v) ~= "boolean" then
      return nil, at .. " must be true/false or a fraction within [0, 1]"
    end
  elseif name == "onlineAfter" then
    if not is_seconds(v) then return nil, at .. " must be a number of seconds >= 0" end
  elseif name == "latency" then
    if type(v) == "table" then
      if not (is_seconds(v[1]) and is_seconds(v[2]) and v[1] <= v[2]) then
        return nil, at .. " as a range must be { min, max } seconds with 0 <= min <= max"
      end
      return { v[1], v[2] }
    end
    if not is_seconds(v) then return nil, at .. " must be seconds >= 0, or a { min, max } range" end
    return { v, v }
  elseif name == "failureRate" then
    if type(v) ~= "number" or v < 0 or v > 1 then return nil, at .. " must be a probability within [0, 1]" end
  elseif name == "failure" then
    if type(v) == "table" then
      local st = v.status
      if type(st) ~= "number" or st % 1 ~= 0 then return nil, at .. ".status must be an integer" end
      return { status = st, payload = util.jsonify(util.deepcopy(v.payload)) }
    end
    if not FAILURE_MODES[v] then
      return nil, at .. " must be 'error', 'timeout', 'offline' or { status = n, payload = ... }"
    end
  end
  return v
end

local function check_entry(e, where)
  if type(e) ~= "table" then return nil, where .. " must be a table" end
  for k in pairs(e) do
    if not FIELDS[k] then return nil, where .. ": unknown field '" .. tostring(k) .. "'" end
  end
  if e.methods ~= nil then
    if type(e.methods) ~= "table" then return nil, where .. ".methods must be a table of functions" end
    for name, fn in pairs(e.methods) do
      if type(name) ~= "string" or name == "" or type(fn) ~= "function" then
        return nil, where .. ".methods must map method names to function(payload, ctx)"
      end
    end
  end
  if e.onDesired ~= nil and type(e.onDesired) ~= "function" and not DESIRED_HANDLERS[e.onDesired] then
    return nil, where .. ".onDesired must be a function(patch, ctx) or \"report\" (echo the changes as reported)"
  end
  -- Static values are checked once per entry, not once per device of a fleet.
  local static = {}
  for _, name in ipairs(PER_DEVICE) do
    if type(e[name]) == "function" then
      static.dynamic = true
    else
      local v, err = field(name, e[name], where)
      if err then return nil, err end
      static[name] = v
    end
  end
  for _, name in ipairs(KNOBS) do
    if type(e[name]) == "function" then static.dynamic_knobs = true end
  end
  return static
end

-- The simulation shared by an entry's devices (handlers and knobs; each device draws from
-- its own streams, made by methods.lua from sim.seed and its id).
-- box: the limits its handlers run under (methods.lua).
local function entry_sim(e, knobs, seed, box)
  return { methods = e.methods or {}, onDesired = DESIRED_HANDLERS[e.onDesired] or e.onDesired, latency = knobs.latency,
    failureRate = knobs.failureRate or 0, failure = knobs.failure or "error", seed = seed, sandbox = box }
end

local function make_def(e, static, id, i, where, seed, box)
  local problem = registry.device_id_problem(id)
  if problem then return nil, where .. ": '" .. tostring(id) .. "': " .. problem end
  local v = static
  if static.dynamic then -- some fields are function(i, id): resolve them for this device
    where = where .. " ('" .. id .. "')"
    v = {}
    for _, name in ipairs(PER_DEVICE) do
      if type(e[name]) == "function" then
        local ok, got = pcall(e[name], i, id)
        if not ok then return nil, where .. "." .. name .. ": " .. tostring(got) end
        local value, err = field(name, got, where)
        if err then return nil, err end
        v[name] = value
      else
        v[name] = static[name]
      end
    end
  end
  local offline = v.offline
  if type(offline) == "number" then
    offline = M.random_stream(seed, id, "offline")() < offline
  end
  local sim
  if static.dynamic_knobs then
    sim = entry_sim(e, v, seed, box)
  else
    sim = static.sim or entry_sim(e, static, seed, box)
    static.sim = sim
  end
  return {
    id = id, simulated = true, status = v.status,
    tags = v.tags, desired = v.desired, reported = v.reported,
    offline = offline or false, onlineAfter = v.onlineAfter, sim = sim,
  }
end

local TOP = { seed = 1, devices = 1, fleets = 1 }

-- The definitions the file's result describes, or nil, message (its functions run here too).
local function expand(spec, box)
  local seed = 1
  if type(spec) ~= "table" then return nil, "the devices file must return a table { devices = ..., fleets = ... }" end
  for k in pairs(spec) do
    if not TOP[k] then return nil, "unknown top-level field '" .. tostring(k) .. "' (use seed, devices, fleets)" end
  end
  if spec.seed ~= nil then
    if type(spec.seed) ~= "number" and type(spec.seed) ~= "string" then
      return nil, "seed must be a number or a string"
    end
    seed = spec.seed
  end
  local defs, seen = {}, {}
  local function add(def)
    if seen[def.id] then return nil, "device id '" .. def.id .. "' is defined twice" end
    seen[def.id] = true
    defs[#defs + 1] = def
    return true
  end
  for _, list in ipairs({ "devices", "fleets" }) do
    if spec[list] ~= nil and type(spec[list]) ~= "table" then return nil, list .. " must be a list of tables" end
  end
  for i, e in ipairs(spec.devices or {}) do
    local where = "devices[" .. i .. "]"
    local static, cerr = check_entry(e, where)
    if not static then return nil, cerr end
    if e.count ~= nil or e.start ~= nil then return nil, where .. ": count/start belong in fleets" end
    local def, derr = make_def(e, static, e.id, nil, where, seed, box)
    if not def then return nil, derr end
    local added, aerr = add(def)
    if not added then return nil, aerr end
  end
  for i, f in ipairs(spec.fleets or {}) do
    local where = "fleets[" .. i .. "]"
    local static, cerr = check_entry(f, where)
    if not static then return nil, cerr end
    if type(f.count) ~= "number" or f.count < 0 or f.count % 1 ~= 0 then
      return nil, where .. ".count must be a whole number"
    end
    local pattern = f.id
    if type(pattern) == "string" then
      if not pattern:find("%%") then return nil, where .. ".id must be a format string such as 'door-%03d'" end
    elseif type(pattern) ~= "function" then
      return nil, where .. ".id must be a format string such as 'door-%03d' or a function(i) returning the id"
    end
    local start = f.start or 1
    if type(start) ~= "number" or start % 1 ~= 0 then return nil, where .. ".start must be an integer" end
    for n = start, start + f.count - 1 do
      local okf, id
      if type(pattern) == "function" then
        okf, id = pcall(pattern, n)
      else
        okf, id = pcall(string.format, pattern, n)
      end
      if not okf then return nil, where .. ".id: " .. tostring(id) end
      local def, derr = make_def(f, static, id, n, where, seed, box)
      if not def then return nil, derr end
      local added, aerr = add(def)
      if not added then return nil, aerr end
    end
  end
  return defs
end

-- Evaluates src (the file's text) under the sandbox limits. Returns a list of definitions, or
-- nil and a message that starts with the file's name ("name:line: what" when the line is known).
-- opts: { limits = core.sandbox_limits(...) } (default: the IOTHUB_SANDBOX_* variables, else
-- the defaults).
function M.from_string(src, name, opts)
  name = name or "devices"
  local limits = opts and opts.limits
  if not limits then
    local why
    limits, why = core.sandbox_limits()
    if not limits then return nil, name .. ": " .. why end
  end
  local chunkname = "@" .. name
  local fn, err = core.sandbox_load(src, chunkname, sandbox())
  if not fn then return nil, err end
  -- The limits its handlers get (methods.lua), and the load's own.
  local box = { memory = limits.memory, instructions = limits.instructions, seconds = limits.seconds,
    name = LIMIT_NAME, source = chunkname, subject = "handler" }
  local ok, defs, problem = core.sandbox_run(function() return expand(fn(), box) end,
    setmetatable({ subject = "file" }, { __index = box }))
  if not ok then return nil, defs end
  if not defs then return nil, name .. ": " .. problem end
  return defs
end

-- opts: as from_string's, and name (what messages call the file; default path).
function M.load(path, opts)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local src = f:read("*a")
  f:close()
  return M.from_string(src, opts and opts.name or path, opts)
end

-- bin/iothub-emulator checks the devices file with this before it starts nginx: the same
-- loader under the same limits, so a bad file is refused at once with "file:line: what".
-- Reads IOTHUB_EMU_DEVICES (the file), IOTHUB_EMU_DEVICES_SHOWN (its name in messages) and
-- IOTHUB_EMU_SANDBOX_MEMORY/_INSTRUCTIONS/_SECONDS (the launcher's --sandbox-* flags); prints
-- the problem on stderr. Returns the exit code: 0 (fine) or 2.
function M.check_from_env(getenv)
  getenv = getenv or os.getenv
  local function flag(name) local v = getenv("IOTHUB_EMU_SANDBOX_" .. name); if v ~= "" then return v end end
  local limits, why = core.sandbox_limits({ memory = flag("MEMORY"), instructions = flag("INSTRUCTIONS"),
    seconds = flag("SECONDS") })
  local defs
  if limits then
    util.set_log_path("/dev/null") -- the file's print() shows once, from nginx
    local path = getenv("IOTHUB_EMU_DEVICES")
    local shown = getenv("IOTHUB_EMU_DEVICES_SHOWN") or path
    defs, why = M.load(path, { name = shown ~= "" and shown or path, limits = limits })
  end
  if defs then return 0 end
  io.stderr:write("iothub-emulator: ", tostring(why), "\n")
  return 2
end

return M
