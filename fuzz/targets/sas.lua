-- Connection strings and SAS tokens (csrc/sas.c). The input is parsed as a connection string
-- and as a SAS token (with and without the "SharedAccessSignature " prefix), and read as the
-- fields of a token to create: what parses must be usable (a key signs, a signature re-parses),
-- a created token must parse back to its fields, and no message may echo key or signature text.
-- libfuzzer: -dict=fuzz/dict/sas.dict
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

-- The value's letters and digits moved on by one within their class (0-9, A-F, G-Z, a-f, g-z):
-- the same length, and valid base64 or percent-encoding exactly when the value was.
local function rotate(value)
  return (value:gsub("%w", function(c)
    local b = c:byte()
    local function within(lo, n) return string.char(lo + (b - lo + 1) % n) end
    if c:match("%d") then return within(48, 10) end
    if c:match("[A-F]") then return within(65, 6) end
    if c:match("[G-Z]") then return within(71, 20) end
    if c:match("[a-f]") then return within(97, 6) end
    return within(103, 20)
  end))
end

-- Where a value following `name=` lies (name matched ignoring case, after a byte that is not
-- a letter or digit, so that a key glued onto another part by a missing separator counts too;
-- the value runs to the next byte of sep, trimmed), if it has 12 bytes.
local function secret_span(data, name, sep)
  local lower, pat = data:lower(), name:lower() .. "="
  local at = lower:find(pat, 1, true)
  while at do
    if at == 1 or not data:sub(at - 1, at - 1):find("%w") then
      local vs = at + #pat
      local stop = (data:find("[" .. sep .. "]", vs) or #data + 1) - 1
      vs = vs + #data:sub(vs, stop):match("^%s*")
      local ve = stop - #data:sub(vs, stop):match("%s*$")
      if ve - vs + 1 >= 12 then return vs, ve end
    end
    at = lower:find(pat, at + 1, true)
  end
  return nil
end

-- Does msg, what parse said of data, echo the secret value of part `name`? It does when it
-- holds 12 bytes of that value and the same parse of data with the value rotated does not.
local function echoes(parse, data, msg, name, sep)
  local s, e = secret_span(data, name, sep)
  if not s then return false end
  local value = data:sub(s, e)
  local _, msg2 = parse(data:sub(1, s - 1) .. rotate(value) .. data:sub(e + 1))
  for i = 1, #value - 11 do
    local run = value:sub(i, i + 11)
    if msg:find(run, 1, true) and not (msg2 or ""):find(run, 1, true) then return true end
  end
  return false
end

local function no_echo(parse, data, msg, name, sep)
  check(not echoes(parse, data, msg, name, sep), "%s: the message echoes the %s value: %s", name, name, msg)
end

local function check_token(tok, resource, expiry, keyName)
  local t, msg = core.parse_sas_token(tok)
  check(t ~= nil, "a created token does not parse: %s", msg)
  check(t.sr == resource, "sr %s ~= resource %s", t.sr, resource)
  check(t.se == expiry, "se %s ~= expiry %s", t.se, expiry)
  if keyName and keyName ~= "" then check(t.skn == keyName, "skn %s ~= keyName %s", t.skn, keyName) end
end

return function(data)
  -- connection strings
  local cs, msg, code = core.parse_connection_string(data)
  if cs then
    check(type(cs.hostName) == "string" and cs.hostName ~= "", "parsed without a hostName")
    if cs.sharedAccessKey then
      local tok, terr = core.sas_token{ resource = cs.hostName, key = cs.sharedAccessKey,
        keyName = cs.sharedAccessKeyName, expiry = 1700000000 }
      check(tok ~= nil, "a parsed key does not sign: %s", terr)
      check_token(tok, cs.hostName, 1700000000, cs.sharedAccessKeyName)
    else
      check(core.parse_sas_token(cs.sharedAccessSignature) ~= nil, "a parsed SharedAccessSignature does not parse")
    end
  else
    fz.check_failure("parse_connection_string", cs, msg, code)
    no_echo(core.parse_connection_string, data, msg, "SharedAccessKey", ";")
    no_echo(core.parse_connection_string, data, msg, "sig", "&;")
  end

  -- SAS tokens
  for _, text in ipairs({ data, "SharedAccessSignature " .. data }) do
    local t, tmsg, tcode = core.parse_sas_token(text)
    if t then
      check(type(t.sr) == "string" and type(t.sig) == "string" and math.type(t.se) == "integer",
        "parse_sas_token result lacks sr, sig or se")
    else
      fz.check_failure("parse_sas_token", t, tmsg, tcode)
      no_echo(core.parse_sas_token, text, tmsg, "sig", "&")
    end
  end

  -- creating tokens from arbitrary fields: misuse raises "sas_token: ...", bad keys fail
  local b = fz.bytes(data)
  local resource, keyName = b:string(80), b:bool() and b:string(20) or nil
  local raw = b:string(64)
  local key = b:bool() and core.base64_encode(raw) or raw
  local expiry = b:number()
  local ok, tok, terr, tcode = pcall(core.sas_token, { resource = resource, key = key, keyName = keyName, expiry = expiry })
  if not ok then
    check(type(tok) == "string" and tok:find("sas_token: ", 1, true), "sas_token raised oddly: %s", tok)
  elseif tok then
    -- exactly the documented form, signed with HMAC-SHA256 of the decoded key (so the token
    -- holds nothing of the key but that signature)
    local se = ("%d"):format(expiry)
    local encoded = core.url_encode(resource)
    local sig = core.base64_encode(core.hmac_sha256(core.base64_decode(key), encoded .. "\n" .. se))
    local want = "SharedAccessSignature sr=" .. encoded .. "&sig=" .. core.url_encode(sig) .. "&se=" .. se ..
      ((keyName or "") ~= "" and "&skn=" .. core.url_encode(keyName) or "")
    check(tok == want, "sas_token gave %s, expected %s", tok, want)
    check_token(tok, resource, expiry, keyName)
  else
    fz.check_failure("sas_token", tok, terr, tcode)
  end

  local mac = core.hmac_sha256(key, resource)
  check(#mac == 32, "hmac_sha256 gave %d bytes", #mac)
  check(core.constant_time_equals(resource, resource) and
    core.constant_time_equals(resource, raw) == (resource == raw), "constant_time_equals is wrong")
end
