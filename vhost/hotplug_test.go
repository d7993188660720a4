package vhost_test

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// memfdRegion returns a fresh memfd of size bytes and ADD/REM_MEM_REG's
// payload for it at guest address gpa (8 bytes of padding, then the region).
func memfdRegion(t *testing.T, gpa, size uint64) (int, []byte) {
	t.Helper()
	fd, err := unix.MemfdCreate("hotplug", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	r := protocol.MemRegion{GuestAddr: gpa, Size: size, UserAddr: 0x7f0000000000 + gpa}
	return fd, protocol.EncodeRegion(make([]byte, 8), r)
}

// TestHotplugCounters: ADD_MEM_REG while the queues run is a memory
// hotplug (counted, as is REM_MEM_REG then); the same request before any
// queue runs, as QEMU sends the boot RAM, is not. (Mutation checked:
// counting every ADD_MEM_REG fails the second half.)
func TestHotplugCounters(t *testing.T) {
	srv, path, _ := serve(t, newSink())
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	fd, payload := memfdRegion(t, 1<<32, 1<<20)
	if err := f.Ack(protocol.AddMemReg, payload, []int{fd}); err != nil {
		t.Fatalf("ADD_MEM_REG: %v", err)
	}
	if got := srv.Stats.MemRegionsAdded.Load(); got != 1 {
		t.Errorf("regions added while running: %d, want 1", got)
	}
	if err := f.Ack(protocol.RemMemReg, payload, []int{fd}); err != nil {
		t.Fatalf("REM_MEM_REG: %v", err)
	}
	if got := srv.Stats.MemRegionsRemoved.Load(); got != 1 {
		t.Errorf("regions removed while running: %d, want 1", got)
	}
	f.Close()

	// A new frontend that adds memory before it starts any queue.
	g, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if _, err := g.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatal(err)
	}
	if _, err := g.U64(protocol.SetFeatures, 1<<30, false); err != nil {
		t.Fatal(err)
	}
	if _, err := g.U64(protocol.SetProtocolFeatures, 1<<protocol.ProtoReplyAck|1<<protocol.ProtoConfigureMemSlots, false); err != nil {
		t.Fatal(err)
	}
	g.Features = 1 << 30
	fd2, payload2 := memfdRegion(t, 0, 1<<20)
	if err := g.Ack(protocol.AddMemReg, payload2, []int{fd2}); err != nil {
		t.Fatalf("boot-time ADD_MEM_REG: %v", err)
	}
	if got := srv.Stats.MemRegionsAdded.Load(); got != 1 {
		t.Errorf("boot-time region counted as hot-plugged: %d added, want still 1", got)
	}
}
