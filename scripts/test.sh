#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, in two passes:
#   1. every test not marked `serial`, in parallel (pytest-xdist, $HARNESS_TEST_WORKERS workers, default 4:
#      the tests mostly wait on real processes, sleeps and load windows, not on the CPU);
#      Tests marked `slow` start first and are handed out one at a time, so no long test runs alone at the end.
#   2. the `serial` ones (they change what the whole machine sees: core_pattern, a system user; or they
#      assert what only an unshared CPU gives), alone.
# Both passes always run; the exit code is the first failing pass's. Arguments go to both passes
# (`bash scripts/test.sh -q`, `bash scripts/test.sh tests/test_x.py -m "not slow"`; `-n 0` runs pass 1
# in one process; pass 2 always does). For pytest exactly as given, run `.venv/bin/python -m pytest ...` directly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
workers=${HARNESS_TEST_WORKERS:-4}
# The suite starts hundreds of Python processes (every `python -m harness`, every xdist worker): let them
# keep compiled bytecode and pytest's rewritten test modules (__pycache__, ignored by git) rather than
# compile everything again each time.
unset PYTHONDONTWRITEBYTECODE

# pytest's exit code 5 means "no tests collected" (a selection with no serial test, say): not a failure
# unless neither pass found anything.
status=0
.venv/bin/python -m pytest -n "$workers" --maxschedchunk 1 "$@" --serial=skip || status=$?
serial_status=0
.venv/bin/python -m pytest "$@" -n 0 --serial=only || serial_status=$?
if [ "$status" = 5 ] && [ "$serial_status" = 5 ]; then exit 5; fi
[ "$status" = 5 ] && status=0
[ "$serial_status" = 5 ] && serial_status=0
if [ "$status" != 0 ]; then exit "$status"; fi
exit "$serial_status"
