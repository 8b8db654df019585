-- base64 and URL codecs (csrc/codec.c): decoders on the raw input, and round trips that must
-- hold for any bytes (decode(encode(x)) == x, and whatever decodes re-encodes to the same bytes).
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

return function(data)
  local raw, msg, code = core.base64_decode(data)
  if raw then
    local again = core.base64_encode(raw)
    check(#again == #data, "base64 re-encoding changed the length: %s -> %s", data, again)
    check(core.base64_decode(again) == raw, "base64 decode(encode(decode(x))) ~= decode(x) for %s", data)
  else
    fz.check_failure("base64_decode", raw, msg, code)
    check(code == "InvalidBase64", "base64_decode code %s", code)
  end
  local enc = core.base64_encode(data)
  check(#enc == math.ceil(#data / 3) * 4, "base64_encode length %d for %d bytes", #enc, #data)
  check(core.base64_decode(enc) == data, "base64 decode(encode(x)) ~= x")

  local dec, umsg, ucode = core.url_decode(data)
  if dec then
    check(core.url_decode(core.url_encode(dec)) == dec, "url decode(encode(decode(x))) ~= decode(x)")
  else
    fz.check_failure("url_decode", dec, umsg, ucode)
    check(ucode == "InvalidEncoding", "url_decode code %s", ucode)
  end
  local uenc = core.url_encode(data)
  check(not uenc:find("[^%w%-_.~%%]"), "url_encode left a reserved byte: %s", uenc)
  check(core.url_decode(uenc) == data, "url decode(encode(x)) ~= x")
end
