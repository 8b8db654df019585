#!/usr/bin/env bash
# Proof with a real client: starts the emulator on https://localhost:443 (the only port the
# azure-iothub npm package can use), trusts its CA through NODE_EXTRA_CA_CERTS, runs
# proof.js against it, stops the emulator and exits with proof.js's status.
# Needs `npm ci` in spec/npm (bash .ci/setup does it). Without the right to bind port 443
# it prints "proof: SKIP ..." and exits 0.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# port_open, free_port, wait_until, first_capture
. "$ROOT/examples/lib/emulator.sh"

say() { echo "[npm-proof] $*"; }
die() { echo "[npm-proof] error: $*" >&2; exit 1; }

# Port 443 is privileged unless the kernel lowered the limit.
unprivileged_from=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)
if [ "$(id -u)" != 0 ] && [ "$unprivileged_from" -gt 443 ]; then
  echo "proof: SKIP (azure-iothub always connects to port 443, which only root may bind here; CI runs as root)"
  exit 0
fi

command -v node >/dev/null || die "node not found: run 'sudo bash .ci/setup' (installs nodejs and npm, then npm ci)"
[ -r "$HERE/node_modules/azure-iothub/package.json" ] ||
  die "azure-iothub is not installed: run 'bash .ci/setup' or 'npm ci' in spec/npm"

# One proof at a time per machine: they all need port 443.
if command -v flock >/dev/null && { exec 9>>"${TMPDIR:-/tmp}/iothub-npm-proof-443.lock"; } 2>/dev/null; then
  flock -w 300 9 || die "another npm proof has held port 443 for 5 minutes"
fi

if port_open 443; then
  die "something already listens on 127.0.0.1:443; stop it first (the package cannot use another port)"
fi
http_port=$(free_port) || die "no free port found for the emulator's plain-HTTP listener"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/npm-proof.XXXXXX")
EMU_OUT=$WORK/emulator.out
EMU_PID=""

stop_emulator() {
  [ -n "$EMU_PID" ] || return 0
  if kill -0 "$EMU_PID" 2>/dev/null; then
    kill -TERM "$EMU_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$EMU_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$EMU_PID" 2>/dev/null; then
      say "the emulator did not stop on SIGTERM; killing it"
      kill -KILL "$EMU_PID" 2>/dev/null
    fi
  fi
  wait "$EMU_PID" 2>/dev/null
  # nginx normally exits with the launcher; make sure our own instance is gone.
  local nginx_pid
  nginx_pid=$(cat "$WORK/hub/nginx.pid" 2>/dev/null || true)
  if [ -n "$nginx_pid" ] && kill -0 "$nginx_pid" 2>/dev/null; then kill -TERM "$nginx_pid" 2>/dev/null; fi
  EMU_PID=""
}
cleanup() {
  stop_emulator
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

say "starting bin/iothub-emulator on https://localhost:443 (http port $http_port)"
"$ROOT/bin/iothub-emulator" --https-port 443 --http-port "$http_port" \
  --devices "$ROOT/examples/devices.lua" --dir "$WORK/hub" >"$EMU_OUT" 2>&1 9>&- &
EMU_PID=$!

if ! wait_until "$EMU_PID" 600 0.1 grep -qsx ready "$EMU_OUT"; then
  sed 's/^/  | /' "$EMU_OUT" >&2
  tail -n 20 "$WORK/hub/logs/error.log" 2>/dev/null | sed 's/^/  | /' >&2
  die "the emulator did not print 'ready' within 60 s"
fi

cs=$(first_capture "$EMU_OUT" '^IOTHUB_CONNECTION_STRING=\(.*\)$')
ca=$(first_capture "$EMU_OUT" '^ca \(.*\)$')
[ -n "$cs" ] && [ -r "$ca" ] || die "the emulator printed no connection string or CA file"
case $cs in *HostName=localhost\;*) ;; *) die "expected HostName=localhost in the connection string" ;; esac

# nginx listens on 127.0.0.1, and on [::1] when the machine has IPv6 loopback (the
# launcher's own check). Node resolves "localhost" in the system's order, which may put
# ::1 first even where nothing can listen on it; then prefer IPv4.
node_options=${NODE_OPTIONS:-}
if ! grep -q 00000000000000000000000000000001 /proc/net/if_inet6 2>/dev/null; then
  node_options="$node_options --dns-result-order=ipv4first"
fi

say "running proof.js (CA $ca)"
NODE_EXTRA_CA_CERTS=$ca IOTHUB_CONNECTION_STRING=$cs NODE_OPTIONS=$node_options \
  node "$HERE/proof.js" 9>&-
rc=$?

stop_emulator
# Show what the simulated devices and the hub logged: the method job's "[myDeviceId] ..." lines.
say "emulator output:"
grep -v '^IOTHUB_CONNECTION_STRING=' "$EMU_OUT" | sed 's/^/  | /'
if [ "$rc" != 0 ]; then
  say "last lines of the emulator's error log:"
  tail -n 30 "$WORK/hub/logs/error.log" 2>/dev/null | sed 's/^/  | /'
fi
exit "$rc"
