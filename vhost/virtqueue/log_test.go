package virtqueue_test

import (
	"slices"
	"sync/atomic"
	"testing"

	"github.com/vunet/vunet/vhost/dirtylog"
	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

func setBits(b []byte) []uint64 {
	var out []uint64
	for i, v := range b {
		for bit := range 8 {
			if v&(1<<bit) != 0 {
				out = append(out, uint64(i*8+bit))
			}
		}
	}
	return out
}

// TestLogUsedRingWrites: each kind of used-ring write is logged at
// UsedLogAddr plus its offset in the ring, and only while LogUsed is set.
// The log address is placed 4 bytes before a page boundary, so that the
// flags and index fall in one logged page and the entries and avail_event
// in the next. Mutations checked: deleting the mark in Push fails "entry";
// in Flush fails "index"; logging storeUsed16 at offset 0 fails
// "avail_event".
func TestLogUsedRingWrites(t *testing.T) {
	for _, eventIdx := range []bool{true, false} {
		d := vqt.New(1<<20, 256, eventIdx)
		bits := make([]byte, 64)
		var pages, outside atomic.Uint64
		l := dirtylog.New(bits, dirtylog.Counters{Pages: &pages, Outside: &outside})
		cfg := d.Config()
		const logAddr = 100*4096 - 4
		cfg.Log, cfg.LogUsed, cfg.UsedLogAddr = l, true, logAddr
		q := virtqueue.New(nil, nil)
		if err := q.Setup(d.Table, cfg); err != nil {
			t.Fatal(err)
		}
		check := func(what string, want ...uint64) {
			t.Helper()
			if got := setBits(bits); !slices.Equal(got, want) {
				t.Errorf("event_idx %v, %s: pages %v, want %v", eventIdx, what, got, want)
			}
			clear(bits)
		}
		d.Post([]byte{1}, nil, nil, false)
		var e virtqueue.Element
		if err := q.Pop(&e); err != nil {
			t.Fatal(err)
		}
		check("pop")
		q.Push(e.Head, 0)
		check("entry", 100)
		q.Flush()
		check("index", 99)
		q.EnableKicks()
		if eventIdx {
			check("avail_event", 100) // offset 4+8*256
		} else {
			check("flags", 99)
		}
		q.DisableKicks()
		if eventIdx {
			check("no write with EVENT_IDX")
		} else {
			check("flags", 99)
		}
		if outside.Load() != 0 || pages.Load() == 0 {
			t.Errorf("outside %d pages %d", outside.Load(), pages.Load())
		}
	}
}

// TestLogMarkBounds: a write beyond the log is counted, never written,
// and a write straddling its end marks what the log covers.
func TestLogMarkBounds(t *testing.T) {
	bits := make([]byte, 8) // 64 pages
	var pages, outside atomic.Uint64
	l := dirtylog.New(bits, dirtylog.Counters{Pages: &pages, Outside: &outside})
	l.Mark(64*4096, 1)
	l.Mark(^uint64(0)-10, 100) // wraps
	if setBits(bits) != nil || outside.Load() != 2 {
		t.Fatalf("beyond the log: bits %v outside %d", setBits(bits), outside.Load())
	}
	l.Mark(63*4096+4095, 2)
	if got := setBits(bits); !slices.Equal(got, []uint64{63}) || outside.Load() != 3 || pages.Load() != 1 {
		t.Fatalf("straddling the end: bits %v outside %d pages %d", got, outside.Load(), pages.Load())
	}
	l.Mark(63*4096, 1) // already set: not counted again
	if pages.Load() != 1 {
		t.Fatalf("pages %d after marking a dirty page again", pages.Load())
	}
	if !l.Covers(0, 64*4096) || l.Covers(0, 64*4096+1) || l.Covers(^uint64(0), 2) {
		t.Fatal("Covers")
	}
}

// BenchmarkPushElement is an RX round (pop a 1514-byte writable buffer,
// push it written, flush) with dirty logging off and on: what a live
// migration costs the data path while it runs.
func BenchmarkPushElement(b *testing.B) {
	for _, logged := range []bool{false, true} {
		name := "off"
		if logged {
			name = "logged"
		}
		b.Run(name, func(b *testing.B) {
			d := vqt.New(1<<22, 256, true)
			cfg := d.Config()
			if logged {
				var pages, outside atomic.Uint64
				cfg.Log = dirtylog.New(make([]byte, 1<<10), dirtylog.Counters{Pages: &pages, Outside: &outside})
				cfg.LogBuffers, cfg.LogUsed, cfg.UsedLogAddr = true, true, cfg.UsedAddr
			}
			q := virtqueue.New(func() error { return nil }, nil)
			if err := q.Setup(d.Table, cfg); err != nil {
				b.Fatal(err)
			}
			var e virtqueue.Element
			for b.Loop() {
				d.Post(nil, nil, []int{1514}, false)
				if err := q.Pop(&e); err != nil {
					b.Fatal(err)
				}
				q.PushElement(&e, 1514)
				q.Flush()
				d.Reap()
			}
		})
	}
}

// TestLogPackedWrites: on a packed ring the device writes the bytes it
// reports into buffers, used descriptors into the descriptor ring and its
// event suppression structure; each is logged at its guest-physical
// address, after the write. Mutations checked: dropping the mark of the
// used descriptors in flushPacked fails "flush"; dropping the InAddr
// recording in addBuffer fails "buffer"; dropping the mark in armPacked
// fails "kicks".
func TestLogPackedWrites(t *testing.T) {
	d := vqt.NewPacked(1<<20, 256, true)
	bits := make([]byte, 64)
	var pages, outside atomic.Uint64
	cfg := d.Config()
	cfg.Log, cfg.LogBuffers, cfg.LogUsed = dirtylog.New(bits, dirtylog.Counters{Pages: &pages, Outside: &outside}), true, true
	q := virtqueue.New(nil, nil)
	if err := q.Setup(d.Table, cfg); err != nil {
		t.Fatal(err)
	}
	check := func(what string, want ...uint64) {
		t.Helper()
		if got := setBits(bits); !slices.Equal(got, want) {
			t.Errorf("%s: pages %#x, want %#x", what, got, want)
		}
		clear(bits)
	}
	if _, err := d.Post(nil, nil, []int{3 * 4096}, false); err != nil {
		t.Fatal(err)
	}
	var e virtqueue.Element
	if err := q.Pop(&e); err != nil {
		t.Fatal(err)
	}
	check("pop")
	q.PushElement(&e, 100)
	var bufPage uint64
	if got := setBits(bits); len(got) == 1 {
		bufPage = got[0]
	}
	check("buffer", bufPage)
	if bufPage < cfg.DescAddr/4096+2 {
		t.Errorf("buffer page %#x is not in the heap", bufPage)
	}
	q.Flush()
	check("flush", cfg.DescAddr/4096)
	q.EnableKicks()
	check("kicks", cfg.UsedAddr/4096)
	q.DisableKicks()
	check("no kicks", cfg.UsedAddr/4096)
}
