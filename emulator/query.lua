-- The IoT Hub query language (hub-behavior.md §1) for the emulator: a thin layer over the C
-- core's compiler and evaluator (csrc/query.c), which the client shares for its checks.
--   plan = query.parse(sql)              -> plan | nil, message
--   plan = query.parse_condition(cond)   -> plan (a job queryCondition; "*" = all) | nil, message
--   query.matches(plan, doc)             -> boolean
--   query.filter(plan, docs)             -> array of the docs that match (order kept, TOP applied)
--   query.item_type(plan)                -> x-ms-item-type: "Twin", "DeviceJob" or "Raw"
--   query.execute(plan, docs, continuation, max_items)
--                                        -> items, item_type, next_continuation (nil on the last page)
--                                         | nil, message when the continuation is not one of ours
-- A plan is the compiled query's info() (collection, top, star, aggregate, groupBy, columns,
-- all, equals; see csrc/query.c) plus plan.query, the compiled query itself.
local core = require "iothub.core"

local M = {}

M.MAX_LENGTH = core.query_max_length
-- The largest POST /devices/query body a query of MAX_LENGTH characters needs, each written
-- as a JSON escape pair (12 bytes), with room for whitespace: larger bodies are refused
-- before they are decoded.
M.MAX_BODY_BYTES = 16 * M.MAX_LENGTH

local function plan_of(compiled, err)
  if not compiled then return nil, err end
  local plan = compiled:info()
  plan.query = compiled
  return plan
end

function M.parse(sql)
  if type(sql) ~= "string" then return nil, "the query must be a string" end
  return plan_of(core.query_compile(sql))
end

function M.parse_condition(cond)
  if type(cond) ~= "string" then return nil, "queryCondition must be a string" end
  return plan_of(core.query_condition(cond))
end

function M.matches(plan, doc)
  return plan.query:match(doc)
end

function M.filter(plan, docs)
  return (plan.query:filter(docs, 1, plan.top))
end

-- PascalCase, as the .NET SDK parses it (hub-behavior.md §1.1).
function M.item_type(plan)
  if plan.aggregate or not plan.star then return "Raw" end
  return plan.collection == "devices.jobs" and "DeviceJob" or "Twin"
end

---------------------------------------------------------------------------
-- Paging. A continuation holds where the scan resumes in docs (an array in stable order)
-- and how many items earlier pages returned (for TOP), so page k never re-evaluates pages
-- 1..k-1. Aggregate results are small: they are recomputed and paged by row offset.

local function encode(kind, position, returned)
  return core.base64_encode(("emuq1:%s:%d:%d"):format(kind, position, returned))
end

local function decode(token)
  local raw = core.base64_decode(token)
  local kind, position, returned = (raw or ""):match("^emuq1:([sa]):(%d+):(%d+)$")
  if not kind or tonumber(position) < 1 then return nil end
  return kind, tonumber(position), tonumber(returned)
end

function M.execute(plan, docs, continuation, max_items)
  local compiled, item_type = plan.query, M.item_type(plan)
  local position, returned = 1, 0
  if continuation ~= nil and continuation ~= "" then
    local kind
    kind, position, returned = decode(continuation)
    if kind ~= (plan.aggregate and "a" or "s") then return nil, "The continuation token is not valid." end
  end
  max_items = max_items or 100

  if plan.aggregate then
    local rows, page = compiled:aggregate(docs), {}
    local last = math.min(#rows, position + max_items - 1)
    for i = position, last do page[#page + 1] = rows[i] end
    return core.json_array(page), item_type, last < #rows and encode("a", last + 1, 0) or nil
  end

  local limit = max_items
  if plan.top then limit = math.min(limit, plan.top - returned) end
  if limit <= 0 then return core.json_array({}), item_type, nil end
  local items, resume = compiled:select(docs, position, limit)
  returned = returned + #items
  if resume and not (plan.top and returned >= plan.top) then
    return items, item_type, encode("s", resume, returned)
  end
  return items, item_type, nil
end

return M
