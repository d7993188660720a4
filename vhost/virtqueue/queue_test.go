package virtqueue_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

func TestPopLayouts(t *testing.T) {
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
			d := vqt.New(1<<20, 256, false)
			q := d.Queue(func() error { return nil })
			head, err := d.Post(frame, tc.outSizes, tc.inSizes, tc.indirect)
			if err != nil {
				t.Fatal(err)
			}
			var e virtqueue.Element
			if err := q.Pop(&e); err != nil {
				t.Fatal(err)
			}
			if e.Head != head || !bytes.Equal(bytes.Join(e.Out, nil), frame) || len(e.In) != len(tc.inSizes) {
				t.Fatalf("head %d/%d out %d iov in %d iov", e.Head, head, len(e.Out), len(e.In))
			}
			if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrEmpty) {
				t.Fatalf("second pop: %v", err)
			}
			q.Push(e.Head, 42)
			if got := d.Reap(); len(got) != 0 {
				t.Fatalf("used visible before flush: %v", got)
			}
			q.Flush()
			got := d.Reap()
			if len(got) != 1 || got[0].Head != head || got[0].Len != 42 {
				t.Fatalf("used %+v", got)
			}
		})
	}
}

func TestRewind(t *testing.T) {
	d := vqt.New(1<<20, 8, false)
	q := d.Queue(nil)
	for i := 0; i < 3; i++ {
		d.Post(nil, nil, []int{100 + i}, false)
	}
	var e virtqueue.Element
	var heads []uint16
	var m virtqueue.Mark
	for i := 0; i < 3; i++ {
		if i == 1 {
			m = q.Mark()
		}
		if err := q.Pop(&e); err != nil {
			t.Fatal(err)
		}
		heads = append(heads, e.Head)
	}
	if err := q.Rewind(m); err != nil {
		t.Fatal(err)
	}
	if q.Pending() != 2 {
		t.Fatalf("pending %d after rewind", q.Pending())
	}
	for i := 1; i < 3; i++ {
		if err := q.Pop(&e); err != nil || e.Head != heads[i] || len(e.In[0]) != 100+i {
			t.Fatalf("re-pop %d: %v head %d", i, err, e.Head)
		}
	}
}

// hostile builds a one-descriptor-table ring by hand.
func TestHostileChains(t *testing.T) {
	for _, tc := range []struct {
		name  string
		descs map[uint16]vqt.Desc
		want  error
	}{
		{"outside memory", map[uint16]vqt.Desc{14: {Addr: 0x1, Len: 10}}, virtqueue.ErrDescMemory},
		{"addr+len overflow", map[uint16]vqt.Desc{14: {Addr: ^uint64(0) - 4, Len: 10}}, virtqueue.ErrDescMemory},
		{"loop", map[uint16]vqt.Desc{14: {Addr: vqt.GuestBase + 0x8000, Len: 10, Flags: 1, Next: 15}, 15: {Addr: vqt.GuestBase + 0x8000, Len: 10, Flags: 1, Next: 14}}, virtqueue.ErrChainLoop},
		{"next out of range", map[uint16]vqt.Desc{14: {Addr: vqt.GuestBase + 0x8000, Len: 10, Flags: 1, Next: 99}}, virtqueue.ErrBadNext},
		{"write then read", map[uint16]vqt.Desc{14: {Addr: vqt.GuestBase + 0x8000, Len: 10, Flags: 3, Next: 15}, 15: {Addr: vqt.GuestBase + 0x8000, Len: 10}}, virtqueue.ErrWriteOrder},
		{"indirect len", map[uint16]vqt.Desc{14: {Addr: vqt.GuestBase + 0x8000, Len: 17, Flags: 4}}, virtqueue.ErrIndirectLen},
		{"indirect with next", map[uint16]vqt.Desc{14: {Addr: vqt.GuestBase + 0x8000, Len: 16, Flags: 5, Next: 1}}, virtqueue.ErrIndirectNext},
		{"indirect outside memory", map[uint16]vqt.Desc{14: {Addr: 0x10, Len: 32, Flags: 4}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := vqt.New(1<<20, 16, false)
			var errs []error
			q := virtqueue.New(nil, func(err error) { errs = append(errs, err) })
			if err := q.Setup(d.Table, d.Config()); err != nil {
				t.Fatal(err)
			}
			for i, ds := range tc.descs {
				d.WriteDesc(i, ds)
			}
			d.PublishRaw(14)
			good, _ := d.Post([]byte("ok"), nil, nil, false)
			var e virtqueue.Element
			if err := q.Pop(&e); err != nil || e.Head != good {
				t.Fatalf("pop after bad chain: %v head %d", err, e.Head)
			}
			if q.Stats.BadChains.Load() != 1 || len(errs) != 1 {
				t.Fatalf("bad chains %d errs %v", q.Stats.BadChains.Load(), errs)
			}
			if tc.want != nil && !errors.Is(errs[0], tc.want) {
				t.Fatalf("error %v, want %v", errs[0], tc.want)
			}
			q.Flush()
			used := d.Reap()
			if len(used) != 1 || used[0].Head != 14 || used[0].Len != 0 {
				t.Fatalf("bad chain not returned with length 0: %+v", used)
			}
		})
	}
}

