package endpoint

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

var (
	gwMAC    = tcpip.LinkAddress("\x52\x55\x0a\x00\x02\x02")
	guestMAC = tcpip.LinkAddress("\x52\x54\x00\x12\x34\x56")
)

// capture is a NetworkDispatcher that keeps what the endpoint delivers.
type capture struct {
	mu   sync.Mutex
	pkts []captured
	ch   chan struct{}
}

type captured struct {
	proto     tcpip.NetworkProtocolNumber
	data      []byte // network header onward
	validated bool
	pktType   tcpip.PacketType
}

func (c *capture) DeliverNetworkPacket(p tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	c.mu.Lock()
	c.pkts = append(c.pkts, captured{p, pkt.Data().AsRange().ToSlice(), pkt.RXChecksumValidated, pkt.PktType})
	c.mu.Unlock()
	c.ch <- struct{}{}
}
func (c *capture) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}

// rig is an endpoint with both queues on mock drivers.
type rig struct {
	ep       *Endpoint
	rxd, txd *vqt.Driver
	rxk, txk *virtqueue.EventFD
	cap      *capture
	calls    int
}

func newRig(t *testing.T, features uint64, opts Options) *rig {
	t.Helper()
	opts.LinkAddress, opts.GuestMAC = gwMAC, guestMAC
	ep, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ep.SetFeatures(features)
	r := &rig{ep: ep, cap: &capture{ch: make(chan struct{}, 1024)}}
	ep.Attach(r.cap)
	eventIdx := features&(1<<29) != 0
	r.rxd, r.txd = vqt.New(4<<20, 256, eventIdx), vqt.New(4<<20, 256, eventIdx)
	r.rxk, _ = virtqueue.CreateEventFD()
	r.txk, _ = virtqueue.CreateEventFD()
	notify := func() error { r.calls++; return nil }
	ep.StartQueue(rxQueue, r.rxd.Queue(notify), r.rxk)
	ep.StartQueue(txQueue, r.txd.Queue(func() error { return nil }), r.txk)
	t.Cleanup(func() {
		ep.Reset()
		r.rxk.Close()
		r.txk.Close()
	})
	return r
}

const v1 = 1<<featureVersion1 | 1<<FeatureMrgRxbuf | 1<<29

func ethFrame(dst tcpip.LinkAddress, proto tcpip.NetworkProtocolNumber, payload []byte) []byte {
	b := make([]byte, header.EthernetMinimumSize+len(payload))
	header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: dst, Type: proto})
	copy(b[header.EthernetMinimumSize:], payload)
	return b
}

func vhdr(hl int, h vnetHdr) []byte {
	b := make([]byte, hl)
	h.encode(b)
	return b
}

func TestTXLayouts(t *testing.T) {
	payload := bytes.Repeat([]byte{0x45, 1, 2, 3, 4, 5, 6, 7}, 30)
	frame := ethFrame(gwMAC, header.IPv4ProtocolNumber, payload)
	for _, tc := range []struct {
		name     string
		features uint64
		hl       int
		sizes    []int
		indirect bool
	}{
		{"header in its own descriptor", v1, 12, []int{12}, false},
		{"header split 5+7", v1, 12, []int{5, 7}, false},
		{"header and frame together", v1, 12, nil, false},
		{"header with start of frame", v1, 12, []int{20}, false},
		{"one-byte descriptors", v1, 12, func() []int {
			s := make([]int, 40)
			for i := range s {
				s[i] = 1
			}
			return s
		}(), false},
		{"indirect", v1, 12, []int{12, 7, 100}, true},
		{"legacy 10-byte header", 0, 10, []int{10}, false},
		{"legacy mergeable 12-byte header", 1 << FeatureMrgRxbuf, 12, []int{3, 9}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, tc.features, Options{})
			buf := append(vhdr(tc.hl, vnetHdr{}), frame...)
			if _, err := r.txd.Post(buf, tc.sizes, nil, tc.indirect); err != nil {
				t.Fatal(err)
			}
			r.txk.Signal()
			select {
			case <-r.cap.ch:
			case <-time.After(30 * time.Second):
				t.Fatal("frame not delivered")
			}
			got := r.cap.pkts[0]
			if got.proto != header.IPv4ProtocolNumber || !bytes.Equal(got.data, payload) || got.pktType != tcpip.PacketHost {
				t.Fatalf("delivered proto %d type %d data %x", got.proto, got.pktType, got.data)
			}
			waitUsed(t, r.txd, 1)
		})
	}
}

