package pcap_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vunet/vunet/pcap"
)

// gateWriter blocks every write until opened: a disk that stalls.
type gateWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	gate chan struct{}
}

func (g *gateWriter) Write(b []byte) (int, error) {
	if g.buf.Len() > 0 { // the file header goes through
		<-g.gate
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.buf.Write(b)
}

func (g *gateWriter) bytes() []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]byte(nil), g.buf.Bytes()...)
}

// TestStalledFileNeverBlocks: while the file does not take a byte, Write
// keeps returning at once; what does not fit in the buffer is dropped and
// counted, and what was buffered reaches the file exactly once the disk
// moves again.
func TestStalledFileNeverBlocks(t *testing.T) {
	g := &gateWriter{gate: make(chan struct{})}
	w, err := pcap.New(g, pcap.Options{BufferBytes: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	const n = 5000
	f := frame(1514)
	start := time.Now()
	for range n {
		w.Write(time.Now(), [][]byte{f}, 0, len(f))
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("%d writes took %v with a stalled file", n, took)
	}
	dropped := w.Stats.DroppedFull.Load()
	if dropped == 0 || dropped >= n {
		t.Fatalf("dropped %d of %d", dropped, n)
	}
	close(g.gate)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	recs := parse(t, g.bytes())
	if uint64(len(recs)) != n-dropped || w.Stats.Frames.Load() != uint64(len(recs)) {
		t.Fatalf("%d records, %d counted, %d dropped of %d", len(recs), w.Stats.Frames.Load(), dropped, n)
	}
	for _, r := range recs {
		if int(r.inclLen) != len(f) || int(r.origLen) != len(f) || !bytes.Equal(r.data, f) {
			t.Fatalf("record %d/%d bytes differs from the frame", r.inclLen, r.origLen)
		}
	}
}

// logRecorder counts log records by message.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.msgs = append(l.msgs, r.Message)
	return nil
}
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecorder) WithGroup(string) slog.Handler      { return l }

func (l *logRecorder) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, m := range l.msgs {
		if strings.Contains(m, sub) {
			n++
		}
	}
	return n
}

// TestSizeCap: capture stops before the record that would pass the cap;
// the file never exceeds it, the rest is counted, and it is logged once.
func TestSizeCap(t *testing.T) {
	var buf bytes.Buffer
	lr := &logRecorder{}
	const rec = 16 + 100
	max := int64(pcap.HeaderSize + 3*rec + rec/2)
	w, err := pcap.New(&buf, pcap.Options{MaxSize: max, Logger: slog.New(lr)})
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		w.Write(time.Now(), [][]byte{frame(100)}, 0, 100)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	recs := parse(t, buf.Bytes())
	if len(recs) != 3 || int64(buf.Len()) > max {
		t.Fatalf("%d records in %d bytes, want 3 within %d", len(recs), buf.Len(), max)
	}
	if got := w.Stats.DroppedCap.Load(); got != 7 {
		t.Errorf("dropped at the cap %d, want 7", got)
	}
	if n := lr.count("size cap"); n != 1 {
		t.Errorf("size cap logged %d times, want once", n)
	}
}

// TestWriteErrorLoggedOnce: a failing file (disk full) stops capture: one
// log line, one write error, every later frame counted as dropped, and the
// data path unaffected.
func TestWriteErrorLoggedOnce(t *testing.T) {
	lr := &logRecorder{}
	w, err := pcap.New(&failWriter{n: 1}, pcap.Options{Logger: slog.New(lr)})
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		w.Write(time.Now(), [][]byte{frame(100)}, 0, 100)
		w.Flush()
	}
	w.Close()
	if n := lr.count("failed"); n != 1 {
		t.Errorf("write error logged %d times, want once", n)
	}
	if got := w.Stats.WriteErrors.Load(); got != 1 {
		t.Errorf("write errors %d, want 1", got)
	}
	if got := w.Stats.Lost.Load(); got != 100 {
		t.Errorf("dropped after the error %d, want 100", got)
	}
}

// TestConcurrentWritesAndClose: writers on several goroutines racing with
// Close neither panic nor deadlock (run with -race).
func TestConcurrentWritesAndClose(t *testing.T) {
	var buf bytes.Buffer
	w, err := pcap.New(&buf, pcap.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 2000 {
				w.Write(time.Now(), [][]byte{frame(60)}, 0, 60)
			}
		}()
	}
	time.Sleep(time.Millisecond)
	w.Close()
	wg.Wait()
	w.Flush()
	w.Close()
	parse(t, buf.Bytes())
}

// BenchmarkWrite is the cost of capturing 1514-byte frames (the copy into a
// pooled record, the hand-off, and the writer goroutine's work; the file is
// io.Discard).
func BenchmarkWrite(b *testing.B) {
	w, err := pcap.New(io.Discard, pcap.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	f := frame(1514)
	segs := [][]byte{f[:12], f[12:]}
	ts := time.Now()
	b.SetBytes(int64(len(f)))
	b.ReportAllocs()
	// A flush every 1024 frames (1.5 MB, within the 4 MiB buffer) keeps the
	// buffer from filling, so every op is a real capture, not a drop.
	i := 0
	for b.Loop() {
		w.Write(ts, segs, 0, len(f))
		if i++; i%1024 == 0 {
			w.Flush()
		}
	}
	b.StopTimer()
	w.Flush()
	b.ReportMetric(float64(w.Stats.DroppedFull.Load())/float64(b.N), "dropped/op")
}
