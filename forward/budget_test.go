package forward

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// streamServer is a host server that writes to every connection until it
// fails: the "streaming host peer" of the pinning scenario.
func streamServer(tb testing.TB) netip.AddrPort {
	chunk := make([]byte, 64<<10)
	return tcpServer(tb, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
}

// zeroWindowConn connects from the guest stack with a tiny receive buffer
// that is never read: after a few KiB the guest advertises a zero window
// for good.
func zeroWindowConn(tb testing.TB, e *env, dst netip.AddrPort) tcpip.Endpoint {
	tb.Helper()
	wq := new(waiter.Queue)
	ep, terr := e.p.Guest.NewEndpoint(tcp.ProtocolNumber, netstacktest.Proto(dst.Addr()), wq)
	if terr != nil {
		tb.Fatalf("guest endpoint: %s", terr)
	}
	ep.SocketOptions().SetReceiveBufferSize(4096, true)
	if err := connectEndpoint(ctxT(tb, 20*time.Second), ep, wq, netstacktest.FullAddr(dst)); err != nil {
		ep.Close()
		tb.Fatalf("zero-window connect: %v", err)
	}
	return ep
}

// heapInUse is the Go heap in use after a collection.
func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse + ms.StackInuse
}

// rss reads this process's resident set size.
func rss() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return -1
}

// pinning is the memory-pinning scenario of issue 9: conns guest
// connections to a streaming host server, each with a zero window, under a
// budget of limit bytes. While they are pinned it checks that a fresh
// guest connection and an inbound forward are still served, and it returns
// the measurements.
type pinResult struct {
	heapBefore, heapDuring, heapAfter uint64
	rssBefore, rssDuring, rssAfter    int64
	used, peak                        int64
	floored                           uint64
	fresh, inbound                    time.Duration
}

func pinning(t *testing.T, conns int, limit int64) pinResult {
	mem := budget.New(limit)
	e := newEnv(t, func(o *Options) {
		o.Memory = mem
		o.OutboundMemory = limit - limit/4       // as the appliance splits it
		o.Logger = slog.New(slog.DiscardHandler) // thousands of debug lines otherwise
		o.MaxConns = conns + 16
	})
	var r pinResult
	r.heapBefore, r.rssBefore = heapInUse(), rss()

	srv := streamServer(t)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	eps := make([]tcpip.Endpoint, 0, conns)
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for i := 0; i < conns; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ep := zeroWindowConn(t, e, dst)
			mu.Lock()
			eps = append(eps, ep)
			mu.Unlock()
		}()
	}
	wg.Wait()
	defer func() {
		for _, ep := range eps {
			ep.Abort()
		}
	}()
	eventually(t, "all connections spliced", func() bool { return e.f.Stats().TCPConns.Load() == int64(conns) })
	// Let every send queue fill up to what its window and share allow.
	stable, last := 0, int64(-1)
	eventually(t, "budget use to settle", func() bool {
		time.Sleep(100 * time.Millisecond)
		u := mem.Used()
		if u == last {
			stable++
		} else {
			stable, last = 0, u
		}
		return stable >= 5
	})
	r.heapDuring, r.rssDuring = heapInUse(), rss()
	st := mem.Stats()
	r.used, r.peak, r.floored = st.Used, st.Peak, e.f.Stats().TCPBudgetFloor.Load()

	// A fresh outbound connection is served while the others pin.
	echo := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	start := time.Now()
	c, err := netstacktest.DialTCP(ctxT(t, 20*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, echo.Port()))
	if err != nil {
		t.Fatalf("fresh connection during pinning: %v", err)
	}
	msg := bytes.Repeat([]byte("fresh"), 20000) // 100 kB: more than any floor window
	go func() { _, _ = c.Write(msg) }()
	got := make([]byte, len(msg))
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("fresh connection echo during pinning: %v", err)
	}
	c.Close()
	r.fresh = time.Since(start)

	// So is an inbound forward.
	guest := netip.AddrPortFrom(netstacktest.Guest4, 2222)
	guestPeerServer(t, e, guest)
	pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), Guest: guest})
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	hc, err := net.DialTimeout("tcp", pf.Host.String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = hc.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(hc)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatalf("inbound forward during pinning: %v", err)
	}
	if _, err := hc.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("inbound echo during pinning: %v", err)
	}
	hc.Close()
	r.inbound = time.Since(start)

	for _, ep := range eps {
		ep.Abort()
	}
	eps = nil
	eventually(t, "connections to close", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
	eventually(t, "budget to be released", func() bool { return mem.Used() == 0 })
	debug.FreeOSMemory()
	r.heapAfter, r.rssAfter = heapInUse(), rss()
	return r
}

