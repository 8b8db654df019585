-- Retry and monitor decisions (csrc/policy.c) over fuzzed numbers: NaN, infinities, huge and
-- negative values, integers and floats, fields of the wrong type, and tables read through a
-- proxy whose __index collects garbage. Results must keep their documented shape.
local core = require "iothub.core"
local fz = require "fuzzlib"
local check = fz.check

local RETRY_FIELDS = { "status", "attempt", "maxAttempts", "now", "deadline", "retryAfter", "base", "cap",
  "throttleBase", "jitter", "random" }
local MONITOR_FIELDS = { "now", "started", "timeout", "interval", "maxInterval", "errors", "startTime" }
local STATUSES = { "completed", "failed", "cancelled", "scheduled", "queued", "enqueued", "running", "", "x" }
local REASONS = { ["not-retryable"] = true, attempts = true, deadline = true }
local DECISIONS = { done = true, timeout = true, sleep = true }

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
  local called, delay, why = call(core.retry_decision, b, r, "retry_decision")
  if called then
    check(type(delay) == "number" or (delay == nil and REASONS[why]), "retry_decision returned %s, %s", delay, why)
  end

  local m = fields(b, MONITOR_FIELDS)
  local k = b:byte() % 4
  if k == 0 then m.status = b:pick(STATUSES) elseif k == 1 then m.status = b:number() elseif k == 2 then m.status = b:string(12) end
  local decided, decision, wait = call(core.monitor_decision, b, m, "monitor_decision")
  if decided then
    check(DECISIONS[decision] and type(wait) == "number", "monitor_decision returned %s, %s", decision, wait)
  end

  local n1, n2, n3, n4, n5 = b:number(), b:number(), b:number(), b:number(), b:number()
  check(type(core.backoff(n1, n2, n3, n4, n5)) == "number", "backoff")
  check(type(core.retryable(n1)) == "boolean", "retryable")
  check(core.retryable(n1) == (n1 == 429 or n1 == 500 or n1 == 503 or n1 == 504), "retryable(%s)", n1)
  check(core.is_terminal(b:pick(STATUSES)) ~= nil, "is_terminal")
end
