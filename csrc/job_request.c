/* The job request, in one place: every check, default and conversion of what a jobs/v2 PUT
 * carries (job id, query condition, the direct-method parameters or the twin patch, start time,
 * maximum execution time), and the body built from it in the service's field order. Sizes
 * (payload 128 KB, tags 8 KB, desired 32 KB) are measured on the bytes of the body as built.
 *
 *   core.job_request(kind, jobId, queryCondition, action, startTime, maxExecutionTimeInSeconds, now)
 *       -> body, action                          the exact JSON, and the action as normalised
 *   core.job_action(kind, action [, maxExecutionTimeInSeconds])
 *                                   -> action    the action (and time) alone, for definitions files
 *   core.method_request(methodParams) -> body, responseTimeout, connectTimeout
 *                                                 POST /twins/{id}/methods (one direct method)
 *   on refusal every one returns nil, message, code, field, detail: code "InvalidArgument", or
 *   "Misuse" for a value of the wrong Lua type (the Lua API raises those); field is the
 *   request's field path ("methodParams.payload"); message is "<field> <detail>" (detail may
 *   be nil when the message names a path inside the field).
 *
 * kind: "scheduleDeviceMethod" (or "method") | "scheduleUpdateTwin" (or "scheduleTwinUpdate",
 * "twin"). startTime: nil (now, the wall time the caller passes), epoch seconds or ISO-8601;
 * always sent as UTC "...Z". The 2016 tutorial's names are accepted: methodParams
 * timeoutInSeconds for responseTimeoutInSeconds, a top-level `desired` in a twin patch. */
#include <stdio.h>
#include <string.h>
#include "common.h"
#include "buffer.h"
#include "clock.h"
#include "json.h"
#include "validate.h"

#define INVALID "InvalidArgument"
#define MISUSE "Misuse"
#define DEFAULT_RESPONSE_TIMEOUT 30 /* seconds, the service default for direct methods */
#define DEFAULT_MAX_EXECUTION 3600  /* seconds, as the Node SDK and the az CLI */
#define MAX_EXECUTION 2147483647.0
#define MAX_PAYLOAD_BYTES (128 * 1024)
#define MAX_TAGS_BYTES (8 * 1024)
#define MAX_DESIRED_BYTES (32 * 1024)
#define METHOD_NAME_MAX 100
#define LATEST_EPOCH 253402300799.0 /* 9999-12-31T23:59:59Z */
#define ERR_MAX 512

enum { KIND_METHOD, KIND_TWIN };

static const char *const METHOD_FIELDS =
  "methodName, payload, responseTimeoutInSeconds, connectTimeoutInSeconds";

/* ---- refusals ---------------------------------------------------------------------------- */

/* Pushes nil, "<subject> <detail>", code, field, detail and returns 5 (the results are the
 * top five values; nothing below is popped, so the arguments' strings stay alive). */
static int refuse(lua_State *L, const char *code, const char *field, const char *subject, const char *fmt, ...) {
  va_list ap;
  int detail;
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  detail = lua_gettop(L);
  lua_pushnil(L);
  lua_pushfstring(L, "%s %s", subject, lua_tostring(L, detail));
  lua_pushstring(L, code);
  lua_pushstring(L, field);
  lua_pushvalue(L, detail);
  return 5;
}

/* The same for a message a validate_* check pushed: its detail is what follows the subject
 * ("responseTimeoutInSeconds must be ..." -> "must be ..."), nil when it names another. */
static int refuse_pushed(lua_State *L, const char *field, const char *subject) {
  int message = lua_gettop(L);
  size_t n = strlen(subject), len;
  const char *text = lua_tolstring(L, message, &len);
  lua_pushnil(L);
  lua_pushvalue(L, message);
  lua_pushliteral(L, INVALID);
  lua_pushstring(L, field);
  if (len > n + 1 && strncmp(text, subject, n) == 0 && text[n] == ' ') lua_pushstring(L, text + n + 1);
  else lua_pushnil(L);
  return 5;
}

