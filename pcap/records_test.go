package pcap_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/vunet/vunet/pcap"
)

// record is one parsed pcap record.
type record struct {
	sec, usec        uint32
	inclLen, origLen uint32
	data             []byte
}

// parse reads a classic little-endian microsecond pcap file, failing the
// test on any structural error.
func parse(t *testing.T, b []byte) []record {
	t.Helper()
	if len(b) < 24 {
		t.Fatalf("file of %d bytes has no header", len(b))
	}
	le := binary.LittleEndian
	if m := le.Uint32(b); m != 0xa1b2c3d4 {
		t.Fatalf("magic %#x", m)
	}
	if maj, min := le.Uint16(b[4:]), le.Uint16(b[6:]); maj != 2 || min != 4 {
		t.Fatalf("version %d.%d", maj, min)
	}
	if snap := le.Uint32(b[16:]); snap != pcap.SnapLen {
		t.Fatalf("snaplen %d, want %d", snap, pcap.SnapLen)
	}
	if lt := le.Uint32(b[20:]); lt != 1 {
		t.Fatalf("link type %d, want 1 (Ethernet)", lt)
	}
	var out []record
	for b = b[24:]; len(b) > 0; {
		if len(b) < 16 {
			t.Fatalf("truncated record header (%d bytes)", len(b))
		}
		r := record{sec: le.Uint32(b), usec: le.Uint32(b[4:]), inclLen: le.Uint32(b[8:]), origLen: le.Uint32(b[12:])}
		b = b[16:]
		if int(r.inclLen) > len(b) {
			t.Fatalf("record claims %d bytes, %d left", r.inclLen, len(b))
		}
		r.data, b = b[:r.inclLen], b[r.inclLen:]
		out = append(out, r)
	}
	return out
}

func frame(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31 + i>>8)
	}
	return b
}

// split cuts b into pieces of the given sizes (the rest in the last).
func split(b []byte, sizes ...int) [][]byte {
	var out [][]byte
	for _, s := range sizes {
		s = min(s, len(b))
		out = append(out, b[:s])
		b = b[s:]
	}
	return append(out, b)
}

// TestRecords: each record holds exactly the frame's bytes, its captured
// length equal to its frame length (the explicit length, not the buffers'
// size), whatever the buffer layout and starting offset; frames beyond
// SnapLen are cut to SnapLen with the original length kept. (Mutations
// checked by hand: capturing one byte less, or ignoring the offset, fail
// here.)
func TestRecords(t *testing.T) {
	var buf bytes.Buffer
	w, err := pcap.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	ts := time.Unix(1700000000, 123456789)
	hdr := make([]byte, 12) // a virtio-net header before the frame, skipped by off
	cases := []struct {
		name  string
		f     []byte
		segs  [][]byte
		off   int
		extra int // buffer bytes after the frame that must not be captured
	}{
		{"one buffer", frame(60), nil, 0, 0},
		{"header then frame", frame(1514), nil, 12, 0},
		{"split across buffers", frame(1514), nil, 12, 0},
		{"buffers larger than the frame", frame(98), nil, 12, 400},
		{"header split", frame(200), nil, 12, 0},
		{"larger than SnapLen", frame(pcap.SnapLen + 1000), nil, 0, 0},
	}
	for i := range cases {
		c := &cases[i]
		all := append(append(append([]byte(nil), hdr[:c.off]...), c.f...), make([]byte, c.extra)...)
		switch c.name {
		case "split across buffers":
			c.segs = split(all, 12, 100, 1, 700)
		case "header split":
			c.segs = split(all, 5, 9, 50)
		default:
			c.segs = [][]byte{all}
		}
		w.Write(ts, c.segs, c.off, len(c.f))
	}
	if err := w.Err(); err != nil {
		t.Fatal(err)
	}
	flushWriter(t, w)
	recs := parse(t, buf.Bytes())
	if len(recs) != len(cases) {
		t.Fatalf("%d records, want %d", len(recs), len(cases))
	}
	if n, cut, lost := w.Stats.Frames.Load(), w.Stats.Truncated.Load(), w.Stats.Lost.Load(); n != uint64(len(cases)) || cut != 1 || lost != 0 {
		t.Errorf("counted %d frames, %d truncated, %d lost; want %d, 1, 0", n, cut, lost, len(cases))
	}
	for i, c := range cases {
		r := recs[i]
		wantIncl := min(len(c.f), pcap.SnapLen)
		if int(r.origLen) != len(c.f) || int(r.inclLen) != wantIncl {
			t.Errorf("%s: captured %d of %d bytes, want %d of %d", c.name, r.inclLen, r.origLen, wantIncl, len(c.f))
			continue
		}
		if !bytes.Equal(r.data, c.f[:wantIncl]) {
			t.Errorf("%s: captured bytes differ from the frame", c.name)
		}
		if r.sec != 1700000000 || r.usec != 123456 {
			t.Errorf("%s: timestamp %d.%06d", c.name, r.sec, r.usec)
		}
	}
}

// failWriter fails every write after the first n.
type failWriter struct {
	n      int
	writes int
}

var errDiskFull = errors.New("disk full")

func (f *failWriter) Write(b []byte) (int, error) {
	f.writes++
	if f.writes > f.n {
		return 0, errDiskFull
	}
	return len(b), nil
}

// TestWriteError: a failing capture file is reported by Err and never
// disturbs the caller (Write does not panic or block).
func TestWriteError(t *testing.T) {
	fw := &failWriter{n: 1} // the file header succeeds, the first record fails
	w, err := pcap.NewWriter(fw)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		w.Write(time.Now(), [][]byte{frame(100)}, 0, 100)
	}
	flushWriter(t, w)
	if err := w.Err(); !errors.Is(err, errDiskFull) {
		t.Fatalf("Err() = %v, want the write error", err)
	}
	// Every frame after the failure is counted as lost, none as recorded.
	if n, lost := w.Stats.Frames.Load(), w.Stats.Lost.Load(); n != 0 || lost != 10 {
		t.Errorf("counted %d frames, %d lost; want 0, 10", n, lost)
	}
}

// TestHeaderError: a file that cannot take even the header is an error at
// creation.
func TestHeaderError(t *testing.T) {
	if _, err := pcap.NewWriter(&failWriter{n: 0}); err == nil {
		t.Fatal("NewWriter succeeded on a failing file")
	}
}
