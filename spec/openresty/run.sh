#!/usr/bin/env bash
# OpenResty tests in a real nginx (Debian's nginx + libnginx-mod-http-lua), never the system
# service: our own instances on loopback, random ports, state in a temp dir.
#
#   spec/openresty/run.sh            # make test-openresty
#
# 1. the emulator (bin/iothub-emulator, spec/openresty/devices.lua) over HTTP and HTTPS;
# 2. a test nginx (nginx.conf.in + openresty_cases.lua) whose cases use the client inside
#    the worker: every JobClient and Registry operation over both schemes through the
#    cosocket transport, transport errors, phase errors, no libcurl in the worker, and
#    /health latency while 50 monitors and a slow hub answer are in flight;
# 3. the dashboard (examples/openresty-dashboard/run.sh) driven in headless Chromium by
#    browser.mjs (playwright-core); screenshot in build/artifacts/ (OPENRESTY_BROWSER=0 skips).
# Ends with "openresty: N passed, M failed"; exits non-zero on any failure. Logs are kept
# (path printed) when something fails.
set -uo pipefail
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
HERE=$ROOT/spec/openresty
cd "$ROOT"
# shellcheck source=examples/lib/emulator.sh
. examples/lib/emulator.sh # start_emulator, free_port, wait_until, stop_pid, start_with_retries
ARTIFACTS=${ARTIFACTS:-$ROOT/build/artifacts}
HEALTH_LIMIT_MS=50
HEALTH_SAMPLES=20

