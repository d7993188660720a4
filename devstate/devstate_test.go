package devstate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sample() *State {
	return &State{
		SavedAt: time.UnixMilli(1764600000123),
		Leases4: []Lease4{{MAC: [6]byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}, Addr: netip.MustParseAddr("10.0.2.15"), Remaining: 3599 * time.Second}},
		Leases6: []Lease6{{DUID: []byte{0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56}, IAID: 0x01020304,
			Addr: netip.MustParseAddr("fd00::100"), Remaining: time.Hour}},
		Forwards: []Forward{
			{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:2222"), GuestPort: 22},
			{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:5353"), GuestPort: 53},
			{Proto: "unix", Path: "/run/user/1000/app.sock", GuestPort: 8080},
		},
		UDPFlows: []UDPFlow{{Guest: netip.MustParseAddrPort("10.0.2.15:40000"), Remote: netip.MustParseAddrPort("192.0.2.1:53"),
			HostPort: 51234, Idle: 1500 * time.Millisecond}},
	}
}

func tcpSample() TCPFlow {
	return TCPFlow{
		Guest: netip.MustParseAddrPort("10.0.2.15:41000"), Remote: netip.MustParseAddrPort("10.0.2.2:8080"),
		GuestMAC: [6]byte{0x52, 0x54, 0, 0x12, 0x34, 0x56},
		SndNxt:   1, RcvNxt: 0xfffffff0, SndWnd: 64240, RcvWnd: 1 << 20, SndWndScale: 7, RcvWndScale: 8,
		MaxPayload: 1448, SACK: true, Timestamps: true, TSVal: 12345, RecentTS: 678,
		Host: TCPHost{Local: netip.MustParseAddrPort("127.0.0.1:50000"), Remote: netip.MustParseAddrPort("127.0.0.1:8080"),
			SndSeq: 99, RcvSeq: 100, MSS: 65483, SACK: true, Timestamps: true, WScale: true, SndWScale: 7, RcvWScale: 7,
			TSVal: 5555, Window: [5]uint32{1, 2, 3, 4, 5}, SndQueue: []byte("queued to the peer"), RcvQueue: []byte("unread")},
	}
}

// TestTCPFlows: a state with TCP connections round-trips as version 2; one
// without is still version 1, which older vunets read.
func TestTCPFlows(t *testing.T) {
	in := sample()
	if b, err := Encode(in); err != nil || binary.LittleEndian.Uint16(b[len(magic):]) != 1 {
		t.Fatalf("a state without TCP connections: version %d, %v; want 1", binary.LittleEndian.Uint16(b[len(magic):]), err)
	}
	in.TCPFlows = []TCPFlow{tcpSample(), tcpSample()}
	in.TCPFlows[1].Host.SndQueue, in.TCPFlows[1].Host.RcvQueue = nil, nil
	in.TCPFlows[1].SACK, in.TCPFlows[1].Host.WScale = false, false
	b, err := Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	if v := binary.LittleEndian.Uint16(b[len(magic):]); v != 2 {
		t.Fatalf("version %d, want 2", v)
	}
	out, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	out.SavedAt = in.SavedAt
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", out.TCPFlows, in.TCPFlows)
	}
}

// TestTCPFlowRefused: hostile TCP records are refused, on both sides.
func TestTCPFlowRefused(t *testing.T) {
	for name, mut := range map[string]func(*TCPFlow){
		"window scale 15":    func(f *TCPFlow) { f.RcvWndScale = 15 },
		"host scale 15":      func(f *TCPFlow) { f.Host.SndWScale = 15 },
		"mixed families":     func(f *TCPFlow) { f.Remote = netip.MustParseAddrPort("[fd00::2]:80") },
		"no host address":    func(f *TCPFlow) { f.Host.Local = netip.AddrPort{} },
		"port 0":             func(f *TCPFlow) { f.Guest = netip.MustParseAddrPort("10.0.2.15:0") },
		"tiny payload":       func(f *TCPFlow) { f.MaxPayload = 10 },
		"host MSS too big":   func(f *TCPFlow) { f.Host.MSS = 1 << 16 },
		"send queue too big": func(f *TCPFlow) { f.Host.SndQueue = make([]byte, MaxTCPQueue+1) },
	} {
		f := tcpSample()
		mut(&f)
		if _, err := Encode(&State{TCPFlows: []TCPFlow{f}}); err == nil {
			t.Errorf("%s: encoded", name)
		}
		// Decode on its own: a hand-built body.
		b := []byte(magic)
		b = binary.LittleEndian.AppendUint16(b, Version)
		b = append(b, make([]byte, 10)...)
		b, _ = record(b, kindTCPFlow, func(b []byte) ([]byte, error) {
			good := tcpSample()
			mut(&good)
			return appendTCP(b, &good), nil // as a hostile source would, unchecked
		})
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		if _, err := Decode(b); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: decode %v, want ErrCorrupt", name, err)
		}
	}
	// A queue length that claims more than the record holds.
	b, _ := Encode(&State{TCPFlows: []TCPFlow{tcpSample()}})
	n := len(b) - crcSize - len("unread") - 4
	binary.LittleEndian.PutUint32(b[n:], 1000)
	if _, err := Decode(reseal(b)); !errors.Is(err, ErrCorrupt) {
		t.Errorf("queue longer than the record: %v", err)
	}
	// Too many connections.
	many := []byte(magic)
	many = binary.LittleEndian.AppendUint16(many, Version)
	many = append(many, make([]byte, 10)...)
	for range MaxTCPFlows + 1 {
		many, _ = record(many, kindTCPFlow, tcpSample().encode)
	}
	many = binary.LittleEndian.AppendUint32(many, crc32.Checksum(many, castagnoli))
	if _, err := Decode(many); !errors.Is(err, ErrLimit) {
		t.Errorf("%d TCP connections: %v", MaxTCPFlows+1, err)
	}
}

