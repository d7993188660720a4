// Package pcap writes packet captures in the classic libpcap format. Each
// record is exactly the frame's L2 length, given explicitly: the buffers a
// frame lives in may be larger than the frame (virtqueue elements are), so
// the length is never derived from them.
package pcap

import (
	"encoding/binary"
	"io"
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
)

// Writer appends records to a pcap stream. It is safe for concurrent use.
type Writer struct {
	mu  sync.Mutex
	w   io.Writer
	buf []byte
	err error
	// Stats counts the capture's records, declared for the metrics
	// registry (internal/metrics).
	Stats Stats
}

// Stats are a Writer's counters.
type Stats struct {
	Frames atomic.Uint64 `metric:"pcap_frames_total" help:"Frames recorded in the capture file."`
	// Truncated frames were longer than SnapLen: recorded cut, with their
	// original length.
	Truncated atomic.Uint64 `metric:"pcap_truncated_total" help:"Frames recorded cut to the snap length (262144 bytes)."`
	// Lost frames were not recorded because the file could not be
	// written (disk full, ...); capture stops at the first error.
	Lost atomic.Uint64 `metric:"pcap_lost_total" help:"Frames not recorded because writing the capture file failed."`
}

// NewWriter writes the file header to w and returns a Writer.
func NewWriter(w io.Writer) (*Writer, error) {
	h := make([]byte, 24)
	binary.LittleEndian.PutUint32(h[0:], magic)
	binary.LittleEndian.PutUint16(h[4:], 2)
	binary.LittleEndian.PutUint16(h[6:], 4)
	binary.LittleEndian.PutUint32(h[16:], SnapLen)
	binary.LittleEndian.PutUint32(h[20:], linkEthernet)
	if _, err := w.Write(h); err != nil {
		return nil, err
	}
	return &Writer{w: w}, nil
}

// Write records the first length bytes of the frame held in segs, starting
// at byte offset off. A capture error is remembered and reported by Err; it
// never affects the caller's data path.
func (p *Writer) Write(ts time.Time, segs [][]byte, off, length int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if length < 0 {
		return
	}
	if p.err != nil {
		p.Stats.Lost.Add(1)
		return
	}
	caplen := min(length, SnapLen)
	if caplen < length {
		p.Stats.Truncated.Add(1)
	}
	p.buf = p.buf[:0]
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(ts.Unix()))
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(ts.Nanosecond()/1000))
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(caplen))
	p.buf = binary.LittleEndian.AppendUint32(p.buf, uint32(length))
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
		p.buf = append(p.buf, s[off:off+c]...)
		need -= c
		off = 0
	}
	// A frame shorter than claimed is padded so that the file stays
	// parseable; it cannot happen with correct explicit lengths.
	for ; need > 0; need-- {
		p.buf = append(p.buf, 0)
	}
	if _, p.err = p.w.Write(p.buf); p.err != nil {
		p.Stats.Lost.Add(1)
		return
	}
	p.Stats.Frames.Add(1)
}

// Err returns the first write error, if any.
func (p *Writer) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}
