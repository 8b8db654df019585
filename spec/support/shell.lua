-- Small shell and file helpers shared by the spec support code (portable across 5.4 and
-- LuaJIT, whose io.popen():close() report exit codes differently).
local M = {}

function M.quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs a shell command; returns ok, combined output, exit code.
function M.run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"__rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("__rc=(%d+)%s*$"))
  return rc == 0, (out:gsub("__rc=%d+%s*$", "")), rc
end

function M.sleep(seconds)
  M.run("sleep " .. string.format("%.3f", seconds))
end

function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

function M.write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  f:close()
end

-- Is the process alive?
function M.alive(pid)
  return (M.run("kill -0 " .. pid))
end

-- A fresh private directory /tmp/<name>.XXXXXX; the caller removes it (rm -rf).
function M.temp_dir(name)
  local ok, out = M.run("mktemp -d /tmp/" .. name .. ".XXXXXX")
  assert(ok, "mktemp failed: " .. out)
  return (out:gsub("%s+$", ""))
end

-- The repository's root directory, absolute (this file is <root>/spec/support/shell.lua).
M.ROOT = (function()
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  local dir = src:match("^(.*)/spec/support/[^/]*$") or "."
  if dir:sub(1, 1) ~= "/" then
    local ok, pwd = M.run("pwd")
    assert(ok, "pwd failed")
    dir = pwd:gsub("%s+$", "") .. (dir == "." and "" or "/" .. dir)
  end
  return dir
end)()

return M
