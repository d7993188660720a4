package forward

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// idleScale is what holding n idle spliced connections costs, measured
// in-process: the simulated guest stack lives in the same process, so the
// heap figures include the guest's gVisor endpoints too (about as large as
// vunet's own); goroutines are vunet's alone (the guest side has none per
// connection).
type idleScale struct {
	n          int
	open       time.Duration
	goroutines int    // added by the n connections
	heap       uint64 // HeapInuse added, bytes
	stack      uint64 // StackInuse added, bytes
	rss        int64  // VmRSS added, bytes (-1 if unknown)
}

func (s idleScale) perConn(v uint64) float64 { return float64(v) / float64(s.n) }

func (s idleScale) String() string {
	return "conns=" + strconv.Itoa(s.n) +
		" open=" + s.open.Round(time.Millisecond).String() +
		" goroutines/conn=" + strconv.FormatFloat(float64(s.goroutines)/float64(s.n), 'f', 2, 64) +
		" heap/conn=" + strconv.FormatFloat(s.perConn(s.heap)/1024, 'f', 1, 64) + "KiB" +
		" stack/conn=" + strconv.FormatFloat(s.perConn(s.stack)/1024, 'f', 1, 64) + "KiB" +
		" rss/conn=" + strconv.FormatFloat(float64(s.rss)/float64(s.n)/1024, 'f', 1, 64) + "KiB"
}

// vmRSS reads this process's resident set from /proc, or -1.
func vmRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) >= 2 && string(f[0]) == "VmRSS:" {
			kb, err := strconv.ParseInt(string(f[1]), 10, 64)
			if err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}

type memPoint struct {
	heap, stack uint64
	rss         int64
	goroutines  int
}

func measureMem() memPoint {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return memPoint{heap: ms.HeapInuse, stack: ms.StackInuse, rss: vmRSS(), goroutines: runtime.NumGoroutine()}
}

// holdServer accepts connections on 127.0.0.1 and keeps them open without a
// goroutine per connection (a host peer that never sends), so the process's
// goroutine and memory counts are the splice's. It closes them at cleanup.
func holdServer(t testing.TB) (netip.AddrPort, func() int) {
	t.Helper()
	l, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = l.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
	})
	return l.Addr().(*net.TCPAddr).AddrPort(), func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(conns)
	}
}

// openIdle opens n guest connections to dst through e's Forwarder, a few
// at a time (as a client opening a pool would), and waits until the host
// has accepted all of them and every splice is running.
func openIdle(t testing.TB, e *env, dst netip.AddrPort, n int, accepted func() int) []*gonet.TCPConn {
	t.Helper()
	const parallel = 64
	conns := make([]*gonet.TCPConn, n)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		ferr error
	)
	next := make(chan int)
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				c, err := netstacktest.DialTCP(ctxT(t, 30*time.Second), e.p.Guest, dst)
				if err != nil {
					mu.Lock()
					ferr = err
					mu.Unlock()
					continue
				}
				conns[i] = c
			}
		}()
	}
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	})
	if ferr != nil {
		t.Fatalf("dial: %v", ferr)
	}
	deadline := time.Now().Add(30 * time.Second)
	for accepted() < n || e.f.Stats().TCPConnsTotal.Load() < uint64(n) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d accepted, %d spliced", accepted(), n, e.f.Stats().TCPConnsTotal.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return conns
}

// measureIdle opens n idle connections through a fresh Forwarder and
// reports their cost. A warm-up connection first starts gVisor's lazily
// created workers, so they are not charged to the n.
func measureIdle(t testing.TB, n int) idleScale {
	if os.Getenv("VUNET_IDLE_PROFILE") != "" {
		old := runtime.MemProfileRate
		runtime.MemProfileRate = 1
		t.Cleanup(func() { runtime.MemProfileRate = old })
	}
	e := benchEnv(t)
	dst, accepted := holdServer(t)
	gdst := netip.AddrPortFrom(gw4, dst.Port())
	openIdle(t, e, gdst, 1, accepted)
	time.Sleep(50 * time.Millisecond)
	before := measureMem()
	start := time.Now()
	openIdle(t, e, gdst, n, func() int { return accepted() - 1 })
	open := time.Since(start)
	time.Sleep(100 * time.Millisecond) // let handshake-time goroutines end
	after := measureMem()
	if dir := os.Getenv("VUNET_IDLE_PROFILE"); dir != "" {
		writeProfiles(t, dir)
	}
	return idleScale{
		n: n, open: open,
		goroutines: after.goroutines - before.goroutines,
		heap:       after.heap - min(before.heap, after.heap),
		stack:      after.stack - min(before.stack, after.stack),
		rss:        after.rss - before.rss,
	}
}

