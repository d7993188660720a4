package forward

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// kernelSim stands in for the kernel side of ping sockets, which
// net.ipv4.ping_group_range often forbids. Each simulated socket is a UDP
// socket connected to the simulator on 127.0.0.1; the simulator turns echo
// requests into replies and, like Linux, replaces the identifier. No packet
// leaves loopback.
type kernelSim struct {
	pc       *net.UDPConn
	requests atomic.Int64
	mu       sync.Mutex
	targets  map[netip.Addr]int
}

const simIdent = 0xbeef

func newKernelSim(t *testing.T) *kernelSim {
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	k := &kernelSim{pc: pc, targets: make(map[netip.Addr]int)}
	done := make(chan struct{})
	t.Cleanup(func() { _ = pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			msg := buf[:n]
			switch msg[0] {
			case 8:
				msg[0] = 0
			case 128:
				msg[0] = 129
			default:
				continue
			}
			k.requests.Add(1)
			binary.BigEndian.PutUint16(msg[4:6], simIdent)
			msg[2], msg[3] = 0xde, 0xad // the Forwarder must recompute it
			_, _ = pc.WriteToUDPAddrPort(msg, from)
		}
	}()
	return k
}

func (k *kernelSim) open(bool) (net.PacketConn, error) {
	c, err := net.DialUDP("udp4", nil, k.pc.LocalAddr().(*net.UDPAddr))
	if err != nil {
		return nil, err
	}
	return &simPing{UDPConn: c, k: k}, nil
}

func (k *kernelSim) count(a netip.Addr) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.targets[a]
}

// simPing is one simulated ping socket.
type simPing struct {
	*net.UDPConn
	k  *kernelSim
	to atomic.Pointer[net.UDPAddr]
}

func (p *simPing) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua := addr.(*net.UDPAddr)
	p.to.Store(ua)
	a, _ := netip.AddrFromSlice(ua.IP)
	p.k.mu.Lock()
	p.k.targets[a]++
	p.k.mu.Unlock()
	return p.UDPConn.Write(b)
}

func (p *simPing) ReadFrom(b []byte) (int, net.Addr, error) {
	n, err := p.UDPConn.Read(b)
	return n, p.to.Load(), err
}

func noPing(bool) (net.PacketConn, error) {
	return nil, &net.OpError{Op: "socket", Net: "ping4", Err: syscall.EACCES}
}

func ping(t *testing.T, e *env, dst netip.Addr, timeout time.Duration) (netip.Addr, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return netstacktest.Ping(ctx, e.p.Guest, dst, []byte("payload for "+dst.String()))
}

// TestPingLocalWithoutPingSockets: the stack's own addresses answer even
// when ping sockets are forbidden; other destinations get nothing (in
// particular not a fake reply from gVisor's IPv6 layer).
func TestPingLocalWithoutPingSockets(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.openPing = noPing })
	for _, dst := range []netip.Addr{gw4, gw6, netstacktest.DNS4, netstacktest.DNS6} {
		from, err := ping(t, e, dst, 5*time.Second)
		if err != nil || from != dst {
			t.Fatalf("ping %s: from %s, %v", dst, from, err)
		}
	}
	for _, dst := range []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")} {
		if from, err := ping(t, e, dst, 200*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("ping %s: got reply from %s (err %v), want none", dst, from, err)
		}
	}
	if s := e.f.Stats(); s.DropPingUnavailable.Load() != 2 || s.PingRequests.Load() != 0 {
		t.Errorf("stats %+v", s)
	}
}

func TestPingForwarded(t *testing.T) {
	k := newKernelSim(t)
	e := newEnv(t, func(o *Options) {
		o.openPing = k.open
		o.UDPIdleTimeout = 200 * time.Millisecond
	})
	for _, tc := range []struct{ dst, host string }{
		{"10.0.2.2", "127.0.0.1"},
		{"fd00::2", "::1"},
		{"192.0.2.1", "192.0.2.1"},
		{"2001:db8::1", "2001:db8::1"},
	} {
		dst := netip.MustParseAddr(tc.dst)
		for i := 0; i < 2; i++ {
			from, err := ping(t, e, dst, 5*time.Second)
			if err != nil || from != dst {
				t.Fatalf("ping %s: from %s, %v", dst, from, err)
			}
		}
		if n := k.count(netip.MustParseAddr(tc.host)); n != 2 {
			t.Errorf("ping %s: host target %s got %d requests", dst, tc.host, n)
		}
	}
	// DNS stays local.
	if _, err := ping(t, e, netstacktest.DNS4, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// The reply counter is bumped after the reply is handed to the guest,
	// so the guest can see the last reply before the counter moves.
	eventually(t, "ping counters to settle", func() bool {
		s := e.f.Stats()
		return s.PingRequests.Load() == 8 && s.PingReplies.Load() == 8 && k.requests.Load() == 8
	})
	eventually(t, "ping flows to expire", func() bool { return e.f.Stats().PingFlows.Load() == 0 })
}

// TestPingRealLoopback uses real ping sockets when this host permits them.
// pingNSEnv marks the re-executed test binary inside its own network
// namespace (TestPingRealLoopback).
const pingNSEnv = "VUNET_TEST_PING_NETNS"

// TestPingRealLoopback pings the gateway through real host ping sockets to
// loopback. Where ping sockets are forbidden (ping_group_range "1 0", the
// kernel default, forbids them to root too) and the test runs as root, it
// re-runs itself in a network namespace of its own with ping sockets
// allowed, so CI never skips it; only a non-root run without ping sockets
// skips, and with CI=true that is a failure.
func TestPingRealLoopback(t *testing.T) {
	if os.Getenv(pingNSEnv) == "1" {
		if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
			t.Fatalf("ip link set lo up: %v: %s", err, out)
		}
		if err := os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 2147483647"), 0o644); err != nil {
			t.Fatalf("allowing ping sockets in the test's namespace: %v", err)
		}
	}
	if c, err := openPingSocket(false); err != nil {
		if os.Getenv(pingNSEnv) == "" && os.Geteuid() == 0 {
			rerunInNetNS(t)
			return
		}
		if os.Getenv("CI") == "true" {
			t.Fatalf("ping sockets not permitted here (%v, ping_group_range %q) and not root: cannot test the real ping path", err, pingGroupRange())
		}
		t.Skipf("ping sockets not permitted here (%v, ping_group_range %q)", err, pingGroupRange())
	} else {
		_ = c.Close()
	}
	e := newEnv(t, nil)
	fams := families(t)
	for _, fam := range fams {
		from, err := ping(t, e, fam.gw, 5*time.Second)
		if err != nil || from != fam.gw {
			t.Fatalf("ping %s: from %s, %v", fam.gw, from, err)
		}
	}
	// The guest can have the reply before the relay has counted it.
	eventually(t, "PingReplies", func() bool { return e.f.Stats().PingReplies.Load() == uint64(len(fams)) })
}

// rerunInNetNS runs the calling test again in a fresh network namespace
// (unshare --net) and fails unless it ran and passed there.
func rerunInNetNS(t *testing.T) {
	t.Helper()
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Fatalf("root without unshare: %v", err)
	}
	cmd := exec.Command(unshare, "--net", "--", os.Args[0], "-test.run", "^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), pingNSEnv+"=1")
	out, err := cmd.CombinedOutput()
	t.Logf("in a new network namespace:\n%s", out)
	if err != nil || !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("%s in its own network namespace: %v", t.Name(), err)
	}
}
