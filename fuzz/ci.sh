#!/usr/bin/env bash
# The fuzz suite for .ci/test (run_suite), ending with "fuzz: N passed, N failed":
#   fuzz/ci.sh fuzz       make fuzz with FUZZ_SECONDS (default 15) per target, two at a time
# (make asan and make valgrind run busted; .ci/test reads their counts through
# spec/support/counting_output.lua.)
set -uo pipefail
cd "$(dirname "$0")/.."
suite=${1:?usage: fuzz/ci.sh fuzz}
case "$suite" in
  fuzz)
    exec make -s fuzz FUZZ_SECONDS="${FUZZ_SECONDS:-15}" FUZZ_JOBS="${FUZZ_JOBS:-2}" ;;
  *) echo "fuzz/ci.sh: unknown suite '$suite'" >&2; exit 2 ;;
esac
