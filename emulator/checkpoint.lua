-- Folds the state database's write-ahead log into the database file, in an nginx worker
-- thread (ngx.run_worker_thread, pool "iothub_store" from emulator/conf.lua) with a
-- connection of its own: the copy and its fsyncs happen off the event loop, while the
-- worker's connection goes on committing (emulator/store.lua).
local M = {}

-- Returns true, frames in the log, frames copied; or nil, message.
function M.run(path)
  local env = require("luasql.sqlite3").sqlite3()
  local conn, err = env:connect(path)
  if not conn then
    env:close()
    return nil, err
  end
  local cur = conn:execute("PRAGMA busy_timeout = 5000") -- answers with a row
  if type(cur) == "userdata" then cur:close() end
  cur, err = conn:execute("PRAGMA wal_checkpoint(PASSIVE)")
  local frames, copied
  if cur then
    local _
    _, frames, copied = cur:fetch()
    cur:close()
  end
  conn:close()
  env:close()
  if not cur then return nil, err end
  return true, frames, copied
end

return M
