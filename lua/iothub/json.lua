--- JSON as the hub speaks it: exact integers (Lua 5.4 integers stay integers), numbers beyond
-- 2^53 refused rather than rounded, `json.null` for null and `json.array` for empty arrays.
-- @module iothub.json
local core = require "iothub.core"

return {
  encode = core.json_encode,
  decode = core.json_decode,
  null = core.null,
  array = core.json_array,
  array_mt = core.json_array_mt,
}
