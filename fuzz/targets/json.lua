-- JSON codec (csrc/json.c). Input: JSON text for json_decode, whose result must encode and then
-- round-trip stably (encode -> decode -> encode gives the same text, and the same value); or,
-- after a leading 0x01 byte, bytes that build an arbitrary Lua value for json_encode.
-- libfuzzer: -max_len=8192 -dict=fuzz/dict/json.dict
local core = require "iothub.core"
local fz = require "fuzzlib"
local check, same = fz.check, fz.same

local DECODE_CODES = { JsonSyntax = true, InvalidUtf8 = true, JsonDepth = true, NumberOutOfRange = true }
local ENCODE_CODES = { NumberOutOfRange = true, InvalidTable = true, UnsupportedType = true, InvalidUtf8 = true,
  JsonDepth = true }

-- text encodes value; it must decode to an equal value that encodes to the very same text.
local function round_trip(text, value)
  local v2, msg, code = core.json_decode(text)
  check(v2 ~= nil, "encoder output does not decode: %s (%s) for %s", msg, code, text)
  check(same(value, v2), "decode(encode(v)) differs from v for %s", text)
  local text2, msg2 = core.json_encode(v2)
  check(text2 == text, "encode(decode(text)) ~= text: %s vs %s (%s)", text, text2, msg2)
end

return function(data)
  if data:byte(1) == 1 then
    local b = fz.bytes(data:sub(2))
    local value = b:value()
    if type(value) == "table" and b:bool() then value.cycle = value end
    local text, msg, code = core.json_encode(value)
    if not text then
      fz.check_failure("json_encode", text, msg, code)
      check(ENCODE_CODES[code], "json_encode failed with unexpected code %s: %s", code, msg)
      return
    end
    local v = core.json_decode(text)
    check(v ~= nil, "json_encode produced text that does not decode: %s", text)
    local text2 = core.json_encode(v)
    check(text2 == text, "encode(decode(encode(v))) ~= encode(v): %s vs %s", text, text2)
    return
  end

  local value, msg, code = core.json_decode(data)
  if value == nil then
    fz.check_failure("json_decode", value, msg, code)
    check(DECODE_CODES[code], "json_decode failed with unexpected code %s: %s", code, msg)
    return
  end
  local text, emsg, ecode = core.json_encode(value)
  if not text then
    -- the one thing the decoder accepts that the encoder refuses: an integral float beyond 2^53
    check(ecode == "NumberOutOfRange", "a decoded value does not encode: %s (%s)", emsg, ecode)
    return
  end
  round_trip(text, value)
end
