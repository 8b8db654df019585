-- Runs bin/iothub-emulator for end-to-end specs and talks to it over real HTTP through
-- iothub.curl (one keep-alive handle), signing with the launcher's development key.
--
--   local emu = require("support.emulator_process").start{ devices = path, dir = path, args = { "--tier", "S1" } }
--   local status, body, headers = emu:api("GET", "/jobs/v2/x")        -- adds api-version
--   emu:control("POST", "/_emulator/clock", { advanceSeconds = 60 })   -- no api-version
--   emu:requests_served(); emu:access_log()                            -- "sent nothing" checks
--   emu:stop(); emu:start(); emu:cleanup()
--   local emu = require("support.emulator_process").shared{ reset_each = true }  -- per describe block
local core = require "iothub.core"
local curl = require "iothub.curl"
local shell = require "support.shell"

local M = {}

M.KEY = "aW90aHViLWVtdWxhdG9yLWRldmVsb3BtZW50LWtleSE=" -- the launcher's default key
M.API_VERSION = "api-version=2021-04-12"

M.ROOT = shell.ROOT

-- Background jobs of a non-interactive shell ignore SIGINT; env (coreutils 8.31+) resets it,
-- so a spec can stop the launcher with the signal Ctrl-C sends.
local RESET_INT = shell.run("env --default-signal=INT true") and "env --default-signal=INT " or ""
-- The signal Ctrl-C sends, when the launcher can receive it (else TERM).
M.INTERRUPT = RESET_INT ~= "" and "INT" or "TERM"

function M.token(opts)
  opts = opts or {}
  local sr = opts.sr or "localhost"
  local se = opts.se or (os.time() + 3600)
  local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(opts.key or M.KEY), core.url_encode(sr) .. "\n" .. se))
  return "SharedAccessSignature sr=" .. core.url_encode(sr) .. "&sig=" .. core.url_encode(sig)
    .. "&se=" .. se .. "&skn=" .. (opts.skn or "iothubowner")
end

-- The error object inside envelope B (JSON in Message, ExceptionMessage empty), as the hub sends errors.
function M.inner_error(body)
  assert(type(body) == "table" and type(body.Message) == "string", "not an error envelope")
  assert(body.ExceptionMessage == "", "envelope B has an empty ExceptionMessage")
  return core.json_decode(body.Message)
end

local Emu = {}
Emu.__index = Emu

local seeded = false
local function seed()
  if seeded then return end
  seeded = true
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0) % 1000003)
end

-- opts: devices (file; default examples/devices.lua, false for none), devices_source (the
-- text of a devices file, written into the temp dir), dir (a kept --dir; default: <tmp>/dir of
-- a fresh temp dir), args (extra launcher flags), temp_dir (true: no --dir at all, so nothing
-- persists), https (true: HTTPS too, on the port after the HTTP one), ready_timeout (seconds,
-- default 10), env (name -> value: environment variables for the launcher, such as
-- IOTHUB_EMU_CLIENT_TIMEOUT).
-- Not started yet: emu:start() launches it (and again after emu:stop()).
function M.new(opts)
  return setmetatable({ opts = opts or {} }, Emu)
end

-- Starts; on failure removes what it made and raises.
local function launch(self)
  local started, err = pcall(self.start, self)
  if not started then
    self:cleanup()
    error(err, 0)
  end
  return self
end

-- A running emulator.
function M.start(opts)
  return launch(M.new(opts))
end

-- One emulator for the tests of the enclosing describe block (busted hooks): started before
-- its first test and stopped after its last, which must end with exit status 0 (unless a
-- test stopped it already). opts as M.start's, and reset_each (true: reset it to its start
-- state before each test).
function M.shared(opts)
  local busted = require "busted"
  local emu, started = M.new(opts), false
  busted.lazy_setup(function()
    launch(emu)
    started = true
  end)
  busted.lazy_teardown(function()
    if not started then return end
    local running = emu.pid ~= nil
    local rc = emu:cleanup()
    assert(rc == 0 or not running, "the emulator exited with status " .. tostring(rc))
  end)
  if emu.opts.reset_each then
    busted.before_each(function()
      local status = emu:control("POST", "/_emulator/reset")
      assert(status == 200, "POST /_emulator/reset -> " .. tostring(status))
    end)
  end
  return emu
