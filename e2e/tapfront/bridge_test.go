package tapfront

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/vhost/iov"
	"github.com/vunet/vunet/vhost/vhosttest"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// echoDevice is a virtio-net device that returns every transmitted frame
// on the receive queue with the same header (num_buffers set to the
// buffers it used, as a mergeable device does). corrupt, if set, may
// change the used length it reports for the first receive buffer.
type echoDevice struct {
	mu      sync.Mutex
	queues  [2]*virtqueue.Queue
	kicks   [2]*virtqueue.EventFD
	done    chan struct{}
	corrupt func(n int, first uint32) uint32
	// badHead, if set, may change the head of the n-th frame's i-th
	// receive buffer (first is the head of its first).
	badHead func(n, i int, head, first uint16) uint16
}

func (d *echoDevice) Features() uint64 {
	return 1<<endpoint.FeatureCsum | 1<<endpoint.FeatureGuestCsum | 1<<endpoint.FeatureHostTSO4 |
		1<<endpoint.FeatureHostTSO6 | 1<<endpoint.FeatureGuestTSO4 | 1<<endpoint.FeatureGuestTSO6 | 1<<endpoint.FeatureMrgRxbuf
}
func (d *echoDevice) SetFeatures(uint64) error { return nil }
func (d *echoDevice) NumQueues() int           { return 2 }
func (d *echoDevice) Config() []byte           { return make([]byte, 12) }
func (d *echoDevice) Reset()                   {}

func (d *echoDevice) StartQueue(idx int, q *virtqueue.Queue, kick *virtqueue.EventFD) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queues[idx], d.kicks[idx] = q, kick
	if d.queues[0] != nil && d.queues[1] != nil && d.done == nil {
		d.done = make(chan struct{})
		go d.run(d.queues[0], d.queues[1], d.kicks[0], d.kicks[1], d.done)
	}
}

func (d *echoDevice) StopQueue(idx int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.done != nil {
		d.kicks[0].Interrupt()
		d.kicks[1].Interrupt()
		<-d.done
		d.done = nil
	}
	d.queues[idx], d.kicks[idx] = nil, nil
}

func (d *echoDevice) run(rx, tx *virtqueue.Queue, rxKick, txKick *virtqueue.EventFD, done chan struct{}) {
	defer close(done)
	var el virtqueue.Element
	els := make([]virtqueue.Element, 64)
	frame := make([]byte, SlotSize)
	for n := 0; ; n++ {
		tx.Lock()
		err := tx.Pop(&el)
		if err != nil {
			more := tx.EnableKicks()
			tx.Unlock()
			if !more {
				if _, err := txKick.Wait(); err != nil {
					return
				}
			}
			n--
			continue
		}
		l := iov.CopyTo(frame, el.Out, 0)
		tx.Push(el.Head, 0)
		tx.Flush()
		tx.Notify()
		tx.Unlock()
		for {
			rx.Lock()
			mark := rx.Mark()
			count, have := 0, 0
			for have < l && count < len(els) && rx.Pop(&els[count]) == nil {
				have += iov.Size(els[count].In)
				count++
			}
			if have < l {
				rx.Rewind(mark)
				armed := rx.ArmKick()
				rx.Unlock()
				if !armed {
					if _, err := rxKick.Wait(); err != nil {
						return
					}
				}
				continue
			}
			binary.LittleEndian.PutUint16(frame[10:], uint16(count))
			rem := l
			for i := 0; i < count; i++ {
				c := min(iov.Size(els[i].In), rem)
				iov.CopyFrom(els[i].In, 0, frame[l-rem:l-rem+c])
				used := uint32(c)
				head := els[i].Head
				if i == 0 && d.corrupt != nil {
					used = d.corrupt(n, used)
				}
				if d.badHead != nil {
					head = d.badHead(n, i, head, els[0].Head)
				}
				rx.Push(head, used)
				rem -= c
			}
			rx.Flush()
			rx.Notify()
			rx.Unlock()
			break
		}
	}
}

