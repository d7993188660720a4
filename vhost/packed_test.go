package vhost_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestPackedSession negotiates VIRTIO_F_RING_PACKED, starts both rings
// with QEMU's fresh-ring base (0x80008000), moves a frame through a
// packed ring, and checks GET_VRING_BASE reports both positions with their
// wrap counters (vhost-user "Ring states"); a restart from that state
// continues the ring.
func TestPackedSession(t *testing.T) {
	b := newSink()
	srv, path := startServer(t, b)
	f, err := vhosttest.Dial(path, vhosttest.Options{Packed: true, QueueSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	if n := srv.Stats.PackedQueueStarts.Load(); n != 2 {
		t.Fatalf("packed queue starts %d, want 2", n)
	}
	if f.Features&(1<<vhost.FeatureRingPacked) == 0 {
		t.Fatalf("features %#x acked without RING_PACKED", f.Features)
	}
	d := f.PackedDrivers[1]
	send := func(frame []byte) {
		t.Helper()
		if _, err := d.Post(frame, []int{5, 7}, nil, false); err != nil {
			t.Fatal(err)
		}
		f.Kick(1)
		select {
		case got := <-b.frames:
			if !bytes.Equal(got, frame) {
				t.Fatalf("frame %q", got)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("frame not popped")
		}
		if err := f.WaitCall(1, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if used := d.Reap(); len(used) != 1 {
			t.Fatalf("used %v", used)
		}
	}
	send([]byte("hello through a packed ring"))
	send([]byte("and a second chain, past the end of the ring")) // 3 + 3 slots of 4: wraps
	base, err := f.GetVringBase(1)
	if want := uint32(d.AvailState()) | uint32(d.UsedState())<<16; err != nil || base != want {
		t.Fatalf("GET_VRING_BASE %#x %v, want %#x", base, err, want)
	}
	if base != 2|2<<16 { // slot 2, both wrap counters 0 after one wrap
		t.Fatalf("GET_VRING_BASE %#x, want 0x00020002", base)
	}
	// Restart the queue from that state, as QEMU does after a stop.
	if err := f.Ack(protocol.SetVringBase, protocol.EncodeVringState(nil, protocol.VringState{Index: 1, Num: base}), nil); err != nil {
		t.Fatal(err)
	}
	if err := f.Ack(protocol.SetVringKick, []byte{1, 0, 0, 0, 0, 0, 0, 0}, []int{f.KickFDs[1]}); err != nil {
		t.Fatal(err)
	}
	send([]byte("after the restart"))
}

// TestPackedControlValidation: the packed ring's own rules on the control
// plane (sizes that are not powers of two are fine; driver and device
// areas must be 4-aligned; a base naming a slot past the ring does not
// start the queue).
func TestPackedControlValidation(t *testing.T) {
	b := newSink()
	_, path := startServer(t, b)
	f, err := vhosttest.Dial(path, vhosttest.Options{Packed: true, QueueSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	if err := f.Ack(protocol.SetVringNum, protocol.EncodeVringState(nil, protocol.VringState{Index: 0, Num: 3}), nil); err != nil {
		t.Errorf("packed ring of size 3 refused: %v", err)
	}
	d := f.PackedDrivers[0]
	user := func(g uint64) uint64 { return g - (1 << 20) + 0x7f0000000000 }
	if err := f.Ack(protocol.SetVringAddr, protocol.EncodeVringAddr(nil, protocol.VringAddr{Index: 0,
		Desc: user(d.DescAddr()), Avail: user(d.DriverAreaAddr()) + 2, Used: user(d.DeviceAreaAddr())}), nil); err == nil {
		t.Error("driver area at 2 mod 4 accepted")
	}
	if _, err := f.GetVringBase(0); err != nil {
		t.Fatal(err)
	}
	if err := f.Ack(protocol.SetVringNum, protocol.EncodeVringState(nil, protocol.VringState{Index: 0, Num: 4}), nil); err != nil {
		t.Fatal(err)
	}
	if err := f.Ack(protocol.SetVringBase, protocol.EncodeVringState(nil, protocol.VringState{Index: 0, Num: 0x8000 | 4}), nil); err != nil {
		t.Fatal(err) // the size may still change: checked at start
	}
	if err := f.Ack(protocol.SetVringKick, []byte{0, 0, 0, 0, 0, 0, 0, 0}, []int{f.KickFDs[0]}); err == nil {
		t.Error("queue started at slot 4 of a 4-slot ring")
	}
}
