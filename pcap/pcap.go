// Package pcap writes packet captures in the classic libpcap format. Each
// record is exactly the frame's L2 length, given explicitly: the buffers a
// frame lives in may be larger than the frame (virtqueue elements are), so
// the length is never derived from them.
//
// Capturing must never stall the data path: Write only copies the frame
// into a record and hands it to a writer goroutine through a bounded
// buffer. When the buffer is full, or the file has reached its size cap, or
// a write failed (disk full), the frame is dropped and counted; the caller
// never waits for the file.
package pcap

import (
	"bufio"
	"encoding/binary"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

const (
	magic        = 0xa1b2c3d4 // microsecond timestamps
	linkEthernet = 1
	// SnapLen is the largest frame recorded whole; GSO frames can be up to
	// 64 KiB plus headers.
	SnapLen = 262144
	// HeaderSize is the size of the file header; each record adds
	// recordHeader bytes to its frame.
	HeaderSize   = 24
	recordHeader = 16
)

// DefaultBufferBytes bounds the frames waiting for the writer goroutine:
// about 2700 full-size Ethernet frames, or 60 TSO segments, enough to ride
// out a slow disk for a moment at a few hundred Mbit/s.
const DefaultBufferBytes = 4 << 20

// fileBuffer is the writer goroutine's write buffer: records are batched
// into few write(2) calls while frames keep coming, and the file is
// flushed whenever the queue runs empty, so it stays current.
const fileBuffer = 256 << 10

// Options configure a Writer.
type Options struct {
	// BufferBytes bounds the bytes of records queued for the file; 0 means
	// DefaultBufferBytes.
	BufferBytes int
	// MaxSize caps the file, header included: capture stops before a
	// record that would pass it. 0 is unlimited.
	MaxSize int64
	// Logger is told once when capture stops (size cap, write error); nil
	// discards.
	Logger *slog.Logger
}

// Stats are the capture's counters.
type Stats struct {
	Frames atomic.Uint64 `metric:"pcap_frames_total" help:"Frames recorded in the capture file."`
	Bytes  atomic.Uint64 `metric:"pcap_bytes_total" help:"Bytes written to the capture file, headers included."`
	// Truncated frames were longer than SnapLen: recorded cut, with their
	// original length.
	Truncated atomic.Uint64 `metric:"pcap_truncated_total" help:"Frames recorded cut to the snap length (262144 bytes)."`
	// Frames not recorded, by reason.
	DroppedFull atomic.Uint64 `metric:"pcap_dropped_total{reason=buffer_full}" help:"Frames not recorded: buffer_full (the file could not keep up; the data path never waits for it), size_cap (--pcap-max-size reached, capture stopped), write_error (writing the file failed, e.g. disk full; capture stopped)."`
	DroppedCap  atomic.Uint64 `metric:"pcap_dropped_total{reason=size_cap}"`
	Lost        atomic.Uint64 `metric:"pcap_dropped_total{reason=write_error}"`
	WriteErrors atomic.Uint64 `metric:"pcap_write_errors_total" help:"Failed writes to the capture file (capture stops at the first)."`
}

// Writer appends records to a pcap stream. Write is safe for concurrent
// use and never blocks on the file.
type Writer struct {
	opts  Options
	log   *slog.Logger
	Stats Stats

	queue  chan item
	queued atomic.Int64 // bytes of records in queue
	// stopped is set once capture ended for good (cap or error): Write
	// then drops without copying.
	stopped atomic.Bool
	failed  atomic.Bool // stopped by a write error, not the size cap
	pool    sync.Pool   // *[]byte record buffers

	mu     sync.Mutex // guards err and closed
	err    error
	closed bool
	done   chan struct{} // closed when the goroutine exits
}

// item is a record to write, or (done != nil) a flush request, or (quit)
// the end. The queue is never closed: a Write racing with Close must not
// send on a closed channel.
type item struct {
	rec  *[]byte
	done chan struct{}
	quit bool
}

// NewWriter is New with default options.
func NewWriter(w io.Writer) (*Writer, error) { return New(w, Options{}) }

// New writes the file header to w (an error here is returned) and starts
// the writer goroutine; Close stops it.
func New(w io.Writer, o Options) (*Writer, error) {
	if o.BufferBytes <= 0 {
		o.BufferBytes = DefaultBufferBytes
	}
	h := make([]byte, HeaderSize)
	binary.LittleEndian.PutUint32(h[0:], magic)
	binary.LittleEndian.PutUint16(h[4:], 2)
	binary.LittleEndian.PutUint16(h[6:], 4)
	binary.LittleEndian.PutUint32(h[16:], SnapLen)
	binary.LittleEndian.PutUint32(h[20:], linkEthernet)
	if _, err := w.Write(h); err != nil {
		return nil, err
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// The channel's capacity only has to exceed what BufferBytes admits
	// of the smallest records (60-byte frames).
	p := &Writer{opts: o, log: log, queue: make(chan item, o.BufferBytes/(recordHeader+60)+1), done: make(chan struct{})}
	p.Stats.Bytes.Add(HeaderSize)
	go p.run(bufio.NewWriterSize(w, fileBuffer), HeaderSize)
	return p, nil
}

// Write records the first length bytes of the frame held in segs, starting
// at byte offset off. It copies them and returns; the frame is dropped (and
// counted) rather than waited for when the buffer is full, and after the
// size cap or a write error.
func (p *Writer) Write(ts time.Time, segs [][]byte, off, length int) {
	if length < 0 {
		return
	}
	if p.stopped.Load() {
		p.countStopped()
		return
	}
	caplen := min(length, SnapLen)
	if caplen < length {
		p.Stats.Truncated.Add(1)
	}
	size := recordHeader + caplen
	if p.queued.Add(int64(size)) > int64(p.opts.BufferBytes) {
		p.queued.Add(-int64(size))
		p.Stats.DroppedFull.Add(1)
		return
	}
	rec := p.record(size)
	b := (*rec)[:0]
	b = binary.LittleEndian.AppendUint32(b, uint32(ts.Unix()))
	b = binary.LittleEndian.AppendUint32(b, uint32(ts.Nanosecond()/1000))
	b = binary.LittleEndian.AppendUint32(b, uint32(caplen))
	b = binary.LittleEndian.AppendUint32(b, uint32(length))
	need := caplen
	for _, s := range segs {
		if need == 0 {
			break
		}
		if off >= len(s) {
			off -= len(s)
			continue
		}
		c := min(len(s)-off, need)
		b = append(b, s[off:off+c]...)
		need -= c
		off = 0
	}
	// A frame shorter than claimed is padded so that the file stays
	// parseable; it cannot happen with correct explicit lengths.
	for ; need > 0; need-- {
		b = append(b, 0)
	}
	*rec = b
	select {
	case p.queue <- item{rec: rec}:
	default: // cannot happen: the byte budget is below the capacity
		p.queued.Add(-int64(size))
		p.pool.Put(rec)
		p.Stats.DroppedFull.Add(1)
	}
}

func (p *Writer) record(size int) *[]byte {
	if r, ok := p.pool.Get().(*[]byte); ok && cap(*r) >= size {
		return r
	}
	b := make([]byte, 0, size)
	return &b
}

func (p *Writer) countStopped() {
	if p.failed.Load() {
		p.Stats.Lost.Add(1)
	} else {
		p.Stats.DroppedCap.Add(1)
	}
}

// run writes queued records until Close.
func (p *Writer) run(w *bufio.Writer, written int64) {
	defer close(p.done)
	bw := &counted{Writer: w}
	for it := range p.queue {
		if it.quit {
			p.flush(bw)
			close(it.done)
			return
		}
		if it.done != nil {
			p.flush(bw)
			close(it.done)
			continue
		}
		rec := *it.rec
		p.queued.Add(-int64(len(rec)))
		switch {
		case p.stopped.Load():
			p.countStopped()
		case p.opts.MaxSize > 0 && written+int64(len(rec)) > p.opts.MaxSize:
			p.stopped.Store(true)
			p.Stats.DroppedCap.Add(1)
			p.flush(bw)
			p.log.Warn("pcap file reached its size cap: capture stopped", "max_size", p.opts.MaxSize, "frames", p.Stats.Frames.Load())
		default:
			if _, err := bw.Write(rec); err != nil {
				p.fail(err)
				p.Stats.Lost.Add(1 + bw.frames)
				bw.frames, bw.bytes = 0, 0
				break
			}
			written += int64(len(rec))
			bw.frames++
			bw.bytes += uint64(len(rec))
		}
		p.pool.Put(it.rec)
		if len(p.queue) == 0 {
			p.flush(bw)
		}
	}
}

// counted is the file buffer with the frames and bytes in it that have
// not reached the file yet: they are counted as written only once they
// have (a write error drops them all).
type counted struct {
	*bufio.Writer
	frames, bytes uint64
}

func (p *Writer) flush(bw *counted) {
	if p.failed.Load() {
		return
	}
	err := bw.Flush()
	if err != nil {
		p.fail(err)
		p.Stats.Lost.Add(bw.frames)
	} else {
		p.Stats.Frames.Add(bw.frames)
		p.Stats.Bytes.Add(bw.bytes)
	}
	bw.frames, bw.bytes = 0, 0
}

// fail records the first write error and stops capture; it is logged once.
func (p *Writer) fail(err error) {
	p.Stats.WriteErrors.Add(1)
	p.mu.Lock()
	first := p.err == nil
	if first {
		p.err = err
	}
	p.mu.Unlock()
	p.failed.Store(true)
	p.stopped.Store(true)
	if first {
		p.log.Error("writing the pcap file failed: capture stopped", "err", err)
	}
}

// Flush waits until every frame written before it has reached the
// underlying writer, and returns the first write error, if any.
func (p *Writer) Flush() error {
	done := make(chan struct{})
	select {
	case p.queue <- item{done: done}:
		select {
		case <-done:
		case <-p.done:
		}
	case <-p.done: // closed: everything was flushed
	}
	return p.Err()
}

// Close flushes and stops the writer goroutine. Frames written after Close
// are dropped. It does not close the underlying writer.
func (p *Writer) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return p.Err()
	}
	p.closed = true
	p.mu.Unlock()
	// Frames queued before Close are written; later ones are dropped.
	done := make(chan struct{})
	p.queue <- item{quit: true, done: done}
	<-p.done
	p.stopped.Store(true)
	return p.Err()
}

// Err returns the first write error, if any.
func (p *Writer) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}