static int kind_of(lua_State *L, int idx) {
  const char *k = luaL_checkstring(L, idx);
  if (strcmp(k, "scheduleDeviceMethod") == 0 || strcmp(k, "method") == 0) return KIND_METHOD;
  if (strcmp(k, "scheduleUpdateTwin") == 0 || strcmp(k, "scheduleTwinUpdate") == 0 || strcmp(k, "twin") == 0)
    return KIND_TWIN;
  return luaL_argerror(L, idx, "kind must be \"scheduleDeviceMethod\" (\"method\") or \"scheduleUpdateTwin\" (\"twin\")");
}

/* ---- direct-method parameters ------------------------------------------------------------ */

static int is_name_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' ||
         c == '.';
}

/* Checks the methodParams table at idx and pushes the normalised copy { methodName, payload,
 * responseTimeoutInSeconds, connectTimeoutInSeconds }. Returns 0, or the refusal's result
 * count (the refusal is pushed, stack reset). */
static int method_params(lua_State *L, int idx) {
  size_t n, i;
  const char *name;
  int has_response, has_legacy, response;
  if (lua_type(L, idx) != LUA_TTABLE)
    return refuse(L, MISUSE, "methodParams", "methodParams", "must be a table, got %s", luaL_typename(L, idx));
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    lua_pop(L, 1);
    if (!k || (strcmp(k, "methodName") && strcmp(k, "payload") && strcmp(k, "responseTimeoutInSeconds") &&
               strcmp(k, "connectTimeoutInSeconds") && strcmp(k, "timeoutInSeconds"))) {
      const char *shown = k ? k : luaL_typename(L, -1);
      return refuse(L, INVALID, "methodParams", "methodParams", "has an unknown field '%s' (expected %s)", shown,
                    METHOD_FIELDS);
    }
  }
  lua_getfield(L, idx, "responseTimeoutInSeconds");
  lua_getfield(L, idx, "timeoutInSeconds");
  has_response = !lua_isnil(L, -2);
  has_legacy = !lua_isnil(L, -1);
  if (has_response && has_legacy)
    return refuse(L, INVALID, "methodParams", "methodParams",
                  "has both timeoutInSeconds (2016 name) and responseTimeoutInSeconds; keep only "
                  "responseTimeoutInSeconds");
  if (has_response) lua_pop(L, 1);
  else lua_remove(L, -2); /* the 2016 preview called the response timeout timeoutInSeconds */
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushinteger(L, DEFAULT_RESPONSE_TIMEOUT);
  }
  if (validate_integer_range(L, "responseTimeoutInSeconds", -1, 5, 300))
    return refuse_pushed(L, "methodParams.responseTimeoutInSeconds", "responseTimeoutInSeconds");
  response = (int)lua_tonumber(L, -1); /* whole and within 5..300: checked just above */
  lua_pop(L, 1);
  lua_getfield(L, idx, "connectTimeoutInSeconds");
  if (!lua_isnil(L, -1) && validate_integer_range(L, "connectTimeoutInSeconds", -1, 0, 300))
    return refuse_pushed(L, "methodParams.connectTimeoutInSeconds", "connectTimeoutInSeconds");

  /* The name last: a definitions file reports the other fields' problems before it. */
  lua_getfield(L, idx, "methodName");
  name = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
  if (!name || n == 0)
    return refuse(L, INVALID, "methodParams.methodName", "methodParams.methodName",
                  "must be a non-empty string (the device's method name)");
  for (i = 0; i < n && is_name_char(name[i]); i++) {}
  if (n > METHOD_NAME_MAX || i < n) {
    char shown[METHOD_NAME_MAX + 1];
    size_t k, m = n > METHOD_NAME_MAX ? METHOD_NAME_MAX : n;
    for (k = 0; k < m; k++) shown[k] = (name[k] >= 0x20 && name[k] < 0x7f) ? name[k] : '?';
    shown[m] = '\0';
    return refuse(L, INVALID, "methodParams.methodName", "methodParams.methodName",
                  "'%s' may only contain letters, digits, '-', '_' and '.' (at most 100 characters)", shown);
  }
  lua_insert(L, -2); /* name connect */
  /* name connect -> the normalised table */
  lua_createtable(L, 0, 4);
  lua_pushvalue(L, -3);
  lua_setfield(L, -2, "methodName");
  lua_getfield(L, idx, "payload");
  lua_setfield(L, -2, "payload");
  lua_pushinteger(L, response);
  lua_setfield(L, -2, "responseTimeoutInSeconds");
  if (!lua_isnil(L, -2)) {
    lua_pushinteger(L, (lua_Integer)lua_tonumber(L, -2)); /* whole and within 0..300 */
    lua_setfield(L, -2, "connectTimeoutInSeconds");
  }
  lua_replace(L, -3);
  lua_pop(L, 1);
  return 0;
}

