-- What the emulator accepts from a client, and the hub-shaped refusal when a request goes past
-- it (emulator/README.md, "Hostile clients"). nginx enforces the sizes and per-read timeouts it
-- is configured with (emulator/conf.lua renders them from conf.LIMITS); this module keeps the
-- rest: one deadline for a whole request body, the header count, and the messages for the
-- requests nginx refuses before Lua runs (error_page -> /_emulator/refused/<status>).
--   limits.configure{ client_timeout = seconds }
--   limits.read_body()        -> body text | nil (no body); raises an error object on a timeout
--   limits.request_headers()  -> headers table; raises an error object past MAX_HEADERS
--   limits.refusal(status)    -> the error object for a request nginx refused with status
local conf = require "emulator.conf"
local errors = require "emulator.errors"

local M = {}

M.MAX_HEADERS = 100 -- request headers read; a request with more is refused, not cut short

local LIMITS = conf.LIMITS
local settings = { client_timeout = LIMITS.client_timeout }

function M.configure(opts)
  settings.client_timeout = conf.client_timeout(opts and opts.client_timeout)
end

local function kb(bytes)
  return string.format("%d KB", math.floor(bytes / 1024))
end

local function mb(bytes)
  return string.format("%d MB", math.floor(bytes / (1024 * 1024)))
end

-- The body of a request that declares its Content-Length, read against one deadline that
-- starts with the request: nginx's client_body_timeout only bounds each gap between two
-- reads, so a client sending a byte every few seconds would otherwise hold the request open
-- for as long as it likes. Returns the body, or nil when this way does not apply.
local function read_declared_body(length)
  local sock = ngx.req.socket()
  if not sock then return nil end -- already read, or a chunked body (nginx reads those)
  local deadline = ngx.req.start_time() + settings.client_timeout
  local parts, got = {}, 0
  while got < length do
    ngx.update_time()
    local left = deadline - ngx.now()
    local data, err
    if left > 0 then
      sock:settimeout(math.max(1, math.floor(left * 1000)))
      data, err = sock:receiveany(length - got)
    else
      err = "timeout"
    end
    if not data then
      if err == "timeout" then
        local e = errors.new("RequestTimeout", string.format("The request body did not arrive in time: %d of "
          .. "the %d bytes its Content-Length announced came within %g s. Send the whole body at once.",
          got, length, settings.client_timeout))
        e.close = true -- the rest of the body would be read as the next request
        error(e, 0)
      end
      error(errors.new("GenericBadRequest", "The connection closed before the request body was complete ("
        .. got .. " of " .. length .. " bytes)."), 0)
    end
    parts[#parts + 1] = data
    got = got + #data
  end
  return table.concat(parts)
end

function M.read_body()
  local length = tonumber(ngx.var.http_content_length)
  if length and length > 0 and not ngx.var.http_transfer_encoding then
    local body = read_declared_body(length)
    if body then return body end
  end
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if not data then
    local path = ngx.req.get_body_file()
    if path then
      local f = io.open(path, "rb")
      if f then data = f:read("*a"); f:close() end
    end
  end
  return data
end

function M.request_headers()
  local headers, err = ngx.req.get_headers(M.MAX_HEADERS)
  if err == "truncated" then
    error(errors.new("GenericBadRequest", "The request has more than " .. M.MAX_HEADERS
      .. " headers; the emulator reads at most " .. M.MAX_HEADERS .. "."), 0)
  end
  return headers
end

local REFUSALS = {
  [413] = { "MessageTooLarge", "The request body is larger than the emulator accepts (" .. mb(LIMITS.body) .. ")." },
  [414] = { "GenericBadRequest", "The request URI is longer than the emulator accepts (" .. kb(LIMITS.header_line)
    .. " for the request line)." },
  [494] = { "GenericBadRequest", "The request headers are larger than the emulator accepts: each header line "
    .. "at most " .. kb(LIMITS.header_line) .. ", all of them together at most "
    .. kb(LIMITS.header_line * LIMITS.header_buffers) .. "." },
}

function M.refusal(status)
  local r = REFUSALS[status]
  if r then return errors.new(r[1], r[2]) end
  return errors.new("GenericBadRequest", "The request line or headers are malformed (HTTP " .. tostring(status) .. ").")
end

return M