func waitUsed(t *testing.T, d *vqt.Driver, n int) []vqt.Used {
	t.Helper()
	var all []vqt.Used
	deadline := time.Now().Add(30 * time.Second)
	for len(all) < n && time.Now().Before(deadline) {
		all = append(all, d.Reap()...)
		time.Sleep(time.Millisecond)
	}
	if len(all) != n {
		t.Fatalf("%d used entries, want %d", len(all), n)
	}
	return all
}

func TestTXHostileFrames(t *testing.T) {
	r := newRig(t, v1&^(1<<FeatureHostTSO4), Options{})
	frame := ethFrame(gwMAC, header.IPv4ProtocolNumber, make([]byte, 40))
	r.txd.Post([]byte{1, 2, 3}, nil, nil, false)                                                       // shorter than the header
	r.txd.Post(append(vhdr(12, vnetHdr{}), 1, 2, 3), nil, nil, false)                                  // shorter than Ethernet
	r.txd.Post(append(vhdr(12, vnetHdr{GSOType: gsoTCPv4, GSOSize: 1400}), frame...), nil, nil, false) // GSO not negotiated
	r.txd.Post(append(vhdr(12, vnetHdr{GSOType: 77}), frame...), nil, nil, false)                      // unknown GSO
	r.txd.Post(nil, nil, []int{64}, false)                                                             // writable-only chain
	r.txd.Post(append(vhdr(12, vnetHdr{Flags: hdrFNeedsCsum, CsumStart: 34, CsumOffset: 16}), frame...), nil, nil, false)
	r.txk.Signal()
	select {
	case <-r.cap.ch:
	case <-time.After(30 * time.Second):
		t.Fatal("good frame not delivered")
	}
	if !r.cap.pkts[0].validated {
		t.Error("NEEDS_CSUM frame not marked validated")
	}
	used := waitUsed(t, r.txd, 6)
	for _, u := range used {
		if u.Len != 0 {
			t.Errorf("TX used length %d, want 0", u.Len)
		}
	}
	s := &r.ep.Stats
	if s.TXBadHeader.Load() != 2 || s.TXShort.Load() != 1 || s.TXBadGSO.Load() != 2 || s.Queues[txQueue].Frames.Load() != 1 {
		t.Fatalf("stats badhdr %d short %d badgso %d frames %d", s.TXBadHeader.Load(), s.TXShort.Load(), s.TXBadGSO.Load(), s.Queues[txQueue].Frames.Load())
	}
}

// outPacket builds a packet as the stack hands it to WritePackets.
func outPacket(ep *Endpoint, payload []byte) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.EthernetMinimumSize,
		Payload:            buffer.MakeWithData(payload),
	})
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	pkt.EgressRoute.RemoteLinkAddress = guestMAC
	pkt.EgressRoute.LocalLinkAddress = gwMAC
	ep.AddHeader(pkt)
	return pkt
}

func write(ep *Endpoint, payloads ...[]byte) {
	var l stack.PacketBufferList
	for _, p := range payloads {
		l.PushBack(outPacket(ep, p))
	}
	ep.WritePackets(l)
	l.DecRef()
}

// readRX reassembles the frame the guest sees from used entries: header
// from the first element, frame across the used bytes of num_buffers
// elements.
func readRX(t *testing.T, hl int, used []vqt.Used) (vnetHdr, []byte, []vqt.Used) {
	t.Helper()
	var all []byte
	first := used[0]
	var flat []byte
	for _, b := range first.Chain.In {
		flat = append(flat, b...)
	}
	h := decodeHdr(flat[:hl])
	n := 1
	if hl == hdrLenMrg && h.NumBuffers > 0 {
		n = int(h.NumBuffers)
	}
	if n > len(used) {
		t.Fatalf("num_buffers %d but %d used", n, len(used))
	}
	for _, u := range used[:n] {
		var b []byte
		for _, s := range u.Chain.In {
			b = append(b, s...)
		}
		if int(u.Len) > len(b) {
			t.Fatalf("used len %d > buffer %d", u.Len, len(b))
		}
		all = append(all, b[:u.Len]...)
	}
	return h, all[hl:], used[n:]
}

