#!/usr/bin/env bash
# The main job: start the local emulator with the tutorial's devices, run the tutorial's flow
# (examples/schedule_jobs.lua) against it, then stop the emulator. Exit status is the example's.
set -euo pipefail
cd "$(dirname "$0")/.."
LUA=${LUA:-lua5.4}
log=$(mktemp)
port() { echo $(( (RANDOM % 20000) + 30000 )); }
HTTP_PORT=${HTTP_PORT:-$(port)}
bin/iothub-emulator --devices examples/devices.lua --http-port "$HTTP_PORT" --https-port 0 >"$log" 2>&1 &
emulator=$!
# SIGTERM, not SIGINT: a background job in a non-interactive shell ignores SIGINT.
stop() {
  kill -TERM "$emulator" 2>/dev/null || true
  wait "$emulator" 2>/dev/null || true
  echo "--- emulator (device side) ---"
  grep -E '^\[' "$log" || true
  rm -f "$log"
}
trap stop EXIT
for _ in $(seq 1 100); do
  grep -q '^ready' "$log" && break
  kill -0 "$emulator" 2>/dev/null || { cat "$log"; echo "emulator failed to start" >&2; exit 1; }
  sleep 0.1
done
grep -q '^ready' "$log" || { cat "$log"; echo "emulator did not become ready" >&2; exit 1; }
IOTHUB_CONNECTION_STRING=$(sed -n 's/^IOTHUB_CONNECTION_STRING=//p' "$log" | head -1)
IOTHUB_ENDPOINT=$(sed -n 's/^endpoint \(http:.*\)$/\1/p' "$log" | head -1)
export IOTHUB_CONNECTION_STRING IOTHUB_ENDPOINT
echo "emulator at $IOTHUB_ENDPOINT"
LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/5.4/?.so;;" "$LUA" examples/schedule_jobs.lua