func TestRoundTrip(t *testing.T) {
	in := sample()
	b, err := Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if !out.SavedAt.Equal(in.SavedAt) {
		t.Errorf("SavedAt %v, want %v", out.SavedAt, in.SavedAt)
	}
	out.SavedAt = in.SavedAt
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip:\n got %+v\nwant %+v", out, in)
	}
	empty, err := Encode(&State{SavedAt: in.SavedAt})
	if err != nil {
		t.Fatal(err)
	}
	if st, err := Decode(empty); err != nil || len(st.Leases4)+len(st.Forwards) != 0 {
		t.Errorf("empty state: %+v, %v", st, err)
	}
}

// reseal recomputes the checksum after a test altered the body.
func reseal(b []byte) []byte {
	n := len(b) - crcSize
	binary.LittleEndian.PutUint32(b[n:], crc32.Checksum(b[:n], castagnoli))
	return b
}

func TestDecodeRefuses(t *testing.T) {
	good, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	mod := func(f func([]byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := []struct {
		name string
		b    []byte
		want error
		text string
	}{
		{"empty", nil, ErrFormat, ""},
		{"other magic", mod(func(b []byte) []byte { b[0] = 'X'; return b }), ErrFormat, ""},
		{"version 3", mod(func(b []byte) []byte { b[len(magic)] = 3; return reseal(b) }), ErrVersion, "version 3"},
		{"version 0", mod(func(b []byte) []byte { b[len(magic)] = 0; return reseal(b) }), ErrVersion, "version 0"},
		{"truncated", good[:len(good)-10], ErrCorrupt, "checksum"},
		{"flipped bit", mod(func(b []byte) []byte { b[headerSize+8] ^= 1; return b }), ErrCorrupt, "checksum"},
		{"reserved", mod(func(b []byte) []byte { b[len(magic)+2] = 1; return reseal(b) }), ErrCorrupt, "reserved"},
		// The first record's length claims more than is left.
		{"record too long", mod(func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[headerSize+2:], 1<<30)
			return reseal(b)
		}), ErrCorrupt, "claims"},
		// A DHCPv4 lease whose address is 16 bytes.
		{"lease4 not ipv4", func() []byte {
			b, _ := Encode(&State{Leases6: []Lease6{{DUID: []byte{1}, Addr: netip.MustParseAddr("fd00::1")}}})
			b[headerSize] = kindLease4 // same body, wrong kind
			return reseal(b)
		}(), ErrCorrupt, "DHCPv4"},
		{"too large", make([]byte, MaxSize+1), ErrLimit, ""},
	}
	for _, c := range cases {
		st, err := Decode(c.b)
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.text) {
			t.Errorf("%s: got %v (state %+v), want %v containing %q", c.name, err, st, c.want, c.text)
		}
	}
}

// An unknown record kind is skipped: a later vunet may add kinds.
func TestUnknownKindSkipped(t *testing.T) {
	b, err := Encode(&State{Forwards: sample().Forwards[:1]})
	if err != nil {
		t.Fatal(err)
	}
	body := b[:len(b)-crcSize]
	body = binary.LittleEndian.AppendUint16(body, 999)
	body = binary.LittleEndian.AppendUint32(body, 3)
	body = append(body, 1, 2, 3)
	b = reseal(append(body, 0, 0, 0, 0))
	st, err := Decode(b)
	if err != nil || len(st.Forwards) != 1 {
		t.Fatalf("%+v, %v", st, err)
	}
}