/* ---- twin patches ------------------------------------------------------------------------ */

/* Checks the patch at idx and pushes the normalised copy { tags, properties = { desired },
 * etag = "*" }. Returns 0, or the refusal's result count. */
static int twin_patch(lua_State *L, int idx) {
  int out, has_tags, has_props;
  if (lua_type(L, idx) != LUA_TTABLE)
    return refuse(L, MISUSE, "patch", "patch", "must be a table, got %s", luaL_typename(L, idx));
  lua_createtable(L, 0, 3);
  out = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (!k || (strcmp(k, "tags") && strcmp(k, "properties") && strcmp(k, "etag") && strcmp(k, "desired")))
      return refuse(L, INVALID, "patch", "patch", "has an unknown field '%s'; a twin job may set only tags and "
                    "properties.desired", k ? k : luaL_typename(L, -2));
    lua_pop(L, 1);
  }
  lua_getfield(L, idx, "desired");
  lua_getfield(L, idx, "properties");
  if (!lua_isnil(L, -2)) {
    if (!lua_isnil(L, -1))
      return refuse(L, INVALID, "patch", "patch", "has both 'desired' and 'properties'; put desired properties "
                    "under properties.desired");
    /* the 2016 tutorial's top-level desired goes under properties */
    lua_pop(L, 1);
    lua_createtable(L, 0, 1);
    lua_insert(L, -2);
    lua_setfield(L, -2, "desired");
  } else {
    lua_remove(L, -2);
  }
  lua_getfield(L, idx, "etag");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    lua_pushliteral(L, "*");
  } else if (lua_type(L, -1) != LUA_TSTRING || strcmp(lua_tostring(L, -1), "*") != 0) {
    return refuse(L, INVALID, "patch.etag", "patch.etag", "must be '*': twin update jobs are force updates and "
                  "the hub accepts no other etag");
  }
  lua_setfield(L, out, "etag");
  lua_getfield(L, idx, "tags");
  has_tags = !lua_isnil(L, -1);
  has_props = !lua_isnil(L, -2);
  if (!has_tags && !has_props)
    return refuse(L, INVALID, "patch", "patch", "sets nothing: give tags and/or properties.desired");
  lua_insert(L, -2); /* out tags properties */
  if (has_props) {
    int props = lua_gettop(L);
    if (lua_type(L, props) != LUA_TTABLE)
      return refuse(L, INVALID, "patch.properties", "patch.properties", "must be a table with a 'desired' table");
    lua_pushnil(L);
    while (lua_next(L, props) != 0) {
      const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
      if (!k || strcmp(k, "desired") != 0)
        return refuse(L, INVALID, "patch.properties", k ? lua_pushfstring(L, "patch.properties.%s", k)
                      : "patch.properties", "cannot be set by a job; only properties.desired (reported properties "
                      "belong to the device)");
      lua_pop(L, 1);
    }
    lua_getfield(L, props, "desired");
    if (lua_type(L, -1) != LUA_TTABLE)
      return refuse(L, INVALID, "patch.properties.desired", "patch.properties.desired", "must be a table");
    if (validate_properties(L, -1, "patch.properties.desired", 1))
      return refuse_pushed(L, "patch.properties.desired", "patch.properties.desired");
    lua_createtable(L, 0, 1);
    lua_insert(L, -2);
    lua_setfield(L, -2, "desired");
    lua_setfield(L, out, "properties");
  }
  lua_pop(L, 1); /* the caller's properties */
  if (has_tags) {
    if (lua_type(L, -1) != LUA_TTABLE)
      return refuse(L, INVALID, "patch.tags", "patch.tags", "must be a table");
    if (validate_properties(L, -1, "patch.tags", 1)) return refuse_pushed(L, "patch.tags", "patch.tags");
    lua_setfield(L, out, "tags");
  } else {
    lua_pop(L, 1);
  }
  return 0;
}