func TestNestedIndirect(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	var errs []error
	q := virtqueue.New(nil, func(err error) { errs = append(errs, err) })
	q.Setup(d.Table, d.Config())
	taddr, tbl := d.Alloc(16)
	binary.LittleEndian.PutUint64(tbl, taddr)
	binary.LittleEndian.PutUint32(tbl[8:], 16)
	binary.LittleEndian.PutUint16(tbl[12:], 4)
	d.WriteDesc(0, vqt.Desc{Addr: taddr, Len: 16, Flags: 4})
	d.PublishRaw(0)
	var e virtqueue.Element
	if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrEmpty) || len(errs) != 1 || !errors.Is(errs[0], virtqueue.ErrNestedIndir) {
		t.Fatalf("pop %v errs %v", err, errs)
	}
}

func TestBrokenRing(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	q := d.Queue(nil)
	d.SetAvailIdx(100)
	var e virtqueue.Element
	if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrBroken) {
		t.Fatalf("avail jump: %v", err)
	}
	if !q.Broken() || q.Ready() {
		t.Fatal("ring not marked broken")
	}
	// A new setup (the next frontend) clears it.
	d2 := vqt.New(1<<20, 16, false)
	if err := q.Setup(d2.Table, d2.Config()); err != nil || q.Broken() {
		t.Fatalf("setup after broken: %v", err)
	}
	// Head index out of range.
	d3 := vqt.New(1<<20, 16, false)
	q3 := d3.Queue(nil)
	d3.PublishRaw(16)
	if err := q3.Pop(&e); !errors.Is(err, virtqueue.ErrBroken) {
		t.Fatalf("bad head: %v", err)
	}
}

func TestSetupValidation(t *testing.T) {
	d := vqt.New(1<<16, 16, false)
	q := virtqueue.New(nil, nil)
	bad := []virtqueue.Config{
		{Size: 0},
		{Size: 3, DescAddr: vqt.GuestBase},
		func() virtqueue.Config { c := d.Config(); c.DescAddr++; return c }(),
		func() virtqueue.Config { c := d.Config(); c.UsedAddr = 0x10; return c }(),
		func() virtqueue.Config { c := d.Config(); c.Size = 32768; return c }(),
	}
	for i, c := range bad {
		if err := q.Setup(d.Table, c); err == nil {
			t.Errorf("config %d accepted", i)
		}
	}
}

func TestNotify(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		d := vqt.New(1<<20, 16, eventIdx)
		calls := 0
		q := d.Queue(func() error { calls++; return nil })
		var e virtqueue.Element
		fixedEvent := -1
		round := func() {
			d.Post(nil, nil, []int{10}, false)
			if err := q.Pop(&e); err != nil {
				t.Fatal(err)
			}
			q.Push(e.Head, 1)
			q.Flush()
			q.Notify()
			d.Reap() // a driver re-arms used_event as it reaps...
			if fixedEvent >= 0 {
				d.SetUsedEvent(uint16(fixedEvent)) // ...or asks for a later one
			}
		}
		round()
		if calls != 1 {
			t.Fatalf("eventIdx=%v: first notify: %d calls", eventIdx, calls)
		}
		if eventIdx {
			// used_event = 5: no interrupt until the used index passes 5.
			fixedEvent = 5
			d.SetUsedEvent(5)
			for i := 0; i < 4; i++ {
				round()
			}
			if calls != 1 {
				t.Fatalf("event idx suppression: %d calls", calls)
			}
			round() // used idx 5 → 6 crosses the event
			if calls != 2 {
				t.Fatalf("event idx crossing: %d calls", calls)
			}
		} else {
			d.SetNoInterrupt(true)
			round()
			if calls != 1 {
				t.Fatalf("NO_INTERRUPT ignored: %d calls", calls)
			}
			d.SetNoInterrupt(false)
			round()
			if calls != 2 {
				t.Fatalf("notify after clearing NO_INTERRUPT: %d calls", calls)
			}
		}
	}
}

