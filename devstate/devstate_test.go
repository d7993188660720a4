package devstate

import (
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
		{"version 2", mod(func(b []byte) []byte { b[len(magic)] = 2; return reseal(b) }), ErrVersion, "version 2"},
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
