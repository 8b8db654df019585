#!/usr/bin/env bash
# Runs fuzz targets (built by `make fuzz-build` as build/fuzz/fuzz-<name>) for FUZZ_SECONDS each,
# FUZZ_JOBS at a time, and fails on any crash, leak, timeout or out-of-memory. Seeds come from
# fuzz/corpus/<name>/ (never written); inputs that found new coverage go to
# $FUZZ_OUT/corpus/<name>/, crash inputs to $FUZZ_OUT/artifacts/<name>/, logs to
# $FUZZ_OUT/logs/<name>.log (FUZZ_OUT defaults to build/fuzz). A target file may add libFuzzer
# options on a line "-- libfuzzer: -max_len=9000 -dict=fuzz/dict/x.dict".
# Ends with "fuzz: N passed, N failed".
# Usage: FUZZ_SECONDS=20 FUZZ_JOBS=2 [FUZZ_NICE=19] [FUZZ_OUT=dir] bash fuzz/run.sh [name...]
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-20}
JOBS=${FUZZ_JOBS:-1}
NICE=${FUZZ_NICE:-0}
OUT=${FUZZ_OUT:-build/fuzz}
if [ "$#" -eq 0 ]; then
  set -- $(ls fuzz/targets/*.lua | sed -E 's#.*/([^/]+)\.lua$#\1#')
fi
mkdir -p "$OUT/logs"

run_one() { # NAME: runs one target, writes $OUT/logs/NAME.result
  local t=$1 bin=build/fuzz/fuzz-$1 log=$OUT/logs/$1.log opts=() extra rc
  local result=$OUT/logs/$t.result
  mkdir -p "$OUT/corpus/$t" "$OUT/artifacts/$t"
  if [ ! -x "$bin" ]; then echo "fuzz $t: FAILED: $bin is not built (make fuzz-build)" >"$result"; return; fi
  extra=$(sed -nE 's/^-- libfuzzer:[[:space:]]*//p' "fuzz/targets/$t.lua")
  # shellcheck disable=SC2206
  opts+=($extra)
  local seeds=()
  [ -d "fuzz/corpus/$t" ] && seeds+=("fuzz/corpus/$t")
  nice -n "$NICE" "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t/" "${opts[@]}" \
    "$OUT/corpus/$t" "${seeds[@]}" >"$log" 2>&1
  rc=$?
  local execs secs corpus
  execs=$(sed -nE 's/^stat::number_of_executed_units:[[:space:]]*([0-9]+).*/\1/p' "$log" | tail -1)
  secs=$(sed -nE 's/^Done [0-9]+ runs in ([0-9]+) second.*/\1/p' "$log" | tail -1)
  corpus=$(ls "$OUT/corpus/$t" | wc -l)
  if [ "$rc" -eq 0 ]; then
    secs=${secs:-$SECONDS_EACH}
    echo "fuzz $t: ok, ${execs:-0} executions in ${secs} s ($(( ${execs:-0} / (secs > 0 ? secs : 1) ))/s), corpus $corpus" >"$result"
  else
    local why
    why=$(grep -m1 -E 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|runtime error:|^fuzz target' "$log")
    {
      echo "fuzz $t: FAILED (exit $rc) after ${execs:-?} executions: ${why:-see $log}"
      echo "  input: $(ls -t "$OUT/artifacts/$t" | head -1 | sed "s#^#$OUT/artifacts/$t/#")"
      echo "  log:   $log"
    } >"$result"
  fi
}

running=0
for t in "$@"; do
  run_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait

passed=0; failed=0
for t in "$@"; do
  cat "$OUT/logs/$t.result"
  if grep -q "^fuzz $t: ok" "$OUT/logs/$t.result"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
