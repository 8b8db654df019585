-- Runs bin/iothub-emulator for end-to-end specs and talks to it over real HTTP through
-- iothub.curl (one keep-alive handle), signing with the launcher's development key.
--
--   local emu = require("support.emulator_process").start{ devices = path, dir = path, args = { "--tier", "S1" } }
--   local status, body, headers = emu:api("GET", "/jobs/v2/x")        -- adds api-version
--   emu:control("POST", "/_emulator/clock", { advanceSeconds = 60 })   -- no api-version
--   emu:stop(); emu:start(); emu:cleanup()
local core = require "iothub.core"
local curl = require "iothub.curl"
local shell = require "support.shell"

local M = {}

M.KEY = "aW90aHViLWVtdWxhdG9yLWRldmVsb3BtZW50LWtleSE=" -- the launcher's default key
M.API_VERSION = "api-version=2021-04-12"

M.ROOT = (function()
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local dir = src:match("^(.*)/spec/support/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then
    local _, pwd = shell.run("pwd")
    dir = pwd:gsub("%s+$", "") .. "/" .. dir
  end
  return dir
end)()

function M.token(opts)
  opts = opts or {}
  local sr = opts.sr or "localhost"
  local se = opts.se or (os.time() + 3600)
  local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(opts.key or M.KEY), core.url_encode(sr) .. "\n" .. se))
  return "SharedAccessSignature sr=" .. core.url_encode(sr) .. "&sig=" .. core.url_encode(sig)
    .. "&se=" .. se .. "&skn=" .. (opts.skn or "iothubowner")
end

-- The error object inside envelope B.
function M.inner_error(body)
  assert(type(body) == "table" and type(body.Message) == "string", "not an error envelope")
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

-- opts: devices (file; default examples/devices.lua, false for none), dir (a kept --dir;
-- default: <tmp>/dir of a fresh temp dir), args (extra launcher flags), temp_dir (true: no
-- --dir at all, so nothing persists), ready_timeout (seconds, default 10).
function M.start(opts)
  seed()
  opts = opts or {}
  local ok, tmp = shell.run("mktemp -d /tmp/iothub-emu-spec.XXXXXX")
  assert(ok, tmp)
  local self = setmetatable({ opts = opts, tmp = tmp:gsub("%s+$", "") }, Emu)
  if not opts.temp_dir then self.dir = opts.dir or (self.tmp .. "/dir") end
  self.easy = assert(curl.easy({}))
  local started, err = pcall(self.start, self)
  if not started then
    self:cleanup()
    error(err, 2)
  end
  return self
end

function Emu:start()
  local opts = self.opts
  local devices = opts.devices
  if devices == nil then devices = M.ROOT .. "/examples/devices.lua" end
  for _ = 1, 5 do
    local port = math.random(20000, 60000)
    self.out = self.tmp .. "/launcher." .. port .. ".out"
    self.rc_file = self.tmp .. "/launcher." .. port .. ".rc"
    local pid_file = self.tmp .. "/launcher." .. port .. ".pid"
    local cmd = { shell.quote(M.ROOT .. "/bin/iothub-emulator"), "--http-port", port, "--https-port", 0 }
    if devices then cmd[#cmd + 1] = "--devices " .. shell.quote(devices) end
    if self.dir then cmd[#cmd + 1] = "--dir " .. shell.quote(self.dir) end
    for _, a in ipairs(opts.args or {}) do cmd[#cmd + 1] = shell.quote(a) end
    -- a wrapper records the launcher's exit status; $! is the launcher itself
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

-- SIGTERM; returns the launcher's exit status once it has ended.
function Emu:stop()
  if not self.pid then return nil end
  shell.run("kill -TERM " .. self.pid)
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
  shell.run("rm -rf " .. shell.quote(self.tmp))
  return rc
end

-- One request. headers: name -> value (false drops the default Authorization).
-- opts.fresh: on a new connection (libcurl silently resends a request whose reused
-- keep-alive connection closes without an answer); opts.timeout in seconds.
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
  local status, rh, raw = easy:perform({ method = method, url = self.base .. path, body = body,
    headers = list, proxy = "", timeout = opts.timeout or 30 })
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