func TestLimits(t *testing.T) {
	st := &State{}
	for i := 0; i <= MaxLeases; i++ {
		st.Leases4 = append(st.Leases4, Lease4{Addr: netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})})
	}
	if _, err := Encode(st); !errors.Is(err, ErrLimit) {
		t.Errorf("Encode with %d leases: %v", len(st.Leases4), err)
	}
	// The decoder counts on its own: build the blob by hand.
	b := []byte(magic)
	b = binary.LittleEndian.AppendUint16(b, Version)
	b = append(b, make([]byte, 10)...)
	for _, l := range st.Leases4 {
		b, _ = record(b, kindLease4, l.encode)
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	if _, err := Decode(b); !errors.Is(err, ErrLimit) {
		t.Errorf("Decode with %d leases: %v", len(st.Leases4), err)
	}
	if _, err := Encode(&State{Leases4: []Lease4{{Addr: netip.MustParseAddr("10.0.2.15"), Remaining: MaxRemaining + time.Hour}}}); !errors.Is(err, ErrLimit) {
		t.Errorf("Encode of a lease beyond MaxRemaining: %v", err)
	}
	if _, err := Encode(&State{Forwards: []Forward{{Proto: "sctp", GuestPort: 1}}}); err == nil {
		t.Error("Encode of an sctp forward succeeded")
	}
}

func FuzzDeviceState(f *testing.F) {
	good, err := Encode(sample())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	withTCP := sample()
	withTCP.TCPFlows = []TCPFlow{tcpSample()}
	tcpBlob, err := Encode(withTCP)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(tcpBlob)
	withGuest := sample()
	withGuest.Forwards = append(withGuest.Forwards, Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:2223"), GuestPort: 22, Guest: "vm2"})
	guestBlob, err := Encode(withGuest)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(guestBlob)
	withExpose := sample()
	withExpose.Exposes = []Expose{{Port: 2375, Path: "/run/podman/podman.sock"}}
	exposeBlob, err := Encode(withExpose)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(exposeBlob)
	empty, _ := Encode(&State{})
	f.Add(empty)
	f.Add(good[:len(good)-1])
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		check(t, b)
		// Past the checksum too: most mutations only break it.
		if len(b) >= headerSize+crcSize {
			check(t, reseal(append([]byte(nil), b...)))
		}
	})
}

func check(t *testing.T, b []byte) {
	st, err := Decode(b)
	if err != nil {
		if st != nil {
			t.Fatal("state with an error")
		}
		return
	}
	// What decodes re-encodes to an equivalent state.
	again, err := Encode(st)
	if err != nil {
		t.Fatalf("decoded state does not encode: %v", err)
	}
	st2, err := Decode(again)
	if err != nil {
		t.Fatalf("re-encoded state does not decode: %v", err)
	}
	st.SavedAt, st2.SavedAt = time.Time{}, time.Time{}
	if !reflect.DeepEqual(st, st2) {
		t.Fatalf("not stable:\n%+v\n%+v", st, st2)
	}
}

// TestForwardGuest: a forward naming its guest round-trips as kind 6 and
// leaves the state at version 1; a vunet that does not know kind 6 skips
// it (the forward is lost, not aimed at the first guest); a selector that
// is empty, too long or not printable ASCII is refused both ways.
func TestForwardGuest(t *testing.T) {
	st := sample()
	named := Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:2223"), GuestPort: 22, Guest: "52-54-00-00-00-02"}
	st.Forwards = append(st.Forwards, named)
	b, err := Encode(st)
	if err != nil {
		t.Fatal(err)
	}
	if v := binary.LittleEndian.Uint16(b[len(magic):]); v != 1 {
		t.Errorf("version %d, want 1 (no TCP connections)", v)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Forwards) != 4 || got.Forwards[3] != named || got.Forwards[0].Guest != "" {
		t.Fatalf("forwards %+v", got.Forwards)
	}
	// An older vunet: kind 6 unknown, so skipped (the kind is renamed
	// to one no vunet knows).
	i := bytes.Index(b, []byte(named.Guest)) // inside the kind-6 record
	at := -1
	for off := headerSize; off < i; {
		kind := binary.LittleEndian.Uint16(b[off:])
		n := int(binary.LittleEndian.Uint32(b[off+2:]))
		if kind == kindForwardGuest {
			at = off
		}
		off += 6 + n
	}
	if at < 0 {
		t.Fatal("no kind-6 record")
	}
	old := append([]byte(nil), b...)
	binary.LittleEndian.PutUint16(old[at:], 999)
	if got, err := Decode(reseal(old)); err != nil || len(got.Forwards) != 3 {
		t.Fatalf("with the record unknown: %v, %+v", err, got)
	}
	for _, bad := range []string{strings.Repeat("a", MaxSelector+1), "vm 1", "vm\x001", "vm\u00e9"} {
		st := &State{Forwards: []Forward{{Proto: "tcp", Host: named.Host, GuestPort: 22, Guest: bad}}}
		if _, err := Encode(st); err == nil {
			t.Errorf("selector %q encoded", bad)
		}
		// The same bytes, written by hand, are refused on the way in.
		good, _ := Encode(&State{Forwards: []Forward{{Proto: "tcp", Host: named.Host, GuestPort: 22, Guest: strings.Repeat("x", len(bad))}}})
		j := bytes.Index(good, []byte(strings.Repeat("x", len(bad))))
		if j < 0 || len(bad) > 255 {
			continue
		}
		forged := append([]byte(nil), good...)
		copy(forged[j:], bad)
		if _, err := Decode(reseal(forged)); err == nil {
			t.Errorf("selector %q decoded", bad)
		}
	}
}

