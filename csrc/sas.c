/* sas.c: HMAC-SHA256, SAS tokens and service connection strings.
 * Rule for every message here: never include key, signature or token text. */
#include <stdio.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include "common.h"
#include "codec.h"

#define SAS_PREFIX "SharedAccessSignature "
#define SAS_PREFIX_LEN (sizeof(SAS_PREFIX) - 1)
#define ECHO_MAX 64

/* Copies at most ECHO_MAX bytes of non-secret text for a message, replacing anything
 * that is not printable ASCII so messages stay single-line and readable. */
static void echo_copy(char *out, size_t outsz, const char *s, size_t n) {
  size_t i, o = 0, lim = n > ECHO_MAX ? ECHO_MAX : n;
  for (i = 0; i < lim && o + 4 < outsz; i++) {
    unsigned char c = (unsigned char)s[i];
    out[o++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
  }
  if (lim < n && o + 4 < outsz) { memcpy(out + o, "...", 3); o += 3; }
  out[o] = '\0';
}

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}

static void trim(const char **s, size_t *n) {
  while (*n > 0 && is_space(**s)) { (*s)++; (*n)--; }
  while (*n > 0 && is_space((*s)[*n - 1])) (*n)--;
}

static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Pushes the percent-decoded value, or returns the 1-based position of a bad escape
 * (nothing pushed). */
static size_t push_url_decoded(lua_State *L, const char *s, size_t n) {
  luaL_Buffer lb;
  size_t i;
  for (i = 0; i < n; i++)
    if (s[i] == '%' && (i + 2 >= n || hexval((unsigned char)s[i + 1]) < 0 ||
                        hexval((unsigned char)s[i + 2]) < 0))
      return i + 1;
  luaL_buffinit(L, &lb);
  for (i = 0; i < n; i++) {
    if (s[i] == '%') {
      luaL_addchar(&lb, (char)((hexval((unsigned char)s[i + 1]) << 4) | hexval((unsigned char)s[i + 2])));
      i += 2;
    } else {
      luaL_addchar(&lb, s[i]);
    }
  }
  luaL_pushresult(&lb);
  return 0;
}

/* ---- HMAC ---- */

static int hmac_sha256(const void *key, size_t keylen, const void *msg, size_t msglen,
                       unsigned char out[32]) {
  unsigned int outlen = 0;
  static const unsigned char empty = 0;
  /* OpenSSL treats a NULL key specially; a zero-length key must still be a valid pointer. */
  if (keylen == 0) key = &empty;
  if (!HMAC(EVP_sha256(), key, (int)keylen, (const unsigned char *)msg, msglen, out, &outlen) ||
      outlen != 32)
    return -1;
  return 0;
}

static int l_hmac_sha256(lua_State *L) {
  size_t klen, mlen;
  const char *key = luaL_checklstring(L, 1, &klen);
  const char *msg = luaL_checklstring(L, 2, &mlen);
  unsigned char mac[32];
  if (klen > 0x7fffffff) return luaL_argerror(L, 1, "key too long");
  if (hmac_sha256(key, klen, msg, mlen, mac) != 0)
    return iothub_fail(L, "CryptoError", "hmac_sha256: OpenSSL HMAC failed");
  lua_pushlstring(L, (const char *)mac, sizeof mac);
  return 1;
}

/* ---- sas_token ---- */

static const char *opt_string_field(lua_State *L, int t, const char *name, size_t *len,
                                    int required) {
  int ty;
  lua_getfield(L, t, name); /* left on the stack so the string stays referenced */
  ty = lua_type(L, -1);
  if (ty == LUA_TNIL && !required) return NULL;
  if (ty != LUA_TSTRING)
    luaL_error(L, "sas_token: field '%s' must be a string (got %s)", name, lua_typename(L, ty));
  return lua_tolstring(L, -1, len);
}

