#!/usr/bin/env bash
# The main job: start the local emulator with the tutorial's devices, run the tutorial's flow
# (examples/schedule_jobs.lua) against it, then stop the emulator. Exit status is the example's.
set -euo pipefail
cd "$(dirname "$0")/.."
. examples/lib/emulator.sh
LUA=${LUA:-lua5.4}
log=$(mktemp)
stop() {
  stop_pid "${EMU_PID:-}"
  echo "--- emulator (device side) ---"
  grep -E '^\[' "$log" || true
  rm -f "$log"
}
trap stop EXIT
start_emulator "$log" http --devices examples/devices.lua || { cat "$log"; echo "the emulator did not start" >&2; exit 1; }
export IOTHUB_CONNECTION_STRING=$EMU_CONNECTION_STRING IOTHUB_ENDPOINT=$EMU_HTTP_ENDPOINT
echo "emulator at $IOTHUB_ENDPOINT"
LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build/5.4/?.so;;" "$LUA" examples/schedule_jobs.lua