func TestKicks(t *testing.T) {
	d := vqt.New(1<<20, 16, true)
	q := d.Queue(nil)
	if q.EnableKicks() {
		t.Fatal("pending on empty ring")
	}
	if d.AvailEvent() != 0 {
		t.Fatalf("avail_event %d", d.AvailEvent())
	}
	d.Post([]byte("x"), nil, nil, false)
	if !q.EnableKicks() {
		t.Fatal("missed a pending buffer")
	}
	d2 := vqt.New(1<<20, 16, false)
	q2 := d2.Queue(nil)
	q2.DisableKicks()
	if d2.UsedFlags() != 1 {
		t.Fatal("NO_NOTIFY not set")
	}
	q2.EnableKicks()
	if d2.UsedFlags() != 0 {
		t.Fatal("NO_NOTIFY not cleared")
	}
}

// FuzzPop feeds arbitrary descriptor tables and avail rings to Pop: it must
// never panic, never loop forever, and always return bad chains. Every
// avail entry Pop consumed must come back in the used ring exactly once, in
// order (good chains are pushed here right after Pop, bad ones by Pop
// itself), so deleting Pop's Push of a bad chain fails the seeds (checked
// by hand).
func FuzzPop(f *testing.F) {
	f.Add(make([]byte, 16*8), []byte{0, 0, 1, 0, 2, 0}, uint16(3))
	seed := make([]byte, 16*8)
	binary.LittleEndian.PutUint64(seed, vqt.GuestBase+0x4000)
	binary.LittleEndian.PutUint32(seed[8:], 64)
	binary.LittleEndian.PutUint16(seed[12:], 4)
	f.Add(seed, []byte{0, 0}, uint16(1))
	f.Fuzz(func(t *testing.T, table []byte, heads []byte, availIdx uint16) {
		d := vqt.New(1<<16, 8, false)
		q := d.Queue(nil)
		for i := 0; i+16 <= len(table) && i < 16*8; i += 16 {
			d.WriteDesc(uint16(i/16), vqt.Desc{
				Addr: binary.LittleEndian.Uint64(table[i:]), Len: binary.LittleEndian.Uint32(table[i+8:]),
				Flags: binary.LittleEndian.Uint16(table[i+12:]), Next: binary.LittleEndian.Uint16(table[i+14:]),
			})
		}
		// Indirect tables may point into the fake memory: fill some with the same bytes.
		copy(d.Mem[0x4000:], table)
		var published []uint16
		for i := 0; i+1 < len(heads) && i < 16; i += 2 {
			h := binary.LittleEndian.Uint16(heads[i:]) % 10
			published = append(published, h)
			d.PublishRaw(h)
		}
		if availIdx%4 == 3 {
			d.SetAvailIdx(availIdx)
		}
		var e virtqueue.Element
		for i := 0; i < 32; i++ {
			if err := q.Pop(&e); err != nil {
				break
			}
			if len(e.In)+len(e.Out) > virtqueue.MaxIovecs {
				t.Fatalf("too many iovecs: %d", len(e.In)+len(e.Out))
			}
			q.Push(e.Head, 0)
		}
		q.Flush()
		used := d.Reap()
		consumed := q.Stats.Popped.Load() + q.Stats.BadChains.Load()
		if uint64(len(used)) != consumed || q.Stats.Used.Load() != consumed {
			t.Fatalf("%d chains consumed (%d good, %d bad), %d returned (used counter %d)",
				consumed, q.Stats.Popped.Load(), q.Stats.BadChains.Load(), len(used), q.Stats.Used.Load())
		}
		if availIdx%4 != 3 { // the avail ring holds exactly what was published
			for i, u := range used {
				if i < len(published) && u.Head != published[i] {
					t.Fatalf("used entry %d returns head %d, avail entry %d was %d", i, u.Head, i, published[i])
				}
			}
		}
	})
}