passed=0
failed=0
record() { # "PASS ..." / "FAIL ..." lines -> counters
  local line
  while IFS= read -r line; do
    case $line in
      PASS*) passed=$((passed + 1)); echo "$line" ;;
      FAIL*) failed=$((failed + 1)); echo "$line" ;;
      *) [ -n "$line" ] && echo "  $line" ;;
    esac
  done
}
pass() { record <<<"PASS $*"; }
fail() { record <<<"FAIL $*"; }
summary() { echo "openresty: $passed passed, $failed failed"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/iothub-openresty.XXXXXX")
EMU_PID="" NGINX_PID="" DASH_PID=""
cleanup() {
  stop_pid "$DASH_PID"; stop_pid "$NGINX_PID"; stop_pid "$EMU_PID"
  if [ "$failed" = 0 ]; then rm -rf "$WORK"; else echo "openresty: logs kept in $WORK"; fi
}
trap cleanup EXIT
trap 'fail "interrupted"; summary; exit 130' INT TERM

die() { fail "$*"; summary; exit 1; }

command -v nginx >/dev/null || die "setup: nginx is not installed (apt-get install nginx libnginx-mod-http-lua)"
[ -r /usr/lib/nginx/modules/ngx_http_lua_module.so ] || die "setup: libnginx-mod-http-lua is not installed"
make -s luajit >"$WORK/make.log" 2>&1 || { cat "$WORK/make.log"; die "setup: make luajit failed"; }

get() { curl -s --noproxy '*' --max-time "${2:-120}" "$1"; }

# --- 1. the emulator --------------------------------------------------------------------
start_emulator "$WORK/emulator.out" https --devices "$HERE/devices.lua" --dir "$WORK/emulator" --job-rate 10 \
  || { cat "$WORK/emulator.out"; die "setup: the emulator did not start"; }
EH=$EMU_HTTP_PORT ES=$EMU_HTTPS_PORT CS=$EMU_CONNECTION_STRING CA=$EMU_CA

# --- 2. the test nginx ------------------------------------------------------------------
N=$WORK/nginx
mkdir -p "$N/tmp" "$N/lua"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost" -keyout "$N/self.key" -out "$N/self.pem" >"$WORK/openssl.log" 2>&1 \
  || die "setup: openssl failed ($(cat "$WORK/openssl.log"))"
USER_LINE=""
if [ "$(id -u)" = 0 ]; then USER_LINE="user root;"; fi # workers must read this tree and $WORK
IPV6=false # the emulator listens on [::1] too when the loopback has IPv6
if grep -q 00000000000000000000000000000001 /proc/net/if_inet6 2>/dev/null; then IPV6=true; fi
health_ok() { [ "$(get "http://127.0.0.1:$TP/health" 2)" = ok ]; }
start_test_nginx() { # on free ports, with openresty_env.lua naming them
  TP=$(free_port) TS=$(free_port) CP=$(free_port)
  cat >"$N/lua/openresty_env.lua" <<EOF
-- Written by spec/openresty/run.sh for openresty_cases.lua.
return {
  cs = "$CS",
  http_endpoint = "http://127.0.0.1:$EH",
  https_endpoint = "https://localhost:$ES",
  https_ip_endpoint = "https://127.0.0.1:$ES",
  test_http = "http://127.0.0.1:$TP",
  test_tls = "https://localhost:$TS",
  closed_port = $CP,
  emulator_http_port = $EH,
  ipv6 = $IPV6,
}
EOF
  sed -e "s|@ROOT@|$ROOT|g" -e "s|@DIR@|$N|g" -e "s|@PORT@|$TP|g" -e "s|@TLS_PORT@|$TS|g" \
    -e "s|@CA@|$CA|g" -e "s|@USER@|$USER_LINE|g" "$HERE/nginx.conf.in" >"$N/nginx.conf"
  nginx -p "$N/" -c "$N/nginx.conf" -e "$N/error.log" &
  NGINX_PID=$!
  wait_until "$NGINX_PID" 100 0.05 health_ok
}
start_with_retries NGINX_PID start_test_nginx \
  || { cat "$N/error.log" 2>/dev/null; die "setup: the test nginx did not start"; }
T=http://127.0.0.1:$TP

run_case() { # case [scheme]
  local out
  out=$(get "$T/t/$1${2:+?scheme=$2}") || out="FAIL $1[${2:-http}]: no answer from the test nginx (curl exit $?)"
  record <<<"${out:-FAIL $1[${2:-http}]: empty answer}"
}

echo "== JobClient and Registry through cosockets (emulator: http :$EH, https :$ES)"
for scheme in http https; do
  for c in jobs_method jobs_twin jobs_get_cancel jobs_query registry keepalive; do run_case "$c" "$scheme"; done
done

echo "== transport errors and nginx phases"
run_case transport_errors
get "$T/probe/log" >/dev/null # its log_by_lua handler records the phase error
run_case phases

echo "== responsiveness: /health while 50 monitors and a slow hub answer are in flight"
run_case load_start https
status=""
for _ in $(seq 1 200); do
  status=$(get "$T/t/load_status" 5)
  case $status in *"monitors=50 slow=1"*) break ;; esac
  sleep 0.05
done
samples=()
for _ in $(seq 1 "$HEALTH_SAMPLES"); do
  samples+=("$(curl -s -o /dev/null --noproxy '*' --max-time 5 -w '%{time_total}' "$T/health")")
  sleep 0.05
done
status_after=$(get "$T/t/load_status" 5)
stats=$(printf '%s\n' "${samples[@]}" | sort -n | awk -v n="$HEALTH_SAMPLES" '
  { v[NR] = $1 * 1000 } END { printf "%.1f %.1f %.1f", v[int((n + 1) / 2)], v[int(n * 0.95 + 0.5)], v[n] }')
read -r median p95 max <<<"$stats"
mkdir -p "$ARTIFACTS"
printf 'health latency (ms) with 50 monitors + a slow hub answer in flight: median %s p95 %s max %s (%s samples: %s)\n' \
  "$median" "$p95" "$max" "$HEALTH_SAMPLES" "${samples[*]}" >"$ARTIFACTS/openresty-health-latency.txt"
in_flight="before: ${status#PASS load_status\[http\]: }; after: ${status_after#PASS load_status\[http\]: }"
if [[ $status != *"monitors=50 slow=1"* || $status_after != *"monitors=50 slow=1"* ]]; then
  fail "health_latency: the load was not in flight for the whole measurement ($in_flight)"
elif awk -v m="$max" -v l="$HEALTH_LIMIT_MS" 'BEGIN { exit !(m < l) }'; then
  pass "health_latency: $HEALTH_SAMPLES /health requests, median $median ms, p95 $p95 ms, max $max ms (< $HEALTH_LIMIT_MS ms) with 50 monitors and a slow method call in flight ($in_flight)"
else
  fail "health_latency: max $max ms >= $HEALTH_LIMIT_MS ms (median $median, p95 $p95; $in_flight)"
fi
run_case load_result

# Control: the same probe must notice a worker that really blocks.
get "$T/t/block_start" >/dev/null
control_max=$(for _ in $(seq 1 20); do
  curl -s -o /dev/null --noproxy '*' --max-time 5 -w '%{time_total}\n' "$T/health"
  sleep 0.05
done | sort -n | tail -1 | awk '{ printf "%.1f", $1 * 1000 }')
if awk -v m="$control_max" -v l="$HEALTH_LIMIT_MS" 'BEGIN { exit !(m >= l) }'; then
  pass "health_latency control: with a timer blocking the worker for 400 ms the probe saw $control_max ms"
else
  fail "health_latency control: a blocked worker went unnoticed (max $control_max ms)"
fi
run_case no_libcurl

if grep -E '\[(error|crit|alert|emerg)\]' "$N/error.log" | grep -v 'openresty_cases' >"$WORK/nginx-errors.txt"; then
  fail "test nginx error.log has errors: $(head -3 "$WORK/nginx-errors.txt" | tr '\n' ' ')"
else
  pass "test nginx error.log has no errors"
fi
stop_pid "$NGINX_PID"; NGINX_PID=""

# --- 3. the dashboard in headless Chromium -----------------------------------------------
if [ "${OPENRESTY_BROWSER:-1}" = 0 ]; then
  echo "== browser test skipped (OPENRESTY_BROWSER=0)"
else
  echo "== dashboard in headless Chromium"
  if [ ! -d "$HERE/node_modules/playwright-core" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund) >"$WORK/npm.log" 2>&1 \
      || { cat "$WORK/npm.log"; die "setup: npm ci in spec/openresty failed"; }
  fi
  [ -x "${CHROMIUM:-/usr/bin/chromium}" ] || die "setup: chromium is not installed (apt-get install chromium)"
  DASH_DIR=$WORK/dashboard
  start_dashboard() { # the example's one documented command, on a free port
    local port
    port=$(free_port)
    examples/openresty-dashboard/run.sh --port "$port" --dir "$DASH_DIR" >"$WORK/dashboard.out" 2>&1 &
    DASH_PID=$!
    wait_until "$DASH_PID" 200 0.1 grep -qs '^dashboard http' "$WORK/dashboard.out"
  }
  if ! start_with_retries DASH_PID start_dashboard; then
    fail "dashboard: run.sh did not start ($(tail -3 "$WORK/dashboard.out" | tr '\n' ' '))"
  else
    pass "dashboard: one command started the emulator and nginx ($(grep '^dashboard http' "$WORK/dashboard.out"))"
    URL=$(sed -n 's/^dashboard //p' "$WORK/dashboard.out" | head -1)
    record < <(node "$HERE/browser.mjs" "$URL" "$ARTIFACTS/openresty-dashboard.png" 2>&1)
    kill -TERM "$DASH_PID" 2>/dev/null
    rc=0
    wait "$DASH_PID" || rc=$?
    DASH_PID=""
    # run.sh must have stopped both of its nginx instances (dashboard and emulator).
    if [ "$rc" = 0 ] && ! pgrep -f "nginx.*$DASH_DIR" >/dev/null; then
      pass "dashboard: SIGTERM stopped the dashboard nginx and the emulator (exit 0)"
    else
      fail "dashboard: after SIGTERM run.sh exited $rc; left running: $(pgrep -af "nginx.*$DASH_DIR" | tr '\n' ' ')"
    fi
    if grep -E '\[(error|crit|alert|emerg)\]' "$DASH_DIR/logs/error.log" >"$WORK/dash-errors.txt" 2>/dev/null; then
      fail "dashboard error.log has errors: $(head -3 "$WORK/dash-errors.txt" | tr '\n' ' ')"
    fi
  fi
fi

summary
[ "$failed" = 0 ]