/* Checks the action at idx for kind and pushes its normalised copy; 0 or a refusal. */
static int job_action(lua_State *L, int kind, int idx) {
  return kind == KIND_METHOD ? method_params(L, idx) : twin_patch(L, idx);
}

/* The maximum execution time at idx (nil: the default) into *out; 0 or a refusal. */
static int max_execution(lua_State *L, int idx, double *out) {
  *out = DEFAULT_MAX_EXECUTION;
  if (lua_isnil(L, idx)) return 0;
  if (lua_type(L, idx) != LUA_TNUMBER)
    return refuse(L, MISUSE, "maxExecutionTimeInSeconds", "maxExecutionTimeInSeconds", "must be a number, got %s",
                  luaL_typename(L, idx));
  if (validate_integer_range(L, "maxExecutionTimeInSeconds", idx, 1, MAX_EXECUTION))
    return refuse_pushed(L, "maxExecutionTimeInSeconds", "maxExecutionTimeInSeconds");
  *out = lua_tonumber(L, idx);
  return 0;
}

/* ---- the body ---------------------------------------------------------------------------- */

typedef struct {
  iothub_buffer b;
  char err[ERR_MAX];
  const char *field; /* set when the body cannot be built */
  size_t limit, size;
} body_builder;

static void add_key(body_builder *w, const char *key) {
  buffer_addc(&w->b, '"');
  buffer_adds(&w->b, key);
  buffer_adds(&w->b, "\":");
}

/* Appends the JSON of the value at idx; on failure records field and the encoder's reason.
 * With limit > 0, the value's own bytes must not exceed it (w->size says how many there were). */
static int add_value(lua_State *L, body_builder *w, int idx, const char *field, size_t limit) {
  const char *code = INVALID;
  size_t start = w->b.len;
  char why[ERR_MAX - 64];
  if (json_encode_value(L, idx, &w->b, why, sizeof why, &code) != 0) {
    w->field = field;
    snprintf(w->err, sizeof w->err, "cannot be sent: %s", why);
    return -1;
  }
  w->size = w->b.len - start;
  if (limit && w->size > limit) {
    w->field = field;
    w->limit = limit;
    return -1;
  }
  return 0;
}

/* One field of the method object: ",<key>:<value>" (no comma first); payload is sent as null
 * when absent. */
static int add_method_field(lua_State *L, body_builder *w, int idx, const char *key, int *first) {
  int rc = 0, payload = strcmp(key, "payload") == 0;
  lua_getfield(L, idx, key);
  if (!lua_isnil(L, -1) || payload) {
    if (!*first) buffer_addc(&w->b, ',');
    *first = 0;
    add_key(w, key);
    if (lua_isnil(L, -1)) buffer_adds(&w->b, "null");
    else rc = add_value(L, w, -1, payload ? "methodParams.payload" : "methodParams", payload ? MAX_PAYLOAD_BYTES : 0);
  }
  lua_pop(L, 1);
  return rc;
}

/* The method object from the normalised params at idx: for a job's cloudToDeviceMethod in the
 * documented order; for a direct method's own body (POST /twins/{id}/methods) in the sorted
 * order the Node SDK's JSON gives. */
static int add_method(lua_State *L, body_builder *w, int idx, int sorted) {
  static const char *const documented[] = {"methodName", "payload", "responseTimeoutInSeconds",
                                           "connectTimeoutInSeconds", NULL};
  static const char *const alphabetical[] = {"connectTimeoutInSeconds", "methodName", "payload",
                                             "responseTimeoutInSeconds", NULL};
  const char *const *keys = sorted ? alphabetical : documented;
  int rc = 0, first = 1, i;
  buffer_addc(&w->b, '{');
  for (i = 0; keys[i] && rc == 0; i++) rc = add_method_field(L, w, idx, keys[i], &first);
  buffer_addc(&w->b, '}');
  return rc;
}

