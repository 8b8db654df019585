-- Persistence for a kept --dir: one JSON file per kind in <dir>/state/ (registry.json,
-- jobs.json). Each is written to a temp file and renamed over the old one, so a reader (or
-- a crash) only ever sees a complete file; writes happen on a short debounce after changes
-- and once more when the nginx worker exits. Loaded at start-up.
--
-- A big state (100,000 devices: 80 MB) takes about 2 s to encode, and nginx has one worker:
-- from a timer or a request the file is built in slices of a few milliseconds with a pause
-- between them, so requests keep being served while it is written. Only exit_worker, which
-- cannot yield, writes in one go.
local util = require "emulator.util"

local core = util.core
local M = {}

local settings = {
  debounce = 0.5,
  duty = 10,         -- a kind is rewritten at most 1/duty of the time (by its work time)
  slice = 0.005,     -- seconds of encoding between pauses: about the longest a save holds up requests
  -- Never ngx.sleep(0): without OpenResty's nginx patch that is a 0 ms timer which nginx
  -- expires again in the same loop, starving all I/O (see jobs.lua).
  pause = 0.001,
  buffer = 1024 * 1024, -- bytes collected before they go to the file
  retry = 5,         -- seconds before a failed write is tried again
}
local state_dir        -- nil: persistence off (a temporary --dir)
local kinds, names = {}, {}
local started = false  -- timers exist only once the worker runs

-- Phases whose Lua code may sleep (exit_worker and init may not).
local YIELDABLE = { timer = true, content = true, access = true, rewrite = true }

local function can_yield()
  return ngx ~= nil and YIELDABLE[ngx.get_phase()] == true
end

local function path_of(name)
  return state_dir .. "/" .. name .. ".json"
end

