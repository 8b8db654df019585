-- Loads a devices file: a Lua chunk run in a sandbox that returns
--   { devices = { {id=, tags=, desired=, reported=, methods={name=fn}, onDesired=fn, offline=} },
--     fleets  = { {count=, id="door-%03d", start=1, tags=tbl|fn(i,id), ...same fields} } }
-- and turns it into registry definitions. Handlers are plain functions; methods.lua calls them.
local util = require "emulator.util"

local M = {}

local function sandbox()
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs, pcall = pcall,
    select = select, tonumber = tonumber, tostring = tostring, type = type, unpack = unpack or rawget(table, "unpack"),
    setmetatable = setmetatable, getmetatable = getmetatable, rawget = rawget, rawset = rawset,
    string = string, table = table, math = math,
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

local function compile(src, name, env)
  if setfenv then -- LuaJIT / 5.1
    local fn, err = loadstring(src, name)
    if not fn then return nil, err end
    return setfenv(fn, env)
  end
  return load(src, name, "t", env)
end

local function value_of(v, i, id)
  if type(v) == "function" then return v(i, id) end
  return v
end

local FIELDS = { id = 1, tags = 1, desired = 1, reported = 1, methods = 1, onDesired = 1, offline = 1,
  count = 1, start = 1, status = 1 }

local function check_entry(e, where)
  if type(e) ~= "table" then return nil, where .. " must be a table" end
  for k in pairs(e) do
    if not FIELDS[k] then return nil, where .. ": unknown field '" .. tostring(k) .. "'" end
  end
  if e.methods ~= nil then
    if type(e.methods) ~= "table" then return nil, where .. ".methods must be a table of functions" end
    for name, fn in pairs(e.methods) do
      if type(name) ~= "string" or type(fn) ~= "function" then
        return nil, where .. ".methods must map method names to functions"
      end
    end
  end
  if e.onDesired ~= nil and type(e.onDesired) ~= "function" then
    return nil, where .. ".onDesired must be a function"
  end
  for _, f in ipairs({ "tags", "desired", "reported" }) do
    local v = e[f]
    if v ~= nil and type(v) ~= "table" and type(v) ~= "function" then
      return nil, where .. "." .. f .. " must be a table (or a function(i, id) returning one)"
    end
  end
  return true
end

local function make_def(e, id, i, where)
  if type(id) ~= "string" or id == "" then return nil, where .. ": id must be a non-empty string" end
  local def = { id = id, simulated = true, offline = e.offline and true or false,
    status = e.status, methods = e.methods or {}, onDesired = e.onDesired }
  for _, f in ipairs({ "tags", "desired", "reported" }) do
    local ok, v = pcall(value_of, e[f], i, id)
    if not ok then return nil, where .. "." .. f .. ": " .. tostring(v) end
    if v ~= nil and type(v) ~= "table" then return nil, where .. "." .. f .. " did not return a table" end
    def[f] = util.jsonify(util.deepcopy(v or {}))
  end
  return def
end

-- Evaluates src (the file's text); returns a list of definitions or nil, message.
function M.from_string(src, name)
  local env = sandbox()
  local fn, err = compile(src, "@" .. (name or "devices"), env)
  if not fn then return nil, err end
  local ok, spec = pcall(fn)
  if not ok then return nil, tostring(spec) end
  if type(spec) ~= "table" then return nil, "the devices file must return a table" end
  local defs, seen = {}, {}
  local function add(def)
    if seen[def.id] then return nil, "device id '" .. def.id .. "' is defined twice" end
    seen[def.id] = true
    defs[#defs + 1] = def
    return true
  end
  for i, e in ipairs(spec.devices or {}) do
    local where = "devices[" .. i .. "]"
    local okc, cerr = check_entry(e, where)
    if not okc then return nil, cerr end
    local def, derr = make_def(e, e.id, nil, where)
    if not def then return nil, derr end
    local added, aerr = add(def)
    if not added then return nil, aerr end
  end
  for i, f in ipairs(spec.fleets or {}) do
    local where = "fleets[" .. i .. "]"
    local okc, cerr = check_entry(f, where)
    if not okc then return nil, cerr end
    if type(f.count) ~= "number" or f.count < 0 or f.count % 1 ~= 0 then
      return nil, where .. ".count must be a whole number"
    end
    if type(f.id) ~= "string" or not f.id:find("%%") then
      return nil, where .. ".id must be a format string such as 'door-%03d'"
    end
    local start = f.start or 1
    for n = start, start + f.count - 1 do
      local okf, id = pcall(string.format, f.id, n)
      if not okf then return nil, where .. ".id: " .. tostring(id) end
      local def, derr = make_def(f, id, n, where)
      if not def then return nil, derr end
      local added, aerr = add(def)
      if not added then return nil, aerr end
    end
  end
  return defs
end

function M.load(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local src = f:read("*a")
  f:close()
  return M.from_string(src, path)
end

return M