func TestRXLayouts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		features  uint64
		hl        int
		bufs      [][]int // one entry per posted element: its descriptor sizes
		frameLen  int     // Ethernet frame length (14 + payload)
		wantElems int
	}{
		{"one big buffer", v1, 12, [][]int{{1526}}, 1000, 1},
		{"buffer larger than frame", v1, 12, [][]int{{65562}}, 100, 1},
		{"short frame padded", v1, 12, [][]int{{1526}}, 42, 1},
		{"short frame padded across descriptors", v1, 12, [][]int{{12, 30, 5, 5, 5, 100}}, 42, 1},
		{"header in its own descriptor", v1, 12, [][]int{{12, 1514}}, 1514, 1},
		{"header split 5+7", v1, 12, [][]int{{5, 7, 1514}}, 1514, 1},
		{"mergeable 3 elements", v1, 12, [][]int{{512}, {512}, {512}, {512}}, 1400, 3},
		{"mergeable padding in second element", v1, 12, [][]int{{40}, {40}}, 42, 2},
		{"64 KiB over 4 KiB buffers", v1, 12, func() [][]int {
			b := make([][]int, 20)
			for i := range b {
				b[i] = []int{4096}
			}
			return b
		}(), 65000, 16},
		{"no mergeable: one multi-descriptor element", 1 << featureVersion1, 12, [][]int{{12, 100, 1000, 500}}, 1514, 1},
		{"legacy 10-byte header", 0, 10, [][]int{{10, 1514}}, 1514, 1},
		{"legacy mergeable", 1 << FeatureMrgRxbuf, 12, [][]int{{100}, {100}}, 150, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, tc.features, Options{MTU: MaxMTU})
			for _, b := range tc.bufs {
				if _, err := r.rxd.Post(nil, nil, b, false); err != nil {
					t.Fatal(err)
				}
			}
			payload := make([]byte, tc.frameLen-header.EthernetMinimumSize)
			for i := range payload {
				payload[i] = byte(i*7 + 1)
			}
			write(r.ep, payload)
			used := r.rxd.Reap()
			if len(used) != tc.wantElems {
				t.Fatalf("%d elements used, want %d", len(used), tc.wantElems)
			}
			h, frame, rest := readRX(t, tc.hl, used)
			if len(rest) != 0 {
				t.Fatalf("%d extra used entries", len(rest))
			}
			if tc.hl == hdrLenMrg && int(h.NumBuffers) != tc.wantElems {
				t.Fatalf("num_buffers %d want %d", h.NumBuffers, tc.wantElems)
			}
			want := ethFrame(guestMAC, header.IPv4ProtocolNumber, payload)
			copy(want[6:12], gwMAC)
			if len(want) < ethZLen {
				want = append(want, make([]byte, ethZLen-len(want))...)
			}
			if !bytes.Equal(frame, want) {
				t.Fatalf("frame (%d bytes) differs from want (%d bytes)", len(frame), len(want))
			}
			if r.calls != 1 {
				t.Fatalf("%d notifies, want 1", r.calls)
			}
		})
	}
}

func TestRXBatchOneNotify(t *testing.T) {
	r := newRig(t, v1, Options{})
	for i := 0; i < 8; i++ {
		r.rxd.Post(nil, nil, []int{1526}, false)
	}
	var p [][]byte
	for i := 0; i < 8; i++ {
		p = append(p, make([]byte, 100))
	}
	write(r.ep, p...)
	if n := len(r.rxd.Reap()); n != 8 || r.calls != 1 {
		t.Fatalf("%d used, %d notifies", n, r.calls)
	}
}

func TestRXBacklog(t *testing.T) {
	r := newRig(t, v1, Options{RXBacklog: 4})
	for i := 0; i < 6; i++ {
		write(r.ep, []byte{byte(i), 0, 0, 0})
	}
	if r.ep.Stats.RXBacklogged.Load() != 4 || r.ep.Stats.RXBacklogFull.Load() != 2 {
		t.Fatalf("backlogged %d full %d", r.ep.Stats.RXBacklogged.Load(), r.ep.Stats.RXBacklogFull.Load())
	}
	for i := 0; i < 8; i++ {
		r.rxd.Post(nil, nil, []int{1526}, false)
	}
	r.rxk.Signal() // the guest's kick
	used := waitUsed(t, r.rxd, 4)
	for i, u := range used {
		_, frame, _ := readRX(t, 12, []vqt.Used{u})
		if frame[14] != byte(i) {
			t.Fatalf("backlog order: packet %d has %d", i, frame[14])
		}
	}
}