/* The updateTwin object from the normalised patch at idx, keys in the encoder's sorted order
 * (etag, properties, tags) so the body is what encoding the whole patch gives. */
static int add_patch(lua_State *L, body_builder *w, int idx) {
  int rc = 0;
  buffer_adds(&w->b, "{\"etag\":\"*\"");
  lua_getfield(L, idx, "properties");
  if (!lua_isnil(L, -1)) {
    buffer_adds(&w->b, ",\"properties\":{\"desired\":");
    lua_getfield(L, -1, "desired");
    rc = add_value(L, w, -1, "patch.properties.desired", MAX_DESIRED_BYTES);
    lua_pop(L, 1);
    buffer_addc(&w->b, '}');
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "tags");
  if (rc == 0 && !lua_isnil(L, -1)) {
    buffer_adds(&w->b, ",\"tags\":");
    rc = add_value(L, w, -1, "patch.tags", MAX_TAGS_BYTES);
  }
  lua_pop(L, 1);
  buffer_addc(&w->b, '}');
  return rc;
}

/* Refuses with what the builder recorded (the buffer is freed first). */
static int refuse_built(lua_State *L, body_builder *w) {
  char err[ERR_MAX];
  const char *field = w->field;
  size_t size = w->size, limit = w->limit;
  memcpy(err, w->err, sizeof err);
  buffer_free(&w->b);
  if (limit) {
    char n[32], lim[32];
    snprintf(n, sizeof n, "%zu", size);
    snprintf(lim, sizeof lim, "%zu", limit);
    if (limit == MAX_PAYLOAD_BYTES)
      return refuse(L, INVALID, field, field, "is %s bytes as JSON; direct methods allow at most %s (128 KB)", n, lim);
    return refuse(L, INVALID, field, field, "is %s bytes as JSON; the hub allows at most %s (%d KB) for a twin job",
                  n, lim, (int)(limit / 1024));
  }
  return refuse(L, INVALID, field, field, "%s", err);
}

/* ---- Lua functions ----------------------------------------------------------------------- */

