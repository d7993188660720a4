package protocol

import (
	"errors"
	"testing"
)

func TestDecodeHeader(t *testing.T) {
	b := EncodeHeader(nil, Header{Request: SetOwner, Flags: FlagVersion, Size: 0})
	h, err := DecodeHeader(b)
	if err != nil || h.Request != SetOwner {
		t.Fatalf("%+v %v", h, err)
	}
	if _, err := DecodeHeader(EncodeHeader(nil, Header{Request: SetOwner, Flags: 2})); !errors.Is(err, ErrVersion) {
		t.Fatalf("version: %v", err)
	}
	if _, err := DecodeHeader(EncodeHeader(nil, Header{Request: SetOwner, Flags: 1, Size: MaxPayload + 1})); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("size: %v", err)
	}
	if _, err := DecodeHeader(b[:5]); !errors.Is(err, ErrSize) {
		t.Fatalf("short: %v", err)
	}
}

func TestRoundTrips(t *testing.T) {
	regions := []MemRegion{{GuestAddr: 0, Size: 0xa0000, UserAddr: 0x7f0000000000, MmapOffset: 0}, {GuestAddr: 0xc0000, Size: 1 << 29, UserAddr: 0x7f00000c0000, MmapOffset: 0xc0000}}
	m := Message{Header: Header{Request: SetMemTable}, Payload: EncodeMemTable(nil, regions), FDs: []int{5, 6}}
	got, err := m.MemTable()
	if err != nil || len(got) != 2 || got[1] != regions[1] {
		t.Fatalf("mem table %+v %v", got, err)
	}
	m.FDs = m.FDs[:1]
	if _, err := m.MemTable(); !errors.Is(err, ErrFDCount) {
		t.Fatalf("fd count: %v", err)
	}
	a := VringAddr{Index: 1, Desc: 1, Used: 2, Avail: 3, Log: 4}
	m = Message{Header: Header{Request: SetVringAddr}, Payload: EncodeVringAddr(nil, a)}
	if got, err := m.VringAddr(); err != nil || got != a {
		t.Fatalf("vring addr %+v %v", got, err)
	}
	c := ConfigPayload{Offset: 4, Flags: 1, Data: []byte{1, 2, 3}}
	m = Message{Header: Header{Request: GetConfig}, Payload: EncodeConfig(nil, c)}
	if got, err := m.Config(); err != nil || got.Offset != 4 || string(got.Data) != "\x01\x02\x03" {
		t.Fatalf("config %+v %v", got, err)
	}
	m.Payload[4] = 200 // size field disagrees with the payload
	if _, err := m.Config(); !errors.Is(err, ErrSize) {
		t.Fatalf("config size: %v", err)
	}
}

// FuzzMessage decodes arbitrary messages with every payload decoder: none
// may panic, and whatever decodes must satisfy its own invariants.
func FuzzMessage(f *testing.F) {
	f.Add(EncodeHeader(nil, Header{Request: SetMemTable, Flags: FlagVersion, Size: 40}), EncodeMemTable(nil, []MemRegion{{Size: 4096}}), uint8(1))
	f.Add(EncodeHeader(nil, Header{Request: SetVringAddr, Flags: FlagVersion, Size: 40}), EncodeVringAddr(nil, VringAddr{}), uint8(0))
	f.Add(EncodeHeader(nil, Header{Request: SetVringKick, Flags: FlagVersion, Size: 8}), []byte{0, 1, 0, 0, 0, 0, 0, 0}, uint8(1))
	f.Add(EncodeHeader(nil, Header{Request: GetConfig, Flags: FlagVersion, Size: 14}), EncodeConfig(nil, ConfigPayload{Data: []byte{0, 0}}), uint8(0))
	f.Fuzz(func(t *testing.T, hdr, payload []byte, nfds uint8) {
		h, err := DecodeHeader(hdr)
		if err != nil {
			return
		}
		m := Message{Header: h, Payload: payload, FDs: make([]int, nfds%10)}
		_ = m.Validate()
		m.U64()
		m.VringState()
		m.VringAddr()
		m.VringFD()
		if regions, err := m.MemTable(); err == nil {
			if len(regions) != len(m.FDs) || len(regions) == 0 || len(regions) > MaxFDs {
				t.Fatalf("%d regions with %d fds", len(regions), len(m.FDs))
			}
			for _, r := range regions {
				if r.Size == 0 || r.GuestAddr+r.Size < r.GuestAddr {
					t.Fatalf("bad region accepted: %+v", r)
				}
			}
		}
		m.MemRegion()
		if c, err := m.Config(); err == nil && len(c.Data) > MaxConfigSize {
			t.Fatalf("config of %d bytes", len(c.Data))
		}
	})
}