// TestRXBacklogMemory: packets waiting for guest buffers are accounted in
// the memory budget; beyond it they are dropped like a full backlog, and
// draining (or dropping) the backlog gives the memory back.
func TestRXBacklogMemory(t *testing.T) {
	mem := budget.New(64 << 10)
	r := newRig(t, v1, Options{RXBacklog: 1024, Memory: mem})
	for i := 0; i < 16; i++ {
		write(r.ep, make([]byte, 6000))
	}
	st := &r.ep.Stats
	queued := st.RXBacklogged.Load()
	if queued == 0 || queued >= 16 || st.RXBacklogMem.Load() != 16-queued {
		t.Fatalf("backlogged %d, dropped for memory %d; want some of each", queued, st.RXBacklogMem.Load())
	}
	if u := mem.Used(); u == 0 || u > 64<<10 {
		t.Fatalf("budget used %d with %d packets queued", u, queued)
	}
	for i := 0; i < 16; i++ {
		r.rxd.Post(nil, nil, []int{6100}, false)
	}
	r.rxk.Signal()
	waitUsed(t, r.rxd, int(queued))
	deadline := time.Now().Add(10 * time.Second)
	for mem.Used() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("budget used %d after the backlog drained", mem.Used())
		}
		time.Sleep(time.Millisecond)
	}
}

func TestRXTooSmallWithoutMergeable(t *testing.T) {
	r := newRig(t, 1<<featureVersion1, Options{})
	r.rxd.Post(nil, nil, []int{100}, false)
	write(r.ep, make([]byte, 1000))
	if r.ep.Stats.RXTooBig.Load() != 1 || len(r.rxd.Reap()) != 0 {
		t.Fatal("oversized frame not dropped")
	}
	write(r.ep, make([]byte, 50)) // a small one still uses the buffer
	if len(r.rxd.Reap()) != 1 {
		t.Fatal("buffer not reused after drop")
	}
}

func TestRXNotConnected(t *testing.T) {
	ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
	write(ep, make([]byte, 10))
	if ep.Stats.RXNotConnected.Load() != 1 {
		t.Fatal("drop not counted")
	}
}

func TestConfigSpace(t *testing.T) {
	ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, MTU: 9000})
	c := ep.Config()
	if !bytes.Equal(c[:6], []byte(guestMAC)) || binary.LittleEndian.Uint16(c[6:]) != 1 || binary.LittleEndian.Uint16(c[10:]) != 9000 {
		t.Fatalf("config %x", c)
	}
	if _, err := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, MTU: 70000}); err == nil {
		t.Fatal("MTU 70000 accepted")
	}
}

// The device benchmarks time only the device's work. The mock driver's
// work (posting and reaping buffers) and building packets happen with the
// timer stopped, once per batch: stopping the timer per frame costs more
// than a frame (it reads memory statistics) and made `make bench` run for
// many minutes.

func BenchmarkTX(b *testing.B)       { benchTX(b, false) }
func BenchmarkTXPacked(b *testing.B) { benchTX(b, true) }

func benchTX(b *testing.B, packed bool) {
	// A full-size frame, and the largest TSO segment a Linux guest sends
	// (IP total length 65535), in 4 KiB descriptors.
	tso := vnetHdr{Flags: hdrFNeedsCsum, GSOType: gsoTCPv4, GSOSize: 1448, HdrLen: 54, CsumStart: 34, CsumOffset: 16}
	for _, c := range []struct {
		name string
		h    vnetHdr
		size int
	}{{"1514B", vnetHdr{}, 1500}, {"65549B-TSO", tso, 65535}} {
		b.Run(c.name, func(b *testing.B) {
			ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
			ep.SetFeatures(v1 | 1<<FeatureHostTSO4 | 1<<FeatureCsum)
			const batch = 64 // frames per batch; 17 descriptors each at most
			d := vqt.NewRing(packed, 16<<20, 2048, true)
			q := d.Queue(nil)
			frame := append(vhdr(12, c.h), ethFrame(gwMAC, header.IPv4ProtocolNumber, make([]byte, c.size))...)
			sizes := []int{12}
			for n := len(frame) - 12; n > 0; n -= 4096 {
				sizes = append(sizes, min(n, 4096))
			}
			var el virtqueue.Element
			var scratch [12]byte
			b.SetBytes(int64(len(frame) - 12))
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(b.N-done, batch)
				b.StopTimer()
				d.Reap()
				for range n {
					if _, err := d.Post(frame, sizes, nil, false); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				for range n {
					if err := q.Pop(&el); err != nil {
						b.Fatal(err)
					}
					pkt, _ := ep.readFrame(&el, scratch[:], &ep.Stats.Queues[txQueue])
					pkt.DecRef()
					q.Push(el.Head, 0)
				}
				q.Flush()
				done += n
			}
		})
	}
}

func BenchmarkRX(b *testing.B)       { benchRX(b, false) }
func BenchmarkRXPacked(b *testing.B) { benchRX(b, true) }