static int l_job_request(lua_State *L) {
  int kind = kind_of(L, 1), rc, action;
  size_t idlen, condlen;
  const char *id, *cond;
  double start, max_exec = DEFAULT_MAX_EXECUTION, now;
  char start_text[32];
  body_builder w;
  lua_settop(L, 7);

  if (lua_type(L, 2) != LUA_TSTRING)
    return refuse(L, MISUSE, "jobId", "jobId", "must be a string, got %s", luaL_typename(L, 2));
  id = lua_tolstring(L, 2, &idlen);
  if (validate_job_id(L, id, idlen)) return refuse_pushed(L, "jobId", "jobId");
  if (lua_type(L, 3) != LUA_TSTRING)
    return refuse(L, MISUSE, "queryCondition", "queryCondition", "must be a string, got %s", luaL_typename(L, 3));
  cond = lua_tolstring(L, 3, &condlen);
  if (validate_condition(L, cond, condlen)) return refuse_pushed(L, "queryCondition", "queryCondition");

  switch (lua_type(L, 5)) {
    case LUA_TNIL:
      if (lua_type(L, 7) != LUA_TNUMBER) return luaL_argerror(L, 7, "the current epoch time is needed for a start of now");
      now = lua_tonumber(L, 7);
      start = now;
      break;
    case LUA_TNUMBER:
      start = lua_tonumber(L, 5);
      if (!(start >= 0 && start <= LATEST_EPOCH)) {
        char shown[40];
        snprintf(shown, sizeof shown, "%.14g", start);
        return refuse(L, INVALID, "startTime", "startTime", "%s is not a usable epoch time in seconds", shown);
      }
      break;
    case LUA_TSTRING: {
      size_t n;
      const char *s = lua_tolstring(L, 5, &n);
      if (clock_parse_iso8601(L, s, n, &start) != 0)
        return refuse(L, INVALID, "startTime", "startTime:", "%s", lua_tostring(L, -1));
      break;
    }
    default:
      return refuse(L, MISUSE, "startTime", "startTime", "must be nil, epoch seconds or an ISO-8601 string, got %s",
                    luaL_typename(L, 5));
  }
  if (clock_format_iso8601(start, start_text) != 0)
    return refuse(L, INVALID, "startTime", "startTime", "is outside the years 0000 to 9999");

  rc = max_execution(L, 6, &max_exec);
  if (rc) return rc;

  rc = job_action(L, kind, 4);
  if (rc) return rc;
  action = lua_gettop(L);

  /* {"jobId","type", action, "queryCondition","startTime","maxExecutionTimeInSeconds"}: the
   * devguide's order, so bodies are byte-for-byte predictable (and diffable in logs). */
  memset(&w, 0, sizeof w);
  buffer_init(&w.b);
  buffer_adds(&w.b, "{\"jobId\":");
  rc = add_value(L, &w, 2, "jobId", 0);
  if (kind == KIND_METHOD) {
    buffer_adds(&w.b, ",\"type\":\"scheduleDeviceMethod\",\"cloudToDeviceMethod\":");
    if (rc == 0) rc = add_method(L, &w, action, 0);
  } else {
    buffer_adds(&w.b, ",\"type\":\"scheduleUpdateTwin\",\"updateTwin\":");
    if (rc == 0) rc = add_patch(L, &w, action);
  }
  buffer_adds(&w.b, ",\"queryCondition\":");
  if (rc == 0) rc = add_value(L, &w, 3, "queryCondition", 0);
  buffer_adds(&w.b, ",\"startTime\":\"");
  buffer_adds(&w.b, start_text);
  buffer_adds(&w.b, "\",\"maxExecutionTimeInSeconds\":");
  {
    char num[24];
    snprintf(num, sizeof num, "%lld", iothub_clamp_int64(max_exec, 1, (long long)MAX_EXECUTION));
    buffer_adds(&w.b, num);
  }
  buffer_addc(&w.b, '}');
  if (rc != 0) return refuse_built(L, &w);
  if (w.b.failed) {
    buffer_free(&w.b);
    return iothub_fail(L, "OutOfMemory", "out of memory building the job request");
  }
  lua_pushlstring(L, w.b.data, w.b.len);
  buffer_free(&w.b);
  lua_pushvalue(L, action);
  return 2;
}

static int l_job_action(lua_State *L) {
  int kind = kind_of(L, 1), rc, action;
  double max_exec;
  body_builder w;
  lua_settop(L, 3);
  rc = max_execution(L, 3, &max_exec);
  if (rc) return rc;
  rc = job_action(L, kind, 2);
  if (rc) return rc;
  action = lua_gettop(L);
  /* The sizes are the bytes the action takes in a body: build that part to measure them. */
  memset(&w, 0, sizeof w);
  buffer_init(&w.b);
  rc = kind == KIND_METHOD ? add_method(L, &w, action, 0) : add_patch(L, &w, action);
  if (rc != 0) return refuse_built(L, &w);
  buffer_free(&w.b);
  return 1;
}

static int l_method_request(lua_State *L) {
  int rc, params;
  body_builder w;
  lua_settop(L, 1);
  rc = method_params(L, 1);
  if (rc) return rc;
  params = lua_gettop(L);
  memset(&w, 0, sizeof w);
  buffer_init(&w.b);
  rc = add_method(L, &w, params, 1);
  if (rc != 0) return refuse_built(L, &w);
  if (w.b.failed) {
    buffer_free(&w.b);
    return iothub_fail(L, "OutOfMemory", "out of memory building the method request");
  }
  lua_pushlstring(L, w.b.data, w.b.len);
  buffer_free(&w.b);
  lua_getfield(L, params, "responseTimeoutInSeconds");
  lua_getfield(L, params, "connectTimeoutInSeconds");
  return 3;
}

int job_request_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"job_request", l_job_request},
    {"job_action", l_job_action},
    {"method_request", l_method_request},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  lua_pushinteger(L, DEFAULT_MAX_EXECUTION);
  lua_setfield(L, -2, "job_default_max_execution");
  return 0;
}
