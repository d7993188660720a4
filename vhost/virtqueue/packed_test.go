package virtqueue_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

func TestPackedPopLayouts(t *testing.T) {
	frame := bytes.Repeat([]byte("0123456789abcdef"), 20)
	for _, tc := range []struct {
		name     string
		outSizes []int
		inSizes  []int
		indirect bool
	}{
		{"single", nil, nil, false},
		{"header apart", []int{12}, nil, false},
		{"header split 5+7", []int{5, 7}, nil, false},
		{"one-byte pieces", []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, nil, false},
		{"indirect", []int{12, 100}, []int{64, 64}, true},
		{"readable then writable", []int{12}, []int{4096}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := vqt.NewPacked(1<<20, 256, false)
			q := d.Queue(func() error { return nil })
			if !q.Packed() {
				t.Fatal("queue not packed")
			}
			id, err := d.Post(frame, tc.outSizes, tc.inSizes, tc.indirect)
			if err != nil {
				t.Fatal(err)
			}
			var e virtqueue.Element
			if err := q.Pop(&e); err != nil {
				t.Fatal(err)
			}
			if e.Head != id || !bytes.Equal(bytes.Join(e.Out, nil), frame) || len(e.In) != len(tc.inSizes) {
				t.Fatalf("id %d/%d out %d iov in %d iov", e.Head, id, len(e.Out), len(e.In))
			}
			if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrEmpty) {
				t.Fatalf("second pop: %v", err)
			}
			q.Push(e.Head, 42)
			if got := d.Reap(); len(got) != 0 {
				t.Fatalf("used visible before flush: %v", got)
			}
			q.Flush()
			// A used descriptor says whether the device wrote (2.8.3).
			if f := d.Slot(0).Flags; f != vqt.PackedFAvail|vqt.PackedFUsed|vqt.PackedFWrite {
				t.Fatalf("used flags %#x, want AVAIL|USED|WRITE", f)
			}
			got := d.Reap()
			if len(got) != 1 || got[0].Head != id || got[0].Len != 42 {
				t.Fatalf("used %+v", got)
			}
		})
	}
}

// TestPackedWrapOutOfOrder runs chains of one to three descriptors through
// a small ring of a size that is not a power of two many times round,
// completing them out of order: every id comes back once with its length,
// the driver's skip-by-chain-length finds each used descriptor (so the
// device advanced its used position by chain lengths and flipped its wrap
// counter at the end of the ring), and Stop reports both positions.
func TestPackedWrapOutOfOrder(t *testing.T) {
	d := vqt.NewPacked(1<<20, 5, true)
	q := d.Queue(func() error { return nil })
	var e virtqueue.Element
	for round := 0; round < 50; round++ {
		a, err := d.Post([]byte{byte(round)}, nil, []int{10}, false) // 2 slots
		if err != nil {
			t.Fatal(round, err)
		}
		var want []uint16
		want = append(want, a)
		if round%2 == 0 {
			b, err := d.Post([]byte{1, 2, 3}, []int{1, 1}, nil, false) // 3 slots
			if err != nil {
				t.Fatal(round, err)
			}
			want = append(want, b)
		}
		var got []virtqueue.Element
		for q.Pop(&e) == nil {
			got = append(got, virtqueue.Element{Head: e.Head, Out: append([][]byte(nil), e.Out...)})
		}
		if len(got) != len(want) {
			t.Fatalf("round %d: popped %d chains, want %d", round, len(got), len(want))
		}
		for i := len(got) - 1; i >= 0; i-- { // last popped is used first
			q.Push(got[i].Head, uint32(100+i))
		}
		q.Flush()
		used := d.Reap()
		if len(used) != len(want) {
			t.Fatalf("round %d: %d used, want %d", round, len(used), len(want))
		}
		for i, u := range used {
			j := len(want) - 1 - i
			if u.Head != want[j] || u.Len != uint32(100+j) {
				t.Fatalf("round %d: used %d is id %d len %d, want id %d len %d", round, i, u.Head, u.Len, want[j], 100+j)
			}
		}
	}
	if q.Broken() || q.Stats.BadChains.Load() != 0 {
		t.Fatalf("broken %v bad %d", q.Broken(), q.Stats.BadChains.Load())
	}
	base := q.Stop()
	if uint16(base) != d.AvailState() || uint16(base>>16) != d.UsedState() {
		t.Fatalf("stop base %#x, driver avail %#x used %#x", base, d.AvailState(), d.UsedState())
	}
}