-- Registers a kind of state. export(out) writes the state through `out` (see M.writer) or
-- returns a plain table to be encoded whole; import(t) -> true | nil, message.
function M.register(name, export, import)
  if not kinds[name] then names[#names + 1] = name end
  kinds[name] = { name = name, export = export, import = import, dirty = false, armed = false, cost = 0 }
end

-- dir: the state directory, or nil/"" for no persistence. opts: debounce, slice (seconds).
function M.configure(dir, opts)
  state_dir = (dir ~= "" and dir) or nil
  for _, k in ipairs({ "debounce", "slice" }) do
    if opts and tonumber(opts[k]) then settings[k] = tonumber(opts[k]) end
  end
end

function M.dir()
  return state_dir
end

local SUPERSEDED = {} -- raised inside a save that a newer save of the same kind replaced

-- The JSON text of a state, given piece by piece to emit(text). Exporters describe the
-- document as nested objects that end in one array:
--   out.open(t, key)  starts object t with an array under key; inside an array it is the
--                     next element
--   out.item(v)       the array's next element
--   out.close()       ends the array and its object
-- Items are encoded in batches, one synchronous step each (one encoder call for many small
-- items), and emit may pause only between batches: v is saved as it is when given, while
-- the state may change from one batch to the next (a device deleted, a row that moved on).
local BATCH = 64

function M.writer(emit)
  local out, first, depth = {}, {}, 0
  local batch, n = {}, 0
  local function encode(v)
    local text, err = util.json_encode(v)
    if not text then error("cannot encode the state: " .. tostring(err), 0) end
    return text
  end
  local function separator()
    if depth == 0 then return "" end
    if first[depth] then
      first[depth] = false
      return ""
    end
    return ","
  end
  local function flush_batch()
    if n == 0 then return end
    local text = encode(util.array(batch)):sub(2, -2) -- the items without the array's brackets
    batch, n = {}, 0
    emit(separator() .. text)
  end
  function out.open(t, key)
    local text = encode(t)
    assert(text:sub(-1) == "}" and text ~= "{}", "out.open takes an object with fields")
    flush_batch()
    local sep = separator()
    depth = depth + 1
    first[depth] = true
    emit(sep .. text:sub(1, -2) .. "," .. encode(key) .. ":[")
  end
  function out.item(v)
    n = n + 1
    batch[n] = v
    if n == BATCH then flush_batch() end
  end
  function out.close()
    assert(depth > 0, "out.close without out.open")
    flush_batch()
    depth = depth - 1
    emit("]}")
  end
  return out
end

local arm

-- Writes kind k to its temp file through the exporter, in slices when it may yield, then
-- renames it over the state file. Returns true, nil, SUPERSEDED (a newer save of k started
-- while this one paused), or nil, message.
local function save(k)
  local cooperative = can_yield()
  local run = {}
  if k.saving then k.saving.superseded = true end -- it stops at its next pause
  k.saving = run
  k.dirty = false -- changes made from now on mark it again
  local path = path_of(k.name)
  local tmp = path .. ".tmp"
  -- A superseded save may still hold the old temp file open: unlink it rather than
  -- truncating a file someone writes into.
  os.remove(tmp)
  local t0 = core.monotime()
  local work, slices, slice_start, longest = 0, 1, t0, 0
  local f, err = io.open(tmp, "wb")
  local buf, n, size = {}, 0, 0

  local function drain()
    if n == 0 then return end
    local ok, werr = f:write(table.concat(buf, "", 1, n))
    if not ok then error(werr, 0) end
    buf, n, size = {}, 0, 0
  end
  local function emit(text)
    n = n + 1
    buf[n] = text
    size = size + #text
    local spent = cooperative and core.monotime() - slice_start or 0
    if spent > settings.slice then
      drain()
      spent = core.monotime() - slice_start
      work, longest = work + spent, math.max(longest, spent)
      ngx.sleep(settings.pause)
      if run.superseded then error(SUPERSEDED, 0) end
      slices = slices + 1
      slice_start = core.monotime()
    elseif size >= settings.buffer then
      drain()
    end
  end

  local ok = f ~= nil
  if ok then
    ok, err = pcall(function()
      local t = k.export(M.writer(emit))
      if type(t) == "table" then emit((assert(util.json_encode(t)))) end
      drain()
      local fok, ferr = f:flush()
      if not fok then error(ferr, 0) end
    end)
    f:close()
  end
  if err == SUPERSEDED then return nil, SUPERSEDED end
  k.saving = nil
  -- on ext4 this alone can take tens of ms for a big file: the new file's delayed blocks are
  -- allocated and the old file's freed
  if ok then ok, err = os.rename(tmp, path) end
  local now = core.monotime()
  local wall = now - t0
  work, longest = work + now - slice_start, math.max(longest, now - slice_start)
  k.cost, k.failed = work, not ok
  if not ok then
    os.remove(tmp)
    k.dirty = true
    err = "cannot save " .. path .. ": " .. tostring(err)
    util.log("hub", err)
  elseif wall > 0.25 and ngx then
    ngx.log(ngx.NOTICE, string.format("state %s saved in %.2f s, %.2f s of work in %d slice(s), the longest %.0f ms",
      k.name, wall, work, slices, longest * 1e3))
  end
  if k.dirty then arm(k) end -- changed while it was written, or to try again
  if not ok then return nil, err end
  return true
end

-- Each kind has its own timer: a big state that takes long to write is written less often
-- (encoding for at most `duty`-th of the time), and one write at a time per kind.
function arm(k)
  if k.armed or k.saving or not started or ngx.worker.exiting() then return end
  local delay = math.max(settings.debounce, settings.duty * k.cost, k.failed and settings.retry or 0)
  k.armed = true
  local ok, err = ngx.timer.at(delay, function(premature)
    k.armed = false
    if premature or not k.dirty or k.saving then return end -- exit_worker saves; a running save re-arms
    save(k)
  end)
  if not ok then
    k.armed = false
    ngx.log(ngx.ERR, "cannot arm the state writer: ", err)
  end
end

local function flush(force, list)
  if not state_dir then return {} end
  local written = {}
  for _, name in ipairs(list) do
    local k = kinds[name]
    if k.dirty or k.saving or force then
      local ok, err = save(k)
      -- superseded: a later flush of the same kind took over and writes the newer state
      if not ok and err ~= SUPERSEDED then return nil, err end
      written[#written + 1] = name
    end
  end
  return written
end

-- Writes every dirty kind (or all with force) now, in slices where the caller may yield;
-- returns the names written, or nil, message. A save still in progress is replaced.
function M.flush(force)
  return flush(force, names)
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

-- exit_worker: last write, synchronously (a save paused in a timer is replaced). nginx kills
-- a worker that takes seconds to exit, so the cheapest kinds go first: a kill in the middle
-- of a long write then loses as little as possible (the old file stays).
function M.stop()
  if not state_dir then return end
  local list = {}
  for i, name in ipairs(names) do list[i] = name end
  table.sort(list, function(a, b) return kinds[a].cost < kinds[b].cost end)
  for _, name in ipairs(list) do
    local ok, err = flush(false, { name })
    if not ok then ngx.log(ngx.ERR, err) end
  end
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
