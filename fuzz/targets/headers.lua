-- The libcurl transport's response-header parser (csrc/curl.c, curl.parse_headers): whatever
-- bytes a server sends as its header block. Names come out lower-cased, values as strings
-- without line feeds (one header line each, folded lines joined).
-- libfuzzer: -dict=fuzz/dict/http.dict
local curl = require "iothub.curl"
local fz = require "fuzzlib"
local check = fz.check

return function(data)
  local h = curl.parse_headers(data)
  check(type(h) == "table", "parse_headers returned %s", type(h))
  for name, value in pairs(h) do
    check(type(name) == "string" and not name:find("%u"), "header name %s is not lower-case", name)
    check(type(value) == "string", "header %s has a %s value", name, type(value))
    check(not value:find("\n", 1, true), "header %s has a line feed in its value: %s", name, value)
  end
end
