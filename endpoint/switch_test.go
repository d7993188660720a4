package endpoint

import (
	"bytes"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// swGuest is one guest on a switch port, its queues on mock drivers.
type swGuest struct {
	ep       *Endpoint
	mac      tcpip.LinkAddress
	rxd, txd *vqt.Driver
	rxk, txk *virtqueue.EventFD
	hungUp   atomic.Bool
	used     []vqt.Used
}

type swRig struct {
	sw     *Switch
	cap    *capture
	down   chan Guest
	guests []*swGuest
}

func newSwitchRig(t *testing.T, ports int, isolate bool) *swRig {
	t.Helper()
	r := &swRig{cap: &capture{ch: make(chan struct{}, 1024)}, down: make(chan Guest, 8)}
	sw, err := NewSwitch(SwitchOptions{Ports: ports, Isolate: isolate,
		Port:       Options{LinkAddress: gwMAC, GuestMAC: guestMAC},
		OnPortDown: func(g Guest) { r.down <- g }})
	if err != nil {
		t.Fatal(err)
	}
	sw.Attach(r.cap)
	r.sw = sw
	return r
}

// connect gives a new frontend a port and starts its queues, as a vhost
// session would; its guest posts nbuf receive buffers of 64 KiB + header.
func (r *swRig) connect(t *testing.T, mac tcpip.LinkAddress, features uint64) *swGuest {
	t.Helper()
	g := &swGuest{mac: mac}
	b, err := r.sw.AcquireBackend(func() { g.hungUp.Store(true) })
	if err != nil {
		t.Fatal(err)
	}
	g.ep = b.(*Endpoint)
	g.ep.SetFeatures(features)
	g.rxd, g.txd = vqt.New(8<<20, 256, true), vqt.New(4<<20, 256, true)
	g.rxk, _ = virtqueue.CreateEventFD()
	g.txk, _ = virtqueue.CreateEventFD()
	for range 32 {
		g.rxd.Post(nil, nil, []int{hdrLenMrg + 65536}, false)
	}
	g.ep.StartQueue(rxQueue, g.rxd.Queue(func() error { return nil }), g.rxk)
	g.ep.StartQueue(txQueue, g.txd.Queue(func() error { return nil }), g.txk)
	t.Cleanup(func() { r.disconnect(g) })
	r.guests = append(r.guests, g)
	return g
}

// disconnect tears the session down the way vhost does.
func (r *swRig) disconnect(g *swGuest) {
	if g.rxk == nil {
		return
	}
	g.ep.StopQueue(rxQueue)
	g.ep.StopQueue(txQueue)
	g.ep.Reset()
	r.sw.ReleaseBackend(g.ep)
	g.rxk.Close()
	g.txk.Close()
	g.rxk, g.txk = nil, nil
}

// send transmits one frame from g with header h.
func (g *swGuest) send(t *testing.T, h vnetHdr, frame []byte) {
	t.Helper()
	if _, err := g.txd.Post(append(vhdr(hdrLenMrg, h), frame...), nil, nil, false); err != nil {
		t.Fatal(err)
	}
	g.txk.Signal()
}

// frame builds an Ethernet frame from g to dst.
func (g *swGuest) frame(dst tcpip.LinkAddress, proto tcpip.NetworkProtocolNumber, payload []byte) []byte {
	b := ethFrame(dst, proto, payload)
	copy(b[6:12], g.mac)
	return b
}

// recv waits for the next frame g's guest receives.
func (g *swGuest) recv(t *testing.T) (vnetHdr, []byte) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for len(g.used) == 0 && time.Now().Before(deadline) {
		// Reaped buffers are reused by the next Post: keep copies.
		for _, u := range g.rxd.Reap() {
			in := make([][]byte, len(u.Chain.In))
			for i, b := range u.Chain.In {
				in[i] = bytes.Clone(b)
			}
			u.Chain.In = in
			g.used = append(g.used, u)
		}
		time.Sleep(time.Millisecond)
	}
	if len(g.used) == 0 {
		t.Fatal("no frame received")
	}
	h, f, rest := readRX(t, hdrLenMrg, g.used)
	g.used = rest
	g.rxd.Post(nil, nil, []int{hdrLenMrg + 65536}, false)
	g.rxk.Signal()
	return h, f
}

