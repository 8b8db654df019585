--- Where iothub-jobs connects: --connection-string, $IOTHUB_CONNECTION_STRING, or a local
-- bin/iothub-emulator (--emulator[=DIR|FILE]). --endpoint / --ca-file (or $IOTHUB_ENDPOINT /
-- $IOTHUB_CA_FILE) map to the client's endpoint and caFile options.
--
-- An emulator publishes its connection in what its launcher prints:
--   IOTHUB_CONNECTION_STRING=HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=...
--   endpoint http://127.0.0.1:8080
--   endpoint https://localhost:8443
--   ca /path/to/certs/ca.pem
-- --emulator=FILE reads those lines from a file (the launcher's saved output);
-- --emulator=DIR reads DIR/connection when the launcher writes one, else derives the same
-- facts from the nginx.conf it rendered into DIR; bare --emulator uses $IOTHUB_EMULATOR_DIR,
-- else the launcher's defaults.
-- @module iothub.cli.connection
local iothub = require "iothub"
local definitions = require "iothub.definitions"
local read_file, is_dir = definitions.read_file, definitions.is_dir

local M = {}

-- The launcher's defaults (bin/iothub-emulator --help): the well-known development key.
M.EMULATOR_DEFAULT = {
  connectionString = "HostName=localhost;SharedAccessKeyName=iothubowner;" ..
    "SharedAccessKey=aW90aHViLWVtdWxhdG9yLWRldmVsb3BtZW50LWtleSE=",
  endpoint = "http://127.0.0.1:8080",
}

--- Parses the launcher's announcement lines. Returns { connectionString, endpoint, caFile } or nil.
function M.parse_announcement(text)
  local out = {}
  for line in text:gmatch("[^\r\n]+") do
    local cs = line:match("^IOTHUB_CONNECTION_STRING=(.+)$")
    if cs then out.connectionString = cs end
    local url = line:match("^endpoint (%S+)$")
    -- Prefer plain HTTP: nothing to trust; otherwise HTTPS with the emulator's CA.
    if url and (not out.endpoint or url:match("^http:")) then out.endpoint = url end
    local ca = line:match("^ca (.+)$")
    if ca then out.caFile = ca end
  end
  if not out.connectionString then return nil end
  if out.endpoint and out.endpoint:match("^http:") then out.caFile = nil end
  return out
end

-- What the launcher rendered into DIR/nginx.conf (emulator/conf.lua): the init block's
-- host and key, and the listen lines.
local function from_nginx_conf(dir)
  local conf = read_file(dir .. "/nginx.conf")
  if not conf then return nil end
  local host = conf:match('host = "([^"]*)"')
  local key = conf:match('key = "([^"]*)"')
  local policy = conf:match('policy = "([^"]*)"') or "iothubowner"
  if not host or not key then return nil end
  local http, https
  for port, rest in conf:gmatch("listen 127%.0%.0%.1:(%d+)([^;]*);") do
    if rest:find("ssl", 1, true) then https = https or port else http = http or port end
  end
  local out = { connectionString = ("HostName=%s;SharedAccessKeyName=%s;SharedAccessKey=%s"):format(host, policy, key) }
  if http then
    out.endpoint = "http://127.0.0.1:" .. http
  elseif https then
    out.endpoint = "https://localhost:" .. https
    out.caFile = dir .. "/certs/ca.pem"
  else
    return nil
  end
  return out
end

--- The emulator's connection from a DIR or FILE (or the defaults when where is true/nil).
-- Returns { connectionString, endpoint, caFile, source } or nil, message.
function M.emulator(where, getenv)
  getenv = getenv or os.getenv
  if where == true or where == nil then
    where = getenv("IOTHUB_EMULATOR_DIR")
    if not where or where == "" then
      local out = {}
      for k, v in pairs(M.EMULATOR_DEFAULT) do out[k] = v end
      out.source = "the emulator's defaults"
      out.emulator = { hint = "bare --emulator means the launcher's default port and key; for one started " ..
        "with --dir DIR, give --emulator=DIR" }
      return out
    end
  end
  if is_dir(where) then
    local text = read_file(where .. "/connection")
    local out = text and M.parse_announcement(text) or from_nginx_conf(where)
    if not out then
      return nil, "--emulator=" .. where .. ": no emulator state there (expected the nginx.conf " ..
        "bin/iothub-emulator --dir writes); is the emulator running with --dir " .. where .. "?"
    end
    out.source = "the emulator in " .. where
    -- The launcher writes DIR/connection while it runs and removes it when it stops.
    out.emulator = { hint = text and (where .. "/connection says it listens there; if it was killed, start it " ..
      "again with bin/iothub-emulator --dir " .. where) or (where .. "/connection is missing: start it with " ..
      "bin/iothub-emulator --dir " .. where) }
    return out
  end
  local text = read_file(where)
  if not text then
    return nil, "--emulator=" .. where .. ": no such directory or file; give the emulator's --dir, " ..
      "or a file holding its start-up output"
  end
  local out = M.parse_announcement(text)
  if not out then
    return nil, "--emulator=" .. where .. ": no IOTHUB_CONNECTION_STRING= line in it; give the emulator's " ..
      "--dir, or a file holding its start-up output"
  end
  out.source = "the emulator announced in " .. where
  out.emulator = { hint = "the address comes from " .. where .. ", the start-up output of an emulator that may have " ..
    "stopped since" }
  return out
end

--- Resolves the connection from parsed options and the environment.
-- Returns { connectionString, endpoint, caFile, source } or nil, message (a usage error).
function M.resolve(options, getenv)
  getenv = getenv or os.getenv
  local conn
  if options.emulator and options["connection-string"] then
    return nil, "give --connection-string or --emulator, not both"
  end
  if options.emulator then
    local err
    conn, err = M.emulator(options.emulator, getenv)
    if not conn then return nil, err end
  elseif options["connection-string"] then
    conn = { connectionString = options["connection-string"], source = "--connection-string" }
  else
    local cs = getenv("IOTHUB_CONNECTION_STRING")
    if not cs or cs == "" then
      return nil, "no hub to talk to: pass --connection-string, set IOTHUB_CONNECTION_STRING, " ..
        "or use --emulator for a local bin/iothub-emulator"
    end
    conn = { connectionString = cs, source = "IOTHUB_CONNECTION_STRING" }
  end
  local endpoint = options.endpoint or getenv("IOTHUB_ENDPOINT")
  if endpoint and endpoint ~= "" then conn.endpoint = endpoint end
  local ca = options["ca-file"] or getenv("IOTHUB_CA_FILE")
  if ca and ca ~= "" then
    if not read_file(ca) then return nil, "--ca-file " .. ca .. ": cannot read it" end
    conn.caFile = ca
  end
  return conn
end

-- A sleep that returns to Lua every 0.1 s, so the interpreter can deliver Ctrl-C
-- (lua5.4 and luajit raise "interrupted!" at the next Lua instruction after SIGINT).
function M.interruptible_sleep(seconds)
  local core = require "iothub.core"
  local deadline = core.monotime() + (seconds or 0)
  while true do
    local left = deadline - core.monotime()
    if left <= 0 then return end
    core.sleep(math.min(left, 0.1))
  end
end

--- Does the endpoint name this machine (127.0.0.0/8, ::1, localhost)?
function M.is_loopback(endpoint)
  if type(endpoint) ~= "string" then return false end
  local host = endpoint:match("^%a[%w+.-]*://%[([^%]]+)%]") or endpoint:match("^%a[%w+.-]*://([^/:?#]+)")
  host = host and host:lower()
  return host == "localhost" or host == "::1" or (host and host:match("^127%.%d+%.%d+%.%d+$")) ~= nil
end

-- Retries for a hub on this machine (an emulator): a refused connection there means nothing
-- is listening, and waiting for it helps nobody, so fail within a second instead of after
-- the default five attempts (~15 s). Hubs elsewhere keep the client's defaults.
M.LOOPBACK_RETRY = { maxAttempts = 2, baseDelay = 0.2 }

--- What to tell someone whose emulator could not be reached (err is an iothub error), or nil.
function M.unreachable_hint(conn, err)
  if not (conn and conn.emulator and type(err) == "table" and err.kind == "network") then return nil end
  return "is bin/iothub-emulator running at " .. tostring(conn.endpoint) .. "? (" .. conn.emulator.hint .. ")"
end

--- Builds the clients. Returns { jobs=, registry= } or nil, err (an iothub error).
function M.clients(conn, extra)
  -- One transport (one connection pool) shared by the two clients.
  local transport = require("iothub.transport.curl").new({ caFile = conn.caFile })
  local opts = { endpoint = conn.endpoint, caFile = conn.caFile, transport = transport }
  local host = conn.connectionString:match("[Hh][Oo][Ss][Tt][Nn][Aa][Mm][Ee]=([^;]+)")
  if M.is_loopback(conn.endpoint or (host and "https://" .. host)) then opts.retry = M.LOOPBACK_RETRY end
  for k, v in pairs(extra or {}) do opts[k] = v end
  local jobs, err = iothub.JobClient.fromConnectionString(conn.connectionString, opts)
  if not jobs then return nil, err end
  local registry = assert(iothub.Registry.fromConnectionString(conn.connectionString, opts))
  return { jobs = jobs, registry = registry }
end

return M
