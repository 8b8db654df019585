# shellcheck shell=bash
# Shell helpers for scripts that run the local IoT Hub emulator (bin/iothub-emulator) and
# other servers in the background on random loopback ports. Source it (bash, fine under
# `set -euo pipefail`); examples/openresty-dashboard/run.sh and spec/openresty/run.sh do:
#
#   . "$ROOT/examples/lib/emulator.sh"
#   start_emulator LOG https --devices FILE --dir DIR || die "..."   # or http: no HTTPS port
#   echo "$EMU_CONNECTION_STRING $EMU_HTTPS_ENDPOINT $EMU_CA"; stop_pid "$EMU_PID"
#
# It lives with the examples so that a copy of them (the rockspec's copy_directories) keeps it.
# EMULATOR_LAUNCHER names another launcher (default: this checkout's bin/iothub-emulator).

EMULATOR_LAUNCHER=${EMULATOR_LAUNCHER:-$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)/bin/iothub-emulator}

port_open() { # PORT: something accepts connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() { # prints a loopback port nobody listens on (another process may still take it)
  local p
  for _ in $(seq 1 100); do
    p=$(( (RANDOM % 30000) + 20000 ))
    if ! port_open "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

# wait_until PID TRIES STEP COMMAND...: runs COMMAND every STEP seconds until it succeeds (0);
# 1 as soon as PID has exited, or when COMMAND still fails after TRIES tries.
wait_until() {
  local pid=$1 tries=$2 step=$3
  shift 3
  for _ in $(seq 1 "$tries"); do
    "$@" && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep "$step"
  done
  "$@"
}

stop_pid() { # PID: TERM, then wait (for this shell's own children only); nothing when empty
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# start_with_retries PID_VAR COMMAND...: runs COMMAND, which starts a background process on
# random ports, stores its pid in the variable PID_VAR and succeeds once it is ready; after a
# failure (say a port taken meanwhile) stops that process and tries again, 3 times at most.
start_with_retries() {
  local pid_var=$1
  shift
  for _ in 1 2 3; do
    "$@" && return 0
    stop_pid "${!pid_var}"
    printf -v "$pid_var" '%s' ""
  done
  return 1
}

first_capture() { # FILE BRE: the \(group\) of the first line of FILE matching BRE (no '/')
  sed -n "/$2/{s/$2/\1/p;q}" "$1"
}

start_emulator_once() { # LOG SCHEME [launcher options...]
  local log=$1 scheme=$2
  shift 2
  EMU_HTTP_PORT=$(free_port)
  EMU_HTTPS_PORT=0
  if [ "$scheme" = https ]; then EMU_HTTPS_PORT=$(free_port); fi
  "$EMULATOR_LAUNCHER" --http-port "$EMU_HTTP_PORT" --https-port "$EMU_HTTPS_PORT" "$@" >"$log" 2>&1 &
  EMU_PID=$!
  wait_until "$EMU_PID" 150 0.1 grep -qs '^ready' "$log"
}

# start_emulator LOG https|http [launcher options...]: starts the emulator in the background
# on free loopback ports (HTTPS too unless http), its output in LOG, and waits until it is
# ready. Sets EMU_PID, EMU_HTTP_PORT, EMU_HTTPS_PORT (0 with http), EMU_CONNECTION_STRING,
# EMU_HTTP_ENDPOINT, and with https EMU_HTTPS_ENDPOINT and EMU_CA (the CA file to trust).
# 1 when it did not start (LOG says why).
# shellcheck disable=SC2034 # the EMU_* variables are this function's output
start_emulator() {
  EMU_PID=""
  start_with_retries EMU_PID start_emulator_once "$@" || return 1
  EMU_CONNECTION_STRING=$(first_capture "$1" '^IOTHUB_CONNECTION_STRING=\(.*\)$')
  EMU_HTTP_ENDPOINT=$(first_capture "$1" '^endpoint \(http:.*\)$')
  EMU_HTTPS_ENDPOINT=$(first_capture "$1" '^endpoint \(https:.*\)$')
  EMU_CA=$(first_capture "$1" '^ca \(.*\)$')
}
