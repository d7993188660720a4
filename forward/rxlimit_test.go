package forward

import (
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/link/pipe"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
)

// slowGuestLink stands for vunet's link to a slow guest: it takes at most
// perTick frames to the guest every tick, backlogs up to backlog frames
// meanwhile and drops the rest, as the endpoint's receive backlog does
// (link_drops_total{reason="rx_backlog_full"}).
type slowGuestLink struct {
	stack.LinkEndpoint // the host end of the pipe to the guest stack
	backlog, perTick   int

	mu    sync.Mutex
	queue []*stack.PacketBuffer
	drops atomic.Int64
	peak  int
}

func (l *slowGuestLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range pkts.AsSlice() {
		if len(l.queue) >= l.backlog {
			l.drops.Add(1)
			continue
		}
		p.IncRef()
		l.queue = append(l.queue, p)
	}
	l.peak = max(l.peak, len(l.queue))
	return pkts.Len(), nil
}

// run hands perTick frames to the guest every tick until done is closed.
func (l *slowGuestLink) run(tick time.Duration, done <-chan struct{}) {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-done:
			l.mu.Lock()
			for _, p := range l.queue {
				p.DecRef()
			}
			l.queue = nil
			l.mu.Unlock()
			return
		case <-t.C:
		}
		l.mu.Lock()
		n := min(l.perTick, len(l.queue))
		var list stack.PacketBufferList
		for _, p := range l.queue[:n] {
			list.PushBack(p)
		}
		l.queue = append(l.queue[:0], l.queue[n:]...)
		l.mu.Unlock()
		if n > 0 {
			_, _ = l.LinkEndpoint.WritePackets(list)
			list.DecRef()
		}
	}
}

// slowGuestDownload downloads size bytes from a host server into a guest
// behind a slowGuestLink over each of streams connections at once and
// returns the link's drops. rxCap is what Options.GuestRXCapacity reports
// (0: no bound).
func slowGuestDownload(t *testing.T, streams, size int, rxCap func(backlog int) int64) (drops int64, peak int, f *Forwarder) {
	const backlog, perTick, mtu = 256, 32, 1500
	hostEnd, guestEnd := pipe.New(netstacktest.HostMAC, netstacktest.GuestMAC, mtu)
	link := &slowGuestLink{LinkEndpoint: hostEnd, backlog: backlog, perTick: perTick}
	ns, err := netstack.New(netstack.Options{
		Endpoint: ethernet.New(link),
		Gateway4: netstacktest.Gateway4, DNS4: netstacktest.DNS4,
		Gateway6: netstacktest.Gateway6, DNS6: netstacktest.DNS6,
	})
	if err != nil {
		t.Fatal(err)
	}
	guest, err := netstacktest.NewGuest(ethernet.New(guestEnd))
	if err != nil {
		ns.Close()
		t.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); link.run(time.Millisecond, done) }()
	t.Cleanup(func() {
		close(done)
		wg.Wait()
		guest.Destroy()
		ns.Close()
	})
	f, err = New(Options{
		Stack: ns.Stack(), NIC: ns.NIC(),
		Gateway4: gw4, Gateway6: gw6, DNS4: netstacktest.DNS4, DNS6: netstacktest.DNS6,
		MapHostLoopback: true, DialTimeout: 5 * time.Second, Logger: testLogger(t),
		GuestRXCapacity: func(int) int64 { return rxCap(backlog) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })

	data := make([]byte, size)
	rng := rand.NewChaCha8([32]byte{7})
	_, _ = rng.Read(data)
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		_, _ = c.Write(data)
		_ = c.(*net.TCPConn).CloseWrite()
		_, _ = io.Copy(io.Discard, c)
	})
	var dl sync.WaitGroup
	for range streams {
		dl.Add(1)
		go func() {
			defer dl.Done()
			c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), guest, netip.AddrPortFrom(gw4, srv.Port()))
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
			h := sha256.New()
			n, err := io.Copy(h, c)
			if err != nil {
				t.Errorf("guest read after %d bytes: %v", n, err)
				return
			}
			if n != int64(size) || [32]byte(h.Sum(nil)) != sha256.Sum256(data) {
				t.Errorf("guest got %d bytes, want %d intact", n, size)
			}
		}()
	}
	dl.Wait()
	link.mu.Lock()
	peak = link.peak
	link.mu.Unlock()
	return link.drops.Load(), peak, f
}

