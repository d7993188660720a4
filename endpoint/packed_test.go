package endpoint

import (
	"bytes"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// The endpoint drives a packed ring through the same Queue methods as a
// split one; these tests run its TX and RX paths (mergeable buffers, the
// backlog and its kick) over packed rings.

type packedRig struct {
	ep       *Endpoint
	rxd, txd *vqt.PackedDriver
	rxk, txk *virtqueue.EventFD
	cap      *capture
	calls    int
}

func newPackedRig(t *testing.T, features uint64, opts Options) *packedRig {
	t.Helper()
	opts.LinkAddress, opts.GuestMAC = gwMAC, guestMAC
	ep, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ep.SetFeatures(features)
	r := &packedRig{ep: ep, cap: &capture{ch: make(chan struct{}, 1024)}}
	ep.Attach(r.cap)
	eventIdx := features&(1<<29) != 0
	r.rxd, r.txd = vqt.NewPacked(4<<20, 256, eventIdx), vqt.NewPacked(4<<20, 256, eventIdx)
	r.rxk, _ = virtqueue.CreateEventFD()
	r.txk, _ = virtqueue.CreateEventFD()
	ep.StartQueue(rxQueue, r.rxd.Queue(func() error { r.calls++; return nil }), r.rxk)
	ep.StartQueue(txQueue, r.txd.Queue(func() error { return nil }), r.txk)
	t.Cleanup(func() {
		ep.Reset()
		r.rxk.Close()
		r.txk.Close()
	})
	return r
}

func waitReaped(t *testing.T, d vqt.Ring, n int) []vqt.Used {
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

func TestPackedTX(t *testing.T) {
	payload := bytes.Repeat([]byte{0x45, 1, 2, 3, 4, 5, 6, 7}, 30)
	frame := append(vhdr(12, vnetHdr{}), ethFrame(gwMAC, header.IPv4ProtocolNumber, payload)...)
	for _, eventIdx := range []uint64{0, 1 << 29} {
		r := newPackedRig(t, v1&^(1<<29)|eventIdx, Options{})
		// Enough frames to go round the 256-slot ring several times, in
		// every layout: header apart, split, together, indirect.
		layouts := [][]int{{12}, {5, 7}, nil, {12, 7, 100}}
		const frames = 600
		for i := 0; i < frames; i++ {
			if _, err := r.txd.Post(frame, layouts[i%4], nil, i%5 == 0); err != nil {
				t.Fatalf("frame %d: %v", i, err) // each one is reaped below
			}
			r.txk.Signal()
			select {
			case <-r.cap.ch:
			case <-time.After(30 * time.Second):
				t.Fatalf("frame %d not delivered", i)
			}
			waitReaped(t, r.txd, 1) // the device advanced by the chain's slots
		}
		r.cap.mu.Lock()
		n := len(r.cap.pkts)
		got := r.cap.pkts[n-1]
		r.cap.mu.Unlock()
		if n != frames || got.proto != header.IPv4ProtocolNumber || !bytes.Equal(got.data, payload) || got.pktType != tcpip.PacketHost {
			t.Fatalf("eventIdx %d: %d delivered, last proto %d data %x", eventIdx, n, got.proto, got.data)
		}
		if r.ep.Stats.Queues[txQueue].Frames.Load() != frames {
			t.Fatalf("TX frames %d", r.ep.Stats.Queues[txQueue].Frames.Load())
		}
	}
}

func TestPackedRX(t *testing.T) {
	for _, tc := range []struct {
		name      string
		bufs      [][]int
		frameLen  int
		wantElems int
	}{
		{"one big buffer", [][]int{{1526}}, 1000, 1},
		{"header in its own descriptor", [][]int{{12, 1514}}, 1514, 1},
		{"mergeable 3 elements", [][]int{{512}, {512}, {512}, {512}}, 1400, 3},
		{"64 KiB over 4 KiB buffers", func() [][]int {
			b := make([][]int, 20)
			for i := range b {
				b[i] = []int{4096}
			}
			return b
		}(), 65000, 16},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newPackedRig(t, v1, Options{MTU: MaxMTU})
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
			h, frame, rest := readRX(t, 12, used)
			if len(rest) != 0 || int(h.NumBuffers) != tc.wantElems {
				t.Fatalf("%d extra used entries, num_buffers %d", len(rest), h.NumBuffers)
			}
			want := ethFrame(guestMAC, header.IPv4ProtocolNumber, payload)
			copy(want[6:12], gwMAC)
			if !bytes.Equal(frame, want) {
				t.Fatalf("frame (%d bytes) differs from want (%d bytes)", len(frame), len(want))
			}
			if r.calls != 1 {
				t.Fatalf("%d notifies, want 1", r.calls)
			}
		})
	}
}

// TestPackedRXBacklogKick: frames wait for buffers; too few buffers for
// the first 64 KiB frame rewinds the collection; the guest's next
// buffers and kick deliver the whole backlog in order.
func TestPackedRXBacklogKick(t *testing.T) {
	r := newPackedRig(t, v1, Options{MTU: MaxMTU, RXBacklog: 8})
	big := make([]byte, 20000)
	big[0] = 0
	write(r.ep, big)
	for i := 1; i < 4; i++ {
		write(r.ep, []byte{byte(i), 0, 0, 0})
	}
	for i := 0; i < 3; i++ { // 3 × 4 KiB: too few for 20 KB
		r.rxd.Post(nil, nil, []int{4096}, false)
	}
	r.rxk.Signal()
	time.Sleep(50 * time.Millisecond)
	if u := r.rxd.Reap(); len(u) != 0 {
		t.Fatalf("%d used before the frame fits", len(u))
	}
	for i := 0; i < 5; i++ {
		r.rxd.Post(nil, nil, []int{4096}, false)
	}
	r.rxk.Signal()
	used := waitReaped(t, r.rxd, 8)
	_, frame, rest := readRX(t, 12, used)
	if len(frame) != 14+len(big) || len(rest) != 3 {
		t.Fatalf("first frame %d bytes, %d entries left", len(frame), len(rest))
	}
	for i, u := range rest {
		_, f, _ := readRX(t, 12, []vqt.Used{u})
		if f[14] != byte(i+1) {
			t.Fatalf("backlog order: packet %d has %d", i+1, f[14])
		}
	}
}

