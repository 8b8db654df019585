--- Iterates every item of a paged query, one page in memory at a time.
--
--     for job, err in jobs:queryJobs{ status = "running" } do
--       if not job then print("query failed: " .. tostring(err)) break end
--       print(job.jobId)
--     end
--
-- Paging follows the hub: the page size goes out as `x-ms-max-item-count`, the continuation
-- token comes back in the `x-ms-continuation` response header and is echoed as a request
-- header (with the same query and page size); the last page has no such header.
--
-- Errors are never swallowed: when a page cannot be fetched the iterator produces one final
-- pair `false, err` (so the loop body runs and sees it), then stops. `pager:all()` collects
-- everything or returns nil, err.
-- @module iothub.pager
local errors = require "iothub.errors"

local Pager = {}
Pager.__index = Pager

--- fetch(continuation) -> items (array), next_continuation | nil, err
function Pager.new(fetch)
  return setmetatable({ fetch = fetch, items = nil, index = 0, token = nil, finished = false,
    pages = 0 }, Pager)
end

function Pager:__call()
  if self.finished then return nil end
  local items = self.items
  while not items or self.index >= #items do
    if items and not self.token then
      self.finished = true
      return nil
    end
    local page, token_or_err = self.fetch(self.token)
    if not page then
      self.finished = true
      self.error = token_or_err
      return false, token_or_err
    end
    self.pages = self.pages + 1
    self.items, self.index, self.token = page, 0, token_or_err
    items = page
  end
  self.index = self.index + 1
  local item = items[self.index]
  items[self.index] = false -- drop our reference so a long scan stays flat in memory
  return item
end

--- A pager over a hub query endpoint. send(headers) -> decoded array, response | nil, err;
-- headers carry the page size and the continuation token of the previous page.
function Pager.query(page_size, send)
  return Pager.new(function(token)
    local headers = {}
    if page_size then headers[#headers + 1] = { "x-ms-max-item-count", tostring(math.floor(page_size)) } end
    if token then headers[#headers + 1] = { "x-ms-continuation", token } end
    local items, res = send(headers)
    if not items then return nil, res end
    if type(items) ~= "table" then
      return nil, errors.new({ kind = "protocol", code = "InvalidResponse",
        message = "the hub answered a query with something that is not a JSON array" })
    end
    local next_token = res.headers and res.headers["x-ms-continuation"]
    if next_token == "" then next_token = nil end
    return items, next_token
  end)
end

--- Returns every remaining item as an array, or nil, err.
function Pager:all()
  local out = {}
  for item, err in self do
    if item == false then return nil, err end
    out[#out + 1] = item
  end
  return out
end

return Pager
