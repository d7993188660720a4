// Package e2e holds vunet's end-to-end tests: a real Linux guest (the
// internal/qemutest kernel + busybox initramfs) boots under QEMU TCG,
// attaches to the real bin/vunet over vhost-user and exercises DHCP, DNS,
// NAT (TCP, UDP, ICMP, IPv4 and IPv6) and inbound forwards against servers
// the test runs on loopback. See docs/testing.md.
//
// The test binary re-executes itself in a private network namespace
// (vunettest.IsolateNetwork), so guest traffic can only reach this
// namespace's loopback. Everything is skipped under -short.
package e2e

import (
	"flag"
	"os"
	"testing"

	"github.com/vunet/vunet/internal/vunettest"
)

// isolated is true when the tests run inside their own network namespace.
var isolated bool

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Short() {
		// Re-executes this binary under `unshare --net` and exits with its
		// status; returns only inside the namespace (or without root).
		isolated = vunettest.IsolateNetwork()
	}
	os.Exit(m.Run())
}