func BenchmarkPopPush(b *testing.B) {
	d := vqt.New(1<<22, 256, true)
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

// TestArmKickWithUnusableBuffers: buffers that are available but were
// rewound (too few for a frame) must not count as "new", and the guest must
// be asked to kick on its next addition.
func TestArmKickWithUnusableBuffers(t *testing.T) {
	d := vqt.New(1<<20, 16, true)
	q := d.Queue(nil)
	for i := 0; i < 3; i++ {
		d.Post(nil, nil, []int{100}, false)
	}
	var e virtqueue.Element
	m := q.Mark()
	for i := 0; i < 3; i++ {
		q.Pop(&e)
	}
	q.Rewind(m) // the frame needed four
	if q.ArmKick() {
		t.Fatal("ArmKick reported new buffers")
	}
	if d.AvailEvent() != 3 {
		t.Fatalf("avail_event %d, want 3 (the guest's index)", d.AvailEvent())
	}
	d.Post(nil, nil, []int{100}, false)
	if q.Pending() != 4 {
		t.Fatalf("pending %d, want 4", q.Pending())
	}
}

// TestArmKickAfterUnseenAddition: the guest adds a buffer after our last
// (failed) look, and reads avail_event only after we arm again (another
// packet joined the RX backlog meanwhile). That ArmKick must report the
// buffer. Arming at the guest's index instead made the guest skip its kick
// while we saw nothing new, and the RX queue stalled for good with a full
// ring (seen at MTU 65520 with four streams to the guest).
func TestArmKickAfterUnseenAddition(t *testing.T) {
	d := vqt.New(1<<20, 16, true)
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
	d.Post(nil, nil, []int{100}, false) // published; avail_event not read yet
	if !q.ArmKick() {
		t.Fatal("ArmKick missed a buffer added since the last look")
	}
	// Had we not seen it, the guest would have kicked: its addition
	// crosses avail_event (virtio 2.7.10: new - event - 1 < new - old).
	if ev, old, new := d.AvailEvent(), uint16(3), uint16(4); !(new-ev-1 < new-old) {
		t.Errorf("avail_event %d: a guest moving from %d to %d would not kick", ev, old, new)
	}
}

// TestRewindAcrossBadChain: collecting buffers for a frame, Pop skips a
// malformed chain between two good ones, the frame does not fit and the
// collection is rewound; later it fits. Every head must reach the used ring
// exactly once (the bad one with length 0). Rewinding by the number of good
// elements re-returned the bad chain and lost the first good one.
func TestRewindAcrossBadChain(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	q := d.Queue(nil)
	a, _ := d.Post(nil, nil, []int{100}, false)
	const bad = 14
	d.WriteDesc(bad, vqt.Desc{Addr: 0x1, Len: 100, Flags: 2}) // outside guest memory
	d.PublishRaw(bad)
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
	if err := q.Rewind(m); err != nil { // the frame needed three buffers
		t.Fatal(err)
	}
	if q.Stats.BadChains.Load() != 0 {
		t.Fatalf("bad chains %d after rewind, want 0 (not returned yet)", q.Stats.BadChains.Load())
	}
	dd, _ := d.Post(nil, nil, []int{100}, false)
	got = got[:0]
	for q.Pop(&e) == nil {
		got = append(got, e.Head)
		q.Push(e.Head, 100)
	}
	q.Flush()
	if len(got) != 3 || got[0] != a || got[1] != c || got[2] != dd {
		t.Fatalf("re-popped %v, want [%d %d %d]", got, a, c, dd)
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
			t.Errorf("head %d returned %d times (used: %v)", h, seen[h], seen)
		}
	}
	if len(seen) != 4 || q.Stats.BadChains.Load() != 1 {
		t.Errorf("used heads %v, bad chains %d", seen, q.Stats.BadChains.Load())
	}
}

// TestRewindAcrossFlush: a rollback past published used entries cannot be
// exact; the ring is marked broken instead of returning a head twice.
func TestRewindAcrossFlush(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	q := d.Queue(nil)
	d.Post(nil, nil, []int{100}, false)
	m := q.Mark()
	var e virtqueue.Element
	if err := q.Pop(&e); err != nil {
		t.Fatal(err)
	}
	q.Push(e.Head, 1)
	q.Flush()
	if err := q.Rewind(m); !errors.Is(err, virtqueue.ErrBroken) || !q.Broken() {
		t.Fatalf("rewind across flush: %v broken %v", err, q.Broken())
	}
}

