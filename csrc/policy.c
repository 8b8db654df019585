/* Retry and monitoring decisions. Pure functions of their inputs (time and randomness are
 * passed in), so the Lua side can drive them with a real or an injected clock and tests can
 * check every branch without sleeping. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "common.h"
#include "clock.h"

static double opt_number(lua_State *L, int t, const char *key, double dflt) {
  double v;
  lua_getfield(L, t, key);
  if (lua_isnil(L, -1)) v = dflt;
  else if (lua_type(L, -1) == LUA_TNUMBER) v = lua_tonumber(L, -1);
  else { lua_pop(L, 1); return luaL_error(L, "field '%s' must be a number", key); }
  lua_pop(L, 1);
  return v;
}

/* Leaves the field on the stack, the one place that keeps the string alive: a number converted
 * to a string, or a string an __index metamethod made, is anchored nowhere else. */
static const char *opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  return lua_isnil(L, -1) ? NULL : lua_tostring(L, -1);
}

static int opt_bool(lua_State *L, int t, const char *key) {
  int v;
  lua_getfield(L, t, key);
  v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

/* Exponential growth capped at `cap`, then jitter removes up to `jitter` of it:
 * attempt 1 -> [base*(1-jitter), base], attempt 2 -> twice that, ... */
static double backoff(double attempt, double base, double cap, double jitter, double r) {
  double d = base * pow(2.0, attempt > 1 ? attempt - 1 : 0);
  if (d > cap) d = cap;
  if (jitter < 0) jitter = 0;
  if (jitter > 1) jitter = 1;
  if (r < 0) r = 0;
  if (r > 1) r = 1;
  return d * (1.0 - jitter * r);
}

/* core.backoff(attempt, base, cap, jitter, random01) -> seconds */
static int l_backoff(lua_State *L) {
  lua_pushnumber(L, backoff(luaL_checknumber(L, 1), luaL_checknumber(L, 2), luaL_checknumber(L, 3),
                            luaL_optnumber(L, 4, 0), luaL_optnumber(L, 5, 0)));
  return 1;
}

/* Statuses and error codes worth another attempt: throttling (429, including
 * ThrottlingMaxActiveJobCountExceeded), server errors, a proxy's bad gateway and gateway
 * timeouts. */
static int status_retryable(int status) {
  return status == 429 || status == 500 || status == 502 || status == 503 || status == 504;
}

/* A number as an HTTP status: anything but a whole 100-999 is 0 (no status). */
static int http_status(double v) {
  long long s;
  return iothub_whole_int64(v, &s) && s >= 100 && s <= 999 ? (int)s : 0;
}

/* The one rule for whether a failure is worth another attempt. An answer is judged by its
 * status. A request that got no usable answer (kind: "network", "timeout", "protocol" for an
 * unreadable one, ...) may not have arrived, so it is retried, except a TLS failure: a
 * certificate that does not verify will not verify on the next attempt either. */
static int failure_retryable(int status, const char *kind) {
  if (status) return status_retryable(status);
  return kind != NULL && strcmp(kind, "tls") != 0;
}

/* core.retryable(status [, kind]) -> boolean: status a number, or nil for a failure with no
 * answer, described by its kind. */
static int l_retryable(lua_State *L) {
  int status = lua_isnoneornil(L, 1) ? 0 : http_status(luaL_checknumber(L, 1));
  const char *kind = luaL_optstring(L, 2, NULL);
  if (!lua_isnoneornil(L, 1) && !status) kind = NULL; /* a number that is no status: nothing to retry */
  lua_pushboolean(L, failure_retryable(status, kind));
  return 1;
}

/* The hub's active-job limit (ThrottlingMaxActiveJobCountExceeded): a caller that manages
 * job slots itself (a rollout) wants it at once rather than after a throttle backoff. */
#define ERROR_ACTIVE_JOB_LIMIT 429004

/* core.retry_decision{ status=, kind=, network=, errorCode=, activeJobLimitFinal=, attempt=,
 *   maxAttempts=, now=, deadline=, retryAfter=, base=, cap=, throttleBase=, jitter=, random= }
 * -> delay seconds, or nil, reason ("not-retryable" | "job-limit" | "attempts" | "deadline").
 * status: the answer's; without one, kind (or network = true, meaning kind "network") says
 * how the request failed (see failure_retryable). `attempt` counts the attempts already made.
 * Throttled responses (429) back off from throttleBase, since the hub asks callers to wait
 * about 10 s; with activeJobLimitFinal, a 429004 is returned at once ("job-limit"). */
static int l_retry_decision(lua_State *L) {
  int network, status;
  const char *kind;
  double error_code, attempt, max_attempts, now, deadline, retry_after, base, cap, tbase, jitter, r, delay;
  luaL_checktype(L, 1, LUA_TTABLE);
  network = opt_bool(L, 1, "network");
  status = http_status(opt_number(L, 1, "status", 0));
  kind = opt_string(L, 1, "kind"); /* stays on the stack, which keeps it alive */
  if (!kind && network) kind = "network";
  error_code = opt_number(L, 1, "errorCode", 0);
  attempt = opt_number(L, 1, "attempt", 1);
  max_attempts = opt_number(L, 1, "maxAttempts", 5);
  now = opt_number(L, 1, "now", 0);
  deadline = opt_number(L, 1, "deadline", HUGE_VAL);
  retry_after = opt_number(L, 1, "retryAfter", -1);
  base = opt_number(L, 1, "base", 1);
  cap = opt_number(L, 1, "cap", 30);
  tbase = opt_number(L, 1, "throttleBase", 10);
  jitter = opt_number(L, 1, "jitter", 0.5);
  r = opt_number(L, 1, "random", 0);

  if (!failure_retryable(status, kind)) {
    lua_pushnil(L);
    lua_pushliteral(L, "not-retryable");
    return 2;
  }
  if (error_code == ERROR_ACTIVE_JOB_LIMIT && opt_bool(L, 1, "activeJobLimitFinal")) {
    lua_pushnil(L);
    lua_pushliteral(L, "job-limit");
    return 2;
  }
  if (attempt >= max_attempts) {
    lua_pushnil(L);
    lua_pushliteral(L, "attempts");
    return 2;
  }
  if (retry_after >= 0) {
    delay = retry_after; /* the server said when; jitter would only make us early or late */
  } else if (status == 429) {
    delay = backoff(attempt, tbase, cap > tbase ? cap : tbase, jitter, r);
    /* Jitter spreads clients apart but never below the hub's minimum wait. */
    if (delay < tbase * (1.0 - jitter)) delay = tbase * (1.0 - jitter);
  } else {
    delay = backoff(attempt, base, cap, jitter, r);
  }
  if (now + delay > deadline) {
    lua_pushnil(L);
    lua_pushliteral(L, "deadline");
    return 2;
  }
  lua_pushnumber(L, delay);
  return 1;
}

/* Retry-After as seconds to wait from wall time `now`: delay-seconds (digits; a fraction is
 * tolerated, as Azure SDKs read the header as a number) or an HTTP-date, which waits until
 * then (0 if it has passed). Returns -1 for anything else. */
static double retry_after_seconds(const char *s, size_t n, double now) {
  const char *end = s + n, *p;
  double date;
  while (s < end && (*s == ' ' || *s == '\t')) s++;
  while (end > s && (end[-1] == ' ' || end[-1] == '\t')) end--;
  if (s == end || end - s > 64) return -1;
  for (p = s; p < end && *p >= '0' && *p <= '9'; p++) {}
  if (p > s && (p == end || *p == '.')) {
    char buf[72];
    double v;
    if (p < end) { /* the fraction: at least one digit, nothing else */
      const char *q = ++p;
      while (p < end && *p >= '0' && *p <= '9') p++;
      if (p == q || p != end) return -1;
    }
    memcpy(buf, s, (size_t)(end - s));
    buf[end - s] = '\0';
    v = strtod(buf, NULL);
    return isfinite(v) ? v : -1;
  }
  if (clock_parse_http_date(s, (size_t)(end - s), &date) != 0) return -1;
  return date > now ? date - now : 0;
}

/* core.retry_after(value, now) -> seconds | nil: a Retry-After header's value (string, or
 * a number of seconds) as the seconds to wait, `now` being the wall time (epoch seconds) the
 * answer came in. nil (no value, or one that is neither form) means the header says nothing. */
static int l_retry_after(lua_State *L) {
  double now = luaL_checknumber(L, 2), v = -1;
  if (lua_type(L, 1) == LUA_TNUMBER) {
    v = lua_tonumber(L, 1);
    if (!(v >= 0) || !isfinite(v)) v = -1;
  } else if (lua_type(L, 1) == LUA_TSTRING) {
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    v = retry_after_seconds(s, n, now);
  } else if (!lua_isnoneornil(L, 1)) {
    return luaL_argerror(L, 1, "Retry-After must be a string, a number or nil");
  }
  if (v < 0) lua_pushnil(L);
  else lua_pushnumber(L, v);
  return 1;
}

static int terminal(const char *status) {
  return status && (strcmp(status, "completed") == 0 || strcmp(status, "failed") == 0 ||
                    strcmp(status, "cancelled") == 0);
}

/* core.is_terminal(status) -> boolean: the job states after which nothing changes. */
static int l_is_terminal(lua_State *L) {
  lua_pushboolean(L, terminal(luaL_optstring(L, 1, NULL)));
  return 1;
}

static int push_decision(lua_State *L, const char *action, double delay, const char *reason) {
  lua_pushstring(L, action);
  lua_pushnumber(L, delay);
  lua_pushstring(L, reason);
  return 3;
}

/* core.monitor_decision{ status=, now=, started=, timeout=, interval=, maxInterval=,
 *   errors=, retryAfter=, startTime= }
 * -> action, delay, reason:
 *   "done", 0, "terminal"            the job reached completed, failed or cancelled
 *   "timeout", 0, "deadline"         the deadline came while the job was still unfinished
 *   "unavailable", 0, "deadline"     the deadline came while the hub kept failing (errors > 0)
 *   "unavailable", 0, "retry-after"  the hub asked to wait (Retry-After) past the deadline
 *   "sleep", delay, why              poll again after delay s; why is "interval", "backoff",
 *                                    "retry-after", "start-time" or "deadline" (cut short)
 * `errors` counts consecutive transient failures, the last poll's included: the poll interval
 * doubles with each one (up to maxInterval) so a struggling hub is not hammered, and the next
 * poll waits at least `retryAfter` s (that poll's Retry-After, see core.retry_after). A job
 * still waiting for a future startTime is polled no sooner than needed, up to maxInterval.
 * The last sleep is cut short at the deadline so the timeout is honoured to the poll. */
static int l_monitor_decision(lua_State *L) {
  const char *status, *why = "interval";
  double now, started, timeout, interval, max_interval, errors, start_time, retry_after, delay, deadline;
  luaL_checktype(L, 1, LUA_TTABLE);
  status = opt_string(L, 1, "status");
  now = opt_number(L, 1, "now", 0);
  started = opt_number(L, 1, "started", now);
  timeout = opt_number(L, 1, "timeout", HUGE_VAL);
  interval = opt_number(L, 1, "interval", 5);
  max_interval = opt_number(L, 1, "maxInterval", 60);
  errors = opt_number(L, 1, "errors", 0);
  retry_after = opt_number(L, 1, "retryAfter", -1);
  start_time = opt_number(L, 1, "startTime", -1);

  if (terminal(status)) return push_decision(L, "done", 0, "terminal");
  deadline = started + timeout;
  if (now >= deadline) return push_decision(L, errors > 0 ? "unavailable" : "timeout", 0, "deadline");
  if (max_interval < interval) max_interval = interval;
  delay = interval;
  if (errors > 0) {
    delay = interval * pow(2.0, errors);
    if (delay > max_interval) delay = max_interval;
    why = "backoff";
    if (retry_after > delay) {
      if (now + retry_after > deadline) return push_decision(L, "unavailable", 0, "retry-after");
      delay = retry_after;
      why = "retry-after";
    }
  } else if (status && start_time > now + interval &&
             (strcmp(status, "scheduled") == 0 || strcmp(status, "queued") == 0 ||
              strcmp(status, "enqueued") == 0)) {
    delay = start_time - now;
    if (delay > max_interval) delay = max_interval;
    why = "start-time";
  }
  if (now + delay > deadline) {
    delay = deadline - now;
    why = "deadline";
  }
  return push_decision(L, "sleep", delay, why);
}

int policy_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"backoff", l_backoff},
    {"retryable", l_retryable},
    {"retry_decision", l_retry_decision},
    {"retry_after", l_retry_after},
    {"is_terminal", l_is_terminal},
    {"monitor_decision", l_monitor_decision},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
