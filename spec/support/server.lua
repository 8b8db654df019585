-- A real local HTTP/HTTPS test server: Debian's nginx + the lua module, a private
-- CA made with the openssl CLI, all state in a temp dir. Handlers live in
-- spec/support/server/handlers.lua.
--
--   local srv = require("support.server").start()
--   srv.http_url, srv.https_url, srv.proxy_url, srv.ca_file, srv.dir
--   srv:script{ { status = 200, body = "{}" } }; srv:request_log(); srv:reset(); srv:stop()
local cjson = require "cjson"
local curl = require "iothub.curl"
local shell = require "support.shell"
local shell_quote, run, sleep = shell.quote, shell.run, shell.sleep
local read_file, write_file, alive = shell.read_file, shell.write_file, shell.alive

local M = {}
local Server = {}
Server.__index = Server

local MODULES = "/usr/lib/nginx/modules"

local function make_certs(dir)
  local q = function(name) return shell_quote(dir .. "/" .. name) end
  write_file(dir .. "/server.ext", table.concat({
    "basicConstraints = critical, CA:FALSE",
    "keyUsage = critical, digitalSignature, keyEncipherment",
    "extendedKeyUsage = serverAuth",
    "subjectAltName = DNS:localhost, IP:127.0.0.1",
    "",
  }, "\n"))
  local steps = {
    -- EC keys: much faster to generate than RSA
    "openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
      .. " -subj '/CN=iothub-test-ca' -addext 'basicConstraints=critical,CA:TRUE'"
      .. " -addext 'keyUsage=critical,keyCertSign,cRLSign'"
      .. " -keyout " .. q("ca.key") .. " -out " .. q("ca.pem"),
    "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      .. " -subj '/CN=localhost' -keyout " .. q("server.key") .. " -out " .. q("server.csr"),
    "openssl x509 -req -days 2 -in " .. q("server.csr") .. " -CA " .. q("ca.pem")
      .. " -CAkey " .. q("ca.key") .. " -CAcreateserial -extfile " .. q("server.ext")
      .. " -out " .. q("server.pem"),
  }
  for _, cmd in ipairs(steps) do
    local ok, out = run(cmd)
    if not ok then error("openssl failed: " .. cmd .. "\n" .. out, 0) end
  end
end

local function has_ipv6_loopback()
  local s = read_file("/proc/net/if_inet6") or ""
  return s:find("00000000000000000000000000000001", 1, true) ~= nil
end

local function routes()
  local h = function(fn) return "content_by_lua_block { require('handlers')." .. fn .. "() }" end
  return table.concat({
    "location /echo { " .. h("echo") .. " }",
    "location /status/ { " .. h("status") .. " }",
    "location = /slow { " .. h("slow") .. " }",
    "location = /stats { " .. h("stats") .. " }",
    "location = /stats/reset { " .. h("stats_reset") .. " }",
    "location = /_script { " .. h("script") .. " }",
    "location = /_requests { " .. h("requests") .. " }",
    "location = /_reset { " .. h("reset") .. " }",
    "location /hub { " .. h("hub") .. " }",
    "location /sim/ { " .. h("sim") .. " }",
  }, "\n    ")
end

local function nginx_conf(dir, ports, handlers_dir, as_root, ipv6)
  local function listen(port, extra)
    local s = "listen 127.0.0.1:" .. port .. (extra or "") .. ";"
    if ipv6 then s = s .. " listen [::1]:" .. port .. (extra or "") .. ";" end
    return s
  end
  return table.concat({
    "load_module " .. MODULES .. "/ndk_http_module.so;",
    "load_module " .. MODULES .. "/ngx_http_lua_module.so;",
    as_root and "user root;" or "",
    "daemon on;",
    "worker_processes 1;",
    "pid " .. dir .. "/nginx.pid;",
    "error_log " .. dir .. "/error.log warn;",
    "events { worker_connections 1024; }",
    "http {",
    "  access_log off;",
    "  default_type application/json;",
    "  client_body_temp_path " .. dir .. "/tmp/body;",
    "  proxy_temp_path " .. dir .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. dir .. "/tmp/fastcgi;",
    "  uwsgi_temp_path " .. dir .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. dir .. "/tmp/scgi;",
    "  client_max_body_size 100m;",
    "  client_body_buffer_size 16m;", -- keep bodies in memory
    "  keepalive_requests 1000000;",
    "  keepalive_timeout 60s;",
    "  lua_shared_dict iothub_test 16m;",
    "  lua_package_path '" .. handlers_dir .. "/?.lua;;';",
    "  server {",
    "    " .. listen(ports.http),
    "    " .. routes(),
    "  }",
    "  server {",
    "    " .. listen(ports.https, " ssl"),
    "    ssl_certificate " .. dir .. "/server.pem;",
    "    ssl_certificate_key " .. dir .. "/server.key;",
    "    " .. routes(),
    "  }",
    "  server {",
    "    " .. listen(ports.proxy),
    "    location / { content_by_lua_block { require('handlers').proxy() } }",
    "  }",
    "}",
    "",
  }, "\n")