func benchRX(b *testing.B, packed bool) {
	for _, size := range []int{64, 1500, 65000} {
		b.Run(byteSize(size), func(b *testing.B) {
			ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, MTU: MaxMTU})
			ep.SetFeatures(v1)
			d := vqt.NewRing(packed, 64<<20, 256, true)
			k, _ := virtqueue.CreateEventFD()
			defer k.Close()
			ep.StartQueue(rxQueue, d.Queue(func() error { return nil }), k)
			defer ep.Reset()
			payload := make([]byte, size)
			per := (size + 4095) / 4096 // 4 KiB buffers per frame
			batch := 256 / per
			b.SetBytes(int64(size))
			var l stack.PacketBufferList
			b.ResetTimer()
			for done := 0; done < b.N; {
				n := min(b.N-done, batch)
				b.StopTimer()
				l.Reset() // releases the packets, as the stack does
				d.Reap()
				for range n * per {
					d.Post(nil, nil, []int{4096}, false)
				}
				for range n {
					l.PushBack(outPacket(ep, payload))
				}
				b.StartTimer()
				ep.WritePackets(l)
				done += n
			}
			b.StopTimer()
			l.Reset()
		})
	}
}

func byteSize(n int) string { return map[int]string{64: "64B", 1500: "1500B", 65000: "65000B"}[n] }

func TestARPOnlyForOwnAddresses(t *testing.T) {
	r := newRig(t, v1, Options{ARPTargets: []netip.Addr{netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3")}})
	arp := func(sender, target string) []byte {
		b := make([]byte, header.ARPSize)
		a := header.ARP(b)
		a.SetIPv4OverEthernet()
		a.SetOp(header.ARPRequest)
		copy(a.HardwareAddressSender(), guestMAC)
		copy(a.ProtocolAddressSender(), netip.MustParseAddr(sender).AsSlice())
		copy(a.ProtocolAddressTarget(), netip.MustParseAddr(target).AsSlice())
		return append(vhdr(12, vnetHdr{}), ethFrame(header.EthernetBroadcastAddress, header.ARPProtocolNumber, b)...)
	}
	r.txd.Post(arp("0.0.0.0", "10.0.2.15"), nil, nil, false)   // conflict probe for the guest's lease
	r.txd.Post(arp("10.0.2.15", "10.0.2.16"), nil, nil, false) // nobody there
	r.txd.Post(arp("10.0.2.15", "10.0.2.2"), nil, nil, false)  // the gateway: answered
	r.txk.Signal()
	select {
	case <-r.cap.ch:
	case <-time.After(30 * time.Second):
		t.Fatal("gateway ARP not delivered")
	}
	waitUsed(t, r.txd, 3)
	if n := r.ep.Stats.ARPIgnored.Load(); n != 2 || len(r.cap.pkts) != 1 {
		t.Fatalf("ignored %d delivered %d", n, len(r.cap.pkts))
	}
}

// TestTXGSOAcross4KiB: a 64 KiB TSO segment from the guest, header in its
// own descriptor and the frame in 4 KiB pieces, reaches the stack whole.
func TestTXGSOAcross4KiB(t *testing.T) {
	for _, n := range []int{65000, 65535} { // 65535: more than one 64 KiB chunk
		t.Run(strconv.Itoa(n), func(t *testing.T) { testTXGSO(t, n) })
	}
}

func testTXGSO(t *testing.T, n int) {
	r := newRig(t, v1|1<<FeatureHostTSO4|1<<FeatureCsum, Options{})
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(i * 3)
	}
	frame := ethFrame(gwMAC, header.IPv4ProtocolNumber, payload)
	h := vnetHdr{Flags: hdrFNeedsCsum, GSOType: gsoTCPv4, GSOSize: 1448, HdrLen: 54, CsumStart: 34, CsumOffset: 16}
	sizes := []int{12}
	for n := len(frame); n > 0; n -= 4096 {
		sizes = append(sizes, min(n, 4096))
	}
	if _, err := r.txd.Post(append(vhdr(12, h), frame...), sizes, nil, false); err != nil {
		t.Fatal(err)
	}
	r.txk.Signal()
	select {
	case <-r.cap.ch:
	case <-time.After(30 * time.Second):
		t.Fatal("GSO frame not delivered")
	}
	got := r.cap.pkts[0]
	if !bytes.Equal(got.data, payload) || !got.validated {
		t.Fatalf("delivered %d bytes (want %d), validated %v", len(got.data), len(payload), got.validated)
	}
}
