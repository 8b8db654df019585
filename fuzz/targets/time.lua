-- Time parsing and formatting (csrc/clock.c). The input is parsed as an ISO-8601 time; what
-- parses and is in the formattable range must format, and format -> parse -> format must be
-- stable (formatting keeps milliseconds). The input is also read as numbers to format.
-- libfuzzer: -dict=fuzz/dict/time.dict
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local function round_trip(t, where)
  local s, msg, code = core.format_time(t)
  if not s then
    fz.check_failure("format_time", s, msg, code)
    check(code == "InvalidTime", "%s: format_time code %s", where, code)
    check(not (t >= -62167219200 and t < 253402300800), "%s: format_time refused %s, which is in range", where, t)
    return
  end
  check(#s == 24 and s:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"), "%s: format_time gave %s", where, s)
  local t2, perr = core.parse_time(s)
  check(t2 ~= nil, "%s: format_time output %s does not parse: %s", where, s, perr)
  check(math.abs(t2 - t) < 0.0011, "%s: %s parses to %s, formatted from %s", where, s, t2, t)
  check(core.format_time(t2) == s, "%s: format(parse(%s)) = %s", where, s, core.format_time(t2))
end

return function(data)
  local t, msg, code = core.parse_time(data)
  if t then
    check(t == t, "parse_time gave NaN for %s", data)
    if t >= -62167219200 and t < 253402300800 then round_trip(t, "parsed") end
  else
    fz.check_failure("parse_time", t, msg, code)
    check(code == "InvalidTime", "parse_time code %s", code)
  end
  local b = fz.bytes(data)
  for _ = 1, 3 do
    local n = b:number()
    local s = core.format_time(n)
    if s then round_trip(n, "number") end
  end
end