// TestPackedReconnect: a new queue set up from the state Stop reported
// continues the ring where the old one stopped.
func TestPackedReconnect(t *testing.T) {
	d := vqt.NewPacked(1<<20, 4, false)
	q := d.Queue(nil)
	var e virtqueue.Element
	for i := 0; i < 7; i++ { // past one wrap
		d.Post([]byte{byte(i)}, nil, nil, false)
		if err := q.Pop(&e); err != nil {
			t.Fatal(err)
		}
		q.Push(e.Head, 0)
		q.Flush()
		d.Reap()
	}
	base := q.Stop()
	cfg := d.Config()
	cfg.NextAvail, cfg.NextUsed = uint16(base), uint16(base>>16)
	q2 := virtqueue.New(nil, nil)
	if err := q2.Setup(d.Table, cfg); err != nil {
		t.Fatal(err)
	}
	id, _ := d.Post([]byte("after"), nil, nil, false)
	if err := q2.Pop(&e); err != nil || e.Head != id || string(e.Out[0]) != "after" {
		t.Fatalf("pop after reconnect: %v id %d", err, e.Head)
	}
	q2.Push(e.Head, 0)
	q2.Flush()
	if u := d.Reap(); len(u) != 1 || u[0].Head != id {
		t.Fatalf("used after reconnect %+v", u)
	}
}

func TestPackedSetupValidation(t *testing.T) {
	d := vqt.NewPacked(1<<16, 16, false)
	q := virtqueue.New(nil, nil)
	bad := []func(*virtqueue.Config){
		func(c *virtqueue.Config) { c.Size = 0 },
		func(c *virtqueue.Config) { c.DescAddr += 8 },
		func(c *virtqueue.Config) { c.AvailAddr += 2 }, // driver area: 4-aligned
		func(c *virtqueue.Config) { c.UsedAddr += 2 },
		func(c *virtqueue.Config) { c.UsedAddr = 0x10 },         // outside memory
		func(c *virtqueue.Config) { c.NextAvail = 0x8000 | 16 }, // slot past the ring
		func(c *virtqueue.Config) { c.NextUsed = 0x8000 | 17 },
		func(c *virtqueue.Config) { c.Size = 32768 },
	}
	for i, f := range bad {
		c := d.Config()
		f(&c)
		if err := q.Setup(d.Table, c); err == nil {
			t.Errorf("config %d accepted: %+v", i, c)
		}
	}
	c := d.Config()
	c.Size = 5 // packed rings need not be a power of two
	if err := q.Setup(d.Table, c); err != nil {
		t.Errorf("size 5 refused: %v", err)
	}
}

func TestPackedRewind(t *testing.T) {
	d := vqt.NewPacked(1<<20, 8, false)
	q := d.Queue(nil)
	for i := 0; i < 3; i++ {
		d.Post(nil, nil, []int{100 + i}, false)
	}
	var e virtqueue.Element
	var ids []uint16
	var m virtqueue.Mark
	for i := 0; i < 3; i++ {
		if i == 1 {
			m = q.Mark()
		}
		if err := q.Pop(&e); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, e.Head)
	}
	if err := q.Rewind(m); err != nil {
		t.Fatal(err)
	}
	if q.Pending() != 2 {
		t.Fatalf("pending %d after rewind", q.Pending())
	}
	for i := 1; i < 3; i++ {
		if err := q.Pop(&e); err != nil || e.Head != ids[i] || len(e.In[0]) != 100+i {
			t.Fatalf("re-pop %d: %v id %d", i, err, e.Head)
		}
	}
	for _, id := range ids {
		q.Push(id, 1)
	}
	q.Flush()
	if u := d.Reap(); len(u) != 3 || q.Broken() {
		t.Fatalf("used %+v broken %v", u, q.Broken())
	}
}

