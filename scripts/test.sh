#!/usr/bin/env bash
# Sets up everything the tests need (idempotent), runs the whole suite, and closes with the line
# "N passed, N failed". Extra arguments go to `deno test` (e.g. a file or --filter NAME).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-test-tools --quiet || { echo "0 passed, 1 failed"; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
NO_COLOR=1 .tools/bin/deno task test "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

summary=$(grep -E '^(ok|FAILED) \| [0-9]+ passed' "$log" | tail -1)
passed=$(sed -E 's/.*\| ([0-9]+) passed.*/\1/' <<<"$summary")
failed=$(sed -E 's/.*\| ([0-9]+) failed.*/\1/' <<<"$summary")
if [ -z "$summary" ]; then
  # The runner died before its summary (type error, crash): count it as one failure.
  passed=0
  failed=1
fi
[ "$rc" -ne 0 ] && [ "$failed" = 0 ] && failed=1
echo "$passed passed, $failed failed"
exit "$rc"