static int l_sas_token(lua_State *L) {
  size_t rlen, klen, nlen = 0, keybytes = 0;
  const char *resource, *key, *keyname;
  long long expiry;
  unsigned char *keybuf, mac[32];
  char sig[base64_encoded_len(32)], sebuf[32];
  size_t siglen;
  int selen;
  iothub_buffer b;

  luaL_checktype(L, 1, LUA_TTABLE);
  resource = opt_string_field(L, 1, "resource", &rlen, 1);
  key = opt_string_field(L, 1, "key", &klen, 1);
  keyname = opt_string_field(L, 1, "keyName", &nlen, 0);
  if (rlen == 0) return luaL_error(L, "sas_token: field 'resource' must not be empty (use the hub host name)");
  lua_getfield(L, 1, "expiry");
  if (lua_type(L, -1) != LUA_TNUMBER)
    return luaL_error(L, "sas_token: field 'expiry' must be a number of seconds since the epoch (got %s)",
                      luaL_typename(L, -1));
  {
    lua_Number e = lua_tonumber(L, -1);
    if (!(e >= 0 && e <= IOTHUB_MAX_SAFE_INTEGER) || e != (lua_Number)(long long)e)
      return luaL_error(L, "sas_token: field 'expiry' must be a whole, non-negative number of seconds");
#if IOTHUB_HAS_INTEGERS
    expiry = lua_isinteger(L, -1) ? (long long)lua_tointeger(L, -1) : (long long)e;
#else
    expiry = (long long)e;
#endif
  }

  keybuf = (unsigned char *)lua_newuserdatauv(L, (klen / 4) * 3 + 1, 0);
  if (base64_decode(key, klen, keybuf, &keybytes) != 0 || keybytes == 0) {
    OPENSSL_cleanse(keybuf, (klen / 4) * 3 + 1);
    return iothub_fail(L, "InvalidKey",
                       "sas_token: key is not valid base64 (%d characters); pass the policy's primary or "
                       "secondary key exactly as shown for the shared access policy",
                       (int)klen);
  }

  selen = snprintf(sebuf, sizeof sebuf, "%lld", expiry);

  /* No Lua call may raise between here and buffer_free (it would leak b). */
  buffer_init(&b);
  url_encode_append(&b, resource, rlen);
  buffer_addc(&b, '\n');
  buffer_append(&b, sebuf, (size_t)selen);
  if (b.failed || hmac_sha256(keybuf, keybytes, b.data, b.len, mac) != 0) {
    int oom = b.failed;
    buffer_free(&b);
    OPENSSL_cleanse(keybuf, keybytes);
    if (oom) return luaL_error(L, "sas_token: out of memory");
    return iothub_fail(L, "CryptoError", "sas_token: OpenSSL HMAC failed");
  }
  OPENSSL_cleanse(keybuf, keybytes);
  siglen = base64_encode(mac, sizeof mac, sig);

  buffer_reset(&b);
  buffer_adds(&b, SAS_PREFIX "sr=");
  url_encode_append(&b, resource, rlen);
  buffer_adds(&b, "&sig=");
  url_encode_append(&b, sig, siglen);
  buffer_adds(&b, "&se=");
  buffer_append(&b, sebuf, (size_t)selen);
  if (keyname && nlen > 0) { /* an empty name is treated as absent, like the Node SDK */
    buffer_adds(&b, "&skn=");
    url_encode_append(&b, keyname, nlen);
  }
  OPENSSL_cleanse(mac, sizeof mac);
  OPENSSL_cleanse(sig, sizeof sig);
  if (b.failed) {
    buffer_free(&b);
    return luaL_error(L, "sas_token: out of memory");
  }
  lua_pushlstring(L, b.data, b.len);
  buffer_free(&b);
  return 1;
}

/* ---- parse_sas_token ---- */

enum { F_SR, F_SIG, F_SE, F_SKN, F_COUNT };
static const char *const SAS_FIELDS[F_COUNT] = {"sr", "sig", "se", "skn"};

/* On success pushes the result table and returns 0. On failure pushes nothing, writes a
 * message (which never contains token text) into err and returns -1. */
