#!/usr/bin/env bash
# CI suites for .ci/test (run_suite): each ends with "<suite>: N passed, N failed".
#   fuzz/ci.sh asan       make asan: busted's counts; a sanitizer report counts as a failure
#   fuzz/ci.sh valgrind   make valgrind: likewise for memcheck errors and leaks
#   fuzz/ci.sh fuzz       make fuzz with FUZZ_SECONDS (default 15) per target, two at a time
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: fuzz/ci.sh asan|valgrind|fuzz}
case "$suite" in
  fuzz)
    exec make -s fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-15}" FUZZ_JOBS="${FUZZ_JOBS:-2}" ;;
  asan|valgrind)
    out=$(mktemp)
    make -s "$suite" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '[0-9]+ successes? / [0-9]+ failures? / [0-9]+ errors?' "$out" | tail -1)
    rm -f "$out"
    s=$(echo "$line" | sed -nE 's/^([0-9]+) success.*/\1/p')
    f=$(echo "$line" | sed -nE 's/.* ([0-9]+) failures? .*/\1/p')
    e=$(echo "$line" | sed -nE 's/.* ([0-9]+) errors?.*/\1/p')
    failed=$(( ${f:-0} + ${e:-0} ))
    # a sanitizer or memcheck report (or a crash before busted's summary) fails the run
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
    echo "$suite: ${s:-0} passed, $failed failed"
    exit "$rc" ;;
  *) echo "fuzz/ci.sh: unknown suite '$suite'" >&2; exit 2 ;;
esac