// TestTCPSendLimitFitsGuestBacklog: a bulk download into a guest that
// takes 8 frames a millisecond, behind a 64-frame backlog, loses no frame
// when the forwarder knows the backlog's capacity (frames × the payload of
// a full frame, as endpoint.RXCapacity reports it): each connection's send
// buffer, which bounds what it has in flight, stays within it. Without
// the bound (rxCap 0, as before) gVisor's sender overruns the backlog
// with its congestion window and the same download drops frames.
func TestTCPSendLimitFitsGuestBacklog(t *testing.T) {
	perFrame := int64(1500 - 40 - 20 - 12)
	for _, streams := range []int{1, 3} {
		drops, peak, f := slowGuestDownload(t, streams, 4<<20/streams, func(b int) int64 { return int64(b) * perFrame })
		t.Logf("%d streams, bounded: %d drops, backlog peak %d of 256, %d buffers lowered", streams, drops, peak, f.Stats().TCPSendLimited.Load())
		if drops != 0 {
			t.Errorf("%d streams: %d frames dropped at the guest's backlog with the send buffers bounded by it, want 0", streams, drops)
		}
	}
}

// TestTCPSendUnboundedOverrunsBacklog shows that the slow guest above is
// slow enough to matter: without GuestRXCapacity the download drops
// frames at the backlog (so TestTCPSendLimitFitsGuestBacklog can fail).
func TestTCPSendUnboundedOverrunsBacklog(t *testing.T) {
	drops, peak, _ := slowGuestDownload(t, 1, 4<<20, func(int) int64 { return 0 })
	t.Logf("unbounded: %d drops, backlog peak %d of 256", drops, peak)
	if drops == 0 {
		t.Errorf("no frame dropped without the bound: the slow guest does not test the bound")
	}
}

// TestSendLimitShares: the guest's share is divided among its bulk
// senders, within MinTCPBuffer..MaxTCPBuffer, a buffer grows only into
// what the others' buffers leave of the share, and the bound vanishes
// without a capacity.
func TestSendLimitShares(t *testing.T) {
	const rx = 1024 * 1428
	share := int64(rx * 7 / 8)
	var capacity int64
	f := &Forwarder{opts: Options{GuestRXCapacity: func(int) int64 { return capacity }}}
	g := &guestLimits{}
	c := &tcpSplice{f: f, g: g}
	for _, tc := range []struct {
		rx               int64
		senders          int32
		sender           bool
		others           int64 // the other connections' send buffers
		wantFair, wantRm int64
	}{
		{rx, 0, false, 0, share, share},                             // the first sender
		{rx, 1, true, 0, share, share},                              // it alone
		{rx, 3, false, 3 * share / 4, share / 4, share / 4},         // a fourth joins, the others have given back
		{rx, 3, false, share - 100<<10, share / 4, 100 << 10},       // they have not yet
		{rx, 4, true, 3 * share / 4, share / 4, share / 4},          // one of four
		{rx, 1000, false, 0, MinTCPBuffer, MinTCPBuffer},            // never below the minimum
		{1024 * 65535, 0, false, 0, MaxTCPBuffer, MaxTCPBuffer},     // TSO: no bound
		{0, 3, false, 3 * MaxTCPBuffer, MaxTCPBuffer, MaxTCPBuffer}, // unknown: no bound
	} {
		capacity = tc.rx
		g.senders.Store(tc.senders)
		c.sender = tc.sender
		c.counted = MinTCPBuffer
		g.sendBytes.Store(tc.others + c.counted)
		if fair, room := c.sendLimit(); fair != tc.wantFair || room != tc.wantRm {
			t.Errorf("rx %d, %d senders (this one counted: %v), others %d: fair %d, room %d, want %d, %d",
				tc.rx, tc.senders, tc.sender, tc.others, fair, room, tc.wantFair, tc.wantRm)
		}
	}
	c.g = nil
	if fair, room := c.sendLimit(); fair != MaxTCPBuffer || room != MaxTCPBuffer {
		t.Errorf("no guest (inbound): %d, %d, want %d", fair, room, MaxTCPBuffer)
	}
}
