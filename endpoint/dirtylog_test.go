package endpoint

import (
	"slices"
	"testing"
	"time"
	"unsafe"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// migrationRig is an endpoint served on a vhost-user socket to the mock
// frontend, with a dirty log mapped, as during a live migration.
type migrationRig struct {
	ep  *Endpoint
	srv *vhost.Server
	f   *vhosttest.Frontend
	cap *capture
}

func newMigrationRig(t *testing.T) *migrationRig {
	t.Helper()
	ep, err := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
	if err != nil {
		t.Fatal(err)
	}
	r := &migrationRig{ep: ep, cap: &capture{ch: make(chan struct{}, 64)}}
	ep.Attach(r.cap)
	var sock string
	r.srv, sock = vhosttest.StartServer(t, ep)
	if r.f, err = vhosttest.Dial(sock, vhosttest.Options{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.f.Close() })
	if err := r.f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	// The log covers guest memory and 1 MiB more, where the used rings'
	// writes are logged (log_guest_addr need not be guest memory).
	if err := r.f.SetLog(r.f.LogSize() + 1<<20/4096/8); err != nil {
		t.Fatal(err)
	}
	return r
}

func pagesOf(addr, n uint64) []uint64 {
	var p []uint64
	for pg := addr / 4096; pg <= (addr+n-1)/4096; pg++ {
		p = append(p, pg)
	}
	return p
}

// moveFrames sends one frame each way and returns the guest pages vunet
// wrote into RX buffers. The RX chain is laid out so that the 72 bytes
// written (12-byte header, 60-byte frame) cross a page boundary inside the
// first buffer and end inside the second, whose last two pages are not
// written; a second RX chain is posted and never used.
func (r *migrationRig) moveFrames(t *testing.T) []uint64 {
	t.Helper()
	rx, tx := r.f.Drivers[0], r.f.Drivers[1]
	at, _ := rx.Alloc(16)
	if gap := (4096 - (at+16)%4096) % 4096; gap != 32 {
		rx.Alloc(int((gap + 4096 - 32) % 4096))
	}
	if _, err := rx.Post(nil, nil, []int{48, 8192}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := rx.Post(nil, nil, []int{4096}, false); err != nil {
		t.Fatal(err)
	}
	r.f.Kick(0)
	// The RX worker takes the buffers when kicked; a packet written
	// before would wait in the backlog and be delivered then.
	write(r.ep, make([]byte, 46))
	used := waitUsed(t, rx, 1)
	if used[0].Len != 72 {
		t.Fatalf("RX used length %d, want 72", used[0].Len)
	}
	in := used[0].Chain.In
	var written []uint64
	first := rx.Base + uint64(uintptrOf(rx.Mem, in[0]))
	written = append(written, pagesOf(first, 48)...)
	second := rx.Base + uint64(uintptrOf(rx.Mem, in[1]))
	written = append(written, pagesOf(second, 24)...)

	frame := append(vhdr(12, vnetHdr{}), ethFrame(gwMAC, header.IPv4ProtocolNumber, make([]byte, 46))...)
	if _, err := tx.Post(frame, []int{12, 0}, nil, false); err != nil {
		t.Fatal(err)
	}
	r.f.Kick(1)
	select {
	case <-r.cap.ch:
	case <-time.After(30 * time.Second):
		t.Fatal("TX frame not delivered")
	}
	waitUsed(t, tx, 1)
	// Stop both queues as the frontend does at the end of a migration:
	// after GET_VRING_BASE vunet writes nothing more.
	for i := range 2 {
		if _, err := r.f.GetVringBase(i); err != nil {
			t.Fatal(err)
		}
	}
	slices.Sort(written)
	return slices.Compact(written)
}

// uintptrOf returns the offset of b within mem.
func uintptrOf(mem, b []byte) int {
	return int(uintptr(unsafe.Pointer(&b[0])) - uintptr(unsafe.Pointer(&mem[0])))
}

// TestDirtyLogMarksWrites: while logging is on, exactly the pages vunet
// writes are marked: the bytes of the RX frame (header included, across
// both buffers of the chain, not the rest of the buffers or the unused
// chain), and the used rings at their log addresses (entries, index,
// avail_event), not at the rings' own pages; TX buffers are only read.
// Mutations checked: marking whole In buffers in PushElement (instead of
// the written length) fails "exact pages"; Push without the used-ring
// mark fails it; using the ring's address instead of log_guest_addr
// fails it; dropping q.PushElement for q.Push in writeFrame fails it.
func TestDirtyLogMarksWrites(t *testing.T) {
	r := newMigrationRig(t)
	memEnd := r.f.LogSize() * 8 * 4096
	usedLog := make([]uint64, 2)
	var want []uint64
	for i, d := range r.f.Drivers {
		used := d.Config().UsedAddr
		// Same offset in its page as the ring, so the entries, index
		// and avail_event all fall in one logged page.
		usedLog[i] = memEnd + uint64(i)*0x10000 + used%4096
		want = append(want, usedLog[i]/4096)
	}
	if err := r.f.SetLogging(true, usedLog); err != nil {
		t.Fatal(err)
	}
	want = append(want, r.moveFrames(t)...)
	slices.Sort(want)
	got := r.f.DirtyPages()
	if !slices.Equal(got, want) {
		t.Fatalf("exact pages: log has %#x, want %#x", got, want)
	}
	t.Logf("pages marked: %#x", got)
	if n := r.srv.Stats.DirtyPages.Load(); n != uint64(len(want)) {
		t.Errorf("vhost_dirty_pages_logged_total = %d, want %d", n, len(want))
	}
	if r.srv.Stats.DirtyLogs.Load() != 1 || r.srv.Stats.DirtyLogOutside.Load() != 0 {
		t.Errorf("dirty logs %d, outside %d; want 1, 0", r.srv.Stats.DirtyLogs.Load(), r.srv.Stats.DirtyLogOutside.Load())
	}
}

// TestDirtyLogOff: a mapped log gets no bits while LOG_ALL and F_LOG are
// off, before a migration starts and after it ends (or is cancelled).
// Mutation checked: starting queues with LogBuffers/LogUsed always true
// (ignoring the acked features and ring flags) fails both.
func TestDirtyLogOff(t *testing.T) {
	t.Run("before", func(t *testing.T) {
		r := newMigrationRig(t)
		r.moveFrames(t)
		if p := r.f.DirtyPages(); len(p) != 0 {
			t.Fatalf("logging off, but pages %#x marked", p)
		}
	})
	t.Run("after", func(t *testing.T) {
		r := newMigrationRig(t)
		if err := r.f.SetLogging(true, nil); err != nil {
			t.Fatal(err)
		}
		if err := r.f.SetLogging(false, nil); err != nil {
			t.Fatal(err)
		}
		clear(r.f.Log)
		r.moveFrames(t)
		if p := r.f.DirtyPages(); len(p) != 0 {
			t.Fatalf("logging turned off, but pages %#x marked", p)
		}
	})
}
