#!/usr/bin/env bash
# Runs every fuzz target in the module for a bounded time each: FUZZTIME (default 10s).
#
# A target that fails with only "context deadline exceeded" (no failing
# input written, no hung worker reported) is run once more: Go's fuzzing
# coordinator can report its own -fuzztime deadline as a failure when a
# worker is mid-input as time runs out (seen in CI on FuzzUpstreamAnswer,
# whose inputs go through real sockets). A second failure of any kind fails
# the run; a crash or hang never gets a second chance.
set -euo pipefail
t=${1:-10s}
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "== $pkg $f ($t)"
    if go test -run '^$' -fuzz "^$f\$" -fuzztime "$t" "$pkg" 2>&1 | tee "$log"; then
      continue
    fi
    if grep -q 'context deadline exceeded' "$log" && ! grep -q 'Failing input written\|hung or terminated' "$log"; then
      echo "== $pkg $f: the fuzzing coordinator timed out on its own deadline; running it once more"
      go test -run '^$' -fuzz "^$f\$" -fuzztime "$t" "$pkg"
      continue
    fi
    exit 1
  done
done