static int parse_sas(lua_State *L, const char *s, size_t n, char *err, size_t errlen) {
  const char *val[F_COUNT] = {NULL, NULL, NULL, NULL};
  size_t vlen[F_COUNT] = {0, 0, 0, 0};
  size_t pos, fieldno = 0;
  int f, top = lua_gettop(L);
  double se = 0;

  if (n < SAS_PREFIX_LEN || memcmp(s, SAS_PREFIX, SAS_PREFIX_LEN) != 0) {
    snprintf(err, errlen, "a SAS token must start with 'SharedAccessSignature ' (that word and one "
                          "space) followed by sr=...&sig=...&se=...");
    return -1;
  }
  pos = SAS_PREFIX_LEN;
  while (pos <= n) {
    const char *field = s + pos, *amp = memchr(field, '&', n - pos), *eq;
    size_t flen = amp ? (size_t)(amp - field) : n - pos, klen;
    fieldno++;
    pos += flen + 1;
    if (flen == 0) {
      snprintf(err, errlen, "field %u of the SAS token is empty; fields are key=value separated by '&'",
               (unsigned)fieldno);
      return -1;
    }
    eq = memchr(field, '=', flen);
    if (!eq) {
      snprintf(err, errlen, "field %u of the SAS token has no '='; fields are key=value separated by '&'",
               (unsigned)fieldno);
      return -1;
    }
    klen = (size_t)(eq - field);
    for (f = 0; f < F_COUNT; f++) {
      if (strlen(SAS_FIELDS[f]) == klen && memcmp(field, SAS_FIELDS[f], klen) == 0) {
        if (val[f]) {
          snprintf(err, errlen, "the SAS token has field '%s' more than once", SAS_FIELDS[f]);
          return -1;
        }
        val[f] = eq + 1;
        vlen[f] = flen - klen - 1;
        break;
      }
    } /* unknown fields are ignored, as the service's own parser tolerates extra fields */
  }
  for (f = F_SR; f <= F_SE; f++) {
    if (!val[f] || vlen[f] == 0) {
      snprintf(err, errlen, "the SAS token has no %s field (or it is empty); sr, sig and se are required",
               SAS_FIELDS[f]);
      return -1;
    }
  }
  for (pos = 0; pos < vlen[F_SE]; pos++) {
    char c = val[F_SE][pos];
    if (c < '0' || c > '9' || pos >= 16) {
      snprintf(err, errlen, "the se field of the SAS token must be an integer (expiry in seconds since "
                            "the epoch)");
      return -1;
    }
    se = se * 10 + (c - '0');
  }
  if (se > IOTHUB_MAX_SAFE_INTEGER) {
    snprintf(err, errlen, "the se field of the SAS token is too large");
    return -1;
  }

  lua_createtable(L, 0, 4);
  for (f = 0; f < F_COUNT; f++) {
    size_t bad;
    if (f == F_SE || !val[f]) continue;
    bad = push_url_decoded(L, val[f], vlen[f]);
    if (bad) {
      lua_settop(L, top);
      snprintf(err, errlen, "the %s field of the SAS token has an invalid percent-escape at position %u "
                            "of its value", SAS_FIELDS[f], (unsigned)bad);
      return -1;
    }
    lua_setfield(L, -2, SAS_FIELDS[f]);
  }
#if IOTHUB_HAS_INTEGERS
  lua_pushinteger(L, (lua_Integer)se);
#else
  lua_pushnumber(L, se);
#endif
  lua_setfield(L, -2, "se");
  return 0;
}

static int l_parse_sas_token(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  char err[256];
  if (parse_sas(L, s, n, err, sizeof err) != 0) return iothub_fail(L, "InvalidToken", "%s", err);
  return 1;
}

