--- A small coroutine scheduler: run many client calls (e.g. 100 `monitorJob`s) concurrently
-- from one thread. HTTP requests made inside a task go through libcurl's multi interface and
-- sleeps become timers, so tasks wait together instead of one after another.
--
--     local sched = iothub.Scheduler.new()
--     for _, id in ipairs(ids) do
--       sched:spawn(function() return jobs:monitorJob(id) end)
--     end
--     local ok, err = sched:run()   -- each task's results are in task.results
--
-- Tasks yield only from Lua (never across a C call): the client calls `coroutine.yield` in
-- Lua after handing the request to curl's multi handle, and the loop resumes the task when
-- libcurl reports the transfer finished.
-- @module iothub.scheduler
local core = require "iothub.core"
local errors = require "iothub.errors"

local unpack = table.unpack or unpack -- luacheck: ignore 143

local Scheduler = {}
Scheduler.__index = Scheduler

-- The task (and through it the scheduler) behind a coroutine; weak so finished tasks can be collected.
local owner = setmetatable({}, { __mode = "k" })

local SLEEP, HTTP = {}, {} -- private yield markers

function Scheduler.new(opts)
  opts = opts or {}
  -- Its loop waits in C and its HTTP goes through libcurl: both would stall an nginx worker.
  if require("iothub.transport.cosocket").inNginx() then
    errors.misuse("iothub.Scheduler would block the nginx worker; inside nginx run monitors with " ..
      "ngx.thread.spawn or ngx.timer.at, which the client's cosocket transport already suits")
  end
  return setmetatable({
    tasks = {},         -- all tasks, in spawn order
    ready = {},         -- tasks to resume next: { task, values... }
    timers = {},        -- { at = seconds, task = task }
    pending = {},       -- transport -> { [id] = task }
    npending = 0,
    now = opts.now or core.monotime,
    block = opts.sleep or core.sleep, -- how the loop itself waits when only timers remain
  }, Scheduler)
end

--- The scheduler running the current coroutine, if any.
function Scheduler.current()
  local co = coroutine.running()
  local task = co and owner[co]
  return task and task.scheduler or nil
end

--- Adds a task; it starts when `run` is called (or at the next turn if already running).
-- Returns the task table: `task.done`, `task.results` (array of return values), `task.error`.
function Scheduler:spawn(fn, ...)
  if type(fn) ~= "function" then errors.misuse("spawn expects a function, got " .. type(fn)) end
  local args = { n = select("#", ...), ... }
  local task = { done = false, scheduler = self }
  task.co = coroutine.create(function() return fn(unpack(args, 1, args.n)) end)
  owner[task.co] = task
  self.tasks[#self.tasks + 1] = task
  self.ready[#self.ready + 1] = { task = task, n = 0 }
  return task
end

--- Called from inside a task: suspends it for `seconds`.
function Scheduler:sleep(seconds)
  local task = self:_running_task()
  local at = self.now() + math.max(0, seconds or 0)
  local timers = self.timers
  local i = #timers
  while i > 0 and timers[i].at > at do i = i - 1 end -- keep sorted by deadline
  table.insert(timers, i + 1, { at = at, task = task })
  coroutine.yield(SLEEP)
end

--- Called from inside a task: performs req on transport (which must offer submit/poll) and
-- suspends the task until it completes. Returns res or nil, err like transport:request.
function Scheduler:http(transport, req)
  local task = self:_running_task()
  local id, err = transport:submit(req)
  if not id then return nil, err end
  local waiting = self.pending[transport]
  if not waiting then
    waiting = {}
    self.pending[transport] = waiting
  end
  waiting[id] = task
  self.npending = self.npending + 1
  return coroutine.yield(HTTP)
end

function Scheduler:_running_task()
  local task = owner[coroutine.running()]
  if task and task.scheduler == self then return task end
  errors.misuse("this call must be made from inside a task spawned on this scheduler")
end

local function resume(self, entry)
  local task = entry.task
  local out = { coroutine.resume(task.co, unpack(entry, 1, entry.n)) }
  if not out[1] then
    task.done, task.error = true, out[2]
    self.failed = self.failed or task
  elseif coroutine.status(task.co) == "dead" then
    task.done = true
    task.results = { n = #out - 1, unpack(out, 2) }
  elseif out[2] ~= SLEEP and out[2] ~= HTTP then
    task.done = true
    task.error = "task yielded a value the iothub scheduler does not understand; " ..
      "wait with scheduler:sleep() or client calls, not a bare coroutine.yield()"
    self.failed = self.failed or task
  end
  if task.done then owner[task.co] = nil end
end

function Scheduler:_fire_timers()
  local now = self.now()
  while self.timers[1] and self.timers[1].at <= now do
    local timer = table.remove(self.timers, 1)
    self.ready[#self.ready + 1] = { task = timer.task, n = 0 }
  end
end

function Scheduler:_poll_http(wait)
  local transports = {}
  for transport, waiting in pairs(self.pending) do
    if next(waiting) then transports[#transports + 1] = transport end
  end
  -- With one transport we can block inside curl; with several, poll each without blocking.
  local each_wait = #transports == 1 and wait or 0
  for _, transport in ipairs(transports) do
    local waiting = self.pending[transport]
    for _, done in ipairs(transport:poll(each_wait)) do
      local task = waiting[done.id]
      if task then
        waiting[done.id] = nil
        self.npending = self.npending - 1
        self.ready[#self.ready + 1] = { task = task, n = 2, done.res, done.err }
      end
    end
  end
  if #transports > 1 and #self.ready == 0 and wait > 0 then self.block(math.min(wait, 0.005)) end
end

--- Runs until every task has finished. Returns true, or nil and the first task error
-- (a task that raised) once all tasks are done.
function Scheduler:run()
  while true do
    while #self.ready > 0 do
      local batch = self.ready
      self.ready = {}
      for _, entry in ipairs(batch) do resume(self, entry) end
    end
    self:_fire_timers()
    if #self.ready == 0 then
      local next_timer = self.timers[1]
      if self.npending == 0 and not next_timer then break end
      local wait = next_timer and math.max(0, next_timer.at - self.now()) or 1
      if self.npending > 0 then
        self:_poll_http(math.min(wait, 1))
      elseif wait > 0 then
        self.block(wait)
      end
      self:_fire_timers()
    end
  end
  if self.failed then return nil, self.failed.error end
  return true
end

return Scheduler
