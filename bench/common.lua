-- Shared set-up for the benchmark scripts: module paths for the running interpreter, a local
-- nginx server (spec/support/server.lua), a client against it, and a clean stop.
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath

local M = {
  core = require "iothub.core",
  iothub = require "iothub",
  interpreter = jit and jit.version or _VERSION,
}

--- Starts the server, calls body(srv, client_for), always stops the server; re-raises errors.
-- client_for(base_url, opts) makes a JobClient whose endpoint is the server's simulated hub.
function M.run(body)
  local srv = require("support.server").start()
  local ok, err = pcall(body, srv, function(base, opts)
    local o = { endpoint = base .. "/sim" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return assert(M.iothub.JobClient.fromConnectionString(
      "HostName=bench.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=cGFzc3dvcmQ=", o))
  end)
  srv:stop()
  if not ok then error(err, 0) end
end

return M