// TestIndirectNotNegotiated: an indirect descriptor on a queue without
// VIRTIO_F_INDIRECT_DESC is a malformed chain (returned with length 0,
// counted); the next chain is served.
func TestIndirectNotNegotiated(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	cfg := d.Config()
	cfg.Indirect = false
	var errs []error
	q := virtqueue.New(nil, func(err error) { errs = append(errs, err) })
	if err := q.Setup(d.Table, cfg); err != nil {
		t.Fatal(err)
	}
	ind, _ := d.Post([]byte("indirect"), nil, nil, true)
	direct, _ := d.Post([]byte("direct"), nil, nil, false)
	var e virtqueue.Element
	if err := q.Pop(&e); err != nil || e.Head != direct {
		t.Fatalf("pop: %v head %d, want %d", err, e.Head, direct)
	}
	if q.Stats.BadChains.Load() != 1 || len(errs) != 1 || !errors.Is(errs[0], virtqueue.ErrIndirectOff) {
		t.Fatalf("bad chains %d errs %v", q.Stats.BadChains.Load(), errs)
	}
	q.Flush()
	if u := d.Reap(); len(u) != 1 || u[0].Head != ind || u[0].Len != 0 {
		t.Fatalf("used %+v, want the indirect chain with length 0", u)
	}
}

// TestBadChainFlood: a guest that republishes malformed chains as fast as
// Pop skips them does not keep Pop looping (with the queue lock held) for
// ever: past a queue's worth in one Pop the ring is broken.
func TestBadChainFlood(t *testing.T) {
	d := vqt.New(1<<20, 16, false)
	republished := 0
	// The error callback runs inside Pop: republishing from it is a guest
	// racing with the device, deterministically.
	q := virtqueue.New(nil, func(error) {
		if republished < 1000 {
			republished++
			d.PublishRaw(3)
		}
	})
	if err := q.Setup(d.Table, d.Config()); err != nil {
		t.Fatal(err)
	}
	d.WriteDesc(3, vqt.Desc{Addr: 0x1, Len: 10})
	d.PublishRaw(3)
	var e virtqueue.Element
	if err := q.Pop(&e); !errors.Is(err, virtqueue.ErrBroken) {
		t.Fatalf("pop: %v after %d republished chains", err, republished)
	}
	if republished > 20 {
		t.Fatalf("Pop skipped %d chains before giving up, want about the queue size (16)", republished)
	}
}

// TestNewCallFDAfterLostInterrupt: QEMU replaces a running ring's call
// eventfd; an interrupt that went to the old descriptor is lost. With
// EVENT_IDX the guest then never moves used_event, so without a fresh
// interrupt on the new descriptor every later entry is suppressed and the
// guest's RX stalls for good. (Mutation checked: SetNotify that only
// stores the function fails both checks below.)
func TestNewCallFDAfterLostInterrupt(t *testing.T) {
	d := vqt.New(1<<20, 16, true)
	lost := 0
	q := d.Queue(func() error { lost++; return nil })
	var e virtqueue.Element
	round := func() {
		t.Helper()
		d.Post(nil, nil, []int{10}, false)
		if err := q.Pop(&e); err != nil {
			t.Fatal(err)
		}
		q.Push(e.Head, 1)
		q.Flush()
		q.Notify()
	}
	round() // interrupt sent to the old descriptor, never seen: used_event stays 0
	round() // suppressed: the guest "already knows"
	if lost != 1 {
		t.Fatalf("old descriptor: %d interrupts, want 1", lost)
	}
	got := 0
	q.Lock()
	q.SetNotify(func() error { got++; return nil })
	q.Unlock()
	if got != 1 {
		t.Fatalf("new call descriptor on a running queue: %d interrupts, want 1", got)
	}
	round() // the guest has still not moved used_event: it must hear of this one too
	if got != 2 {
		t.Fatalf("after the swap: %d interrupts, want 2", got)
	}
	q.Stop()
	q.Lock()
	q.SetNotify(func() error { got++; return nil })
	q.Unlock()
	if got != 2 {
		t.Fatalf("stopped queue signalled on a new descriptor")
	}
}
