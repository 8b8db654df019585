-- The query language (csrc/query.c). The input is compiled as a query and as a job condition
-- (and checked by validate.c's check_query_condition, which must agree), then run over a few
-- documents with match, project, filter, select and aggregate, and described by info. filter
-- must agree with match, and paging through filter must give the same rows as one call.
-- libfuzzer: -max_len=9000 -dict=fuzz/dict/query.dict
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local DOCS = assert(core.json_decode([==[[
  { "deviceId": "door-1", "status": "enabled", "version": 3, "connectionState": "Connected",
    "tags": { "building": "43", "floor": 1, "ratio": 0.5, "enabled": true, "off": false, "nothing": null,
              "list": [1, 2], "empty": [], "obj": { "a": 1 }, "Group": { "name": "x" }, "my-prop": "dash",
              "where": "w", "café": "yes", "big": 9223372036854775807, "neg": -9223372036854775808 },
    "properties": { "reported": { "fw": "1.2.3", "temp": 21.5, "$version": 4 },
                    "desired": { "temp": 21.5, "mode": "eco" } } },
  { "deviceId": "door-2", "Tags": { "Building": "44", "floor": 2.0, "ratio": -0.5, "list": [] },
    "properties": { "reported": { "temp": "hot" } }, "jobId": "j1", "moduleId": "m" },
  { "deviceId": "", "tags": null, "version": 1e300, "status": "disabled" },
  { "deviceId": "x", "tags": { "floor": 9007199254740993, "building": "43" } },
  {}, [], "not a document", 7, null
]]==]))
DOCS[#DOCS + 2] = { deviceId = "after a hole" } -- a hole in the array is no document

local function exercise(q, where)
  local info = q:info()
  check(type(info) == "table" and type(info.collection) == "string" and type(info.columns) == "table",
    "%s: info() lacks fields", where)
  for _, c in ipairs(info.columns) do check(type(c) == "string", "%s: a column name is not a string", where) end
  for _, g in ipairs(info.groupBy) do check(type(g) == "string", "%s: a groupBy entry is not a string", where) end
  if info.aggregate then
    local rows = q:aggregate(DOCS)
    check(type(rows) == "table", "%s: aggregate returned %s", where, type(rows))
    if info.top then check(#rows <= info.top, "%s: %d rows despite TOP %d", where, #rows, info.top) end
    return
  end
  local matching = {}
  for i = 1, #DOCS + 2 do
    local doc = DOCS[i]
    if doc ~= nil then
      local m = q:match(doc)
      check(type(m) == "boolean", "%s: match returned %s", where, type(m))
      if m then matching[#matching + 1] = doc end
      check(type(q:project(doc)) ~= "nil", "%s: project returned nil", where)
    end
  end
  local all, nxt = q:filter(DOCS)
  check(nxt == nil, "%s: filter of everything says to resume at %s", where, nxt)
  check(#all == #matching, "%s: filter found %d documents, match %d", where, #all, #matching)
  for i = 1, #all do check(all[i] == matching[i], "%s: filter row %d is not the matching document", where, i) end
  local selected = q:select(DOCS)
  check(#selected == #all, "%s: select found %d rows, filter %d", where, #selected, #all)
  for limit = 1, 3 do
    local paged, start, pages = {}, 1, 0
    while start do
      local page
      page, start = q:filter(DOCS, start, limit)
      pages = pages + 1
      check(#page <= limit and pages <= #DOCS + 3, "%s: paging by %d does not end", where, limit)
      check(start == nil or #page == limit, "%s: a short page before the last", where)
      for _, r in ipairs(page) do paged[#paged + 1] = r end
    end
    check(#paged == #all, "%s: paging by %d gave %d rows, one call %d", where, limit, #paged, #all)
    for i = 1, #all do check(paged[i] == all[i], "%s: paged row %d differs", where, i) end
  end
end

return function(data)
  local q, msg, code = core.query_compile(data)
  if q then
    exercise(q, "query")
    check(tostring(q):find("iothub.query", 1, true), "tostring(query)")
  else
    fz.check_failure("query_compile", q, msg, code)
    check(code == "InvalidArgument", "query_compile code %s", code)
  end

  local c, cmsg, ccode = core.query_condition(data)
  local ok, vmsg = core.check_query_condition(data)
  check((c ~= nil) == (ok == true), "query_condition and check_query_condition disagree: %s / %s", cmsg, vmsg)
  if c then
    exercise(c, "condition")
  else
    fz.check_failure("query_condition", c, cmsg, ccode)
    check(type(vmsg) == "string" and vmsg:find("queryCondition", 1, true), "check_query_condition message: %s", vmsg)
  end
end
