package vhost_test

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// sinkBackend pops every element of every queue it is given and records the
// readable bytes: the minimal device.
type sinkBackend struct {
	mu      sync.Mutex
	frames  chan []byte
	workers map[int]chan struct{}
	kicks   map[int]*virtqueue.EventFD
	resets  int
	acked   uint64
	// stopDelay makes StopQueue slow, like a worker finishing a batch.
	stopDelay time.Duration
}

var _ vhost.Backend = (*sinkBackend)(nil)

func newSink() *sinkBackend {
	return &sinkBackend{frames: make(chan []byte, 64), workers: map[int]chan struct{}{}, kicks: map[int]*virtqueue.EventFD{}}
}

func (b *sinkBackend) Features() uint64           { return 1 << 15 }
func (b *sinkBackend) SetFeatures(v uint64) error { b.acked = v; return nil }
func (b *sinkBackend) NumQueues() int             { return 2 }
func (b *sinkBackend) Config() []byte             { return []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0} }
func (b *sinkBackend) Reset()                     { b.mu.Lock(); b.resets++; b.mu.Unlock() }

func (b *sinkBackend) StartQueue(idx int, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	done := make(chan struct{})
	b.mu.Lock()
	b.workers[idx], b.kicks[idx] = done, kick
	b.mu.Unlock()
	go func() {
		defer close(done)
		var e virtqueue.Element
		for {
			q.Lock()
			n := 0
			for q.Pop(&e) == nil {
				var buf bytes.Buffer
				for _, s := range e.Out {
					buf.Write(s)
				}
				b.frames <- buf.Bytes()
				q.Push(e.Head, 0)
				n++
			}
			q.Flush()
			if n > 0 {
				q.Notify()
			}
			q.Unlock()
			if _, err := kick.Wait(); err != nil {
				return
			}
		}
	}()
}

func (b *sinkBackend) StopQueue(idx int) {
	time.Sleep(b.stopDelay)
	b.mu.Lock()
	kick, done := b.kicks[idx], b.workers[idx]
	b.mu.Unlock()
	kick.Interrupt()
	<-done
	b.mu.Lock()
	delete(b.workers, idx)
	b.mu.Unlock()
}

// running returns how many queue workers the backend runs.
func (b *sinkBackend) running() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.workers)
}

func startServer(t *testing.T, b vhost.Backend) (*vhost.Server, string) {
	return vhosttest.StartServer(t, b)
}

const allFeatures = ^uint64(0)

func TestSessionDataPath(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features uint64
		opts     vhosttest.Options
	}{
		{"protocol features", allFeatures, vhosttest.Options{}},
		{"legacy no protocol features", allFeatures &^ (1<<30 | 1<<32), vhosttest.Options{}},
		{"unaligned mmap offset", allFeatures, vhosttest.Options{MmapOffset: 0x1234}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newSink()
			srv, path := startServer(t, b)
			f, err := vhosttest.Dial(path, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.Setup(tc.features); err != nil {
				t.Fatal(err)
			}
			frame := []byte("hello through a split header and frame")
			if _, err := f.Drivers[1].Post(frame, []int{5, 7}, nil, false); err != nil {
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
			if used := f.Drivers[1].Reap(); len(used) != 1 {
				t.Fatalf("used %v", used)
			}
			base, err := f.GetVringBase(1)
			if err != nil || base != 1 {
				t.Fatalf("GET_VRING_BASE %d %v", base, err)
			}
			if srv.Stats.QueueStarts.Load() != 2 {
				t.Fatalf("queue starts %d", srv.Stats.QueueStarts.Load())
			}
		})
	}
}

