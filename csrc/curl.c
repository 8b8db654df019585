/* iothub.curl: blocking (easy) and concurrent (multi) HTTP over libcurl.
 *
 *   curl.easy([opts]) / curl.multi([opts]): opts = { caFile, verify, proxy, noProxy, verbose,
 *     timeout, connectTimeout, maxBody } are the handle's defaults for every request.
 *   e:request(method, url [, headers [, body [, timeout [, connectTimeout [, maxBody]]]]])
 *     -> { status, headers, body } | nil, message, code        (the per-call fast path)
 *   e:perform{ method=, url=, ..., any option } -> status, headers, body | nil, message, code
 *   m:submit(same arguments as request) / m:add{ ... } -> id; m:perform(), m:wait(s),
 *     m:completed(), m:cancel(id), m:timeout(), m:pending()
 *
 * curl_transfer.c holds what both handles share, curl_easy.c and curl_multi.c one handle each. */
#include "curl_transfer.h"

int luaopen_iothub_curl(lua_State *L) {
  static int initialized = 0;
  if (!initialized) {
    CURLcode rc = curl_global_init(CURL_GLOBAL_DEFAULT);
    if (rc != CURLE_OK) return luaL_error(L, "curl_global_init failed: %s", curl_easy_strerror(rc));
    initialized = 1;
  }
  lua_newtable(L);
  transfer_open(L);
  easy_open(L);
  multi_open(L);
  return 1;
}
