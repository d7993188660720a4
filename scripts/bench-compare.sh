#!/usr/bin/env bash
# Compares vunet's whole-system TCP throughput with passt and gvproxy on the
# same test guest in one run (e2e/perf, TestCompare). See docs/performance.md.
#
# Usage: scripts/bench-compare.sh [go test flags...]
#
# Needs root (the test re-executes itself under `unshare --net`), QEMU, iperf3
# and the test guest (scripts/install-deps.sh), plus:
#   passt    Debian's package (apt-get install passt), or VUNET_PERF_PASST=PATH
#   passt-vhost  passt --vhost-user: VUNET_PERF_PASST_VHOST=PATH to a passt
#            you built yourself from its public source (plain `make`);
#            defaults to the passt binary. VUNET_PERF_PASST_REV names its
#            revision in the report. This repository neither contains nor
#            fetches or builds passt.
#   gvproxy  VUNET_PERF_GVPROXY=PATH to a gvproxy binary you built yourself
#            (gvisor-tap-vsock's cmd/gvproxy); this repository neither
#            contains nor fetches or builds it.
# A column that cannot run (a backend or frontend missing or failing to
# start) is reported as unavailable with the reason, one that fails later
# as failed, in the markdown and the JSON; the others still run. The run
# exits 0 as long as one comparison ran: non-zero only if a vunet column
# could not run or failed, if nothing was measured, or if no other
# backend's column was.
#
# Frontends: VUNET_PERF_FRONTENDS (default qemu) is a comma-separated subset
# of
#   qemu      the QEMU TCG guest (every backend; the throughput, latency
#             and counter tests)
#   testpmd   dpdk-testpmd (apt-get install dpdk, or VUNET_PERF_TESTPMD=PATH):
#             a virtio-user port on the backend's socket forwarding to a
#             tap in a namespace, no offloads negotiated; its csum engine
#             recomputes every checksum in software (passt leaves TCP
#             checksums out) and retries a full TX ring for up to 10 ms
#             (VUNET_PERF_TESTPMD_ARGS replaces testpmd's own arguments)
#   tapfront  e2e/tapfront: a tap with IFF_VNET_HDR/TUNSETOFFLOAD bridged to
#             the virtqueues, checksum and TSO both ways
# The two VM-less frontends measure throughput (VUNET_PERF_STREAMS, both
# ways) of the vhost-user backends (vunet, passt-vhost) with iperf3 in the
# namespace, interleaved with the QEMU columns, and each repetition also
# measures host loopback, reported as the ceiling ("of loopback"), e.g.
#   VUNET_PERF_FRONTENDS=qemu,testpmd,tapfront \
#     VUNET_PERF_BACKENDS=vunet,passt-vhost VUNET_PERF_PASST_VHOST=/path/to/passt \
#     scripts/bench-compare.sh
#
# vunet is built from this tree into build/perf/vunet (VUNET_PERF_VUNET=PATH
# overrides). Every VUNET_PERF_* variable of e2e/perf/compare_test.go passes
# through (VUNET_PERF_BACKENDS, _FRONTENDS, _REPS, _SECONDS, _STREAMS, _MEM,
# _SMP, _OUT, _PROFILE, _TESTPMD, _TESTPMD_ARGS), and the VUNET_PERF_SCALE_* ones of
# e2e/perf/scale_test.go. The markdown report is printed and written to
# build/perf/report.md unless VUNET_PERF_OUT says otherwise; every sample
# goes to build/perf/report.json (VUNET_PERF_JSON).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=$root/build/perf
mkdir -p "$out"

if [ -z "${VUNET_PERF_VUNET:-}" ]; then
	rev=$(git describe --always --dirty 2>/dev/null || echo dev)
	go build -trimpath -ldflags "-X github.com/vunet/vunet/internal/version.Version=$rev" -o "$out/vunet" ./cmd/vunet
	export VUNET_PERF_VUNET=$out/vunet
fi

if [ -z "${VUNET_PERF_GVPROXY:-}" ]; then
	echo "bench-compare: VUNET_PERF_GVPROXY is not set; gvproxy will be reported unavailable" >&2
fi

export VUNET_PERF=1
export VUNET_PERF_OUT=${VUNET_PERF_OUT:-$out/report.md}
export VUNET_PERF_JSON=${VUNET_PERF_JSON:-$out/report.json}
export VUNET_PERF_SCALE_OUT=${VUNET_PERF_SCALE_OUT:-$out/scale.md}
export VUNET_PERF_SCALE_JSON=${VUNET_PERF_SCALE_JSON:-$out/scale.json}
# TestConnScale (10 000 idle connections per backend through e2e/tapfront,
# about a minute) runs after the throughput comparison;
# VUNET_PERF_SCALE_CONNS=0 skips it, and `-run '^TestConnScale$'` runs it
# alone (a later -run wins).
exec go test -count=1 -timeout 90m -run '^(TestCompare|TestConnScale)$' -v "$@" ./e2e/perf/