func TestReconnect(t *testing.T) {
	b := newSink()
	_, path := startServer(t, b)
	for i := 0; i < 3; i++ {
		f, err := vhosttest.Dial(path, vhosttest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Setup(allFeatures); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		f.Drivers[1].Post([]byte{byte(i)}, nil, nil, false)
		f.Kick(1)
		if got := <-b.frames; got[0] != byte(i) {
			t.Fatalf("session %d got %v", i, got)
		}
		f.Close()
	}
}

// TestDisconnectStopsQueues: a frontend that goes away mid-traffic gets
// every queue worker stopped. (Mutation checked: deleting the session's
// stop of running queues on close, or backend.StopQueue, fails here.)
func TestDisconnectStopsQueues(t *testing.T) {
	b := newSink()
	_, path := startServer(t, b)
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	if n := b.running(); n != 2 {
		t.Fatalf("%d queue workers after set-up, want 2", n)
	}
	f.Drivers[1].Post([]byte("in flight"), nil, nil, false)
	f.Kick(1)
	f.Close()
	deadline := time.Now().Add(5 * time.Second)
	for b.running() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d queue workers still running 5 s after the frontend disconnected", b.running())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestHostileMessages sends malformed requests: each is refused (NACK or
// disconnect), never crashes the server, and the next frontend works.
func TestHostileMessages(t *testing.T) {
	b := newSink()
	srv, path := startServer(t, b)
	nack := []struct {
		name    string
		req     protocol.Request
		payload []byte
		fds     int
	}{
		{"short u64", protocol.SetFeatures, []byte{1, 2, 3}, 0},
		{"unoffered features", protocol.SetFeatures, []byte{0, 0, 0, 0, 0, 0, 0, 0x80}, 0},
		{"vring index out of range", protocol.SetVringNum, protocol.EncodeVringState(nil, protocol.VringState{Index: 99, Num: 256}), 0},
		{"vring num not power of two", protocol.SetVringNum, protocol.EncodeVringState(nil, protocol.VringState{Index: 0, Num: 100}), 0},
		{"mem table without fds", protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{{GuestAddr: 0, Size: 4096}}), 0},
		{"mem table fd count mismatch", protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{{Size: 4096}, {GuestAddr: 8192, Size: 4096}}), 1},
		{"mem table zero size", protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{{Size: 0}}), 1},
		{"mem table wrapping", protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{{GuestAddr: ^uint64(0) - 10, Size: 4096}}), 1},
		{"mem table past end of file", protocol.SetMemTable, protocol.EncodeMemTable(nil, []protocol.MemRegion{{Size: 1 << 30, MmapOffset: 1 << 40}}), 1},
		{"fd on a request without fds", protocol.SetOwner, nil, 1},
		{"kick with nofd bit and an fd", protocol.SetVringKick, []byte{0, 1, 0, 0, 0, 0, 0, 0}, 1},
		{"unknown request", protocol.Request(99), nil, 0},
		{"desc table misaligned", protocol.SetVringAddr, protocol.EncodeVringAddr(nil, protocol.VringAddr{Desc: 0x1008, Avail: 0x2000, Used: 0x3000}), 0},
		{"avail ring misaligned", protocol.SetVringAddr, protocol.EncodeVringAddr(nil, protocol.VringAddr{Desc: 0x1000, Avail: 0x2001, Used: 0x3000}), 0},
		{"used ring misaligned", protocol.SetVringAddr, protocol.EncodeVringAddr(nil, protocol.VringAddr{Desc: 0x1000, Avail: 0x2000, Used: 0x3002}), 0},
		{"log base not offered", protocol.SetLogBase, make([]byte, 16), 0},
	}
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.U64(protocol.SetFeatures, 1<<30, false); err != nil {
		t.Fatal(err)
	}
	for _, tc := range nack {
		var fds []int
		for i := 0; i < tc.fds; i++ {
			fds = append(fds, f.MemFD)
		}
		if err := f.Ack(tc.req, tc.payload, fds); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if got := srv.Stats.BadMessages.Load(); got != uint64(len(nack)) {
		t.Errorf("bad messages counted %d, want %d", got, len(nack))
	}
	// A GET with a malformed payload cannot be answered: the session ends.
	if _, err := f.Request(protocol.GetVringBase, 0, []byte{1}, nil, true); err == nil {
		t.Error("malformed GET_VRING_BASE answered")
	}
	// An oversized header ends the session too.
	g, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	g.Conn.Write(protocol.Header{Request: protocol.SetOwner, Flags: protocol.FlagVersion}, make([]byte, protocol.MaxPayload+1), nil)
	g.Close()
	// The next frontend still works.
	h, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
}

func TestConfigAndStatus(t *testing.T) {
	b := newSink()
	_, path := startServer(t, b)
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(allFeatures); err != nil {
		t.Fatal(err)
	}
	m, err := f.Request(protocol.GetConfig, 0, protocol.EncodeConfig(nil, protocol.ConfigPayload{Data: make([]byte, 10)}), nil, true)
	if err != nil {
		t.Fatal(err)
	}
	c, err := m.Config()
	if err != nil || !bytes.Equal(c.Data, []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0}) {
		t.Fatalf("config %x %v", c.Data, err)
	}
	if err := f.Ack(protocol.SetStatus, []byte{15, 0, 0, 0, 0, 0, 0, 0}, nil); err != nil {
		t.Fatal(err)
	}
	st, err := f.U64(protocol.GetStatus, 0, true)
	if err != nil || st != 15 {
		t.Fatalf("status %d %v", st, err)
	}
	// sinkBackend does not report a queue number: its virtqueue count.
	n, err := f.U64(protocol.GetQueueNum, 0, true)
	if err != nil || n != 2 {
		t.Fatalf("queue num %d %v", n, err)
	}
	slots, err := f.U64(protocol.GetMaxMemSlots, 0, true)
	if err != nil || slots < 8 {
		t.Fatalf("mem slots %d %v", slots, err)
	}
}
