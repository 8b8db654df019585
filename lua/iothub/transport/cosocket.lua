--- HTTP transport for nginx workers (OpenResty, or Debian's nginx + lua module): nginx
-- cosockets (`ngx.socket.tcp`) and the project's own HTTP/1.1 client (iothub.http1), so a
-- request yields the worker to other requests instead of blocking it.
--
--   local t = require("iothub.transport.cosocket").new{ timeout = 30, poolSize = 30 }
--   local res, err = t:request{ method = "GET", url = "https://…", headers = { "A: b" } }
--   -- res = { status, headers, body }; err = { kind = "network"|"timeout"|"tls", code, message }
--
-- TLS: `sslhandshake` verifies the certificate chain and the host name by default
-- (verify = false turns both off). Inside nginx the trusted CAs come from the
-- `lua_ssl_trusted_certificate` directive (with `lua_ssl_verify_depth`), never from a file
-- named at run time: a client's `caFile` option must be configured there instead, and a
-- verification failure says so. nginx checks the name as a host name only, so with
-- verification on, reach a TLS server by name, not by IP address.
--
-- Connections are kept alive in nginx's per-worker pool, one pool per host:port and TLS
-- mode (`poolSize` connections, closed after `idleTimeout` seconds idle). Host names other
-- than "localhost" and IP literals are resolved by nginx's `resolver` directive.
--
-- Phases: cosockets exist in rewrite, access, content, timer, ssl_cert, ssl_session_fetch,
-- ssl_client_hello and preread. Elsewhere (init, init_worker, set, header/body filter, log)
-- a request is a programming error and raises, naming ngx.timer.at as the way out. As
-- everywhere in the project, misuse raises and runtime failures (connect, TLS, timeout,
-- malformed answer) return nil, err.
-- @module iothub.transport.cosocket
local core = require "iothub.core"
local errors = require "iothub.errors"
local http1 = require "iothub.http1"

local CosocketTransport = {}
CosocketTransport.__index = CosocketTransport

--- nginx phases in which cosockets and ngx.sleep are available.
CosocketTransport.PHASES = {
  rewrite = true, access = true, content = true, timer = true, ssl_cert = true,
  ssl_session_fetch = true, ssl_client_hello = true, preread = true,
}

local OPTION_TYPES = {
  caFile = "string", verify = "boolean", timeout = "number", connectTimeout = "number",
  maxBody = "number", poolSize = "number", idleTimeout = "number", keepalive = "boolean",
}
local METHODS = { GET = true, PUT = true, POST = true, PATCH = true, DELETE = true, HEAD = true }
local DEFAULTS = { timeout = 60, connectTimeout = 15, poolSize = 30, idleTimeout = 30 }

-- The ngx API table when running inside nginx (a global there), else nil.
local function ngx_api()
  local n = rawget(_G, "ngx")
  if type(n) == "table" and type(n.get_phase) == "function" then return n end
  return nil
end

--- True inside an nginx worker or master (the `ngx` API is present).
function CosocketTransport.inNginx()
  return ngx_api() ~= nil
end

--- Raises unless the current nginx phase allows cosockets and ngx.sleep; returns the ngx
-- table. `what` names the operation for the message (e.g. "getJob").
function CosocketTransport.checkPhase(what)
  local n = ngx_api()
  if not n then
    errors.misuse("iothub: " .. what .. ": the cosocket transport works only inside nginx " ..
      "(OpenResty or nginx's lua module); outside nginx use transport = \"curl\"")
  end
  local phase = n.get_phase()
  if not CosocketTransport.PHASES[phase] then
    errors.misuse(("iothub: %s cannot run in nginx's '%s' phase: nginx offers no cosockets " ..
      "or ngx.sleep there and the worker must not block; run it from a timer instead: " ..
      "ngx.timer.at(0, function(premature) ... end)"):format(what, tostring(phase)))
  end
  return n
end

local function check_number(what, name, v, level)
  if type(v) ~= "number" or v ~= v or v < 0 then
    error(("%s: option '%s' must be a non-negative number"):format(what, name), level + 1)
  end
end

local warned_ca_file = false

function CosocketTransport.new(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("CosocketTransport.new: options must be a table, got " .. type(opts), 2)
  end
  opts = opts or {}
  for k, v in pairs(opts) do
    local want = OPTION_TYPES[k]
    if not want then error("CosocketTransport.new: unknown option '" .. tostring(k) .. "'", 2) end
    if type(v) ~= want then
      error(("CosocketTransport.new: option '%s' must be a %s, got %s"):format(k, want, type(v)), 2)
    end
    if want == "number" then check_number("CosocketTransport.new", k, v, 2) end
  end
  if opts.poolSize and (opts.poolSize < 1 or opts.poolSize % 1 ~= 0) then
    error("CosocketTransport.new: option 'poolSize' must be a positive integer", 2)
  end
  local n = ngx_api()
  if opts.caFile and n and not warned_ca_file then
    warned_ca_file = true
    n.log(n.WARN, "iothub: caFile '", opts.caFile, "' is not read by the cosocket transport; nginx ",
      "verifies TLS peers against the lua_ssl_trusted_certificate directive, so put the file there")
  end
  return setmetatable({
    caFile = opts.caFile,
    verify = opts.verify ~= false,
    timeout = opts.timeout or DEFAULTS.timeout,
    connectTimeout = opts.connectTimeout or DEFAULTS.connectTimeout,
    maxBody = opts.maxBody or http1.DEFAULT_MAX_BODY,
    poolSize = opts.poolSize or DEFAULTS.poolSize,
    idleTimeout = opts.idleTimeout or DEFAULTS.idleTimeout,
    keepalive = opts.keepalive ~= false,
    counters = { requests = 0, connects = 0, reused = 0 },
  }, CosocketTransport)
end

local function to_ms(seconds)
  if seconds <= 0 then return 1 end
  return math.ceil(seconds * 1000) -- round up: a tiny timeout must not become "none"
end

local function fail(kind, code, message)
  return { kind = kind, code = code, message = message }
end

local function connect_error(where, err)
  err = tostring(err)
  if err == "timeout" then return fail("timeout", "Timeout", where .. ": timed out connecting") end
  if err:find("no resolver defined", 1, true) then
    return fail("network", "ResolveFailed", where .. ": " .. err .. "; nginx does not read " ..
      "/etc/resolv.conf: add a `resolver <dns-server-ip>;` directive to nginx.conf's http block")
  end
  if err:find("could not be resolved", 1, true) then
    return fail("network", "ResolveFailed", where .. ": " .. err)
  end
  return fail("network", "ConnectFailed", where .. ": cannot connect: " .. err)
end

-- Where trust comes from inside nginx, for verification failures.
function CosocketTransport:_trust_hint()
  local add = self.caFile
    and ("this client's caFile ('" .. self.caFile .. "') is not read inside nginx: add " ..
      "`lua_ssl_trusted_certificate " .. self.caFile .. ";`")
    or "add e.g. `lua_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;`"
  return "inside nginx the trusted CAs come from the lua_ssl_trusted_certificate directive; " .. add ..
    " to the http block (and lua_ssl_verify_depth if the chain is longer than 1)"
end

function CosocketTransport:_tls_error(where, host, err)
  err = tostring(err)
  if err == "timeout" then return fail("timeout", "Timeout", where .. ": timed out in the TLS handshake") end
  if err:find("^%d+: ") then -- "<X509 verify code>: <reason>", e.g. "20: unable to get local issuer certificate"
    return fail("tls", "CertificateVerifyFailed", where .. ": TLS certificate verification failed (" ..
      err .. "); " .. self:_trust_hint())
  end
  if err:find("host mismatch", 1, true) then
    return fail("tls", "HostMismatch", where .. ": the server's TLS certificate does not name '" ..
      host .. "' (use the host name the certificate was issued for)")
  end
  if err == "rejected" then
    return fail("tls", "CertificateRejected", where .. ": the server's TLS certificate was rejected: " ..
      "not trusted, or not issued for '" .. host .. "' (nginx's error log says which); " .. self:_trust_hint())
  end
  return fail("tls", "HandshakeFailed", where .. ": TLS handshake failed: " .. err ..
    " (details in nginx's error log)")
end

-- Reads through the socket with one overall deadline, like curl's total timeout: each
-- receive may wait only for what is left of the request's time.
local DeadlineReader = {}
DeadlineReader.__index = DeadlineReader

function DeadlineReader:receive(pattern)
  local left = self.deadline - core.monotime()
  if left <= 0 then return nil, "timeout" end
  self.sock:settimeout(to_ms(left))
  return self.sock:receive(pattern)
end

-- Validates a request table (misuse raises, as in the curl transport).
local function check_request(req, level)
  if type(req) ~= "table" then error("CosocketTransport: request must be a table, got " .. type(req), level + 1) end
  if type(req.method) ~= "string" or not METHODS[req.method] then
    error("CosocketTransport: request.method must be GET, PUT, POST, PATCH, DELETE or HEAD, got " ..
      tostring(req.method), level + 1)
  end
  if type(req.url) ~= "string" then error("CosocketTransport: request.url must be a string", level + 1) end
  if req.headers ~= nil and type(req.headers) ~= "table" then
    error("CosocketTransport: request.headers must be an array of strings", level + 1)
  end
  if req.body ~= nil and type(req.body) ~= "string" then
    error("CosocketTransport: request.body must be a string or nil", level + 1)
  end
  for _, name in ipairs({ "timeout", "connectTimeout", "maxBody" }) do
    if req[name] ~= nil then check_number("CosocketTransport: request", name, req[name], level + 1) end
  end
end

-- One attempt on one connection (pooled or new).
-- Returns res | nil, err, retry (true when a reused connection failed before any answer).
function CosocketTransport:_attempt(n, x)
  local sock, serr = n.socket.tcp()
  if not sock then return nil, fail("network", "SocketFailed", x.where .. ": " .. tostring(serr)) end
  local left = x.deadline - core.monotime()
  if left <= 0 then return nil, fail("timeout", "Timeout", x.where .. ": timed out before connecting") end
  sock:settimeouts(to_ms(math.min(x.connectTimeout, left)), to_ms(left), to_ms(left))
  local ok, cerr = sock:connect(x.address, x.port, { pool = x.pool, pool_size = self.poolSize })
  if not ok then return nil, connect_error(x.where, cerr) end
  local reused = (sock:getreusedtimes() or 0) > 0
  local counters = self.counters
  if reused then counters.reused = counters.reused + 1 else counters.connects = counters.connects + 1 end
  if x.tls and not reused then
    -- false: no session object wanted back; the server name drives SNI and the host check.
    local done, herr = sock:sslhandshake(false, x.serverName, self.verify)
    if done and not sock:getreusedtimes() then
      -- lua-nginx-module 0.10.23 (Debian 12) answers true when a handshake that finished at
      -- once then failed verification; it has closed the socket, which is how we tell.
      done, herr = nil, "rejected"
    end
    if not done then
      sock:close()
      return nil, self:_tls_error(x.where, x.serverName, herr)
    end
  end
  left = x.deadline - core.monotime()
  sock:settimeout(to_ms(left))
  local sent, werr = sock:send(x.payload)
  if not sent then
    sock:close()
    local _, e = http1.socket_error(x.where, werr, "sending the request")
    return nil, e, reused and e.kind ~= "timeout"
  end
  local reader = setmetatable({ sock = sock, deadline = x.deadline }, DeadlineReader)
  local res, keep_or_err, started = http1.read_response(reader, x.method, { where = x.where, maxBody = x.maxBody })
  if not res then
    sock:close()
    return nil, keep_or_err, reused and not started and keep_or_err.kind ~= "timeout"
  end
  if keep_or_err and self.keepalive then
    -- idleTimeout 0 keeps idle connections until the server closes them (nginx's meaning of 0);
    -- on failure nginx closes the socket itself.
    sock:setkeepalive(math.ceil(self.idleTimeout * 1000))
  else
    sock:close()
  end
  return res
end

--- Sends one request and reads the answer. Returns { status, headers, body } or nil, err.
-- A kept-alive connection the server closed while idle is detected and the request is sent
-- again on another connection (as libcurl does), before any answer was read, never after.
function CosocketTransport:request(req)
  local n = CosocketTransport.checkPhase("an HTTP request")
  check_request(req, 2)
  local u, msg = http1.parse_url(req.url)
  if not u then error("CosocketTransport: " .. msg, 2) end
  local head = http1.request_head(req.method, u, req.headers, req.body)
  local timeout = req.timeout or self.timeout
  local tls_mode = u.tls and (self.verify and "tls" or "tls-noverify") or "plain"
  local host_text = u.host:find(":", 1, true) and ("[" .. u.host .. "]") or u.host -- IPv6 literal
  -- "localhost" is loopback by definition (RFC 6761): no resolver needed for local work.
  local address = u.host == "localhost" and "127.0.0.1" or host_text
  local x = {
    method = req.method, where = req.method .. " " .. u.scheme .. "://" .. host_text .. ":" .. u.port,
    address = address, port = u.port, serverName = u.host, tls = u.tls,
    pool = "iothub:" .. u.host .. ":" .. u.port .. ":" .. tls_mode,
    payload = req.body and { head, req.body } or head,
    connectTimeout = req.connectTimeout or self.connectTimeout,
    deadline = core.monotime() + timeout, maxBody = req.maxBody or self.maxBody,
  }
  self.counters.requests = self.counters.requests + 1
  -- Each stale pooled connection costs one retry; a fresh connection ends the loop.
  for _ = 1, self.poolSize + 1 do
    local res, err, retry = self:_attempt(n, x)
    if res or not retry then return res, err end
  end
  return nil, fail("network", "ConnectionClosed", x.where .. ": every pooled connection was closed by the server")
end

--- Counters for this transport in this worker: requests, connects (new connections) and
-- reused (requests served on a kept-alive connection).
function CosocketTransport:stats()
  local c = self.counters
  return { requests = c.requests, connects = c.connects, reused = c.reused }
end

--- Nothing to release: idle connections belong to nginx's pool. Kept for interface parity.
function CosocketTransport.close(_) end

return CosocketTransport