// TestPackedRewindAcrossBadChain mirrors TestRewindAcrossBadChain: every
// id reaches the ring exactly once, the bad one with length 0, and the
// ids popped after the mark are not left "in flight" (which would make
// their re-pop look like a duplicate id and break the ring).
func TestPackedRewindAcrossBadChain(t *testing.T) {
	d := vqt.NewPacked(1<<20, 16, false)
	q := d.Queue(nil)
	a, _ := d.Post(nil, nil, []int{100}, false)
	const bad = 14
	d.PostRaw(bad, []vqt.PDesc{{Addr: 0x1, Len: 100, ID: bad, Flags: vqt.PackedFWrite}}) // outside guest memory
	c, _ := d.Post(nil, nil, []int{100}, false)

	var e virtqueue.Element
	m := q.Mark()
	var got []uint16
	for q.Pop(&e) == nil {
		got = append(got, e.Head)
	}
	if len(got) != 2 || got[0] != a || got[1] != c {
		t.Fatalf("popped %v, want [%d %d]", got, a, c)
	}
	if err := q.Rewind(m); err != nil {
		t.Fatal(err)
	}
	if q.Stats.BadChains.Load() != 0 {
		t.Fatalf("bad chains %d after rewind, want 0", q.Stats.BadChains.Load())
	}
	dd, _ := d.Post(nil, nil, []int{100}, false)
	got = got[:0]
	for q.Pop(&e) == nil {
		got = append(got, e.Head)
		q.Push(e.Head, 100)
	}
	q.Flush()
	if q.Broken() || len(got) != 3 || got[0] != a || got[1] != c || got[2] != dd {
		t.Fatalf("re-popped %v (broken %v), want [%d %d %d]", got, q.Broken(), a, c, dd)
	}
	seen := map[uint16]int{}
	for _, u := range d.Reap() {
		seen[u.Head]++
		if u.Head == bad && u.Len != 0 {
			t.Errorf("bad chain returned with length %d", u.Len)
		}
	}
	for _, h := range []uint16{a, bad, c, dd} {
		if seen[h] != 1 {
			t.Errorf("id %d returned %d times (used: %v)", h, seen[h], seen)
		}
	}
}

