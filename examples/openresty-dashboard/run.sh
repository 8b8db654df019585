#!/usr/bin/env bash
# Starts the live jobs dashboard against the local IoT Hub emulator, in the foreground:
#
#   examples/openresty-dashboard/run.sh            # then open the printed URL
#
# It starts bin/iothub-emulator (examples/devices.lua, HTTPS on random loopback ports) and
# an nginx running this directory's nginx.conf.in, prints "dashboard http://127.0.0.1:PORT/",
# and runs until Ctrl-C or SIGTERM, which stop both. Options:
#   --port N        dashboard port on 127.0.0.1 (default 8090)
#   --devices FILE  the emulator's devices file (default examples/devices.lua)
#   --http          talk to the emulator over plain HTTP instead of HTTPS
#   --dir DIR       keep nginx.conf, logs and the emulator state in DIR (default: a temp
#                   dir removed on exit)
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=examples/lib/emulator.sh
. "$HERE/../lib/emulator.sh"
PORT=8090
DEVICES=$ROOT/examples/devices.lua
SCHEME=https
DIR=""
NGINX=${NGINX:-nginx}

die() { echo "openresty-dashboard: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    --port) [ $# -ge 2 ] || die "--port needs a value"; PORT=$2; shift 2 ;;
    --devices) [ $# -ge 2 ] || die "--devices needs a value"; DEVICES=$2; shift 2 ;;
    --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --http) SCHEME=http; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case $PORT in ''|*[!0-9]*) die "bad --port '$PORT'" ;; esac
[ -r "$DEVICES" ] || die "devices file '$DEVICES' not found"
command -v "$NGINX" >/dev/null || die "nginx not found (apt-get install nginx libnginx-mod-http-lua)"
if [ ! -r "$ROOT/build/luajit/iothub/core.so" ]; then
  make -s -C "$ROOT" luajit >&2 || die "could not build build/luajit/iothub/core.so"
fi

CLEANUP_DIR=0
if [ -z "$DIR" ]; then
  DIR=$(mktemp -d "${TMPDIR:-/tmp}/iothub-dashboard.XXXXXX")
  CLEANUP_DIR=1
fi
mkdir -p "$DIR/logs" "$DIR/tmp"
DIR=$(readlink -f "$DIR")

EMU_PID="" NGINX_PID="" TAIL_PID="" STOPPING=0
stop() {
  STOPPING=1
  for pid in $NGINX_PID $EMU_PID; do kill -TERM "$pid" 2>/dev/null || true; done
}
finish() {
  set +e
  stop
  for pid in $NGINX_PID $EMU_PID; do wait "$pid" 2>/dev/null; done
  if [ -n "$TAIL_PID" ]; then kill "$TAIL_PID" 2>/dev/null; wait "$TAIL_PID" 2>/dev/null; fi
  if [ "$CLEANUP_DIR" = 1 ]; then rm -rf "$DIR"; fi
}
trap finish EXIT
trap 'exit 130' INT TERM # while starting up; once running, `stop` ends the loop below

EMU_LOG=$DIR/logs/emulator.out
start_emulator "$EMU_LOG" "$SCHEME" --devices "$DEVICES" --dir "$DIR/emulator" \
  || { cat "$EMU_LOG" >&2; die "the emulator did not start"; }

IOTHUB_CONNECTION_STRING=$EMU_CONNECTION_STRING
if [ "$SCHEME" = https ]; then
  IOTHUB_ENDPOINT=$EMU_HTTPS_ENDPOINT
  TRUST="lua_ssl_trusted_certificate $EMU_CA;"
else
  IOTHUB_ENDPOINT=$EMU_HTTP_ENDPOINT
  TRUST=""
fi
export IOTHUB_CONNECTION_STRING IOTHUB_ENDPOINT

USER_LINE=""
if [ "$(id -u)" = 0 ]; then USER_LINE="user root;"; fi # workers must read this tree and DIR
sed -e "s|@ROOT@|$ROOT|g" -e "s|@HERE@|$HERE|g" -e "s|@DIR@|$DIR|g" -e "s|@PORT@|$PORT|g" \
  -e "s|@TRUST@|$TRUST|g" -e "s|@USER@|$USER_LINE|g" "$HERE/nginx.conf.in" >"$DIR/nginx.conf"

"$NGINX" -p "$DIR/" -c "$DIR/nginx.conf" -e "$DIR/logs/error.log" &
NGINX_PID=$!
if ! wait_until "$NGINX_PID" 100 0.1 port_open "$PORT"; then
  cat "$DIR/logs/error.log" >&2 2>/dev/null || true
  CLEANUP_DIR=0
  die "nginx did not start on 127.0.0.1:$PORT (is the port taken? try --port); logs in $DIR"
fi

trap stop INT TERM
echo "emulator $IOTHUB_ENDPOINT (output in $EMU_LOG)"
echo "dashboard http://127.0.0.1:$PORT/"
# Simulated device output and hub events from here on.
tail -n 0 -F "$EMU_LOG" 2>/dev/null &
TAIL_PID=$!

while [ "$STOPPING" = 0 ] && kill -0 "$NGINX_PID" 2>/dev/null && kill -0 "$EMU_PID" 2>/dev/null; do
  sleep 0.5 &
  wait $! || true
done
if [ "$STOPPING" = 0 ]; then
  echo "openresty-dashboard: $(kill -0 "$NGINX_PID" 2>/dev/null && echo the emulator || echo nginx) exited unexpectedly" >&2
  CLEANUP_DIR=0
  exit 1
fi
exit 0