// FuzzRXPacked is FuzzRX on a packed ring: hostile RX buffer layouts
// (tiny, zero-length and split buffers, chains outside guest memory
// between good ones, device-readable chains, indirect tables) and frames
// of fuzzed sizes, with and without mergeable buffers. The device must
// return exactly the chains it took (a prefix of those posted, in any
// order), each once (the driver panics on an id it does not have in
// flight), and stop with nothing in flight:
// its available position just after the last chain it took, its used
// position where the driver expects the next used descriptor.
func FuzzRXPacked(f *testing.F) {
	f.Add(uint8(0), []byte{0x3f, 0x3f, 0x3f}, []byte{0, 100, 5, 220})
	f.Add(uint8(0), []byte{0x02, 0x80, 0x02, 0x02}, []byte{30, 0})
	f.Add(uint8(1), []byte{0x3f, 0x80, 0x3f, 0x40, 0xff}, []byte{40, 0, 40})
	f.Add(uint8(0), []byte{0xc1, 0x41, 0x00, 0x80, 0xc0}, []byte{255, 255, 1})
	f.Add(uint8(0), []byte{0x40, 0x4a, 0x3f, 0x40, 0x3f}, []byte{10, 60, 10, 10}) // chains of three slots
	f.Fuzz(func(t *testing.T, feat uint8, layout []byte, frames []byte) {
		features := []uint64{v1, v1 &^ (1 << FeatureMrgRxbuf), v1 &^ (1 << 29), 1 << FeatureMrgRxbuf}[int(feat)%4]
		ep, err := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
		if err != nil {
			t.Fatal(err)
		}
		ep.SetFeatures(features)
		d := vqt.NewPacked(1<<20, 48, features&(1<<29) != 0) // not a power of two
		q := d.Queue(nil)
		rx := &ep.pairs[0].rx
		rx.mu.Lock()
		rx.q = q
		rx.mu.Unlock()
		ep.updateActiveRX()

		type chain struct {
			id    uint16
			after uint16 // the driver's available state after it
		}
		var order []chain
		var returned []uint16
		reap := func() {
			for _, u := range d.Reap() {
				returned = append(returned, u.Head)
			}
		}
		post := func(b byte) {
			size := (int(b&0x3f) + 1) * 24
			slot := d.AvailState() & 0x7fff
			var id uint16
			var err error
			switch b >> 6 {
			case 0: // one writable buffer
				id, err = d.Post(nil, nil, []int{size}, false)
			case 1: // split in three, the first empty
				id, err = d.Post(nil, nil, []int{0, size / 2, size - size/2}, b&1 == 1)
			case 2: // a buffer outside guest memory: a bad chain
				id, err = d.Post(nil, nil, []int{size}, false)
				if err == nil {
					s := d.Slot(slot)
					s.Addr = 1 << 50
					d.WriteSlot(slot, s)
				}
			case 3: // device-readable only, or readable then writable
				id, err = d.Post(make([]byte, 8), nil, []int{size * int(b&1)}, b&2 == 2)
			}
			if err != nil {
				return // ring full
			}
			order = append(order, chain{id, d.AvailState()})
		}
		for i, b := range layout {
			if i >= 48 {
				break
			}
			post(b)
		}
		for i, b := range frames {
			if i >= 32 {
				break
			}
			n := int(b) * 8
			if b >= 0xf0 {
				n = int(b-0xf0+1) * 4000
			}
			var l stack.PacketBufferList
			l.PushBack(rxPacket(ep, n, b))
			ep.WritePackets(l)
			l.DecRef()
			reap()
			if i%4 == 3 && len(layout) > 48+i/4 {
				post(layout[48+i/4])
				rx.drainLocked(ep, q)
				reap()
			}
		}
		rx.drainLocked(ep, q)
		reap()
		q.Lock()
		broken := q.Broken()
		base := q.Stop()
		q.Unlock()
		rx.mu.Lock()
		rx.q = nil
		rx.mu.Unlock()
		ep.updateActiveRX()
		rx.dropBacklog()
		reap()
		if broken {
			t.Fatalf("ring broken by a layout a driver may post (layout %x, frames %x)", layout, frames)
		}
		if len(returned) > len(order) {
			t.Fatalf("%d chains returned, %d posted", len(returned), len(order))
		}
		// The device takes chains in ring order but may complete them out
		// of order (a bad chain is returned as soon as it is met, before
		// the good ones collected around it for a frame): the returned
		// ids are exactly those of the first len(returned) chains posted.
		want := map[uint16]int{}
		for _, c := range order[:len(returned)] {
			want[c.id]++
		}
		for _, id := range returned {
			if want[id]--; want[id] < 0 {
				t.Fatalf("id %d returned but not among the first %d chains posted (layout %x, frames %x)", id, len(returned), layout, frames)
			}
		}
		wantAvail := uint16(0x8000)
		if k := len(returned); k > 0 {
			wantAvail = order[k-1].after
		}
		if uint16(base) != wantAvail || uint16(base>>16) != d.UsedState() {
			t.Fatalf("stopped at avail %#x used %#x; %d chains returned, so want avail %#x used %#x", uint16(base), base>>16, len(returned), wantAvail, d.UsedState())
		}
	})
}
