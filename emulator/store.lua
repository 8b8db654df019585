-- Persistence for a kept --dir: one JSON file per kind in <dir>/state/ (registry.json,
-- jobs.json). Each is written whole to a temp file and renamed over the old one, so a
-- reader (or a crash) only ever sees a complete file; writes happen on a short debounce
-- after changes and once more when the nginx worker exits. Loaded at start-up.
local util = require "emulator.util"

local M = {}

local settings = { debounce = 0.5, duty = 10 }
local state_dir        -- nil: persistence off (a temporary --dir)
local kinds, names = {}, {}
local started = false  -- timers exist only once the worker runs

local function path_of(name)
  return state_dir .. "/" .. name .. ".json"
end

-- Registers a kind of state: export() -> plain table, import(t) -> true | nil, message.
function M.register(name, export, import)
  if not kinds[name] then names[#names + 1] = name end
  kinds[name] = { name = name, export = export, import = import, dirty = false, armed = false, cost = 0 }
end

-- dir: the state directory, or nil/"" for no persistence. opts.debounce (seconds).
function M.configure(dir, opts)
  state_dir = (dir ~= "" and dir) or nil
  if opts and tonumber(opts.debounce) then settings.debounce = tonumber(opts.debounce) end
end

function M.dir()
  return state_dir
end

local function write_atomic(path, data)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then return nil, err end
  local ok, werr = f:write(data)
  if ok then ok, werr = f:flush() end
  f:close()
  if ok then ok, werr = os.rename(tmp, path) end
  if not ok then
    os.remove(tmp)
    return nil, werr
  end
  return true
end

-- Export, encode and write do not yield, so the file is one consistent snapshot of the kind.
local function save(k)
  k.dirty = false -- changes made from now on mark it again
  local t0 = util.core.monotime()
  local data, err = util.json_encode(k.export())
  if data then data, err = write_atomic(path_of(k.name), data) end
  k.cost = util.core.monotime() - t0
  if not data then
    k.dirty = true
    local msg = "cannot save " .. path_of(k.name) .. ": " .. tostring(err)
    util.log("hub", msg)
    return nil, msg
  end
  if k.cost > 0.25 and ngx then
    ngx.log(ngx.NOTICE, string.format("state %s saved in %.2f s", k.name, k.cost))
  end
  return true
end

-- Writes every dirty kind (or all with force); returns the names written, or nil, message.
function M.flush(force)
  if not state_dir then return {} end
  local written = {}
  for _, name in ipairs(names) do
    local k = kinds[name]
    if k.dirty or force then
      local ok, err = save(k)
      if not ok then return nil, err end
      written[#written + 1] = name
    end
  end
  return written
end

-- Each kind has its own timer: a big state that takes long to write is written less often
-- (at most `duty`-th of the time), and two kinds never stall requests back to back.
local function arm(k)
  if k.armed or not started then return end
  k.armed = true
  local ok, err = ngx.timer.at(math.max(settings.debounce, settings.duty * k.cost), function(premature)
    k.armed = false
    if premature or not k.dirty then return end -- exit_worker saves
    save(k)
  end)
  if not ok then
    k.armed = false
    ngx.log(ngx.ERR, "cannot arm the state writer: ", err)
  end
end

-- Marks a kind changed; the file is rewritten after the debounce.
function M.mark(name)
  local k = kinds[name]
  if not k or not state_dir then return end
  if not k.dirty then
    k.dirty = true
    arm(k)
  end
end

-- init_worker: from now on changes are written by timers.
function M.start()
  started = true
  for _, name in ipairs(names) do
    if kinds[name].dirty then arm(kinds[name]) end
  end
end

-- exit_worker: last write, synchronously.
function M.stop()
  if not state_dir then return end
  local ok, err = M.flush()
  if not ok then ngx.log(ngx.ERR, err) end
end

-- Loads every kind whose file exists. Returns the names loaded, or raises an error that
-- says which file is wrong and what to do (init_by_lua shows it and nginx does not start).
function M.load()
  if not state_dir then return {} end
  local loaded = {}
  for _, name in ipairs(names) do
    local path = path_of(name)
    os.remove(path .. ".tmp") -- left by a write that never completed; the old file is intact
    local f = io.open(path, "rb")
    if f then
      local data = f:read("*a")
      f:close()
      local t, err = util.json_decode(data)
      if t == nil then
        error("state file " .. path .. " is not valid JSON (" .. tostring(err)
          .. "); move it away to start without it", 0)
      end
      local ok, ierr = kinds[name].import(t)
      if not ok then
        error("state file " .. path .. ": " .. tostring(ierr) .. "; move it away to start without it", 0)
      end
      loaded[#loaded + 1] = name
    end
  end
  return loaded
end

return M
