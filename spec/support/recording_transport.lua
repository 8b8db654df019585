-- A transport for unit specs: records every request exactly as the client built it and
-- answers from a script. It stands in for the network only; the curl transport has its own
-- specs against a real server.
local Recorder = {}
Recorder.__index = Recorder

-- script entries: { status=, headers=, body= (string or table encoded with iothub.json) }
-- or { err = { kind=, code=, message= } } or a function(req) returning either.
function Recorder.new(script)
  return setmetatable({ script = script or {}, requests = {} }, Recorder)
end

function Recorder:push(entry)
  self.script[#self.script + 1] = entry
  return self
end

local function header_map(lines)
  local map = {}
  for _, line in ipairs(lines or {}) do
    local name, value = line:match("^([^:]+):%s?(.*)$")
    map[name:lower()] = value
  end
  return map
end

function Recorder:request(req)
  local rec = { method = req.method, url = req.url, headers = header_map(req.headers),
    lines = req.headers, body = req.body, timeout = req.timeout }
  rec.path, rec.query = req.url:match("^https?://[^/]+([^?]*)%??(.*)$")
  self.requests[#self.requests + 1] = rec
  local entry = table.remove(self.script, 1)
  if type(entry) == "function" then entry = entry(rec) end
  if entry == nil then
    error("recording transport: no scripted response left for " .. req.method .. " " .. req.url, 2)
  end
  if entry.err then return nil, entry.err end
  local body = entry.body
  if type(body) == "table" then body = require("iothub.json").encode(body) end
  local headers = {}
  for k, v in pairs(entry.headers or {}) do headers[k:lower()] = v end
  return { status = entry.status or 200, headers = headers, body = body or "" }
end

function Recorder:last()
  return self.requests[#self.requests]
end

return Recorder