// TestPackedHostileChains: chains with bad buffers are returned with
// length 0 and counted, and the next chain is served.
func TestPackedHostileChains(t *testing.T) {
	mem := uint64(vqt.GuestBase + 0x8000)
	for _, tc := range []struct {
		name     string
		descs    []vqt.PDesc
		table    []vqt.PDesc // written at mem as an indirect table
		indirOff bool
		want     error
	}{
		{"outside memory", []vqt.PDesc{{Addr: 0x1, Len: 10}}, nil, false, virtqueue.ErrDescMemory},
		{"addr+len overflow", []vqt.PDesc{{Addr: ^uint64(0) - 4, Len: 10}}, nil, false, virtqueue.ErrDescMemory},
		{"write then read", []vqt.PDesc{{Addr: mem, Len: 10, Flags: 3}, {Addr: mem, Len: 10}}, nil, false, virtqueue.ErrWriteOrder},
		{"bad buffer mid-chain", []vqt.PDesc{{Addr: mem, Len: 10, Flags: 1}, {Addr: 0x1, Len: 10, Flags: 1}, {Addr: mem, Len: 10}}, nil, false, virtqueue.ErrDescMemory},
		{"indirect len", []vqt.PDesc{{Addr: mem, Len: 17, Flags: 4}}, nil, false, virtqueue.ErrIndirectLen},
		{"indirect with next", []vqt.PDesc{{Addr: mem, Len: 16, Flags: 5}, {Addr: mem, Len: 10}}, nil, false, virtqueue.ErrIndirectNext},
		{"indirect after direct", []vqt.PDesc{{Addr: mem, Len: 10, Flags: 1}, {Addr: mem, Len: 16, Flags: 4}}, nil, false, virtqueue.ErrIndirectNext},
		{"indirect outside memory", []vqt.PDesc{{Addr: 0x10, Len: 32, Flags: 4}}, nil, false, nil},
		{"nested indirect", []vqt.PDesc{{Addr: mem, Len: 32, Flags: 4}}, []vqt.PDesc{{Addr: mem, Len: 8}, {Addr: mem, Len: 16, Flags: 4}}, false, virtqueue.ErrNestedIndir},
		{"indirect table write then read", []vqt.PDesc{{Addr: mem, Len: 32, Flags: 4}}, []vqt.PDesc{{Addr: mem, Len: 8, Flags: 2}, {Addr: mem, Len: 16}}, false, virtqueue.ErrWriteOrder},
		{"indirect not negotiated", []vqt.PDesc{{Addr: mem, Len: 16, Flags: 4}}, []vqt.PDesc{{Addr: mem, Len: 8}}, true, virtqueue.ErrIndirectOff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := vqt.NewPacked(1<<20, 16, false)
			var errs []error
			q := virtqueue.New(nil, func(err error) { errs = append(errs, err) })
			cfg := d.Config()
			cfg.Indirect = !tc.indirOff
			if err := q.Setup(d.Table, cfg); err != nil {
				t.Fatal(err)
			}
			for i, td := range tc.table {
				b := d.Mem[0x8000+16*i:]
				binary.LittleEndian.PutUint64(b, td.Addr)
				binary.LittleEndian.PutUint32(b[8:], td.Len)
				binary.LittleEndian.PutUint16(b[14:], td.Flags)
			}
			const badID = 9
			for i := range tc.descs {
				tc.descs[i].ID = badID
			}
			d.PostRaw(badID, tc.descs)
			good, err := d.Post([]byte("ok"), nil, nil, false)
			if err != nil {
				t.Fatal(err)
			}
			var e virtqueue.Element
			if err := q.Pop(&e); err != nil || e.Head != good {
				t.Fatalf("pop after bad chain: %v id %d (errs %v)", err, e.Head, errs)
			}
			if q.Stats.BadChains.Load() != 1 || len(errs) != 1 {
				t.Fatalf("bad chains %d errs %v", q.Stats.BadChains.Load(), errs)
			}
			if tc.want != nil && !errors.Is(errs[0], tc.want) {
				t.Fatalf("error %v, want %v", errs[0], tc.want)
			}
			q.Push(e.Head, 0)
			q.Flush()
			if f := d.Slot(0).Flags; f != vqt.PackedFAvail|vqt.PackedFUsed {
				t.Fatalf("used flags %#x for a chain returned with length 0, want AVAIL|USED", f)
			}
			used := d.Reap()
			if len(used) != 2 || used[0].Head != badID || used[0].Len != 0 || used[1].Head != good {
				t.Fatalf("bad chain not returned with length 0 before the good one: %+v", used)
			}
		})
	}
}