// TestExposes: runtime exposes round-trip as kind 7 and leave the state
// at version 1; a vunet that does not know kind 7 skips them and reads
// the rest; a port 0, a relative or overlong path, a NUL or more than
// MaxExposes are refused both ways.
func TestExposes(t *testing.T) {
	st := sample()
	st.Exposes = []Expose{{Port: 2375, Path: "/run/user/1000/podman/podman.sock"}, {Port: 65535, Path: "/a"}}
	b, err := Encode(st)
	if err != nil {
		t.Fatal(err)
	}
	if v := binary.LittleEndian.Uint16(b[len(magic):]); v != 1 {
		t.Errorf("version %d, want 1 (no TCP connections)", v)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Exposes, st.Exposes) || len(got.Forwards) != 3 {
		t.Fatalf("exposes %+v, forwards %+v", got.Exposes, got.Forwards)
	}
	// An older vunet: kind 7 unknown, so skipped.
	old := append([]byte(nil), b...)
	n := 0
	for off := headerSize; off < len(old)-crcSize; {
		kind := binary.LittleEndian.Uint16(old[off:])
		size := int(binary.LittleEndian.Uint32(old[off+2:]))
		if kind == kindExpose {
			binary.LittleEndian.PutUint16(old[off:], 999)
			n++
		}
		off += recordHead + size
	}
	if n != 2 {
		t.Fatalf("%d kind-7 records, want 2", n)
	}
	if got, err := Decode(reseal(old)); err != nil || len(got.Exposes) != 0 || len(got.Forwards) != 3 || len(got.Leases4) != 1 {
		t.Fatalf("with the records unknown: %v, %+v", err, got)
	}

	for _, bad := range []Expose{{Port: 0, Path: "/a"}, {Port: 1, Path: "a"}, {Port: 1, Path: ""},
		{Port: 1, Path: "/" + strings.Repeat("x", MaxUnixPath-1)}, {Port: 1, Path: "/a\x00b"}} {
		if _, err := Encode(&State{Exposes: []Expose{bad}}); err == nil {
			t.Errorf("expose %+v encoded", bad)
		}
		// The same record written by hand is refused on the way in.
		body := binary.LittleEndian.AppendUint16(nil, bad.Port)
		body = append(body, byte(len(bad.Path)))
		body = append(body, bad.Path...)
		if _, err := Decode(withRecord(t, kindExpose, body)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("forged expose %+v: %v, want ErrCorrupt", bad, err)
		}
	}
	// A length byte past the record.
	if _, err := Decode(withRecord(t, kindExpose, []byte{1, 0, 5, '/'})); !errors.Is(err, ErrCorrupt) {
		t.Errorf("truncated expose: %v", err)
	}
	many := &State{}
	for i := range MaxExposes + 1 {
		many.Exposes = append(many.Exposes, Expose{Port: uint16(i + 1), Path: "/s"})
	}
	if _, err := Encode(many); !errors.Is(err, ErrLimit) {
		t.Errorf("Encode of %d exposes: %v", len(many.Exposes), err)
	}
	rec := binary.LittleEndian.AppendUint16(nil, 1)
	rec = append(rec, 2, '/', 's')
	var recs [][]byte
	for range MaxExposes + 1 {
		recs = append(recs, rec)
	}
	if _, err := Decode(withRecord(t, kindExpose, recs...)); !errors.Is(err, ErrLimit) {
		t.Errorf("Decode of %d exposes: %v", len(recs), err)
	}
}

// withRecord is an empty state with records of kind appended, sealed.
func withRecord(t *testing.T, kind uint16, bodies ...[]byte) []byte {
	t.Helper()
	b, err := Encode(&State{})
	if err != nil {
		t.Fatal(err)
	}
	b = b[:len(b)-crcSize]
	for _, body := range bodies {
		b = binary.LittleEndian.AppendUint16(b, kind)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(body)))
		b = append(b, body...)
	}
	return reseal(append(b, 0, 0, 0, 0))
}
