#!/usr/bin/env bash
# `make demo`: boot the test guest under QEMU (TCG) against vunet and show
# what it achieves. On a fresh Debian 12 machine, as root:
#   1. installs the packages it needs (scripts/install-deps.sh),
#   2. builds bin/vunet (if missing or stale) and the guest (scripts/build-guest.sh),
#   3. builds the demo driver (e2e/cmd/demo) into build/demo,
#   4. runs it in a private network namespace (unshare --net): it starts an
#      HTTP server and a DNS server on loopback, runs vunet with a forward,
#      boots the guest, reports progress and prints a table of results.
# Exits 0 only if every row of the table passed.
#
# Needs Go (see go.mod) in PATH. Without root, step 1 is skipped (the
# packages must already be installed) and a user namespace maps us to root
# inside the network namespace. Extra arguments go to the demo driver
# (e.g. -v to print the guest console and the vunet log).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
t0=$(date +%s)
say() { printf '==> [%3ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
die() {
	echo "demo: $*" >&2
	exit 1
}

command -v go >/dev/null || die "Go is not in PATH (vunet needs the Go version in go.mod; see https://go.dev/dl)"

if [ "$(id -u)" = 0 ]; then
	say "installing dependencies (scripts/install-deps.sh)"
	./scripts/install-deps.sh
	unshare=(unshare --net)
else
	say "not root: skipping scripts/install-deps.sh"
	command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing; run scripts/install-deps.sh as root"
	unshare=(unshare --user --map-root-user --net)
fi

# `make demo` has just built bin/vunet; when run directly, build it if any
# Go file is newer.
if [ ! -x bin/vunet ] || [ -n "$(find . -name '*.go' -newer bin/vunet -not -path './e2e/*' -print -quit)" ]; then
	say "building bin/vunet"
	make -s build
fi

say "building the guest (scripts/build-guest.sh; cached after the first run)"
./scripts/build-guest.sh build/guest

say "building the demo driver (e2e/cmd/demo)"
go build -o build/demo ./e2e/cmd/demo

say "running the demo in a private network namespace"
"${unshare[@]}" -- build/demo -vunet bin/vunet "$@"
