package soak

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// udpIdle is the appliance's UDP idle timeout in the soak (see TestChurn).
const udpIdle = 5 * time.Second

// defaultDuration is the churn's length unless VUNET_SOAK says otherwise
// (a Go duration; make test passes SOAK).
const defaultDuration = 5 * time.Minute

// Tolerances for "flat". Goroutines and fds must return to the warmed-up
// baseline almost exactly (a handful for timers and pooled conns); memory
// may settle a little higher (heap growth to a steady state), but not in
// proportion to the number of sessions.
const (
	slackGoroutines = 8
	slackFDs        = 4
	slackRSS        = 48 << 20
	slackHeap       = 24 << 20
)

// hostServers are the host side of the guest's connections, on 127.0.0.1
// (the guest reaches them as 10.0.2.2): a sink that sends n bytes of a
// known pattern, an echo server, a UDP echo. Every accepted conn is tracked
// so the test can reset the ones a vanished guest left behind, as a peer's
// timeout eventually would.
type hostServers struct {
	down, echo *net.TCPListener
	udp        *net.UDPConn
	mu         sync.Mutex
	conns      map[*net.TCPConn]struct{}
	wg         sync.WaitGroup
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>10)
	}
	return b
}

var blob = pattern(1 << 20)

func startHostServers(t *testing.T) *hostServers {
	h := &hostServers{conns: map[*net.TCPConn]struct{}{}}
	listen := func() *net.TCPListener {
		l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	h.down, h.echo = listen(), listen()
	var err error
	if h.udp, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	serve := func(l *net.TCPListener, handle func(c *net.TCPConn)) {
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			for {
				c, err := l.AcceptTCP()
				if err != nil {
					return
				}
				h.mu.Lock()
				h.conns[c] = struct{}{}
				h.mu.Unlock()
				h.wg.Add(1)
				go func() {
					defer h.wg.Done()
					defer func() {
						h.mu.Lock()
						delete(h.conns, c)
						h.mu.Unlock()
						c.Close()
					}()
					handle(c)
				}()
			}
		}()
	}
	// The download server: the guest sends the size it wants (decimal,
	// newline), gets that many bytes of the pattern (repeated), then EOF.
	serve(h.down, func(c *net.TCPConn) {
		line := make([]byte, 0, 16)
		b := make([]byte, 1)
		for len(line) < 16 {
			if _, err := c.Read(b); err != nil {
				return
			}
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
		}
		n, _ := strconv.Atoi(string(line))
		for n > 0 {
			k := min(n, len(blob))
			if _, err := c.Write(blob[:k]); err != nil {
				return
			}
			n -= k
		}
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	serve(h.echo, func(c *net.TCPConn) { io.Copy(c, c) })
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		b := make([]byte, 2048)
		for {
			n, from, err := h.udp.ReadFromUDPAddrPort(b)
			if err != nil {
				return
			}
			h.udp.WriteToUDPAddrPort(b[:n], from)
		}
	}()
	t.Cleanup(func() {
		h.down.Close()
		h.echo.Close()
		h.udp.Close()
		h.resetAll()
		h.wg.Wait()
	})
	return h
}

// resetAll aborts (RST) every open host-side connection: what remains of
// guests that disappeared mid-transfer.
func (h *hostServers) resetAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.conns {
		c.SetLinger(0)
		c.Close()
	}
}

func (h *hostServers) open() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.conns)
}

func port(a net.Addr) uint16 {
	return uint16(a.(interface{ AddrPort() netip.AddrPort }).AddrPort().Port())
}

type usage struct {
	fds, goroutines int
	rss, heap       int64
}