func writeProfiles(t testing.TB, dir string) {
	for _, p := range []string{"heap", "goroutine"} {
		f, err := os.Create(dir + "/" + p + ".pprof")
		if err != nil {
			t.Fatal(err)
		}
		_ = pprof.Lookup(p).WriteTo(f, 0)
		_ = f.Close()
	}
}

// TestIdleConnScale opens idle connections through the splice and checks
// what each costs: an idle connection parks both directions and holds no
// goroutine, and its heap stays small (no copy buffers, no blocked
// goroutine stacks). VUNET_IDLE_CONNS=N measures N connections (and
// VUNET_IDLE_PROFILE=DIR writes heap and goroutine profiles there); the
// figures are logged.
func TestIdleConnScale(t *testing.T) {
	n := 300
	if s := os.Getenv("VUNET_IDLE_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n <= 0 {
			t.Fatalf("VUNET_IDLE_CONNS=%q", s)
		}
	}
	s := measureIdle(t, n)
	t.Log(s)
	// Two goroutines per connection before parking; none now. A few
	// stragglers (gVisor's forwarder goroutines ending) are allowed.
	if g := float64(s.goroutines) / float64(n); g > 0.05 {
		t.Errorf("%.2f goroutines per idle connection, want none", g)
	}
	// The heap includes the simulated guest's endpoints (~6 KiB each);
	// vunet's side is about 8 KiB. A copy buffer per direction or a
	// goroutine per connection would be far beyond this.
	if kb := s.perConn(s.heap) / 1024; kb > 24 {
		t.Errorf("%.1f KiB of heap per idle connection (guest and vunet), want at most 24", kb)
	}
}

// parked counts splice directions that hold no goroutine.
func parked(f *Forwarder) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for c := range f.conns {
		for _, d := range []*direction{&c.tg, &c.th} {
			if s := d.state.Load(); s == dirParkedGuest || s == dirParkedHost {
				n++
			}
		}
	}
	return n
}

// TestIdleConnWakes checks that parked directions come back to life: idle
// connections park both ways, and a round trip on each then wakes the
// guest → host direction (a guest event) and the host → guest one (a
// host socket event), with every byte echoed back.
func TestIdleConnWakes(t *testing.T) {
	e := newEnv(t, nil)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	const n = 20
	conns := make([]*gonet.TCPConn, n)
	for i := range conns {
		c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	eventually(t, "every direction parked", func() bool { return parked(e.f) == 2*n })
	w0 := e.f.Stats().TCPWakeups.Load()
	for round := 0; round < 3; round++ {
		for i, c := range conns {
			msg := []byte("ping " + strconv.Itoa(i) + " round " + strconv.Itoa(round))
			if _, err := c.Write(msg); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("conn %d round %d: echo %q, %v", i, round, got, err)
			}
		}
		eventually(t, "every direction parked again", func() bool { return parked(e.f) == 2*n })
	}
	if w := e.f.Stats().TCPWakeups.Load() - w0; w < 2*3*n {
		t.Errorf("%d wakeups for %d round trips from parked connections, want at least 2 each", w, 3*n)
	}
}

// TestIdleHostResetReachesGuest: a host peer that resets a parked, idle
// connection must reach the guest as a RST (the host socket's error
// wakes the parked direction, which aborts the guest endpoint).
func TestIdleHostResetReachesGuest(t *testing.T) {
	e := newEnv(t, nil)
	accepted := make(chan net.Conn, 1)
	hold := make(chan struct{})
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		accepted <- c
		<-hold // the test resets c
	})
	t.Cleanup(func() { close(hold) }) // before tcpServer's cleanup waits for us
	c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hc := <-accepted
	eventually(t, "both directions parked", func() bool { return parked(e.f) == 2 })
	_ = hc.(*net.TCPConn).SetLinger(0)
	_ = hc.Close()
	wantReset(t, c, "guest connection after the host peer's RST")
	eventually(t, "splice ended", func() bool { return e.f.Stats().TCPConns.Load() == 0 })
}