// quiet checks that g's guest receives nothing for a while.
func (g *swGuest) quiet(t *testing.T) {
	t.Helper()
	time.Sleep(100 * time.Millisecond)
	if u := g.rxd.Reap(); len(u) > 0 {
		t.Fatalf("guest %s received %d frames, want none", g.mac, len(u))
	}
}

// waitStack waits for n frames delivered to the stack.
func (r *swRig) waitStack(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-r.cap.ch:
		case <-time.After(20 * time.Second):
			t.Fatal("frame not delivered to the stack")
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

var (
	macA = tcpip.LinkAddress("\x52\x54\x00\x00\x00\x0a")
	macB = tcpip.LinkAddress("\x52\x54\x00\x00\x00\x0b")
	macC = tcpip.LinkAddress("\x52\x54\x00\x00\x00\x0c")
)

// ipv4Payload is an IPv4 header from src (then zeros): enough for the
// switch to record the source address.
func ipv4Payload(src string, n int) []byte {
	b := make([]byte, max(n, header.IPv4MinimumSize))
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: 17,
		SrcAddr: tcpip.AddrFrom4(netip.MustParseAddr(src).As4()), DstAddr: tcpip.AddrFrom4([4]byte{10, 0, 2, 99})})
	return b
}

// TestSwitchLearnsAndForwards: the first frame of each guest teaches the
// switch its MAC; unicast between guests goes ring to ring (not to the
// stack), byte for byte; broadcast reaches the other guests and the stack;
// frames to the gateway only the stack.
func TestSwitchLearnsAndForwards(t *testing.T) {
	r := newSwitchRig(t, 3, false)
	a, b, c := r.connect(t, macA, v1), r.connect(t, macB, v1), r.connect(t, macC, v1)
	// Each says hello to the gateway: learnt, and the stack sees them.
	for i, g := range []*swGuest{a, b, c} {
		g.send(t, vnetHdr{}, g.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2."+string(rune('5'+i)), 60)))
	}
	r.waitStack(t, 3)
	a.quiet(t)

	// Unicast A → B: only B gets it, unchanged.
	uni := a.frame(macB, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 300))
	a.send(t, vnetHdr{}, uni)
	if h, f := b.recv(t); !bytes.Equal(f, uni) || h.Flags != 0 || h.GSOType != 0 {
		t.Fatalf("B got header %+v frame %x, want the frame as sent", h, f)
	}
	c.quiet(t)
	if n := len(r.cap.pkts); n != 3 {
		t.Fatalf("the stack saw %d frames, want 3 (the unicast must not reach it)", n)
	}

	// Broadcast from C: A, B and the stack.
	bc := c.frame(header.EthernetBroadcastAddress, header.ARPProtocolNumber, make([]byte, header.ARPSize))
	c.send(t, vnetHdr{}, bc)
	for _, g := range []*swGuest{a, b} {
		if _, f := g.recv(t); !bytes.Equal(f[:len(bc)], bc) {
			t.Fatalf("%s got %x, want the broadcast", g.mac, f)
		}
	}
	r.waitStack(t, 1)
	c.quiet(t)
	if got := r.sw.Stats.Unicast.Load(); got != 1 {
		t.Errorf("unicast counter %d, want 1", got)
	}
	if got := r.sw.Stats.Flooded.Load(); got != 2 {
		t.Errorf("flood counter %d, want 2", got)
	}

	// Guests lists what was learnt.
	gs := r.sw.Guests()
	if len(gs) != 3 || gs[0].MAC.String() != "52:54:00:00:00:0a" || len(gs[0].Addrs) != 1 || gs[0].Addrs[0] != netip.MustParseAddr("10.0.2.5") {
		t.Fatalf("Guests = %+v", gs)
	}

	// The stack's frames go by destination MAC.
	pkt := outPacketTo(a.ep, macB, []byte("to b"))
	var l stack.PacketBufferList
	l.PushBack(pkt)
	r.sw.WritePackets(l)
	if _, f := b.recv(t); !bytes.Contains(f, []byte("to b")) {
		t.Fatalf("B got %x", f)
	}
	a.quiet(t)
	l.Reset()
}

