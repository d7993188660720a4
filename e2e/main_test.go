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
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/vunet/vunet/e2e/harness"
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
	if isolated {
		if err := allowPings(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
			os.Exit(1)
		}
	}
	os.Exit(m.Run())
}

// allowPings lets vunet relay guest pings through host ping sockets, as a
// host that permits them would (ping_group_range is per network namespace,
// so this changes nothing outside the test's own), and puts
// harness.HostPingAddr on the namespace's loopback: a non-gateway address
// the guest pings, which only a working ping-socket path can answer.
func allowPings() error {
	if err := os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 2147483647"), 0o644); err != nil {
		return fmt.Errorf("allowing ping sockets in the test namespace: %w", err)
	}
	if out, err := exec.Command("ip", "addr", "add", harness.HostPingAddr+"/32", "dev", "lo").CombinedOutput(); err != nil {
		return fmt.Errorf("ip addr add %s dev lo: %v: %s", harness.HostPingAddr, err, out)
	}
	return nil
}