// start runs a bridge to an echo device; the returned file is the
// "kernel" end of the tap (a SOCK_SEQPACKET pair keeps frame boundaries).
func start(t *testing.T, dev *echoDevice, opts Options) (*Bridge, *os.File, *runResult) {
	t.Helper()
	_, sock := vhosttest.StartServer(t, dev)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Room for a burst of 64 KiB frames in flight in the pair.
	for _, fd := range fds {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 8<<20)
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	}
	tap := os.NewFile(uintptr(fds[0]), "tap")
	kernel := os.NewFile(uintptr(fds[1]), "kernel")
	t.Cleanup(func() { kernel.Close() })
	b, err := Dial(sock, tap, opts)
	if err != nil {
		tap.Close()
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	res := &runResult{done: make(chan struct{})}
	go func() { res.err = b.Run(ctx); close(res.done) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-res.done:
			if res.err != nil && !res.wantErr {
				t.Errorf("Run: %v", res.err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
	})
	return b, kernel, res
}

// runResult is Run's outcome: err is valid once done is closed.
type runResult struct {
	done    chan struct{}
	err     error
	wantErr bool // the test expects Run to fail
}

// frame builds a header and an Ethernet frame of n bytes (pattern seeded).
func frame(n int, seed int64, hdr [10]byte) []byte {
	p := make([]byte, HdrLen+n)
	copy(p, hdr[:])
	p[10], p[11] = 0xee, 0xee // garbage num_buffers, as a tap leaves it
	r := rand.New(rand.NewSource(seed))
	r.Read(p[HdrLen:])
	return p
}

func tsoHdr(flags uint8) [10]byte {
	var h [10]byte
	h[0], h[1] = flags, 1 // NEEDS_CSUM (or not), GSO TCPv4
	binary.LittleEndian.PutUint16(h[2:], 66)
	binary.LittleEndian.PutUint16(h[4:], 1448)
	binary.LittleEndian.PutUint16(h[6:], 34)
	binary.LittleEndian.PutUint16(h[8:], 16)
	return h
}

// TestEcho sends frames of every size class into the "tap" (64 KiB TSO
// frames with partial checksums among them) and checks each comes back
// byte for byte through the TX ring, the echo device and the RX ring,
// with small receive buffers (frames merged over up to 33 buffers) and
// whole-frame ones, with and without EVENT_IDX.
func TestEcho(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"2 KiB buffers, event idx", Options{RXBufSize: 2048, RingSize: 64}},
		{"whole-frame buffers, event idx", Options{}},
		{"2 KiB buffers, no event idx", Options{RXBufSize: 2048, RingSize: 64, NoEventIdx: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, kernel, _ := start(t, &echoDevice{}, tc.opts)
			sizes := []int{14, 60, 1514, 2036, 2037, 9000, 65549, 65000, 1, 3000}
			var want [][]byte
			for i := 0; i < 300; i++ {
				n := sizes[i%len(sizes)]
				h := [10]byte{}
				if n > 1514 {
					h = tsoHdr(flagNeedsCsum | flagDataValid)
				}
				want = append(want, frame(n, int64(i), h))
			}
			go func() {
				for _, p := range want {
					for {
						_, err := unix.Write(int(kernel.Fd()), p)
						if err == unix.EAGAIN {
							time.Sleep(time.Millisecond)
							continue
						}
						break
					}
				}
			}()
			got := make([]byte, SlotSize)
			deadline := time.Now().Add(20 * time.Second)
			dropped := 0
			for i, p := range want {
				if len(p) < HdrLen+14 {
					dropped++
					continue // too short: the bridge drops it
				}
				var n int
				for {
					var err error
					n, err = unix.Read(int(kernel.Fd()), got)
					if err == unix.EAGAIN && time.Now().Before(deadline) {
						time.Sleep(100 * time.Microsecond)
						continue
					}
					if err != nil {
						t.Fatalf("frame %d: read: %v (stats %+v)", i, err, snapshot(b))
					}
					break
				}
				g := got[:n]
				if n != len(p) {
					t.Fatalf("frame %d: %d bytes back, sent %d", i, n, len(p))
				}
				// DATA_VALID is cleared on transmit; the rest of the
				// header and the frame come back as sent.
				if g[0] != p[0]&^flagDataValid || !bytes.Equal(g[1:10], p[1:10]) {
					t.Fatalf("frame %d: header % x, sent % x", i, g[:10], p[:10])
				}
				nb := binary.LittleEndian.Uint16(g[10:])
				if wantNB := (len(p) + tc.opts.RXBufSize - 1) / max(tc.opts.RXBufSize, 1); tc.opts.RXBufSize != 0 && int(nb) != wantNB {
					t.Fatalf("frame %d: num_buffers %d, want %d", i, nb, wantNB)
				}
				if !bytes.Equal(g[HdrLen:], p[HdrLen:]) {
					t.Fatalf("frame %d: content differs", i)
				}
			}
			st := snapshot(b)
			if st.TXDropped != uint64(dropped) || st.TXFrames != uint64(len(want)-dropped) || st.RXFrames != st.TXFrames {
				t.Errorf("counters: %+v, want %d dropped, %d frames each way", st, dropped, len(want)-dropped)
			}
			if st.TXGSO == 0 || st.TXGSO != st.RXGSO || st.TXBig != st.RXBig || st.TXNeedsCsum != st.TXGSO {
				t.Errorf("offload counters: %+v", st)
			}
			if tc.opts.RXBufSize == 2048 && st.RXMerged == 0 || tc.opts.RXBufSize == 0 && st.RXMerged != 0 {
				t.Errorf("merged frames %d with %d-byte buffers", st.RXMerged, tc.opts.RXBufSize)
			}
			if st.RXBad != 0 || st.RXTapErrors != 0 {
				t.Errorf("errors: %+v", st)
			}
		})
	}
}

