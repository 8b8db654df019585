--- Progress for iothub-jobs: a live one-line bar on a terminal, plain lines (only when
-- something changes) otherwise, or nothing. Views come from iothub.rollout (status, device
-- statistics summed over the jobs shown, when they started).
-- @module iothub.cli.progress
local core = require "iothub.core"

local Progress = {}
Progress.__index = Progress

local CLEAR = "\r\27[K" -- carriage return, erase to end of line

local function clock_text(seconds)
  seconds = math.max(0, math.floor(seconds + 0.5))
  local h, m, s = math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60
  if h > 0 then return ("%d:%02d:%02d"):format(h, m, s) end
  return ("%d:%02d"):format(m, s)
end
Progress.clock_text = clock_text

local function terminal_width(stream_is_tty)
  local cols = tonumber(os.getenv("COLUMNS") or "")
  if cols and cols >= 20 then return cols end
  if stream_is_tty then
    local p = io.popen("stty size </dev/tty 2>/dev/null")
    if p then
      local out = p:read("*a") or ""
      p:close()
      cols = tonumber(out:match("%d+%s+(%d+)"))
      if cols and cols >= 20 then return cols end
    end
  end
  return 80
end

--- opts: stream (io.stderr), mode ("bar" | "lines" | "off"; default bar on a terminal,
-- else lines), width, now (monotonic clock), time (wall clock).
function Progress.new(opts)
  opts = opts or {}
  local stream = opts.stream or io.stderr
  local mode = opts.mode
  local tty = stream == io.stderr and core.isatty(2) or stream == io.stdout and core.isatty(1)
  if not mode then mode = tty and "bar" or "lines" end
  return setmetatable({
    stream = stream, mode = mode,
    width = opts.width or (mode == "bar" and terminal_width(tty) or 80),
    now = opts.now or core.monotime, time = opts.time or core.time,
    drawn = nil,        -- the bar text on screen (bar mode)
    last_line = {},     -- label -> last plain line (lines mode)
    running_since = {}, -- label -> when devices started moving (for the ETA)
  }, Progress)
end

-- succeeded / failed / pending of deviceCount, plus the status.
local function counts(view)
  local n = view.deviceCount or 0
  local ok, failed = view.succeededCount or 0, view.failedCount or 0
  return n, ok, failed, math.max(0, n - ok - failed)
end

function Progress:_eta(view)
  local n, ok, failed = counts(view)
  local done = ok + failed
  if core.is_terminal(view.status) or done == 0 then return nil end
  local since = self.running_since[view.label]
  if not since then return nil end
  local spent = self.now() - since
  if spent <= 0 then return nil end
  return (n - done) * spent / done
end

function Progress:_track(view)
  if view.status == "running" and not self.running_since[view.label] then
    self.running_since[view.label] = self.now()
  end
end

-- "starts in 4:59" for a job waiting for its start time.
function Progress:_waiting(view)
  if (view.status == "scheduled" or view.status == "queued") and view.startTime then
    local left = view.startTime - self.time()
    if left > 1 then return "starts in " .. clock_text(left) end
  end
  return nil
end

local function bar(width, n, ok, failed)
  if width < 5 then return "" end
  if n <= 0 then return "[" .. ("."):rep(width) .. "]" end
  local ok_w = math.floor(width * ok / n + 0.5)
  local failed_w = math.min(width - ok_w, failed > 0 and math.max(1, math.floor(width * failed / n + 0.5)) or 0)
  return "[" .. ("#"):rep(ok_w) .. ("x"):rep(failed_w) .. ("."):rep(width - ok_w - failed_w) .. "]"
end

--- The bar line for a view (without control characters), fitted to the width: the label
-- is shortened before the bar is dropped.
function Progress:bar_text(view)
  self:_track(view)
  local n, ok, failed, pending = counts(view)
  local elapsed = clock_text(self.now() - (view.started or self.now()))
  local eta = self:_eta(view)
  local when = self:_waiting(view) or (core.is_terminal(view.status) and "done") or
    ("ETA " .. (eta and clock_text(eta) or "--:--"))
  local tail = ("%d ok  %d failed  %d pending of %s%d  %s  %s"):format(ok, failed, pending,
    view.estimated and "~" or "", n, elapsed, when)
  local status = tostring(view.status)
  if view.jobs and view.jobs > 1 then status = status .. (" (%d/%d jobs)"):format(view.finished or 0, view.jobs) end
  local label = view.label
  local width = self.width - 1
  local fixed = #status + #tail + 6 -- the separators
  local bar_w = math.min(40, width - fixed - #label)
  if bar_w < 12 then
    local room = width - fixed - 12
    if room >= 12 and room < #label then
      label = label:sub(1, room - 3) .. "..."
      bar_w = 12
    end
  end
  if bar_w >= 12 then
    return label .. "  " .. status .. "  " .. bar(bar_w - 2, n, ok, failed) .. "  " .. tail
  end
  local line = label .. "  " .. status .. "  " .. tail
  if #line > width then line = line:sub(1, width - 3) .. "..." end
  return line
end

--- The plain line for a view (lines mode, and the final summary).
function Progress:line_text(view)
  self:_track(view)
  local n, ok, failed, pending = counts(view)
  local text = ("%s: %s, %d succeeded, %d failed, %d pending of %s%d device(s)"):format(view.label,
    tostring(view.status), ok, failed, pending, view.estimated and "~" or "", n)
  if view.jobs and view.jobs > 1 then text = text .. (" in %d jobs"):format(view.jobs) end
  local waiting = self:_waiting(view)
  if waiting then text = text .. " (" .. waiting .. ")" end
  return text
end

--- Shows a view; final = true when this is the view's last update.
function Progress:update(view, final)
  if self.mode == "off" then return end
  if self.mode == "bar" then
    local text = self:bar_text(view)
    self.stream:write(CLEAR, text)
    self.drawn = text
    if final then
      self.stream:write("\n")
      self.drawn = nil
    end
  else
    local text = self:line_text(view)
    if self.last_line[view.label] ~= text then
      self.last_line[view.label] = text
      self.stream:write(("[%s] %s\n"):format(clock_text(self.now() - (view.started or self.now())), text))
    end
  end
  self.stream:flush()
end

--- A message between updates: printed on its own line, the bar redrawn below it.
function Progress:note(text)
  if self.mode == "off" then return end
  if self.mode == "bar" and self.drawn then
    self.stream:write(CLEAR, text, "\n", self.drawn)
  else
    self.stream:write(text, "\n")
  end
  self.stream:flush()
end

--- Leaves the terminal tidy (after an error or Ctrl-C): the bar line is ended.
function Progress:close()
  if self.mode == "bar" and self.drawn then
    self.stream:write("\n")
    self.drawn = nil
    self.stream:flush()
  end
end

return Progress
