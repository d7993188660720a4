#!/usr/bin/env bash
# Mutation testing of the packages that parse guest and frontend input and
# move packets: go-gremlins (fetched with go run) mutates each covered
# statement in turn (arithmetic, comparisons, negations, increments) and
# runs that package's tests; a mutant no test notices LIVES. Not part of
# make test: run it before resolving an issue that touches these packages,
# and look at the LIVED lines (docs/testing.md, "Mutation testing").
#
# Usage: scripts/mutate.sh [DIR...]   (default: every package under vhost,
#        endpoint, forward and services, helpers excluded)
# Env: MUTATE_WORKERS (default 1: the tests themselves use both cores),
#      MUTATE_TIMEOUT_COEFF (default 3: a test run may take 3 times as long
#      as the coverage run before it counts as hung), GREMLINS_VERSION.
# Writes build/mutate/DIR.log per directory and build/mutate/summary.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${GREMLINS_VERSION:-v0.6.0}
workers=${MUTATE_WORKERS:-1}
coeff=${MUTATE_TIMEOUT_COEFF:-3}
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(vhost vhost/iov vhost/memory vhost/protocol vhost/virtqueue endpoint forward
  services/dhcp4 services/dns services/ra services/tftp services/internal/gnet)
out=build/mutate
mkdir -p "$out"
# Test helpers (mock drivers, frontends, fake networks) are not under test.
helpers='(virtqueuetest|vhosttest|endpointtest|netstacktest|testnet)/'
summary=$out/summary.txt
: >"$summary"
for d in "${dirs[@]}"; do
  log=$out/$(echo "$d" | tr / _).log
  echo "== $d (log: $log)"
  # gremlins descends into subdirectories (paths relative to ./$d): the
  # ones run on their own are left out here, so that each package's
  # mutants run against its own tests and their timeouts scale with them.
  exclude=$helpers
  for o in "${dirs[@]}"; do
    case $o in "$d"/*) exclude="$exclude|^${o#"$d"/}/" ;; esac
  done
  [ "$d" = vhost ] && exclude="$exclude|^internal/"
  start=$(date +%s)
  go run "github.com/go-gremlins/gremlins/cmd/gremlins@$version" unleash \
    --workers "$workers" --timeout-coefficient "$coeff" -E "$exclude" "./$d" >"$log" 2>&1 || true
  took=$(( $(date +%s) - start ))
  counts=$(grep -E '^Killed: ' "$log" | tail -1)
  timeouts=$(grep -E '^Timed out: ' "$log" | tail -1)
  printf '%-10s %s; %s (%ds)\n' "$d" "${counts:-no result}" "${timeouts:-}" "$took" | tee -a "$summary"
  grep -E '^ +LIVED ' "$log" | sed "s|^ *|  $d: |" | tee -a "$summary" || true
done
echo "summary: $summary"
