/* The floor for bench/getjob.lua: the same keep-alive HTTPS requests made by a minimal C program
 * with the same libcurl and the options iothub.curl sets, so the Lua figures can be compared
 * with what libcurl itself costs on this machine (CPU per request and peak RSS).
 *
 *   libcurl_floor URL CAFILE CALLS [HEADER...]
 *   prints: cpu_us_per_call user_us sys_us peak_rss_kb rss_after_dlopen_kb
 *
 * bench/getjob.lua compiles it with cc; it is not part of the library. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <curl/curl.h>

typedef struct {
  char *data;
  size_t len, cap;
} sink;

/* Buffers what it is given, as iothub.curl does, so the floor pays for the same copies. */
static size_t keep(char *p, size_t size, size_t nmemb, void *ud) {
  sink *s = (sink *)ud;
  size_t n = size * nmemb;
  if (s->len + n > s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 4096;
    char *q;
    while (cap < s->len + n) cap *= 2;
    q = (char *)realloc(s->data, cap);
    if (!q) return 0;
    s->data = q;
    s->cap = cap;
  }
  memcpy(s->data + s->len, p, n);
  s->len += n;
  return n;
}

static void times_now(double *user, double *sys) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  *user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
  *sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static long status_kb(const char *key) {
  char line[256];
  long v = -1;
  size_t n = strlen(key);
  FILE *f = fopen("/proc/self/status", "r");
  if (!f) return -1;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, key, n) == 0 && line[n] == ':') v = atol(line + n + 1);
  fclose(f);
  return v;
}

int main(int argc, char **argv) {
  CURL *c;
  struct curl_slist *headers = NULL;
  sink body = { NULL, 0, 0 }, head = { NULL, 0, 0 };
  double u0, s0, u1, s1;
  long calls, i, loaded;
  int k;
  if (argc < 4) {
    fprintf(stderr, "usage: %s URL CAFILE CALLS [HEADER...]\n", argv[0]);
    return 2;
  }
  calls = atol(argv[3]);
  loaded = status_kb("VmRSS"); /* libcurl and its dependencies are mapped at exec */
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(c = curl_easy_init())) return 1;
  for (k = 4; k < argc; k++) headers = curl_slist_append(headers, argv[k]);
  headers = curl_slist_append(headers, "Expect:");
  curl_easy_setopt(c, CURLOPT_URL, argv[1]);
  curl_easy_setopt(c, CURLOPT_CAINFO, argv[2]);
  curl_easy_setopt(c, CURLOPT_CAPATH, (char *)NULL);
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 60000L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, 15000L);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, keep);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, (void *)&body);
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, keep);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, (void *)&head);
  for (i = -20; i < calls; i++) { /* 20 untimed: the TLS handshake happens there */
    CURLcode rc;
    long status = 0;
    if (i == 0) times_now(&u0, &s0);
    body.len = head.len = 0;
    rc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (rc != CURLE_OK || status != 200) {
      fprintf(stderr, "libcurl_floor: request failed: %s (HTTP %ld)\n", curl_easy_strerror(rc), status);
      return 1;
    }
  }
  times_now(&u1, &s1);
  printf("%.1f %.1f %.1f %ld %ld\n", (u1 - u0 + s1 - s0) / (double)calls * 1e6,
         (u1 - u0) / (double)calls * 1e6, (s1 - s0) / (double)calls * 1e6, status_kb("VmHWM"), loaded);
  curl_easy_cleanup(c);
  curl_slist_free_all(headers);
  curl_global_cleanup();
  free(body.data);
  free(head.data);
  return 0;
}