// TestPackedBrokenRing: ring-level nonsense (no usable id, or no end to the
// chain) marks the ring broken instead of guessing.
func TestPackedBrokenRing(t *testing.T) {
	mem := uint64(vqt.GuestBase + 0x8000)
	for _, tc := range []struct {
		name  string
		setup func(d *vqt.PackedDriver, q *virtqueue.Queue)
		want  error
	}{
		{"id out of range", func(d *vqt.PackedDriver, q *virtqueue.Queue) {
			d.PostRaw(16, []vqt.PDesc{{Addr: mem, Len: 10, ID: 16}})
		}, virtqueue.ErrBadID},
		{"id in flight twice", func(d *vqt.PackedDriver, q *virtqueue.Queue) {
			d.PostRaw(3, []vqt.PDesc{{Addr: mem, Len: 10, ID: 3}})
			d.PostRaw(3, []vqt.PDesc{{Addr: mem, Len: 10, ID: 3}})
			var e virtqueue.Element
			if err := q.Pop(&e); err != nil {
				t.Fatal(err)
			}
		}, virtqueue.ErrDupID},
		{"chain without end", func(d *vqt.PackedDriver, q *virtqueue.Queue) {
			descs := make([]vqt.PDesc, 16)
			for i := range descs {
				descs[i] = vqt.PDesc{Addr: mem, Len: 10, Flags: 1}
			}
			d.PostRaw(0, descs)
		}, virtqueue.ErrChainLength},
		{"slot reused while in flight", func(d *vqt.PackedDriver, q *virtqueue.Queue) {
			var e virtqueue.Element
			for i := 0; i < 16; i++ {
				d.Post([]byte{1}, nil, nil, false)
				if err := q.Pop(&e); err != nil {
					t.Fatal(err)
				}
			}
			// Slot 0 again, with the next wrap's AVAIL bits, before any
			// chain came back.
			d.WriteSlot(0, vqt.PDesc{Addr: mem, Len: 10, ID: 0, Flags: vqt.PackedFUsed})
		}, virtqueue.ErrChainLength},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := vqt.NewPacked(1<<20, 16, false)
			var errs []error
			q := virtqueue.New(nil, func(err error) { errs = append(errs, err) })
			if err := q.Setup(d.Table, d.Config()); err != nil {
				t.Fatal(err)
			}
			tc.setup(d, q)
			var e virtqueue.Element
			if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrBroken) {
				t.Fatalf("pop: %v", err)
			}
			if !q.Broken() || q.Ready() || q.Stats.Broken.Load() != 1 || len(errs) != 1 || !errors.Is(errs[0], tc.want) {
				t.Fatalf("broken %v ready %v count %d errs %v, want %v", q.Broken(), q.Ready(), q.Stats.Broken.Load(), errs, tc.want)
			}
		})
	}
}

// TestPackedBadChainFlood: as TestBadChainFlood, on a packed ring.
func TestPackedBadChainFlood(t *testing.T) {
	d := vqt.NewPacked(1<<20, 16, false)
	republished := 0
	var q *virtqueue.Queue
	q = virtqueue.New(nil, func(error) {
		if republished < 1000 {
			republished++
			// The device's used descriptors are not flushed, so the
			// guest's copy of the ring does not move: flush them here
			// as if the device had, and republish.
			q.Flush()
			d.Reap()
			d.PostRaw(3, []vqt.PDesc{{Addr: 0x1, Len: 10, ID: 3}})
		}
	})
	if err := q.Setup(d.Table, d.Config()); err != nil {
		t.Fatal(err)
	}
	d.PostRaw(3, []vqt.PDesc{{Addr: 0x1, Len: 10, ID: 3}})
	var e virtqueue.Element
	if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrBroken) {
		t.Fatalf("pop: %v after %d republished chains", err, republished)
	}
	if republished > 20 {
		t.Fatalf("Pop skipped %d chains before giving up, want about the queue size (16)", republished)
	}
}

