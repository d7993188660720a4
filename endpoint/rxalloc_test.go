package endpoint

import (
	"bytes"
	"slices"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// TestPacketSlices: packetSlices sees exactly the bytes AsSlices does, in
// the same views, for a packet whose payload spans several views behind
// its pushed headers.
func TestPacketSlices(t *testing.T) {
	var payload buffer.Buffer
	for i, n := range []int{100, 3000, 7} {
		payload.Append(buffer.NewViewWithData(bytes.Repeat([]byte{byte('a' + i)}, n)))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 64, Payload: payload})
	defer pkt.DecRef()
	copy(pkt.NetworkHeader().Push(20), bytes.Repeat([]byte{'n'}, 20))
	copy(pkt.LinkHeader().Push(14), bytes.Repeat([]byte{'l'}, 14))
	want := pkt.AsSlices()
	got := packetSlices(make([][]byte, 0, 1), pkt)
	if len(got) != len(want) {
		t.Fatalf("%d slices, AsSlices has %d", len(got), len(want))
	}
	if !bytes.Equal(bytes.Join(got, nil), bytes.Join(want, nil)) || len(bytes.Join(got, nil)) != pkt.Size() {
		t.Fatalf("packetSlices differs from AsSlices:\n%q\n%q", got, want)
	}
}

// TestRXWriteAllocatesNothing: in steady state (buffers posted, frames
// fit) handing packets to the guest allocates nothing per packet, plain
// and as a 64 KiB segment offloaded to the guest across many buffers.
func TestRXWriteAllocatesNothing(t *testing.T) {
	for _, c := range []struct {
		name string
		size int
		gso  bool
	}{{"1500B", 1500, false}, {"64KiB-TSO", 65000, true}} {
		t.Run(c.name, func(t *testing.T) {
			ep, _ := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC, MTU: MaxMTU})
			ep.SetFeatures(v1 | 1<<FeatureGuestCsum | 1<<FeatureGuestTSO4)
			d := vqt.New(64<<20, 1024, true)
			k, _ := virtqueue.CreateEventFD()
			defer k.Close()
			ep.StartQueue(rxQueue, d.Queue(func() error { return nil }), k)
			defer ep.Reset()
			per := (c.size + 12 + 4095) / 4096
			const runs = 20
			for range (runs + 1) * per {
				d.Post(nil, nil, []int{4096}, false)
			}
			var pkt *stack.PacketBuffer
			if c.gso {
				f, _ := gsoFrame(false, make([]byte, c.size), header.TCPFlagAck)
				pkt = stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(f)})
				pkt.LinkHeader().Consume(header.EthernetMinimumSize)
				pkt.NetworkHeader().Consume(header.IPv4MinimumSize)
				pkt.TransportHeader().Consume(header.TCPMinimumSize)
				pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, L3HdrLen: header.IPv4MinimumSize, MSS: 1460, MaxSize: gsoMaxSize}
			} else {
				pkt = outPacket(ep, make([]byte, c.size))
			}
			var list stack.PacketBufferList
			list.PushBack(pkt)
			defer list.DecRef()
			before := ep.Stats.Queues[rxQueue].Frames.Load()
			allocs := testing.AllocsPerRun(runs, func() { ep.WritePackets(list) })
			if got := ep.Stats.Queues[rxQueue].Frames.Load() - before; got != runs+1 {
				t.Fatalf("%d frames written, want %d (backlogged %d)", got, runs+1, ep.Stats.RXBacklogged.Load())
			}
			if allocs != 0 {
				t.Fatalf("%.1f allocations per packet, want 0", allocs)
			}
			used := d.Reap()
			if !slices.ContainsFunc(used, func(u vqt.Used) bool { return u.Len > 0 }) {
				t.Fatalf("guest saw no used buffers")
			}
			h, frame, _ := readRX(t, 12, used)
			if want := pkt.Size(); len(frame) != want || (c.gso && (h.GSOType != gsoTCPv4 || h.NumBuffers < 2)) {
				t.Fatalf("first frame: %d bytes (want %d), header %+v", len(frame), want, h)
			}
		})
	}
}