// outPacketTo is a stack packet for dst, Ethernet header added.
func outPacketTo(ep *Endpoint, dst tcpip.LinkAddress, payload []byte) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: int(ep.MaxHeaderLength()),
		Payload:            buffer.MakeWithData(payload),
	})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	pkt.EgressRoute.RemoteLinkAddress = dst
	ep.AddHeader(pkt)
	return pkt
}

// TestSwitchIsolation: under Isolate, guest-to-guest frames (unicast and
// flooded) are dropped and counted; the gateway still gets everything.
func TestSwitchIsolation(t *testing.T) {
	r := newSwitchRig(t, 2, true)
	a, b := r.connect(t, macA, v1), r.connect(t, macB, v1)
	a.send(t, vnetHdr{}, a.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	b.send(t, vnetHdr{}, b.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.6", 60)))
	r.waitStack(t, 2)
	a.send(t, vnetHdr{}, a.frame(macB, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	a.send(t, vnetHdr{}, a.frame(header.EthernetBroadcastAddress, header.ARPProtocolNumber, make([]byte, header.ARPSize)))
	r.waitStack(t, 1) // the broadcast, to the gateway only
	b.quiet(t)
	if got := r.sw.Stats.Isolated.Load(); got != 2 {
		t.Fatalf("isolated drops %d, want 2", got)
	}
}

// TestSwitchMACInUse: a second guest whose MAC a connected guest has is
// refused (hung up, counted) and its frames go nowhere; another guest
// spoofing a third MAC is dropped.
func TestSwitchMACInUse(t *testing.T) {
	r := newSwitchRig(t, 3, false)
	a := r.connect(t, macA, v1)
	a.send(t, vnetHdr{}, a.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	r.waitStack(t, 1)
	dup := r.connect(t, macA, v1)
	dup.send(t, vnetHdr{}, dup.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.6", 60)))
	waitFor(t, "the duplicate hung up", dup.hungUp.Load)
	if got := r.sw.Stats.MACInUse.Load(); got != 1 {
		t.Fatalf("mac_in_use %d, want 1", got)
	}
	dup.send(t, vnetHdr{}, dup.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.6", 60)))
	waitFor(t, "the second frame counted", func() bool { return r.sw.Stats.MACClash.Load() == 1 })
	// A's traffic is undisturbed: the stack's frames to A reach A, not the
	// duplicate.
	var l stack.PacketBufferList
	l.PushBack(outPacketTo(a.ep, macA, []byte("to a")))
	r.sw.WritePackets(l)
	l.Reset()
	if _, f := a.recv(t); !bytes.Contains(f, []byte("to a")) {
		t.Fatalf("A got %x", f)
	}
	dup.quiet(t)
	if n := len(r.cap.pkts); n != 1 {
		t.Fatalf("the stack saw %d frames, want 1", n)
	}
	// Its MAC is free again once the refused frontend is gone... but A
	// still has it: the refused one never owned it.
	r.disconnect(dup)
	if gs := r.sw.Guests(); len(gs) != 1 || gs[0].MAC.String() != "52:54:00:00:00:0a" {
		t.Fatalf("Guests = %+v", gs)
	}
	// A frame with the gateway's MAC as its source is refused too.
	c := r.connect(t, macC, v1)
	bad := c.frame(macA, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.7", 60))
	copy(bad[6:12], gwMAC)
	c.send(t, vnetHdr{}, bad)
	waitFor(t, "bad source counted", func() bool { return r.sw.Stats.BadSrcMAC.Load() == 1 })
}

// TestSwitchPortRemoved: a guest leaving takes its MACs with it (frames to
// it are dropped as unknown), is reported once with what it used, and its
// port serves the next frontend; the other guest keeps working.
func TestSwitchPortRemoved(t *testing.T) {
	r := newSwitchRig(t, 2, false)
	a, b := r.connect(t, macA, v1), r.connect(t, macB, v1)
	a.send(t, vnetHdr{}, a.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	b.send(t, vnetHdr{}, b.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.6", 60)))
	r.waitStack(t, 2)
	port := b.ep.PortID()
	r.disconnect(b)
	select {
	case g := <-r.down:
		if g.Port != port || g.MAC.String() != "52:54:00:00:00:0b" || len(g.Addrs) != 1 || g.Addrs[0] != netip.MustParseAddr("10.0.2.6") {
			t.Fatalf("OnPortDown(%+v)", g)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("OnPortDown not called")
	}
	var l stack.PacketBufferList
	l.PushBack(outPacketTo(a.ep, macB, []byte("to b")))
	r.sw.WritePackets(l)
	l.Reset()
	if got := r.sw.Stats.UnknownDst.Load(); got != 1 {
		t.Fatalf("unknown_destination %d, want 1", got)
	}
	// A → B's old MAC now goes to the stack (nobody has it).
	a.send(t, vnetHdr{}, a.frame(macB, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	r.waitStack(t, 1)
	// The port is free for the next VM, which may reuse B's MAC.
	b2 := r.connect(t, macB, v1)
	if b2.ep.PortID() != port {
		t.Fatalf("new guest on port %d, want the freed %d", b2.ep.PortID(), port)
	}
	b2.send(t, vnetHdr{}, b2.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.6", 60)))
	r.waitStack(t, 1)
	a.send(t, vnetHdr{}, a.frame(macB, header.IPv4ProtocolNumber, []byte("hello b2, pad to sixty bytes of frame please..")))
	if _, f := b2.recv(t); !bytes.Contains(f, []byte("hello b2")) {
		t.Fatalf("B2 got %x", f)
	}
	if _, err := r.sw.AcquireBackend(func() {}); err == nil {
		t.Fatal("a third frontend got a port of a two-port switch")
	}
}

// TestSwitchOffloads: a guest's TSO frame (partial checksum, GSO) reaches
// a guest that negotiated TSO as is, header and all, and one that did
// not as MSS-sized segments with full checksums; a partial checksum alone
// is finished for a guest without GUEST_CSUM. Metadata that does not fit
// the frame is dropped, not handed on.
func TestSwitchOffloads(t *testing.T) {
	const tsoFeatures = v1 | 1<<FeatureCsum | 1<<FeatureHostTSO4 | 1<<FeatureHostTSO6 |
		1<<FeatureGuestCsum | 1<<FeatureGuestTSO4 | 1<<FeatureGuestTSO6
	r := newSwitchRig(t, 3, false)
	a := r.connect(t, macA, tsoFeatures)
	tso := r.connect(t, macB, tsoFeatures)
	plain := r.connect(t, macC, v1|1<<FeatureCsum)
	for _, g := range []*swGuest{a, tso, plain} {
		g.send(t, vnetHdr{}, g.frame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.5", 60)))
	}
	r.waitStack(t, 3)

	for _, v6 := range []bool{false, true} {
		payload := bytes.Repeat([]byte("0123456789abcdef"), 1000) // 16000 bytes
		f, l := gsoFrame(v6, payload, header.TCPFlagAck|header.TCPFlagPsh)
		const mss = 1400
		gt := uint8(gsoTCPv4)
		if v6 {
			gt = gsoTCPv6
		}
		h := vnetHdr{Flags: hdrFNeedsCsum, GSOType: gt, GSOSize: mss, HdrLen: uint16(l.hdrLen),
			CsumStart: uint16(l.l4Start), CsumOffset: header.TCPChecksumOffset}
		for _, dst := range []*swGuest{tso, plain} {
			frame := bytes.Clone(f)
			copy(frame[0:6], dst.mac)
			copy(frame[6:12], a.mac)
			a.send(t, h, frame)
			if dst == tso {
				gh, got := dst.recv(t)
				if !bytes.Equal(got, frame) || gh.GSOType != h.GSOType || gh.GSOSize != mss ||
					gh.CsumStart != h.CsumStart || gh.CsumOffset != h.CsumOffset || gh.Flags != hdrFNeedsCsum {
					t.Fatalf("v6 %v: TSO guest got header %+v, %d bytes; want %+v and the frame as sent", v6, gh, len(got), h)
				}
				continue
			}
			var data []byte
			for len(data) < len(payload) {
				gh, seg := dst.recv(t)
				if gh.GSOType != 0 || gh.Flags&hdrFNeedsCsum != 0 || len(seg) > l.hdrLen+mss {
					t.Fatalf("v6 %v: plain guest got header %+v, %d bytes", v6, gh, len(seg))
				}
				tcpValid(t, seg, l)
				data = append(data, seg[l.hdrLen:]...)
			}
			if !bytes.Equal(data, payload) {
				t.Fatalf("v6 %v: segments carry other data", v6)
			}
		}
	}

	// A partial checksum without GSO (a small TCP segment).
	f, l := gsoFrame(false, []byte("small segment"), header.TCPFlagAck)
	copy(f[0:6], plain.mac)
	copy(f[6:12], a.mac)
	a.send(t, vnetHdr{Flags: hdrFNeedsCsum, CsumStart: uint16(l.l4Start), CsumOffset: header.TCPChecksumOffset}, f)
	if gh, got := plain.recv(t); gh.Flags != 0 {
		t.Fatalf("plain guest got flags %d", gh.Flags)
	} else {
		tcpValid(t, got[:len(f)], l)
	}

	// Metadata past the frame's end: dropped and counted.
	a.send(t, vnetHdr{Flags: hdrFNeedsCsum, CsumStart: uint16(len(f) - 2), CsumOffset: 16}, f)
	bad := bytes.Clone(f)
	copy(bad[0:6], tso.mac)
	a.send(t, vnetHdr{Flags: hdrFNeedsCsum, GSOType: gsoTCPv4, GSOSize: 1400, CsumStart: 20, CsumOffset: 16}, bad)
	waitFor(t, "bad offloads counted", func() bool { return r.sw.Stats.BadOffload.Load() == 2 })
	plain.quiet(t)
	tso.quiet(t)
}

// TestSwitchSinglePortTakesAll: with one port, everything the stack sends
// reaches the guest whatever its destination MAC, as a lone endpoint did.
func TestSwitchSinglePortTakesAll(t *testing.T) {
	r := newSwitchRig(t, 1, false)
	a := r.connect(t, macA, v1)
	var l stack.PacketBufferList
	l.PushBack(outPacketTo(a.ep, guestMAC, []byte("before learning")))
	r.sw.WritePackets(l)
	l.Reset()
	if _, f := a.recv(t); !bytes.Contains(f, []byte("before learning")) {
		t.Fatalf("got %x", f)
	}
}

type nullDispatcher struct{}

func (nullDispatcher) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (nullDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

// BenchmarkDeliver is a guest's frame to the gateway handed to the stack,
// by a lone endpoint and through a switch port (learning checks, the
// gateway fast path): the cost the switch adds to every guest frame.
func BenchmarkDeliver(b *testing.B) {
	frame := ethFrame(gwMAC, header.IPv4ProtocolNumber, ipv4Payload("10.0.2.15", 1500))
	for _, via := range []string{"endpoint", "switch"} {
		b.Run(via, func(b *testing.B) {
			sw, err := NewSwitch(SwitchOptions{Port: Options{LinkAddress: gwMAC, GuestMAC: guestMAC}})
			if err != nil {
				b.Fatal(err)
			}
			sw.Attach(nullDispatcher{})
			e, _ := sw.AcquireBackend(func() {})
			ep := e.(*Endpoint)
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for range b.N {
				pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)})
				if via == "switch" {
					sw.input(ep, pkt, vnetHdr{})
				} else {
					ep.deliver(pkt)
				}
			}
		})
	}
}

// BenchmarkSwitchRX is BenchmarkRX's 1500-byte case through a switch:
// one port (everything to it) and two (by destination MAC).
func BenchmarkSwitchRX(b *testing.B) {
	for _, ports := range []int{1, 2} {
		b.Run(strconv.Itoa(ports)+"ports", func(b *testing.B) {
			sw, err := NewSwitch(SwitchOptions{Ports: ports, Port: Options{LinkAddress: gwMAC, GuestMAC: guestMAC}})
			if err != nil {
				b.Fatal(err)
			}
			be, _ := sw.AcquireBackend(func() {})
			ep := be.(*Endpoint)
			ep.SetFeatures(v1)
			d := vqt.New(64<<20, 256, true)
			k, _ := virtqueue.CreateEventFD()
			defer k.Close()
			ep.StartQueue(rxQueue, d.Queue(func() error { return nil }), k)
			defer ep.Reset()
			// The guest's MAC is learnt from its first frame.
			sw.learn(ep, [6]byte([]byte(guestMAC)))
			payload := make([]byte, 1500)
			const batch = 64
			b.SetBytes(int64(len(payload)))
			var l stack.PacketBufferList
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(b.N-done, batch)
				b.StopTimer()
				l.Reset()
				d.Reap()
				for range n {
					d.Post(nil, nil, []int{4096}, false)
					l.PushBack(outPacketTo(ep, guestMAC, payload))
				}
				b.StartTimer()
				sw.WritePackets(l)
				done += n
			}
			b.StopTimer()
			l.Reset()
		})
	}
}

// BenchmarkGuestToGuest is a frame switched from one port's guest to
// another's RX ring with its header: 1514 bytes, and a 64 KiB TSO frame
// handed on as is.
func BenchmarkGuestToGuest(b *testing.B) {
	const tsoFeatures = v1 | 1<<FeatureCsum | 1<<FeatureHostTSO4 | 1<<FeatureGuestCsum | 1<<FeatureGuestTSO4
	big, l := gsoFrame(false, make([]byte, 65535-54), header.TCPFlagAck)
	small, _ := gsoFrame(false, make([]byte, 1460), header.TCPFlagAck)
	for _, c := range []struct {
		name  string
		frame []byte
		h     vnetHdr
	}{
		{"1514B", small, vnetHdr{Flags: hdrFNeedsCsum, CsumStart: uint16(l.l4Start), CsumOffset: header.TCPChecksumOffset}},
		{"65549B-TSO", big, vnetHdr{Flags: hdrFNeedsCsum, GSOType: gsoTCPv4, GSOSize: 1448, HdrLen: uint16(l.hdrLen), CsumStart: uint16(l.l4Start), CsumOffset: header.TCPChecksumOffset}},
	} {
		b.Run(c.name, func(b *testing.B) {
			sw, err := NewSwitch(SwitchOptions{Ports: 2, Port: Options{LinkAddress: gwMAC, GuestMAC: guestMAC}})
			if err != nil {
				b.Fatal(err)
			}
			sw.Attach(nullDispatcher{})
			sb, _ := sw.AcquireBackend(func() {})
			db, _ := sw.AcquireBackend(func() {})
			src, dst := sb.(*Endpoint), db.(*Endpoint)
			dst.SetFeatures(tsoFeatures)
			d := vqt.New(64<<20, 256, true)
			k, _ := virtqueue.CreateEventFD()
			defer k.Close()
			dst.StartQueue(rxQueue, d.Queue(func() error { return nil }), k)
			defer dst.Reset()
			sw.learn(src, [6]byte([]byte(macA)))
			sw.learn(dst, [6]byte([]byte(macB)))
			frame := bytes.Clone(c.frame)
			copy(frame[0:6], macB)
			copy(frame[6:12], macA)
			per := (len(frame) + 12 + 4095) / 4096
			batch := 256 / per
			b.SetBytes(int64(len(frame)))
			pkts := make([]*stack.PacketBuffer, 0, batch)
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(b.N-done, batch)
				b.StopTimer()
				d.Reap()
				for range n * per {
					d.Post(nil, nil, []int{4096}, false)
				}
				pkts = pkts[:0]
				for range n {
					pkts = append(pkts, stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(frame)}))
				}
				b.StartTimer()
				for _, p := range pkts {
					sw.input(src, p, c.h)
				}
				done += n
			}
			if got := sw.Stats.Unicast.Load(); got < uint64(b.N) {
				b.Fatalf("%d frames switched, want %d", got, b.N)
			}
		})
	}
}
