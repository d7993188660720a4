// Package perf compares the whole-system TCP throughput of vunet with passt
// and gvproxy: the same test guest (internal/qemutest, QEMU TCG) runs iperf3
// against a server on the host's loopback through each backend in turn, in
// one invocation, and the test prints a table with the rates, the ratios and
// the CPU time each backend process spent per GB moved.
//
// It is a measurement, not a test: it only runs with VUNET_PERF=1, so `make
// test` skips it. See docs/performance.md for the command, the knobs
// (VUNET_PERF_* environment variables) and the numbers.
//
// Like the e2e suite it re-executes itself in a private network namespace
// (vunettest.IsolateNetwork), so the guests reach nothing but the iperf3
// servers on that namespace's loopback. passt copies its guest addressing
// from a host interface with a default route, so inside the namespace the
// test adds a veth interface (192.0.2.1/24, default via 192.0.2.254) for it;
// that never touches the machine's own namespace.
package perf

import (
	"flag"
	"os"
	"testing"

	"github.com/vunet/vunet/internal/vunettest"
)

// enabledEnv must be "1" for anything here to run.
const enabledEnv = "VUNET_PERF"

// isolated is true when the test runs inside its own network namespace.
var isolated bool

func TestMain(m *testing.M) {
	if target := os.Getenv(scaleDialEnv); target != "" {
		// The dialer of TestConnScale, run inside the guest namespace.
		os.Exit(scaleDialer(target))
	}
	flag.Parse()
	if os.Getenv(enabledEnv) == "1" && !testing.Short() {
		// Re-executes this binary under `unshare --net` and exits with its
		// status; returns only inside the namespace (or without root).
		isolated = vunettest.IsolateNetwork()
	}
	os.Exit(m.Run())
}
