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

return M