// TestHostileUsedLength: a device that reports more bytes than the
// receive buffer holds gets the frame dropped and counted, and the buffer
// is reused; frames after it still arrive.
func TestHostileUsedLength(t *testing.T) {
	dev := &echoDevice{corrupt: func(n int, used uint32) uint32 {
		if n%2 == 0 {
			return 2049 // one byte past the buffer
		}
		return used
	}}
	b, kernel, _ := start(t, dev, Options{RingSize: 8, RXBufSize: 2048})
	for i := 0; i < 20; i++ {
		p := frame(100, int64(i), [10]byte{})
		if _, err := unix.Write(int(kernel.Fd()), p); err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			continue
		}
		got := make([]byte, SlotSize)
		deadline := time.Now().Add(10 * time.Second)
		for {
			n, err := unix.Read(int(kernel.Fd()), got)
			if err == unix.EAGAIN && time.Now().Before(deadline) {
				time.Sleep(100 * time.Microsecond)
				continue
			}
			if err != nil {
				t.Fatalf("frame %d: %v (stats %+v)", i, err, snapshot(b))
			}
			if !bytes.Equal(got[HdrLen:n], p[HdrLen:]) {
				t.Fatalf("frame %d: wrong frame back", i)
			}
			break
		}
	}
	if st := snapshot(b); st.RXBad != 10 || st.RXFrames != 10 {
		t.Errorf("want 10 bad and 10 good frames: %+v", st)
	}
}

// TestHostileHead: a receive used entry naming a buffer the frontend did
// not post (out of the ring, or one it already holds for this frame) means
// the device lost track of the ring: Run stops with an error instead of
// using a buffer twice, and does not panic.
func TestHostileHead(t *testing.T) {
	for _, tc := range []struct {
		name string
		head func(i int, h, first uint16) uint16
	}{
		{"out of range", func(i int, h, _ uint16) uint16 {
			if i == 0 {
				return 200
			}
			return h
		}},
		{"same buffer twice in one frame", func(i int, h, first uint16) uint16 {
			if i == 1 {
				return first
			}
			return h
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := &echoDevice{badHead: func(n, i int, h, first uint16) uint16 {
				if n == 3 {
					return tc.head(i, h, first)
				}
				return h
			}}
			_, kernel, res := start(t, dev, Options{RingSize: 8, RXBufSize: 2048})
			res.wantErr = true
			got := make([]byte, SlotSize)
			for i := 0; i < 6; i++ {
				unix.Write(int(kernel.Fd()), frame(3000, int64(i), [10]byte{})) // two buffers each
				for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
					if _, err := unix.Read(int(kernel.Fd()), got); err != unix.EAGAIN {
						break
					}
					time.Sleep(100 * time.Microsecond)
				}
			}
			select {
			case <-res.done:
			case <-time.After(10 * time.Second):
				t.Fatal("Run did not stop on a bad used head")
			}
			if res.err == nil || !strings.Contains(res.err.Error(), "not posted") {
				t.Fatalf("Run returned %v, want a used-head error", res.err)
			}
		})
	}
}

type stats struct {
	TXFrames, TXGSO, TXBig, TXNeedsCsum, TXDropped       uint64
	RXFrames, RXGSO, RXBig, RXNeedsCsum, RXMerged, RXBad uint64
	RXTapErrors, Kicks, Calls                            uint64
}

func snapshot(b *Bridge) stats {
	s := &b.Stats
	return stats{s.TXFrames.Load(), s.TXGSO.Load(), s.TXBig.Load(), s.TXNeedsCsum.Load(), s.TXDropped.Load(),
		s.RXFrames.Load(), s.RXGSO.Load(), s.RXBig.Load(), s.RXNeedsCsum.Load(), s.RXMerged.Load(), s.RXBad.Load(),
		s.RXTapErrors.Load(), s.Kicks.Load(), s.Calls.Load()}
}