static int l_constant_time_equals(lua_State *L) {
  size_t la, lb;
  const char *a = luaL_checklstring(L, 1, &la);
  const char *b = luaL_checklstring(L, 2, &lb);
  if (la != lb) {
    /* Still walk a, so the time depends on a's length only, not on content. */
    (void)CRYPTO_memcmp(a, a, la);
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushboolean(L, CRYPTO_memcmp(a, b, la) == 0);
  return 1;
}

/* ---- parse_connection_string ---- */

enum { C_HOST, C_KEYNAME, C_KEY, C_SIG, C_COUNT };
static const char *const CS_KEYS[C_COUNT] = {"HostName", "SharedAccessKeyName", "SharedAccessKey",
                                             "SharedAccessSignature"};
static const char *const CS_FIELDS[C_COUNT] = {"hostName", "sharedAccessKeyName", "sharedAccessKey",
                                               "sharedAccessSignature"};
#define CS_EXPECTED "expected HostName, SharedAccessKeyName and SharedAccessKey (or SharedAccessSignature)"
#define CS_POLICY_HINT \
  "a service connection string from a shared access policy such as iothubowner, service or " \
  "registryReadWrite is needed (Azure portal: IoT Hub > Shared access policies)"

static int ieq(const char *a, size_t n, const char *b) {
  size_t i;
  if (strlen(b) != n) return 0;
  for (i = 0; i < n; i++) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = (char)(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = (char)(y - 'A' + 'a');
    if (x != y) return 0;
  }
  return 1;
}

/* Only short, letters-only key names are echoed: anything else might be key material
 * that lost its "SharedAccessKey=" prefix. */
static int safe_to_echo_name(const char *s, size_t n) {
  size_t i;
  if (n == 0 || n > 32) return 0;
  for (i = 0; i < n; i++)
    if (!((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z') || s[i] == '_')) return 0;
  return 1;
}

/* Checks host[:port]. Returns NULL, or a reason with *badpos the 1-based position. */
static const char *check_host(const char *s, size_t n, size_t *badpos) {
  size_t i, label = 0, hostlen = n;
  const char *colon = memchr(s, ':', n);
  *badpos = 0;
  if (colon) hostlen = (size_t)(colon - s);
  if (hostlen == 0) return "the host part is empty";
  if (hostlen > 253) return "the host name is longer than 253 characters";
  for (i = 0; i < hostlen; i++) {
    char c = s[i];
    if (c == '.') {
      if (label == 0) { *badpos = i + 1; return "it has an empty label (two dots, or a leading dot)"; }
      if (s[i - 1] == '-') { *badpos = i; return "a label ends with '-'"; }
      label = 0;
      continue;
    }
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) {
      *badpos = i + 1;
      return "it contains a character that is not a letter, digit, '-' or '.'";
    }
    if (c == '-' && label == 0) { *badpos = i + 1; return "a label starts with '-'"; }
    if (++label > 63) { *badpos = i + 1; return "a label is longer than 63 characters"; }
  }
  if (label == 0) return "it ends with a dot";
  if (s[hostlen - 1] == '-') return "a label ends with '-'";
  if (colon) {
    size_t plen = n - hostlen - 1;
    long port = 0;
    if (plen == 0 || plen > 5) return "the port after ':' must be a number from 1 to 65535";
    for (i = hostlen + 1; i < n; i++) {
      if (s[i] < '0' || s[i] > '9') { *badpos = i + 1; return "the port after ':' must be a number from 1 to 65535"; }
      port = port * 10 + (s[i] - '0');
    }
    if (port < 1 || port > 65535) return "the port after ':' must be a number from 1 to 65535";
  }
  return NULL;
}

static int cs_fail_host(lua_State *L, const char *v, size_t vlen) {
  char shown[ECHO_MAX + 8];
  size_t badpos, shownlen = 0;
  const char *why;
  if (vlen == 0)
    return iothub_fail(L, "InvalidConnectionString",
                       "HostName is empty; set it to the hub's host name, e.g. HostName=myhub.azure-devices.net");
  /* Show only the leading run of host characters: a missing ';' could glue a secret on. */
  while (shownlen < vlen) {
    char c = v[shownlen];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
          c == '.' || c == ':'))
      break;
    shownlen++;
  }
  echo_copy(shown, sizeof shown, v, shownlen);
  if (vlen >= 3 && memchr(v, '/', vlen))
    return iothub_fail(L, "InvalidConnectionString",
                       "HostName '%s%s' is not a plain host name; remove any 'https://' scheme and path, "
                       "e.g. HostName=myhub.azure-devices.net",
                       shown, shownlen < vlen ? "..." : "");
  why = check_host(v, vlen, &badpos);
  if (badpos)
    return iothub_fail(L, "InvalidConnectionString",
                       "HostName '%s%s' is not a valid host name: %s (character %d); expected the hub's "
                       "host name such as myhub.azure-devices.net (letters, digits, '-' and '.', "
                       "optionally :port)",
                       shown, shownlen < vlen ? "..." : "", why, (int)badpos);
  return iothub_fail(L, "InvalidConnectionString",
                     "HostName '%s%s' is not a valid host name: %s; expected the hub's host name such as "
                     "myhub.azure-devices.net (letters, digits, '-' and '.', optionally :port)",
                     shown, shownlen < vlen ? "..." : "", why);
}

static int l_parse_connection_string(lua_State *L) {
  size_t n, pos = 0, partno = 0, badpos;
  const char *cs = luaL_checklstring(L, 1, &n);
  const char *val[C_COUNT] = {NULL, NULL, NULL, NULL};
  size_t vlen[C_COUNT] = {0, 0, 0, 0}, where[C_COUNT] = {0, 0, 0, 0};
  int k;

  while (pos <= n) {
    const char *part = cs + pos, *semi = memchr(part, ';', n - pos), *eq, *key, *v;
    size_t plen = semi ? (size_t)(semi - part) : n - pos, keylen, vl;
    partno++;
    pos += plen + 1;
    trim(&part, &plen);
    if (plen == 0) continue; /* empty parts (e.g. a trailing ';') are harmless */
    eq = memchr(part, '=', plen);
    if (!eq)
      return iothub_fail(L, "InvalidConnectionString",
                         "connection string part %d (%d characters) has no '='; expected Key=Value "
                         "parts separated by ';', e.g. HostName=myhub.azure-devices.net;"
                         "SharedAccessKeyName=iothubowner;SharedAccessKey=<key>",
                         (int)partno, (int)plen);
    key = part;
    keylen = (size_t)(eq - part);
    trim(&key, &keylen);
    v = eq + 1;
    vl = plen - (size_t)(eq - part) - 1;
    trim(&v, &vl);
    if (keylen == 0)
      return iothub_fail(L, "InvalidConnectionString",
                         "connection string part %d has nothing before '='; expected Key=Value, " CS_EXPECTED,
                         (int)partno);
    for (k = 0; k < C_COUNT; k++)
      if (ieq(key, keylen, CS_KEYS[k])) break;
    if (k == C_COUNT) {
      char shown[ECHO_MAX + 8];
      if (ieq(key, keylen, "DeviceId") || ieq(key, keylen, "ModuleId")) {
        echo_copy(shown, sizeof shown, key, keylen);
        return iothub_fail(L, "InvalidConnectionString",
                           "connection string part %d is %s: this is a device (or module) connection string, "
                           "but scheduling jobs needs the service side; " CS_POLICY_HINT,
                           (int)partno, shown);
      }
      if (!safe_to_echo_name(key, keylen))
        return iothub_fail(L, "InvalidConnectionString",
                           "connection string part %d has an unknown key (%d characters, not shown in case "
                           "it is key material); " CS_EXPECTED,
                           (int)partno, (int)keylen);
      echo_copy(shown, sizeof shown, key, keylen);
      return iothub_fail(L, "InvalidConnectionString",
                         "connection string part %d has unknown key '%s'; " CS_EXPECTED, (int)partno, shown);
    }
    if (val[k])
      return iothub_fail(L, "InvalidConnectionString",
                         "connection string has %s twice (parts %d and %d); keep only one", CS_KEYS[k],
                         (int)where[k], (int)partno);
    val[k] = v;
    vlen[k] = vl;
    where[k] = partno;
  }

  if (!val[C_HOST])
    return iothub_fail(L, "InvalidConnectionString",
                       "connection string has no HostName; add HostName=<hub>.azure-devices.net (" CS_POLICY_HINT ")");
  if (vlen[C_HOST] == 0 || check_host(val[C_HOST], vlen[C_HOST], &badpos) != NULL)
    return cs_fail_host(L, val[C_HOST], vlen[C_HOST]);
  if (val[C_KEY] && val[C_SIG])
    return iothub_fail(L, "InvalidConnectionString",
                       "connection string has both SharedAccessKey and SharedAccessSignature; keep only one "
                       "(a key lets this client create fresh tokens, a signature expires)");
  if (val[C_KEY] && !val[C_KEYNAME])
    return iothub_fail(L, "InvalidConnectionString",
                       "connection string has SharedAccessKey but no SharedAccessKeyName; add "
                       "SharedAccessKeyName=<policy name>, e.g. iothubowner");
  if (val[C_KEYNAME] && !val[C_KEY] && !val[C_SIG]) {
    char shown[ECHO_MAX + 8];
    /* A missing ';' glues the key onto the name ("iothubowner SharedAccessKey=..."): only a
     * name that looks like one is shown. */
    if (!safe_to_echo_name(val[C_KEYNAME], vlen[C_KEYNAME]))
      return iothub_fail(L, "InvalidConnectionString",
                         "connection string has a SharedAccessKeyName (%d characters, not shown in case it "
                         "holds key material; is a ';' missing?) but no SharedAccessKey; add "
                         "SharedAccessKey=<the policy's primary or secondary key>",
                         (int)vlen[C_KEYNAME]);
    echo_copy(shown, sizeof shown, val[C_KEYNAME], vlen[C_KEYNAME]);
    return iothub_fail(L, "InvalidConnectionString",
                       "connection string has SharedAccessKeyName '%s' but no SharedAccessKey; add "
                       "SharedAccessKey=<the policy's primary or secondary key>",
                       shown);
  }
  if (!val[C_KEY] && !val[C_SIG])
    return iothub_fail(L, "InvalidConnectionString",
                       "connection string has neither SharedAccessKeyName+SharedAccessKey nor "
                       "SharedAccessSignature; " CS_POLICY_HINT);
  if (val[C_KEYNAME] && vlen[C_KEYNAME] == 0)
    return iothub_fail(L, "InvalidConnectionString",
                       "SharedAccessKeyName is empty; set it to the policy name, e.g. iothubowner");
  if (val[C_KEY]) {
    size_t kn = vlen[C_KEY], outlen = 0;
    unsigned char *scratch = (unsigned char *)lua_newuserdatauv(L, (kn / 4) * 3 + 1, 0);
    int bad = base64_decode(val[C_KEY], kn, scratch, &outlen) != 0 || outlen == 0;
    OPENSSL_cleanse(scratch, (kn / 4) * 3 + 1);
    lua_pop(L, 1);
    if (bad)
      return iothub_fail(L, "InvalidConnectionString",
                         "SharedAccessKey is not valid base64 (%d characters); copy the primary or secondary "
                         "key of the shared access policy exactly",
                         (int)kn);
  }
  if (val[C_SIG]) {
    char err[256];
    if (parse_sas(L, val[C_SIG], vlen[C_SIG], err, sizeof err) != 0)
      return iothub_fail(L, "InvalidConnectionString", "SharedAccessSignature is not a valid SAS token: %s",
                         err);
    lua_pop(L, 1);
  }

  lua_createtable(L, 0, 4);
  for (k = 0; k < C_COUNT; k++) {
    if (!val[k]) continue;
    lua_pushlstring(L, val[k], vlen[k]);
    lua_setfield(L, -2, CS_FIELDS[k]);
  }
  return 1;
}

int sas_open(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"hmac_sha256", l_hmac_sha256},
    {"sas_token", l_sas_token},
    {"parse_sas_token", l_parse_sas_token},
    {"constant_time_equals", l_constant_time_equals},
    {"parse_connection_string", l_parse_connection_string},
    {NULL, NULL}
  };
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
