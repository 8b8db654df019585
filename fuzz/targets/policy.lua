-- Retry and monitor decisions (csrc/policy.c) over fuzzed numbers: NaN, infinities, huge and
-- negative values, integers and floats, fields of the wrong type, and tables read through a
-- proxy whose __index collects garbage, and Retry-After header text. Results must keep their
-- documented shape.
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local RETRY_FIELDS = { "status", "attempt", "maxAttempts", "now", "deadline", "retryAfter", "base", "cap",
  "throttleBase", "jitter", "random" }
local MONITOR_FIELDS = { "now", "started", "timeout", "interval", "maxInterval", "errors", "startTime" }
local STATUSES = { "completed", "failed", "cancelled", "scheduled", "queued", "enqueued", "running", "", "x" }
local REASONS = { ["not-retryable"] = true, ["job-limit"] = true, attempts = true, deadline = true }
local DECISIONS = { done = true, timeout = true, unavailable = true, sleep = true }
local MONITOR_REASONS = { terminal = true, deadline = true, ["retry-after"] = true, interval = true,
  backoff = true, ["start-time"] = true }
local RETRY_AFTER_SAMPLES = { "5", " 120 ", "0.5", "Wed, 21 Oct 2015 07:28:00 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
  "Sun Nov  6 08:49:37 1994", "-1", "1e3", "", "soon" }

local function fields(b, names)
  local t = {}
  for _, name in ipairs(names) do
    local k = b:byte() % 8
    if k < 5 then t[name] = b:number() elseif k == 5 then t[name] = b:pick({ "5", true, {} }) end
  end
  return t
end

-- Calls f(t) (t perhaps behind a proxy); a raise is fine only for a field of the wrong type.
local function call(f, b, t, what)
  local mode = b:byte() % 4
  local arg = mode > 0 and fz.proxy(t, mode == 3) or t
  local res = table.pack(pcall(f, arg))
  if not res[1] then
    check(tostring(res[2]):find("must be a number", 1, true), "%s raised: %s", what, res[2])
    return false
  end
  return true, table.unpack(res, 2, res.n)
end

return function(data)
  local b = fz.bytes(data)
  local r = fields(b, RETRY_FIELDS)
  r.network = b:bool()
  if b:bool() then r.kind = b:pick({ "network", "timeout", "tls", "protocol" }) end
  if b:bool() then r.errorCode, r.activeJobLimitFinal = b:pick({ 429004, 429001 }), b:bool() end
  local called, delay, why = call(core.retry_decision, b, r, "retry_decision")
  if called then
    check(type(delay) == "number" or (delay == nil and REASONS[why]), "retry_decision returned %s, %s", delay, why)
  end

  local m = fields(b, MONITOR_FIELDS)
  if b:bool() then m.retryAfter = b:number() end
  local k = b:byte() % 4
  if k == 0 then m.status = b:pick(STATUSES) elseif k == 1 then m.status = b:number() elseif k == 2 then m.status = b:string(12) end
  local decided, decision, wait, reason = call(core.monitor_decision, b, m, "monitor_decision")
  if decided then
    check(DECISIONS[decision] and type(wait) == "number" and MONITOR_REASONS[reason],
      "monitor_decision returned %s, %s, %s", decision, wait, reason)
  end

  -- Retry-After text from the wire: seconds to wait (never negative or NaN), or nil.
  local header = b:bool() and b:pick(RETRY_AFTER_SAMPLES) or b:string(40)
  local seconds = core.retry_after(header, b:number())
  check(seconds == nil or (type(seconds) == "number" and seconds >= 0 and seconds == seconds),
    "retry_after(%q) returned %s", header, seconds)

  local n1, n2, n3, n4, n5 = b:number(), b:number(), b:number(), b:number(), b:number()
  check(type(core.backoff(n1, n2, n3, n4, n5)) == "number", "backoff")
  check(type(core.retryable(n1)) == "boolean", "retryable")
  -- only a whole HTTP status can be worth a retry (which ones is policy.c's to say)
  check(not core.retryable(n1) or (n1 % 1 == 0 and n1 >= 100 and n1 <= 999), "retryable(%s)", n1)
  check(core.is_terminal(b:pick(STATUSES)) ~= nil, "is_terminal")
end