func TestPackedNotify(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		d := vqt.NewPacked(1<<20, 16, eventIdx)
		calls := 0
		q := d.Queue(func() error { calls++; return nil })
		var e virtqueue.Element
		fixed := -1
		round := func() {
			t.Helper()
			d.Post(nil, nil, []int{10}, false)
			if err := q.Pop(&e); err != nil {
				t.Fatal(err)
			}
			q.Push(e.Head, 1)
			q.Flush()
			q.Notify()
			d.Reap() // re-arms at the next slot with EVENT_IDX...
			if fixed >= 0 {
				d.SetDriverEvent(vqt.EventDesc, uint16(fixed)) // ...or asks for a later one
			}
		}
		round()
		if calls != 1 {
			t.Fatalf("eventIdx=%v: first notify: %d calls", eventIdx, calls)
		}
		if eventIdx {
			// Interrupt when slot 5 (wrap 1) is used: used slots 1..4 not.
			fixed = 0x8000 | 5
			d.SetDriverEvent(vqt.EventDesc, uint16(fixed))
			for i := 0; i < 4; i++ {
				round()
			}
			if calls != 1 {
				t.Fatalf("event suppression: %d calls", calls)
			}
			round() // slot 5 used
			if calls != 2 {
				t.Fatalf("event crossing: %d calls", calls)
			}
			// Same slot, other wrap: not before the ring comes round.
			fixed = 5
			d.SetDriverEvent(vqt.EventDesc, uint16(fixed))
			for i := 0; i < 15; i++ {
				round()
			}
			if calls != 2 {
				t.Fatalf("event on the next wrap fired early: %d calls", calls)
			}
			round() // slot 5, wrap 0
			if calls != 3 {
				t.Fatalf("event on the next wrap: %d calls", calls)
			}
			fixed = -1
		}
		d.SetDriverEvent(vqt.EventDisable, 0)
		fixed = -2
		before := calls
		for i := 0; i < 3; i++ {
			d.Post(nil, nil, []int{10}, false)
			q.Pop(&e)
			q.Push(e.Head, 1)
			q.Flush()
			q.Notify()
			d.Reap()
			d.SetDriverEvent(vqt.EventDisable, 0)
		}
		if calls != before {
			t.Fatalf("eventIdx=%v: DISABLE ignored: %d calls", eventIdx, calls-before)
		}
		d.SetDriverEvent(3, 0) // reserved: taken as ENABLE
		d.Post(nil, nil, []int{10}, false)
		q.Pop(&e)
		q.Push(e.Head, 1)
		q.Flush()
		q.Notify()
		if calls != before+1 {
			t.Fatalf("eventIdx=%v: reserved flags value suppressed the interrupt", eventIdx)
		}
		if q.Stats.Suppressed.Load() == 0 {
			t.Fatal("suppressed interrupts not counted")
		}
	}
}

func TestPackedKicks(t *testing.T) {
	d := vqt.NewPacked(1<<20, 16, true)
	q := d.Queue(nil)
	if q.EnableKicks() {
		t.Fatal("pending on empty ring")
	}
	if f, ow := d.DeviceEvent(); f != vqt.EventDesc || ow != 0x8000 {
		t.Fatalf("device event %d %#x, want DESC at slot 0 wrap 1", f, ow)
	}
	old := d.AvailState()
	d.Post([]byte("x"), nil, nil, false)
	if !d.NeedKick(old) {
		t.Fatal("driver would not kick for the slot the device asked about")
	}
	if !q.EnableKicks() {
		t.Fatal("missed a pending buffer")
	}
	q.DisableKicks()
	if f, _ := d.DeviceEvent(); f != vqt.EventDisable {
		t.Fatalf("device event flags %d after DisableKicks", f)
	}

	d2 := vqt.NewPacked(1<<20, 16, false)
	q2 := d2.Queue(nil)
	q2.DisableKicks()
	if f, _ := d2.DeviceEvent(); f != vqt.EventDisable {
		t.Fatal("kicks not disabled")
	}
	q2.EnableKicks()
	if f, _ := d2.DeviceEvent(); f != vqt.EventEnable {
		t.Fatal("kicks not enabled")
	}
}

