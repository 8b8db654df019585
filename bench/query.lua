-- Cost of the C query language over emulator-like twins: compile, one match called from Lua,
-- a whole-fleet scan in C (q:filter), paging, and GROUP BY.
-- Run: lua5.4 bench/query.lua [twins]   (or luajit bench/query.lua)
package.cpath = (jit and "build/luajit/?.so;" or "build/5.4/?.so;") .. package.cpath
local core = require "iothub.core"

local twins = tonumber(arg and arg[1]) or 100000

-- Shaped like registry.twin_doc: root identity fields, tags, desired/reported with metadata.
-- One template text, varied after decoding: 100,000 long near-identical strings would
-- measure LuaJIT's string interning instead of the queries.
local TEMPLATE = [[{
  "deviceId": "", "etag": "AAAAAAAAAAE=", "deviceEtag": "MTIzNDU2Nzg=", "status": "enabled",
  "statusUpdateTime": "0001-01-01T00:00:00Z", "connectionState": "Disconnected",
  "lastActivityTime": "2026-11-22T10:00:00.0000000Z", "cloudToDeviceMessageCount": 0,
  "authenticationType": "sas", "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
  "modelId": "", "version": 3, "capabilities": {"iotEdge": false},
  "tags": {"location": {"building": "", "floor": 0}, "ring": "main"},
  "properties": {
    "desired": {"telemetryConfig": {"sendFrequency": "5m"}, "$metadata": {"$lastUpdated": "2026-11-22T10:00:00Z"},
                "$version": 1},
    "reported": {"fw": 0, "telemetryConfig": {"status": ""}, "$metadata": {"$lastUpdated": "2026-11-22T10:00:00Z"},
                 "$version": 2}}}]]
local STATUSES = { "Success", "Pending", "Error" }

local function twin(i)
  local d = assert(core.json_decode(TEMPLATE))
  d.deviceId = ("door-%06d"):format(i)
  if i % 3 == 0 then d.connectionState = "Connected" end
  d.tags.location.building = tostring(40 + i % 5)
  d.tags.location.floor = i % 4
  if i % 10 == 0 then d.tags.ring = "canary" end
  d.properties.reported.fw = i % 3 + (i % 7) / 10
  d.properties.reported.telemetryConfig.status = STATUSES[i % 3 + 1]
  return d
end

local docs = {}
for i = 1, twins do docs[i] = twin(i) end

local function clock() return core.cputime() end

local function per_item(label, n, fn)
  fn() -- warm up (JIT, caches)
  local t0 = clock()
  local reps = 0
  repeat
    fn()
    reps = reps + 1
  until clock() - t0 > 0.3
  local each = (clock() - t0) / reps / n
  print(("%-58s %8.0f ns"):format(label, each * 1e9))
end

print(("interpreter %s; %d twins"):format(jit and jit.version or _VERSION, twins))

local ids = {}
for i = 1, 200 do ids[i] = ("'door-%06d'"):format(i * 37) end
local conditions = {
  { "tags.location.building = '43'", "simple tag equality" },
  { "TAGS.Location.BUILDING = '43'", "same, names in other case (case-insensitive lookups)" },
  { "tags.location.building = '43' AND properties.reported.fw < 2", "two comparisons" },
  { "deviceId IN [" .. table.concat(ids, ",") .. "]", "IN with 200 ids" },
  { "tags.nothere.x = 1", "missing path" },
  { "STARTSWITH(deviceId, 'door-00') AND NOT (connectionState = 'Connected')", "function + NOT" },
  { "properties.reported.fw * 10 % 7 >= 3", "arithmetic" },
}

per_item("compile  tags.location.building = '43'", 1, function()
  assert(core.query_condition("tags.location.building = '43'"))
end)

for _, c in ipairs(conditions) do
  local q = assert(core.query_condition(c[1]))
  local doc = docs[12345 % twins + 1]
  per_item("q:match(doc) from Lua   " .. c[2], 1000, function()
    for _ = 1, 1000 do q:match(doc) end
  end)
  per_item("q:filter(docs) in C, per twin   " .. c[2], twins, function() q:filter(docs) end)
end

local q = assert(core.query_compile("SELECT * FROM devices WHERE tags.ring = 'canary'"))
per_item("q:select(docs, start, 100): one page of 100 (10% match), per twin scanned", 1000, function()
  local _, nxt = q:select(docs, 1, 100)
  assert(nxt)
end)

local agg = assert(core.query_compile("SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS n "
  .. "FROM devices GROUP BY properties.reported.telemetryConfig.status"))
per_item("q:aggregate(docs) GROUP BY 3 values, per twin", twins, function() agg:aggregate(docs) end)