func (u usage) String() string {
	return fmt.Sprintf("%d fds, %d goroutines, RSS %.1f MiB, heap in use %.1f MiB", u.fds, u.goroutines, mib(u.rss), mib(u.heap))
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// flat reports whether u is back within the slack of base.
func (u usage) flat(base usage) bool {
	return u.goroutines <= base.goroutines+slackGoroutines && u.fds <= base.fds+slackFDs &&
		u.rss <= base.rss+slackRSS && u.heap <= base.heap+slackHeap
}

func measure(t *testing.T) usage {
	runtime.GC()
	debug.FreeOSMemory()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	var rss int64
	for _, l := range strings.Split(string(st), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			rss = kb << 10
		}
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return usage{fds: len(es) - 1, goroutines: runtime.NumGoroutine(), rss: rss, heap: int64(ms.HeapInuse)}
}

// cycle connects a frontend, runs guest traffic to completion (downloads
// checked byte for byte, echoes, UDP), starts more and disconnects while
// it flows.
func cycle(t *testing.T, sock string, h *hostServers, i int) error {
	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 8 << 20})
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	mem := f.Mem
	defer func() { unix.Munmap(mem) }() // vhosttest leaves the mapping to its user
	if err := f.Setup(^uint64(0)); err != nil {
		f.Close()
		return fmt.Errorf("setup: %w", err)
	}
	gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, 2048)
	guest, err := netstacktest.NewGuest(gl)
	if err != nil {
		gl.Stop()
		f.Close()
		return err
	}
	teardown := func() {
		f.Close() // the disconnect vunet sees
		gl.Stop()
		guest.Destroy()
	}
	gw := netstacktest.Gateway4.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	// Every session's guest is 10.0.2.15, like a VM that restarts; it
	// RSTs what vunet still sends for the vanished guest's connections,
	// which is what lets vunet release them. Its local ports rotate so it
	// does not reuse a 4-tuple of an earlier session for 2500 sessions: a
	// random port that hits a vanished guest's connection vunet has not
	// yet let go of makes the dial hang for half a minute or more (seen
	// here with random ports, and when the ports wrapped every 100
	// sessions; see the commit message).
	nextPort := uint16(20000 + 16*(i%2500))
	var portMu sync.Mutex
	local := func() tcpip.FullAddress {
		portMu.Lock()
		defer portMu.Unlock()
		nextPort++
		return tcpip.FullAddress{NIC: netstacktest.GuestNIC, Addr: netstacktest.Addr(netstacktest.Guest4), Port: nextPort}
	}
	dial := func(to uint16) (*gonet.TCPConn, error) {
		return gonet.DialTCPWithBind(ctx, guest, local(), netstacktest.FullAddr(netip.AddrPortFrom(gw, to)), ipv4.ProtocolNumber)
	}
	download := func(n int, check bool) {
		defer wg.Done()
		c, err := dial(port(h.down.Addr()))
		if err != nil {
			if check {
				errs <- fmt.Errorf("dial download: %w", err)
			}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		fmt.Fprintf(c, "%d\n", n)
		got, err := io.ReadAll(c)
		if check && (err != nil || len(got) != n || !bytes.Equal(got, blob[:n])) {
			errs <- fmt.Errorf("download of %d bytes: got %d (%v)", n, len(got), err)
		}
	}
	echo := func() {
		defer wg.Done()
		c, err := dial(port(h.echo.Addr()))
		if err != nil {
			errs <- fmt.Errorf("dial echo: %w", err)
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		msg := []byte(fmt.Sprintf("cycle %d says hello", i))
		c.Write(msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			errs <- fmt.Errorf("echo: %q %v", got, err)
		}
	}
	udp := func() {
		defer wg.Done()
		c, err := netstacktest.DialUDP(guest, netip.AddrPortFrom(gw, port(h.udp.LocalAddr())))
		if err != nil {
			errs <- fmt.Errorf("dial udp: %w", err)
			return
		}
		defer c.Close()
		msg := []byte(fmt.Sprintf("udp %d", i))
		for try := 0; try < 5; try++ { // UDP may be lost; the test counts answers, not attempts
			c.Write(msg)
			c.SetReadDeadline(time.Now().Add(time.Second))
			got := make([]byte, 64)
			if n, err := c.Read(got); err == nil && bytes.Equal(got[:n], msg) {
				return
			}
		}
		errs <- errors.New("no UDP echo in 5 tries")
	}
	for k := 0; k < 3; k++ {
		wg.Add(3)
		go download(len(blob)/(k+1), true)
		go echo()
		go udp()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		teardown()
		return err
	}
	// Mid-traffic: big downloads in flight when the frontend goes away.
	var bg sync.WaitGroup
	for k := 0; k < 2; k++ {
		bg.Add(1)
		wg.Add(1)
		go func() { defer bg.Done(); download(64<<20, false) }()
	}
	time.Sleep(200 * time.Millisecond)
	teardown()
	cancel()
	bg.Wait()
	return nil
}

// TestChurn: frontends connect, carry guest TCP and UDP through vunet's
// NAT to host servers, and disconnect mid-transfer, over and over for
// VUNET_SOAK (default 5 minutes). After each session the host peers of the
// transfers the guest abandoned reset them, as their timeouts would.
// Afterwards the process's fds, goroutines, RSS and Go heap must be back at
// the level measured after a warm-up. make test runs it without the race
// detector: its shadow memory makes RSS meaningless.
func TestChurn(t *testing.T) {
	if testing.Short() {
		t.Skip("soak: skipped under -short")
	}
	d := defaultDuration
	if s := os.Getenv("VUNET_SOAK"); s != "" {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			t.Fatalf("VUNET_SOAK=%q: %v", s, err)
		}
	}
	h := startHostServers(t)
	cfg := config.Default()
	cfg.Socket = filepath.Join(t.TempDir(), "vhost.sock")
	cfg.IPv6.Enable = false
	// Vanished guests' UDP flows are held until they are idle this long;
	// shorter than the default 30 s so that the churn's steady state and
	// the final settling stay small.
	cfg.UDPIdleTimeout = udpIdle
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := appliance.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		stop()
		<-done
		a.Close()
	}()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(cfg.Socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("vhost-user socket never appeared")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// settle resets what vanished guests left on the host side and waits
	// until vunet has let go of it (UDP flows of vanished guests expire
	// after their idle timeout, TCP state after gVisor's timers): for the
	// baseline until nothing fell for 3 s, at the end until usage is back
	// within the slack of base, or max has passed.
	settle := func(max time.Duration, base *usage) usage {
		h.resetAll()
		// Twice the UDP idle timeout first: flows of the last sessions
		// expire on the forwarder's sweep after it.
		time.Sleep(2 * udpIdle)
		u := measure(t)
		for deadline, still := time.Now().Add(max), time.Now(); time.Now().Before(deadline); {
			if base != nil && u.flat(*base) {
				break // back within the slack of the baseline
			}
			if base == nil && time.Since(still) >= 3*time.Second {
				break // the baseline: nothing fell for 3 s
			}
			time.Sleep(500 * time.Millisecond)
			if v := measure(t); v.goroutines < u.goroutines || v.fds < u.fds || v.heap < u.heap-1<<20 {
				still = time.Now()
			}
			u = measure(t)
		}
		if n := h.open(); n > 0 {
			t.Errorf("%d host-side connections still open after being reset", n)
		}
		return u
	}
	const warmup = 5
	var base usage
	start := time.Now()
	n := 0
	for ; n < warmup || time.Since(start) < d; n++ {
		if err := cycle(t, cfg.Socket, h, n); err != nil {
			t.Fatalf("cycle %d: %v\nmemory budget: %+v\nhost-side conns open: %d; %s", n, err, a.Memory.Stats(), h.open(), measure(t))
		}
		// The host peers of the transfers the guest abandoned give up
		// (as their timeouts would): vunet must then let go of them.
		h.resetAll()
		if n == warmup-1 {
			base = settle(20*time.Second, nil)
			t.Logf("after %d warm-up cycles: %s", warmup, base)
		} else if n%25 == 0 && testing.Verbose() {
			t.Logf("cycle %d (%v): %s; memory budget used %d bytes", n, time.Since(start).Round(time.Second), measure(t), a.Memory.Stats().Used)
		}
	}
	// Give the appliance up to 2 minutes to come back down: what the vanished
	// guests held goes as the host side resets it and UDP flows expire.
	settled := time.Now()
	end := settle(2*time.Minute, &base)
	t.Logf("settled in %v", time.Since(settled).Round(100*time.Millisecond))
	t.Logf("after %d cycles in %v: %s (baseline %s)", n, time.Since(start).Round(time.Second), end, base)
	if end.goroutines > base.goroutines+slackGoroutines {
		t.Errorf("goroutines grew from %d to %d over %d sessions", base.goroutines, end.goroutines, n)
	}
	if end.fds > base.fds+slackFDs {
		t.Errorf("fds grew from %d to %d over %d sessions", base.fds, end.fds, n)
	}
	if end.rss > base.rss+slackRSS {
		t.Errorf("RSS grew from %.1f to %.1f MiB over %d sessions", mib(base.rss), mib(end.rss), n)
	}
	if end.heap > base.heap+slackHeap {
		t.Errorf("heap in use grew from %.1f to %.1f MiB over %d sessions", mib(base.heap), mib(end.heap), n)
	}
}