// TestPackedArmKickAfterUnseenAddition mirrors the split ring's test: RX
// found too few buffers and rewound; ArmKick must name the first slot it
// found empty, not the rewound position (a guest adding there would not
// kick), and report a buffer added meanwhile.
func TestPackedArmKickAfterUnseenAddition(t *testing.T) {
	d := vqt.NewPacked(1<<20, 16, true)
	q := d.Queue(nil)
	for i := 0; i < 3; i++ {
		d.Post(nil, nil, []int{100}, false)
	}
	var e virtqueue.Element
	m := q.Mark()
	for q.Pop(&e) == nil {
	}
	q.Rewind(m) // the frame needed four
	if q.ArmKick() {
		t.Fatal("ArmKick reported new buffers")
	}
	if _, ow := d.DeviceEvent(); ow != 0x8000|3 {
		t.Fatalf("device event at %#x, want slot 3 wrap 1", ow)
	}
	old := d.AvailState()
	d.Post(nil, nil, []int{100}, false)
	if !d.NeedKick(old) {
		t.Fatal("the guest would not kick for its next buffer")
	}
	if !q.ArmKick() {
		t.Fatal("ArmKick missed a buffer added since the last look")
	}
	if q.Pending() != 4 {
		t.Fatalf("pending %d, want 4", q.Pending())
	}
}

func TestPackedState(t *testing.T) {
	d := vqt.NewPacked(1<<20, 16, true)
	q := d.Queue(nil)
	d.Post(nil, nil, []int{100}, false)
	d.Post(nil, []int{1, 1}, nil, false)
	var e virtqueue.Element
	q.Pop(&e)
	s := q.State()
	if !s.Packed || s.NextAvail != 0x8000|1 || s.AvailIdx != 0x8000|3 || s.UsedIdx != 0x8000 {
		t.Fatalf("state %+v", s)
	}
}

