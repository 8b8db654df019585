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
    last_line = {},     -- label -> last plain line, countdown left out (lines mode)
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

-- The bar with its brackets, `width` columns in all.
local function bar(width, n, ok, failed)
  local cells = width - 2
  if n <= 0 then return "[" .. ("."):rep(cells) .. "]" end
  local ok_w = math.floor(cells * ok / n + 0.5)
  local failed_w = math.min(cells - ok_w, failed > 0 and math.max(1, math.floor(cells * failed / n + 0.5)) or 0)
  return "[" .. ("#"):rep(ok_w) .. ("x"):rep(failed_w) .. ("."):rep(cells - ok_w - failed_w) .. "]"
end

-- Bar widths, brackets included: at least 4 cells, at most 38; a label is shortened to keep
-- 10 cells.
local MIN_BAR, GOOD_BAR, MAX_BAR = 6, 12, 40
-- A UUID (create's default job id) is known by its first 8 characters, as a git commit by its
-- first 7; other labels are cut with "...".
local SHORT_ID = 8
local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"

-- The label in at most `room` columns, or nil: in full; for a stage, "name k/n" instead of
-- "name stage k/n"; a UUID's first 8 characters; and when `cut`, the name cut short with
-- "...". The stage numbers are never cut.
local function fit_label(view, room, cut)
  local label = tostring(view.label)
  if #label <= room then return label end
  local name, suffix = label, ""
  if view.name and view.stage and (view.stages or 0) > 1 then
    name, suffix = tostring(view.name), (" %d/%d"):format(view.stage, view.stages)
    if #name + #suffix <= room then return name .. suffix end
  end
  if name:match(UUID) and SHORT_ID + #suffix <= room then return name:sub(1, SHORT_ID) .. suffix end
  local keep = room - #suffix - 3
  if not cut or keep < 3 then return nil end
  return name:sub(1, keep) .. "..." .. suffix
end

--- The bar line for a view (without control characters), fitted to the width. The counts,
-- elapsed time and ETA are never cut. To make room, in turn: the label is shortened and the
-- bar narrows to 4 cells; the "(k/n jobs)" after the status goes; the bar goes; the label
-- goes; the status goes.
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
  local statuses = { status }
  if view.jobs and view.jobs > 1 then
    table.insert(statuses, 1, status .. (" (%d/%d jobs)"):format(view.finished or 0, view.jobs))
  end
  local width = self.width - 1 -- writing the last column makes some terminals wrap
  for _, st in ipairs(statuses) do
    local room = width - #st - #tail - 6 -- for the label and the bar, after three separators
    for _, try in ipairs({ { GOOD_BAR }, { MIN_BAR }, { MIN_BAR, true } }) do
      local label = fit_label(view, room - try[1], try[2])
      if label then
        return label .. "  " .. st .. "  " .. bar(math.min(MAX_BAR, room - #label), n, ok, failed) .. "  " .. tail
      end
    end
  end
  local label = fit_label(view, width - #status - #tail - 4, true)
  if label then return label .. "  " .. status .. "  " .. tail end
  if #status + 2 + #tail <= width then return status .. "  " .. tail end
  return tail
end

-- The plain line for a view, and the same line without the "starts in" countdown (what
-- counts as a change).
function Progress:_line(view)
  self:_track(view)
  local n, ok, failed, pending = counts(view)
  local text = ("%s: %s, %d succeeded, %d failed, %d pending of %s%d device(s)"):format(view.label,
    tostring(view.status), ok, failed, pending, view.estimated and "~" or "", n)
  if view.jobs and view.jobs > 1 then text = text .. (" in %d jobs"):format(view.jobs) end
  local waiting = self:_waiting(view)
  if waiting then return text .. " (" .. waiting .. ")", text .. " (waiting to start)" end
  return text, text
end

--- The plain line for a view (lines mode, and the final summary).
function Progress:line_text(view)
  return (self:_line(view))
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
    -- A new line only when something changed; a countdown ticking is not a change.
    local text, key = self:_line(view)
    if self.last_line[view.label] ~= key then
      self.last_line[view.label] = key
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
