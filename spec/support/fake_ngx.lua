-- A stand-in for the parts of OpenResty's `ngx` that timers and content handlers use, so code
-- written for nginx can be specified in plain Lua 5.4 or LuaJIT:
--   * shared dicts whose expiry follows a clock the spec moves (`advance`);
--   * timers that only run when the spec starts them, one run at a time;
--   * requests, each with its own method, URI, body, status, headers and output.
-- Every timer run and request is a task (a coroutine). Code under test waits through `wait`
-- (fake I/O) or ngx.sleep, and each wait hands a label back to the spec, so a spec can stop
-- one task at a known wait, run others, then let the first one go on: the interleavings that
-- nginx produces when cosocket reads and sleeps yield.
local FakeNgx = {}
FakeNgx.__index = FakeNgx

local unpack = table.unpack or unpack -- luacheck: ignore 143
local function pack(...) return { n = select("#", ...), ... } end

---------------------------------------------------------------------------
-- lua_shared_dict: get/set/add/delete with nginx's return values. Values must be what nginx
-- can store (nil, boolean, number, string), so storing a table fails here as it would there.

local SharedDict = {}
SharedDict.__index = SharedDict

local STORABLE = { boolean = true, number = true, string = true }

function SharedDict:_entry(key)
  local entry = self.entries[key]
  if entry and entry.expires and entry.expires <= self.fake.clock then
    self.entries[key] = nil
    return nil
  end
  return entry
end

function SharedDict:get(key)
  local entry = self:_entry(key)
  if entry then return entry.value end
  return nil
end

function SharedDict:set(key, value, exptime)
  if value == nil then
    self.entries[key] = nil
    return true, nil, false
  end
  if not STORABLE[type(value)] then error("bad value type: " .. type(value), 2) end
  local expires = exptime and exptime > 0 and self.fake.clock + exptime or nil
  self.entries[key] = { value = value, expires = expires }
  return true, nil, false
end

function SharedDict:add(key, value, exptime)
  if self:_entry(key) then return false, "exists", false end
  return self:set(key, value, exptime)
end

function SharedDict:delete(key)
  self.entries[key] = nil
end

---------------------------------------------------------------------------
-- Tasks.

local Task = {}
Task.__index = Task