// FuzzPackedPop posts fuzzer-made chains (descriptor counts, flags, ids,
// buffer addresses) on a packed ring and pops them. It must never panic
// or loop, and every chain Pop consumed (good ones pushed here in pop
// order, bad ones by Pop itself) must come back exactly once, in order,
// at the slot where the driver looks for it: the driver skips by each
// chain's length. Stop's state must then match the driver's.
func FuzzPackedPop(f *testing.F) {
	f.Add([]byte{1, 0, 0, 0, 2, 1, 2, 0, 0, 1, 1, 3, 0}, uint16(0), uint16(0))
	f.Add([]byte{3, 5, 0, 1, 4, 1, 4, 0, 0}, uint16(2), uint16(0x8003))
	f.Add([]byte{1, 0, 0, 9, 1, 0, 0, 9}, uint16(1), uint16(0))
	f.Fuzz(func(t *testing.T, spec []byte, evFlags, evOff uint16) {
		const size = 8
		d := vqt.NewPacked(1<<16, size, true)
		q := d.Queue(func() error { return nil })
		// A valid buffer and an indirect table at fixed places.
		buf := uint64(vqt.GuestBase + 0x8000)
		tbl := uint64(vqt.GuestBase + 0x9000)
		for i := 0; i < 4; i++ {
			b := d.Mem[0x9000+16*i:]
			binary.LittleEndian.PutUint64(b, buf)
			binary.LittleEndian.PutUint32(b[8:], 64)
			if i >= 2 && len(spec) > 0 {
				binary.LittleEndian.PutUint16(b[14:], uint16(spec[0]&6))
			}
		}
		type chain struct {
			id    uint16
			descs []vqt.PDesc
			runOn bool // the last descriptor has NEXT: the chain runs on into the next one
		}
		var chains []chain
		free := size
		for len(spec) >= 2 && len(chains) < 12 {
			n := int(spec[0]%3) + 1
			id := uint16(spec[1] % 10) // ids 8 and 9 are out of range
			spec = spec[2:]
			if n > free {
				break
			}
			c := chain{id: id}
			for i := 0; i < n; i++ {
				var fl byte
				if len(spec) > 0 {
					fl, spec = spec[0], spec[1:]
				}
				ds := vqt.PDesc{Addr: buf, Len: 64, ID: id, Flags: uint16(fl & 7)}
				switch fl >> 3 & 3 {
				case 1:
					ds.Addr = 0x1 // outside memory
				case 2:
					ds.Addr, ds.Len = tbl, uint32(16*(1+fl>>5&3)) // an indirect table
				}
				ds.Flags &^= vqt.PackedFNext
				if i < n-1 {
					ds.Flags |= vqt.PackedFNext
				} else if fl&0x80 != 0 {
					c.runOn = true
				}
				c.descs = append(c.descs, ds)
			}
			chains = append(chains, c)
			free -= n
		}
		// What the device must see: a chain that runs on is one with the
		// next (the last one may not run on into unposted slots), and its
		// id is that of its last descriptor.
		type expect struct {
			id    uint16
			slots int
		}
		var want []expect
		merge := false
		for i, c := range chains {
			if c.runOn && i < len(chains)-1 {
				c.descs[len(c.descs)-1].Flags |= vqt.PackedFNext
			} else {
				c.runOn = false
			}
			d.PostRaw(c.id, c.descs)
			if merge {
				want[len(want)-1].id = c.id
				want[len(want)-1].slots += len(c.descs)
			} else {
				want = append(want, expect{c.id, len(c.descs)})
			}
			merge = c.runOn
		}
		d.SetDriverEvent(evFlags, evOff)
		var e virtqueue.Element
		var rewound uint64
		if evFlags&4 != 0 {
			// Collect up to two elements, too few for a frame: give them
			// back, with any bad chains skipped meanwhile.
			m := q.Mark()
			for i := 0; i < 2 && q.Pop(&e) == nil; i++ {
				rewound++
			}
			if err := q.Rewind(m); err != nil && !q.Broken() {
				t.Fatal(err)
			}
		}
		for i := 0; i < 32; i++ {
			if err := q.Pop(&e); err != nil {
				break
			}
			if len(e.In)+len(e.Out) > virtqueue.MaxIovecs {
				t.Fatalf("too many iovecs: %d", len(e.In)+len(e.Out))
			}
			q.Push(e.Head, 7)
		}
		q.Flush()
		q.Notify()
		q.ArmKick()
		consumed := q.Stats.Popped.Load() - rewound + q.Stats.BadChains.Load()
		// Read the used descriptors where a driver would.
		slot, wrap := uint16(0), true
		var got int
		for ; got < len(want); got++ {
			u := d.Slot(slot)
			if (u.Flags&vqt.PackedFUsed != 0) != wrap || (u.Flags&vqt.PackedFAvail != 0) != wrap {
				break
			}
			if u.ID != want[got].id {
				t.Fatalf("used descriptor %d at slot %d has id %d, chain %d was posted with id %d", got, slot, u.ID, got, want[got].id)
			}
			s := int(slot) + want[got].slots
			if s >= size {
				s -= size
				wrap = !wrap
			}
			slot = uint16(s)
		}
		if uint64(got) != consumed || q.Stats.Used.Load() != consumed {
			t.Fatalf("%d chains consumed (%d good, %d bad, %d rewound), %d found used (used counter %d)",
				consumed, q.Stats.Popped.Load(), q.Stats.BadChains.Load(), rewound, got, q.Stats.Used.Load())
		}
		if !q.Broken() {
			base := q.Stop()
			if uint16(base>>16) != (slot | map[bool]uint16{true: 0x8000}[wrap]) {
				t.Fatalf("stop used state %#x, driver expects slot %d wrap %v", base>>16, slot, wrap)
			}
		}
	})
}

func BenchmarkPackedPopPush(b *testing.B) {
	d := vqt.NewPacked(1<<22, 256, true)
	q := d.Queue(func() error { return nil })
	frame := make([]byte, 1514)
	var e virtqueue.Element
	for b.Loop() {
		d.Post(frame, []int{12}, nil, false)
		if err := q.Pop(&e); err != nil {
			b.Fatal(err)
		}
		q.Push(e.Head, 0)
		q.Flush()
		d.Reap()
	}
}