end

local seeded = false
local function random_ports()
  if not seeded then
    -- tostring({}) differs per process, so parallel runs do not pick the same sequence
    local addr = tonumber((tostring({}):match("0x(%x+)")) or "0", 16) or 0
    math.randomseed(os.time() + (addr % 1000003))
    seeded = true
  end
  local base = math.random(20000, 60000)
  return { http = base, https = base + 1, proxy = base + 2 }
end

-- One-off request through iothub.curl, never through an environment proxy.
function Server:http(method, path, body)
  local e = assert(curl.easy())
  local status, headers, resp = e:perform({
    method = method, url = self.http_url .. path, body = body, proxy = "",
    headers = body and { "Content-Type: application/json" } or nil, timeout = 10,
  })
  e:close()
  return status, headers, resp
end

local function json_call(self, method, path, body)
  local status, err, resp = self:http(method, path, body)
  if not status then error("test server: " .. tostring(err), 3) end
  if status ~= 200 then error("test server: " .. method .. " " .. path .. " -> " .. status .. " " .. resp, 3) end
  return cjson.decode(resp)
end

function Server:script(list) return json_call(self, "POST", "/_script", cjson.encode(list)) end
function Server:request_log() return json_call(self, "GET", "/_requests") end
function Server:reset() return json_call(self, "POST", "/_reset", "") end
function Server:stats() return json_call(self, "GET", "/stats") end
function Server:reset_stats() return json_call(self, "POST", "/stats/reset", "") end

function Server:error_log() return read_file(self.dir .. "/error.log") or "" end


function Server:stop()
  if self.stopped then return end
  self.stopped = true
  if self.started then
    self.pid = self.pid or tonumber(read_file(self.dir .. "/nginx.pid") or "")
    run("nginx -p " .. shell_quote(self.dir) .. " -c " .. shell_quote(self.conf) .. " -e "
      .. shell_quote(self.dir .. "/error.log") .. " -s stop")
    if self.pid then
      for _ = 1, 100 do
        if not alive(self.pid) then break end
        sleep(0.05)
      end
      if alive(self.pid) then run("kill -9 " .. self.pid) end -- our own master only
    end
  end
  if self.dir and self.dir:match("^/tmp/iothub%-nginx%.") then run("rm -rf " .. shell_quote(self.dir)) end
end

local function wait_ready(self)
  local e = assert(curl.easy())
  local urls = {
    self.http_url .. "/stats",
    self.https_url .. "/stats",
    self.proxy_url .. "/ready",
  }
  for _, url in ipairs(urls) do
    local ok = false
    for _ = 1, 100 do
      local status = e:perform({ method = "GET", url = url, proxy = "", caFile = self.ca_file,
                                 timeout = 2, connectTimeout = 1 })
      if status == 200 then ok = true; break end
      sleep(0.05)
    end
    if not ok then
      e:close()
      return false, url .. " never answered"
    end
  end
  e:close()
  return true
end

function M.start(opts)
  opts = opts or {}
  local dir = shell.temp_dir("iothub-nginx")
  local self = setmetatable({ dir = dir, conf = dir .. "/nginx.conf", ca_file = dir .. "/ca.pem" }, Server)
  local started, lasterr = false, nil
  local okAll, err = pcall(function()
    assert(run("mkdir -p " .. shell_quote(dir .. "/tmp")))
    make_certs(dir)
    local as_root = (select(2, run("id -u")):match("^%s*0%s*$")) ~= nil
    local ipv6 = opts.ipv6 ~= false and has_ipv6_loopback()
    for _ = 1, 20 do
      local ports = random_ports()
      write_file(self.conf, nginx_conf(dir, ports, shell.ROOT .. "/spec/support/server", as_root, ipv6))
      local okStart, log = run("nginx -p " .. shell_quote(dir) .. " -c " .. shell_quote(self.conf)
        .. " -e " .. shell_quote(dir .. "/error.log"))
      if okStart then
        self.ports = ports
        self.started = true
        self.http_url = "http://127.0.0.1:" .. ports.http
        self.https_url = "https://localhost:" .. ports.https
        self.proxy_url = "http://127.0.0.1:" .. ports.proxy
        started = true
        break
      end
      lasterr = log
      -- a port taken by someone else: try others; anything else is fatal
      if not log:find("in use", 1, true) then break end
    end
    if not started then error("nginx failed to start: " .. tostring(lasterr), 0) end
    local ready, why = wait_ready(self)
    -- the daemon writes its pid file after the launcher exits: read it once it serves
    self.pid = tonumber(read_file(dir .. "/nginx.pid") or "")
    if not ready then error("nginx started but " .. why .. "\n" .. self:error_log(), 0) end
  end)
  if not okAll then
    self:stop()
    error(err, 2)
  end
  return self
end

return M
