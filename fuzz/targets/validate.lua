-- Client-side validation (csrc/validate.c): job ids and query conditions from the raw input,
-- job properties from the input as JSON (or as bytes that build any Lua value), integer ranges
-- from fuzzed numbers. Each check must agree with a plain-Lua statement of its rule.
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

-- The documented rule; numbers compare as doubles (a Lua 5.4 integer beyond 2^53 is rounded
-- first, as the C check reads every number as a double).
local function whole_in(v, min, max)
  if type(v) ~= "number" then return false end
  v, min, max = v + 0.0, min + 0.0, max + 0.0
  if not (v >= -2 ^ 63 and v < 2 ^ 63) or v ~= math.floor(v) then return false end
  return v >= min and v <= max
end

local function expect_result(what, ok, msg, code)
  if ok ~= true then
    fz.check_failure(what, ok, msg, code)
    check(code == "InvalidArgument", "%s code %s", what, code)
  end
  return ok == true
end

return function(data)
  local ok = expect_result("check_job_id", core.check_job_id(data))
  check(ok == (#data >= 1 and #data <= 64 and not data:find("[^%w%-]")), "check_job_id(%s) = %s", data, ok)
  ok = expect_result("check_device_id", core.check_device_id(data))
  check(not ok or (#data >= 1 and #data <= 128 and not data:find("%c")), "check_device_id(%s) = %s", data, ok)

  expect_result("check_query_condition", core.check_query_condition(data))

  local b = fz.bytes(data)
  local props = core.json_decode(data)
  if type(props) ~= "table" then props = b:value() end
  if type(props) == "table" then
    local name = b:bool() and b:string(30) or nil
    for _, values in ipairs({ false, true }) do
      local pok, pmsg, pcode = core.check_properties(props, name, values)
      if not expect_result("check_properties", pok, pmsg, pcode) then
        local path = (name or "properties"):match("^[^%z]*") -- the message is a C string
        check(pmsg:find(path, 1, true), "check_properties message lacks the path %s: %s", path, pmsg)
      end
    end
  end

  local v, min, max = b:number(), b:number(), b:number()
  if b:bool() then v = b:pick({ "5", true, nil, {} }) end
  local name = b:pick({ "maxExecutionTimeInSeconds", "pageSize", "", "x%s%d" })
  local returned, rok, rmsg, rcode = pcall(core.check_integer_range, name, v, min, max)
  if not returned then
    local ordered = min <= max -- false for NaN too
    check(not ordered, "check_integer_range raised for min %s <= max %s: %s", min, max, rok)
    check(tostring(rok):find("min must not be greater than max", 1, true), "check_integer_range raised: %s", rok)
    return
  end
  local in_range = expect_result("check_integer_range", rok, rmsg, rcode)
  check(in_range == whole_in(v, min, max), "check_integer_range(%s, %s, %s) = %s", v, min, max, in_range)
end