--- Runs the task until its next wait. Returns that wait's label, or "done" once it has ended.
-- An error inside the task is raised here, with the task's traceback.
function Task:step()
  if coroutine.status(self.co) == "dead" then return "done" end
  local previous = self.fake.current
  self.fake.current = self
  local ok, label = coroutine.resume(self.co, unpack(self.args, 1, self.args.n))
  self.fake.current = previous
  self.args = { n = 0 }
  if not ok then error(debug.traceback(self.co, tostring(label)), 0) end
  if coroutine.status(self.co) == "dead" then return "done" end
  self.waits[#self.waits + 1] = label
  return label
end

--- Runs the task to its end, answering every wait at once.
function Task:finish()
  while self:step() ~= "done" do end
  return self
end

function FakeNgx:_task(fn, args, request)
  return setmetatable({ fake = self, co = coroutine.create(fn), args = args, request = request, waits = {} }, Task)
end

--- Waits inside the running task (a cosocket read, say): the spec sees `label` from step().
function FakeNgx:wait(label)
  if not self.current then error("fake ngx: waiting outside a task (" .. tostring(label) .. ")", 2) end
  return coroutine.yield(label)
end

---------------------------------------------------------------------------
-- Timers: ngx.timer.at and ngx.timer.every only record the callback.

--- Takes the oldest ngx.timer.at callback not yet started and returns its run as a task.
function FakeNgx:timer_task()
  local timer = table.remove(self.timers, 1)
  if not timer then error("fake ngx: no ngx.timer.at callback is pending", 2) end
  return self:_task(timer.fn, { n = timer.args.n + 1, false, unpack(timer.args, 1, timer.args.n) })
end

--- A fresh run of the i-th ngx.timer.every callback, as a task.
function FakeNgx:every_task(i)
  local timer = self.recurring[i or 1]
  if not timer then error("fake ngx: no ngx.timer.every callback number " .. tostring(i or 1), 2) end
  return self:_task(timer.fn, { n = timer.args.n + 1, false, unpack(timer.args, 1, timer.args.n) })
end

function FakeNgx:advance(seconds)
  self.clock = self.clock + seconds
end

---------------------------------------------------------------------------
-- Requests: `request` returns a task running `handler` with its own request and response.

--- @param req { method = "GET", uri = "/", body = nil }
function FakeNgx:request(req, handler)
  local context = { method = req.method or "GET", uri = req.uri or "/", body = req.body,
    response = { status = 200, headers = {}, body = "" } }
  return self:_task(handler, { n = 0 }, context)
end

function FakeNgx:_request_context(what)
  local task = self.current
  if not (task and task.request) then
    error("fake ngx: " .. what .. " used outside a request (nginx disables it in timers)", 3)
  end
  return task.request
end

---------------------------------------------------------------------------

local function new_ngx(fake)
  local ngx = {
    ERR = 4, WARN = 5, NOTICE = 6, INFO = 7, DEBUG = 8,
    shared = setmetatable({}, { __index = function(_, name)
      error("fake ngx: no lua_shared_dict '" .. tostring(name) .. "' (pass it to FakeNgx.new)", 2)
    end }),
    worker = { id = function() return fake.worker_id end },
    now = function() return fake.clock end,
    log = function(level, ...)
      fake.logs[#fake.logs + 1] = { level = level, message = table.concat({ ... }) }
    end,
    sleep = function(seconds)
      fake:wait("sleep")
      fake:advance(seconds)
    end,
    timer = {
      at = function(delay, fn, ...)
        fake.timers[#fake.timers + 1] = { delay = delay, fn = fn, args = pack(...) }
        return true
      end,
      every = function(interval, fn, ...)
        fake.recurring[#fake.recurring + 1] = { interval = interval, fn = fn, args = pack(...) }
        return true
      end,
    },
    print = function(...)
      local response = fake:_request_context("ngx.print").response
      response.body = response.body .. table.concat({ ... })
    end,
    req = {
      read_body = function() fake:_request_context("ngx.req.read_body") end,
      get_body_data = function() return fake:_request_context("ngx.req.get_body_data").body end,
      get_method = function() return fake:_request_context("ngx.req.get_method").method end,
    },
    var = setmetatable({}, { __index = function(_, name)
      local context = fake:_request_context("ngx.var")
      if name == "uri" then return context.uri end
      return nil
    end }),
    header = setmetatable({}, {
      __index = function(_, name) return fake:_request_context("ngx.header").response.headers[name] end,
      __newindex = function(_, name, value) fake:_request_context("ngx.header").response.headers[name] = value end,
    }),
  }
  return setmetatable(ngx, {
    __index = function(_, key)
      if key == "status" then return fake:_request_context("ngx.status").response.status end
      return nil
    end,
    __newindex = function(_, key, value)
      if key ~= "status" then error("fake ngx: setting ngx." .. tostring(key) .. " is not modelled", 2) end
      fake:_request_context("ngx.status").response.status = value
    end,
  })
end

--- @param opts { dicts = { "name", ... }, now = 1700000000, worker_id = 0 }
function FakeNgx.new(opts)
  opts = opts or {}
  local self = setmetatable({ clock = opts.now or 1700000000, worker_id = opts.worker_id or 0,
    timers = {}, recurring = {}, logs = {}, current = nil }, FakeNgx)
  self.ngx = new_ngx(self)
  for _, name in ipairs(opts.dicts or {}) do
    rawset(self.ngx.shared, name, setmetatable({ fake = self, entries = {} }, SharedDict))
  end
  return self
end

--- Log lines at `level` (e.g. ngx.ERR) or worse.
function FakeNgx:logged(level)
  local lines = {}
  for _, entry in ipairs(self.logs) do
    if entry.level <= level then lines[#lines + 1] = entry.message end
  end
  return lines
end

return FakeNgx