end

function Emu:start()
  seed()
  local opts = self.opts
  if not self.tmp then
    self.tmp = shell.temp_dir("iothub-emu-spec")
    if not opts.temp_dir then self.dir = opts.dir or (self.tmp .. "/dir") end
    self.easy = assert(curl.easy({}))
  end
  local devices = opts.devices
  if opts.devices_source then
    devices = self.tmp .. "/devices.lua"
    shell.write_file(devices, opts.devices_source)
  elseif devices == nil then
    devices = M.ROOT .. "/examples/devices.lua"
  end
  for _ = 1, 5 do
    local port = math.random(20000, 60000)
    self.http_port, self.https_port = port, opts.https and port + 1 or nil
    self.out = self.tmp .. "/launcher." .. port .. ".out"
    self.rc_file = self.tmp .. "/launcher." .. port .. ".rc"
    local pid_file = self.tmp .. "/launcher." .. port .. ".pid"
    local env = {}
    for name, value in pairs(opts.env or {}) do
      assert(name:match("^[%a_][%w_]*$"), "bad environment variable name " .. name)
      env[#env + 1] = name .. "=" .. shell.quote(value) .. " "
    end
    table.sort(env)
    local cmd = { table.concat(env) .. RESET_INT .. shell.quote(M.ROOT .. "/bin/iothub-emulator"), "--http-port", port,
      "--https-port", self.https_port or 0 }
    if devices then cmd[#cmd + 1] = "--devices " .. shell.quote(devices) end
    if self.dir then cmd[#cmd + 1] = "--dir " .. shell.quote(self.dir) end
    for _, a in ipairs(opts.args or {}) do cmd[#cmd + 1] = shell.quote(a) end
    -- a wrapper records the launcher's exit status; env execs it, so $! is the launcher itself
    shell.run("( " .. table.concat(cmd, " ") .. " >" .. shell.quote(self.out) .. " 2>&1 </dev/null & echo $! >"
      .. shell.quote(pid_file) .. "; wait $!; echo $? >" .. shell.quote(self.rc_file) .. " ) >/dev/null 2>&1 &")
    for _ = 1, 100 do
      self.pid = tonumber((shell.read_file(pid_file) or ""):match("%d+"))
      if self.pid then break end
      shell.sleep(0.02)
    end
    assert(self.pid, "no launcher pid")
    for _ = 1, (opts.ready_timeout or 10) * 20 do
      local out = shell.read_file(self.out) or ""
      if out:find("\nready\n", 1, true) or out:find("^ready\n") then
        self.base = "http://127.0.0.1:" .. port
        return self
      end
      if shell.read_file(self.rc_file) then break end -- the launcher gave up
      shell.sleep(0.05)
    end
    if shell.alive(self.pid) then shell.run("kill " .. self.pid) end
    if not (shell.read_file(self.out) or ""):find("in use", 1, true) then break end
  end
  error("the emulator did not start:\n" .. (shell.read_file(self.out) or ""), 2)
end

-- The launcher's output so far.
function Emu:output()
  return shell.read_file(self.out) or ""
end

-- Sends signal (default TERM; M.INTERRUPT for Ctrl-C's); returns the launcher's exit status
-- once it has ended.
function Emu:stop(signal)
  if not self.pid then return nil end
  shell.run("kill -" .. (signal or "TERM") .. " " .. self.pid)
  local rc
  for _ = 1, 200 do
    rc = tonumber((shell.read_file(self.rc_file) or ""):match("%d+"))
    if rc then break end
    shell.sleep(0.05)
  end
  self.pid = nil
  return rc
end

-- Stops the emulator (if running) and removes the temp dir; returns the launcher's exit status.
function Emu:cleanup()
  local rc = self.pid and self:stop()
  if self.easy then self.easy:close(); self.easy = nil end
  if self.tmp then shell.run("rm -rf " .. shell.quote(self.tmp)) end
  self.tmp = nil
  return rc
end

-- The nginx access log of the kept --dir, one line per request served, from byte from + 1
-- on (default: all of it).
function Emu:access_log(from)
  assert(self.dir, "no --dir, so no access log to read")
  return (shell.read_file(self.dir .. "/logs/access.log") or ""):sub((from or 0) + 1)
end

-- How many requests the emulator has served so far: the same count before and after a step
-- proves the step sent nothing.
function Emu:requests_served()
  local n = 0
  for _ in self:access_log():gmatch("[^\n]+") do n = n + 1 end
  return n
end

-- One request. headers: name -> value (false drops the default Authorization).
-- opts.fresh: on a new connection (libcurl silently resends a request whose reused
-- keep-alive connection closes without an answer); opts.timeout in seconds; opts.base:
-- another base URL (e.g. "https://localhost:" .. emu.https_port) with opts.ca_file to trust.
-- Returns status, decoded body (or nil), response headers, raw body; or nil, curl error.
function Emu:request(method, path, body, headers, opts)
  opts = opts or {}
  local h = { Authorization = M.token() }
  for k, v in pairs(headers or {}) do h[k] = v end
  local list = {}
  for k, v in pairs(h) do
    if v ~= false then list[#list + 1] = k .. ": " .. v end
  end
  if body ~= nil and type(body) ~= "string" then body = assert(core.json_encode(body)) end
  if body then list[#list + 1] = "Content-Type: application/json; charset=utf-8" end
  local easy = opts.fresh and assert(curl.easy({})) or self.easy
  local status, rh, raw = easy:perform({ method = method, url = (opts.base or self.base) .. path, body = body,
    headers = list, proxy = "", caFile = opts.ca_file, timeout = opts.timeout or 30 })
  if opts.fresh then easy:close() end
  if not status then return nil, rh end
  local decoded = raw ~= "" and core.json_decode(raw) or nil
  return status, decoded, rh, raw
end

function Emu:api(method, path, body, headers, opts)
  local sep = path:find("?", 1, true) and "&" or "?"
  return self:request(method, path .. sep .. M.API_VERSION, body, headers, opts)
end

function Emu:control(method, path, body)
  return self:request(method, path, body)
end

-- Polls a job until its status is `wanted` (a string or a set); returns the job.
function Emu:wait_job(id, wanted, timeout)
  if type(wanted) == "string" then wanted = { [wanted] = true } end
  local deadline = core.monotime() + (timeout or 15)
  local job
  repeat
    local status
    status, job = self:api("GET", "/jobs/v2/" .. id)
    assert(status == 200, "GET job " .. id .. " -> " .. tostring(status))
    if wanted[job.status] then return job end
    shell.sleep(0.05)
  until core.monotime() > deadline
  error("job " .. id .. " stayed " .. tostring(job and job.status), 2)
end

-- Every devices.jobs row of a job, by device id, through the query route's paging.
function Emu:rows(job_id)
  local q = { query = "SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '" .. job_id .. "'" }
  local out, continuation = {}, nil
  repeat
    local status, rows, h = self:api("POST", "/devices/query", q,
      { ["x-ms-max-item-count"] = "1000", ["x-ms-continuation"] = continuation or false })
    assert(status == 200, "devices.jobs query -> " .. tostring(status))
    for _, r in ipairs(rows) do out[r.deviceId] = r end
    continuation = h["x-ms-continuation"]
  until not continuation
  return out
end

-- A job request body with the usual defaults; fields in over override them.
function M.job(id, over)
  local t = {
    jobId = id, type = "scheduleUpdateTwin",
    updateTwin = { etag = "*", tags = { spec = id } },
    queryCondition = "*", startTime = os.date("!%Y-%m-%dT%H:%M:%SZ"), maxExecutionTimeInSeconds = 3600,
  }
  for k, v in pairs(over or {}) do t[k] = v end
  if t.type == "scheduleDeviceMethod" and not (over or {}).updateTwin then t.updateTwin = nil end
  return t
end

function M.iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", t)
end

M.sleep = shell.sleep
return M