// TestMemoryPinning is the CI-sized pinning case: 300 zero-window
// connections under an 8 MiB budget (which they more than fill: 300 × 2 ×
// 16 KiB minimum shares), and the Go heap must stay within the budget plus
// a per-connection overhead for the endpoints and goroutines. Before the
// budget, each connection pinned about 1.2 MB (≈360 MB here).
func TestMemoryPinning(t *testing.T) {
	if testing.Short() {
		t.Skip("opens 300 connections")
	}
	const conns, limit = 300, 8 << 20
	// Per connection: two gVisor endpoints (vunet's and the simulated
	// guest's), their segments, two splice goroutines, host socket
	// structures.
	const perConn = 64 << 10
	r := pinning(t, conns, limit)
	t.Logf("heap before %d KiB, during %d KiB, after %d KiB; budget used %d KiB, peak %d KiB; floored directions %d; fresh %v, inbound %v",
		r.heapBefore>>10, r.heapDuring>>10, r.heapAfter>>10, r.used>>10, r.peak>>10, r.floored, r.fresh, r.inbound)
	if r.peak > limit {
		t.Errorf("budget peak %d over the limit %d", r.peak, limit)
	}
	if r.floored == 0 {
		t.Errorf("no connection was refused a share: the scenario did not reach the budget")
	}
	growth := int64(r.heapDuring) - int64(r.heapBefore)
	if bound := int64(limit + conns*perConn); growth > bound {
		t.Errorf("heap grew by %d KiB while pinned; want at most the budget plus %d KiB per connection (%d KiB)",
			growth>>10, perConn>>10, bound>>10)
	}
}

// TestMemoryPinningBench is the full-size bench of docs/security.md: 4096
// zero-window connections under the default budget, reporting RSS. It is
// not a timed test and runs only with VUNET_PIN_BENCH=1.
func TestMemoryPinningBench(t *testing.T) {
	if os.Getenv("VUNET_PIN_BENCH") == "" {
		t.Skip("set VUNET_PIN_BENCH=1 (and VUNET_PIN_CONNS, VUNET_PIN_MIB) to run the pinning bench")
	}
	conns, limit := 4096, int64(256)<<20
	if v, err := strconv.Atoi(os.Getenv("VUNET_PIN_CONNS")); err == nil {
		conns = v
	}
	if v, err := strconv.Atoi(os.Getenv("VUNET_PIN_MIB")); err == nil {
		limit = int64(v) << 20
	}
	r := pinning(t, conns, limit)
	mib := func(v int64) string { return fmt.Sprintf("%.1f MiB", float64(v)/(1<<20)) }
	t.Logf("%d connections, budget %s: RSS before %s, during %s, after %s; heap before %s, during %s, after %s; budget used %s (peak %s); floored directions %d; fresh connection %v, inbound forward %v",
		conns, mib(limit), mib(r.rssBefore), mib(r.rssDuring), mib(r.rssAfter),
		mib(int64(r.heapBefore)), mib(int64(r.heapDuring)), mib(int64(r.heapAfter)),
		mib(r.used), mib(r.peak), r.floored, r.fresh, r.inbound)
}

// TestUDPFlowMemory: every UDP flow reserves its receive buffer from the
// budget; flows beyond it are not created (counted), and closed flows give
// their memory back. Relay buffers are borrowed per
// datagram, so idle flows hold none.
func TestUDPFlowMemory(t *testing.T) {
	const limit = 4 << 20 // outbound share 3.5 MiB: 56 flows of 64 KiB
	mem := budget.New(limit)
	e := newEnv(t, func(o *Options) {
		o.Memory = mem
		o.UDPIdleTimeout = time.Minute // outlives the loop below
		o.UDPStreamIdleTimeout = time.Minute
	})
	srv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	dst := netip.AddrPortFrom(gw4, srv.Port())
	served := 0
	for i := 0; i < 80; i++ {
		c, err := netstacktest.DialUDP(e.p.Guest, dst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_, _ = c.Write([]byte("x"))
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		var b [8]byte
		if _, err := c.Read(b[:]); err == nil {
			served++
		}
	}
	want := int((limit - limit/8) / udpMinRecv)
	dropped := e.f.Stats().DropUDPMemory.Load()
	if served != want || int(dropped) != 80-want {
		t.Fatalf("served %d flows, %d dropped for memory; want %d and %d", served, dropped, want, 80-want)
	}
	if u := mem.Used(); u > limit {
		t.Fatalf("budget used %d over its limit", u)
	}
	_ = e.f.Close()
	if u := mem.Used(); u != 0 {
		t.Fatalf("closed flows left %d bytes in the budget", u)
	}
}
