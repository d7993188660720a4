// Package devstate is the format of the state one vunet hands the next when
// its VM is live-migrated: what the guest would otherwise lose (DHCP leases,
// port forwards and gateway exposes added at run time, UDP flows). The same
// bytes travel through the vhost-user DEVICE_STATE pipe (QEMU 10.0 and
// later) and through the control API (`vunet state save|load`, for
// frontends that do not transfer back-end state).
//
// The blob comes from another process, possibly on another host: it is
// hostile input. Decode checks the magic, the version, every length against
// what is left, every count against a limit and the trailing CRC-32C, and
// never panics (FuzzDeviceState).
//
// Layout (integers little-endian):
//
//	magic "VUNETST\x00" | version u16 | reserved u16 (0) | saved_at i64 (Unix ms)
//	record*: kind u16 | length u32 | body[length]
//	crc32c u32 of everything before it
//
// Records of a kind this version does not know are skipped, so a later
// vunet may add kinds without a new version; changing the body of an
// existing kind needs a new version, and an unknown version is refused.
//
// Version 2 added TCP connections (kind 5). A state without any is still
// written as version 1, which every vunet reads; one with TCP connections
// is version 2, which a vunet that could not restore them refuses, rather
// than lose them silently.
//
// A forward that names its guest (Forward.Guest, vunet forward add
// tcp:2222:vm1:22) is kind 6: kind 3's body and the selector. A vunet
// that predates it skips the record: the forward is lost, never aimed at
// whichever guest comes first. Forwards without a guest stay kind 3, so
// such a state reads as before everywhere.
//
// A gateway port exposed at run time (Expose, vunet expose add
// tcp:2375:unix:PATH) is kind 7: the port and the socket path. A vunet
// that predates it skips the record, and the guest's connections to that
// gateway port there get what an unexposed port gets. A state without
// runtime exposes has no such record.
package devstate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"net/netip"
	"strings"
	"time"
)

// Version is the newest format version: Encode writes it when the state
// needs it (TCP connections), else version 1; Decode accepts both.
const (
	Version    = 2
	minVersion = 1
)

// magic opens every blob.
const magic = "VUNETST\x00"

// Limits. MaxSize bounds the blob (a pipe or HTTP body is read up to it and
// no further); the per-kind counts bound what a decoded state can make the
// destination hold, before any service or forwarder is asked.
const (
	MaxSize      = 1 << 20
	MaxLeases    = 4096
	MaxForwards  = 1024
	MaxExposes   = 1024
	MaxUDPFlows  = 4096
	MaxTCPFlows  = 1024
	MaxTCPQueue  = 64 << 10             // each host queue of a TCP connection
	MaxDUID      = 130                  // RFC 8415 11.1: 2-byte type and at most 128 bytes
	MaxUnixPath  = 108                  // sun_path
	MaxSelector  = 64                   // a guest's host name (one label), MAC or address
	MaxRemaining = 366 * 24 * time.Hour // longer leases or idle times are refused
)

// Record kinds.
const (
	kindLease4  = 1
	kindLease6  = 2
	kindForward = 3
	kindUDPFlow = 4
	kindTCPFlow = 5
	// kindForwardGuest is a forward to a named guest (kind 3 + selector).
	kindForwardGuest = 6
	// kindExpose is a gateway port exposed at run time.
	kindExpose = 7
)

const (
	headerSize = len(magic) + 2 + 2 + 8
	recordHead = 2 + 4
	crcSize    = 4
)

// Errors, wrapped with details by Decode.
var (
	ErrFormat  = errors.New("device state: not a vunet device state")
	ErrVersion = errors.New("device state: unsupported version")
	ErrCorrupt = errors.New("device state: corrupt")
	ErrLimit   = errors.New("device state: over a limit")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// State is what moves from the source vunet to the destination.
type State struct {
	// SavedAt is when the source took the state. Durations below are
	// relative to it, so the hosts' clocks need not agree.
	SavedAt  time.Time
	Leases4  []Lease4
	Leases6  []Lease6
	Forwards []Forward
	Exposes  []Expose
	UDPFlows []UDPFlow
	TCPFlows []TCPFlow
}

// Lease4 is a bound DHCPv4 lease.
type Lease4 struct {
	MAC       [6]byte
	Addr      netip.Addr // IPv4
	Remaining time.Duration
}

// Lease6 is a stateful DHCPv6 lease (IA_NA).
type Lease6 struct {
	DUID      []byte // wire form, 1..MaxDUID bytes
	IAID      uint32
	Addr      netip.Addr // IPv6
	Remaining time.Duration
}

// Forward is an inbound port forward added at run time (through the API);
// forwards from the configuration are the destination's own.
type Forward struct {
	Proto     string         // "tcp", "udp" or "unix"
	Host      netip.AddrPort // tcp, udp
	Path      string         // unix
	GuestPort uint16
	// Guest names the guest (its DHCP host name, MAC or address, as
	// in --forward tcp:2222:vm1:22); empty for the first guest. Printable
	// ASCII, at most MaxSelector bytes; its meaning is the destination's
	// to check.
	Guest string
}

// Expose is a gateway TCP port mapped to a host Unix socket at run time
// (through the API); exposes from the configuration are the
// destination's own. Whether the destination may connect to Path is its
// business.
type Expose struct {
	Port uint16 // 1..65535
	Path string // absolute, shorter than MaxUnixPath, no NUL
}

func (e Expose) check() error {
	if e.Port == 0 || e.Path == "" || e.Path[0] != '/' || len(e.Path) >= MaxUnixPath || strings.IndexByte(e.Path, 0) >= 0 {
		return fmt.Errorf("expose of gateway port %d to socket %q", e.Port, e.Path)
	}
	return nil
}

func (e Expose) encode(b []byte) ([]byte, error) {
	if err := e.check(); err != nil {
		return nil, fmt.Errorf("device state: %w", err)
	}
	b = binary.LittleEndian.AppendUint16(b, e.Port)
	b = append(b, byte(len(e.Path)))
	return append(b, e.Path...), nil
}

// UDPFlow is an outbound UDP flow: the guest's socket, the peer, and the
// host port vunet sent from, which the destination tries to reuse.
type UDPFlow struct {
	Guest    netip.AddrPort
	Remote   netip.AddrPort
	HostPort uint16
	Idle     time.Duration // since the flow's last datagram
}

// TCPFlow is an established TCP connection moved with the guest
// (--migrate-tcp): the guest's half as the guest knows it, and the host
// socket's state in TCP repair mode.
type TCPFlow struct {
	// Guest is the guest's socket, Remote what it connected to.
	Guest, Remote netip.AddrPort
	GuestMAC      [6]byte // zero: unknown
	// The stack's next sequence number, the next expected from the guest,
	// the guest's window and the window the stack offered (bytes).
	SndNxt, RcvNxt, SndWnd, RcvWnd uint32
	SndWndScale, RcvWndScale       uint8
	MaxPayload                     uint16
	SACK, Timestamps               bool
	TSVal, RecentTS                uint32
	Host                           TCPHost
}

// TCPHost is the host socket of a TCPFlow (package tcprepair).
type TCPHost struct {
	Local, Remote            netip.AddrPort
	SndSeq, RcvSeq, MSS      uint32
	SACK, Timestamps, WScale bool
	SndWScale, RcvWScale     uint8
	TSVal                    uint32
	// Window is struct tcp_repair_window: snd_wl1, snd_wnd, max_window,
	// rcv_wnd, rcv_wup.
	Window             [5]uint32
	SndQueue, RcvQueue []byte // at most MaxTCPQueue each
}

// maxWndScale is TCP's largest window scale (RFC 7323).
const maxWndScale = 14

func (f *TCPFlow) check() error {
	h := &f.Host
	switch {
	case !f.Guest.Addr().IsValid() || !f.Remote.Addr().IsValid() || f.Guest.Addr().Is4() != f.Remote.Addr().Is4() ||
		f.Guest.Port() == 0 || f.Remote.Port() == 0:
		return fmt.Errorf("TCP connection %v -> %v", f.Guest, f.Remote)
	case !h.Local.Addr().IsValid() || !h.Remote.Addr().IsValid() || h.Local.Addr().Is4() != h.Remote.Addr().Is4() ||
		h.Local.Port() == 0 || h.Remote.Port() == 0:
		return fmt.Errorf("TCP host socket %v -> %v", h.Local, h.Remote)
	case f.SndWndScale > maxWndScale || f.RcvWndScale > maxWndScale || h.SndWScale > maxWndScale || h.RcvWScale > maxWndScale:
		return errors.New("TCP window scale over 14")
	case f.MaxPayload < 64 || h.MSS < 64 || h.MSS > 0xffff:
		return fmt.Errorf("TCP segment sizes %d and %d", f.MaxPayload, h.MSS)
	case len(h.SndQueue) > MaxTCPQueue || len(h.RcvQueue) > MaxTCPQueue:
		return fmt.Errorf("TCP queues of %d and %d bytes (at most %d)", len(h.SndQueue), len(h.RcvQueue), MaxTCPQueue)
	}
	return nil
}

func flagBits(bits ...bool) byte {
	var b byte
	for i, v := range bits {
		if v {
			b |= 1 << i
		}
	}
	return b
}

func (f TCPFlow) encode(b []byte) ([]byte, error) {
	if err := f.check(); err != nil {
		return nil, fmt.Errorf("device state: %w", err)
	}
	return appendTCP(b, &f), nil
}

// appendTCP is the body of a TCP record, unchecked.
func appendTCP(b []byte, f *TCPFlow) []byte {
	h := &f.Host
	b = appendAddrPort(b, f.Guest)
	b = appendAddrPort(b, f.Remote)
	b = append(b, f.GuestMAC[:]...)
	for _, v := range []uint32{f.SndNxt, f.RcvNxt, f.SndWnd, f.RcvWnd} {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	b = append(b, f.SndWndScale, f.RcvWndScale)
	b = binary.LittleEndian.AppendUint16(b, f.MaxPayload)
	b = append(b, flagBits(f.SACK, f.Timestamps))
	b = binary.LittleEndian.AppendUint32(b, f.TSVal)
	b = binary.LittleEndian.AppendUint32(b, f.RecentTS)
	b = appendAddrPort(b, h.Local)
	b = appendAddrPort(b, h.Remote)
	for _, v := range []uint32{h.SndSeq, h.RcvSeq, h.MSS} {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	b = append(b, flagBits(h.SACK, h.Timestamps, h.WScale), h.SndWScale, h.RcvWScale)
	b = binary.LittleEndian.AppendUint32(b, h.TSVal)
	for _, v := range h.Window {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	for _, q := range [][]byte{h.SndQueue, h.RcvQueue} {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func (r *reader) tcpFlow() TCPFlow {
	var f TCPFlow
	h := &f.Host
	f.Guest = r.addrPort()
	f.Remote = r.addrPort()
	copy(f.GuestMAC[:], r.bytes(6))
	f.SndNxt, f.RcvNxt, f.SndWnd, f.RcvWnd = r.u32(), r.u32(), r.u32(), r.u32()
	f.SndWndScale, f.RcvWndScale = r.u8(), r.u8()
	f.MaxPayload = r.u16()
	flags := r.u8()
	f.SACK, f.Timestamps = flags&1 != 0, flags&2 != 0
	f.TSVal, f.RecentTS = r.u32(), r.u32()
	h.Local = r.addrPort()
	h.Remote = r.addrPort()
	h.SndSeq, h.RcvSeq, h.MSS = r.u32(), r.u32(), r.u32()
	hflags := r.u8()
	h.SACK, h.Timestamps, h.WScale = hflags&1 != 0, hflags&2 != 0, hflags&4 != 0
	h.SndWScale, h.RcvWScale = r.u8(), r.u8()
	h.TSVal = r.u32()
	for i := range h.Window {
		h.Window[i] = r.u32()
	}
	for _, q := range []*[]byte{&h.SndQueue, &h.RcvQueue} {
		n := r.u32()
		if r.err == nil && n > MaxTCPQueue {
			r.err = fmt.Errorf("TCP queue of %d bytes (at most %d)", n, MaxTCPQueue)
		}
		if b := r.bytes(int(n)); len(b) > 0 {
			*q = append([]byte(nil), b...)
		}
	}
	if r.err == nil && (flags&^3 != 0 || hflags&^7 != 0) {
		r.err = fmt.Errorf("TCP option flags %#x, %#x", flags, hflags)
	}
	if r.err == nil {
		if err := f.check(); err != nil {
			r.err = err
		}
	}
	return f
}

var protoCodes = map[string]byte{"tcp": 1, "udp": 2, "unix": 3}

// Encode serialises st. It refuses a state that Decode would refuse, so a
// source never produces a blob its peer cannot read.
func Encode(st *State) ([]byte, error) {
	if len(st.Leases4)+len(st.Leases6) > MaxLeases || len(st.Forwards) > MaxForwards || len(st.UDPFlows) > MaxUDPFlows ||
		len(st.TCPFlows) > MaxTCPFlows || len(st.Exposes) > MaxExposes {
		return nil, fmt.Errorf("%w: %d leases, %d forwards, %d exposes, %d UDP flows, %d TCP connections", ErrLimit,
			len(st.Leases4)+len(st.Leases6), len(st.Forwards), len(st.Exposes), len(st.UDPFlows), len(st.TCPFlows))
	}
	version := uint16(minVersion)
	if len(st.TCPFlows) > 0 {
		version = Version
	}
	b := make([]byte, 0, 256)
	b = append(b, magic...)
	b = binary.LittleEndian.AppendUint16(b, version)
	b = binary.LittleEndian.AppendUint16(b, 0)
	b = binary.LittleEndian.AppendUint64(b, uint64(st.SavedAt.UnixMilli()))
	var err error
	for _, l := range st.Leases4 {
		if b, err = record(b, kindLease4, l.encode); err != nil {
			return nil, err
		}
	}
	for _, l := range st.Leases6 {
		if b, err = record(b, kindLease6, l.encode); err != nil {
			return nil, err
		}
	}
	for _, f := range st.Forwards {
		kind := kindForward
		if f.Guest != "" {
			kind = kindForwardGuest
		}
		if b, err = record(b, uint16(kind), f.encode); err != nil {
			return nil, err
		}
	}
	for _, e := range st.Exposes {
		if b, err = record(b, kindExpose, e.encode); err != nil {
			return nil, err
		}
	}
	for _, f := range st.UDPFlows {
		if b, err = record(b, kindUDPFlow, f.encode); err != nil {
			return nil, err
		}
	}
	for _, f := range st.TCPFlows {
		if b, err = record(b, kindTCPFlow, f.encode); err != nil {
			return nil, err
		}
	}
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	if len(b) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes (at most %d)", ErrLimit, len(b), MaxSize)
	}
	return b, nil
}

// record appends one record whose body enc appends.
func record(b []byte, kind uint16, enc func([]byte) ([]byte, error)) ([]byte, error) {
	b = binary.LittleEndian.AppendUint16(b, kind)
	at := len(b)
	b = binary.LittleEndian.AppendUint32(b, 0)
	b, err := enc(b)
	if err != nil {
		return nil, err
	}
	binary.LittleEndian.PutUint32(b[at:], uint32(len(b)-at-4))
	return b, nil
}

func appendDuration(b []byte, d time.Duration) ([]byte, error) {
	if d < 0 {
		d = 0
	}
	if d > MaxRemaining {
		return nil, fmt.Errorf("%w: duration %v (at most %v)", ErrLimit, d, MaxRemaining)
	}
	return binary.LittleEndian.AppendUint64(b, uint64(d.Milliseconds())), nil
}

func appendAddr(b []byte, a netip.Addr) []byte {
	a = a.Unmap()
	if !a.IsValid() {
		return append(b, 0)
	}
	s := a.AsSlice()
	b = append(b, byte(len(s)))
	return append(b, s...)
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	return binary.LittleEndian.AppendUint16(appendAddr(b, ap.Addr()), ap.Port())
}

func (l Lease4) encode(b []byte) ([]byte, error) {
	if !l.Addr.Unmap().Is4() {
		return nil, fmt.Errorf("device state: DHCPv4 lease address %v is not IPv4", l.Addr)
	}
	b = append(b, l.MAC[:]...)
	b = appendAddr(b, l.Addr)
	return appendDuration(b, l.Remaining)
}

func (l Lease6) encode(b []byte) ([]byte, error) {
	if len(l.DUID) == 0 || len(l.DUID) > MaxDUID || !l.Addr.Is6() || l.Addr.Is4In6() {
		return nil, fmt.Errorf("device state: DHCPv6 lease %v with a %d-byte DUID", l.Addr, len(l.DUID))
	}
	b = append(b, byte(len(l.DUID)))
	b = append(b, l.DUID...)
	b = binary.LittleEndian.AppendUint32(b, l.IAID)
	b = appendAddr(b, l.Addr)
	return appendDuration(b, l.Remaining)
}

func (f Forward) encode(b []byte) ([]byte, error) {
	code, ok := protoCodes[f.Proto]
	if !ok || len(f.Path) > MaxUnixPath || f.GuestPort == 0 {
		return nil, fmt.Errorf("device state: port forward %s %v %q to guest port %d", f.Proto, f.Host, f.Path, f.GuestPort)
	}
	b = append(b, code)
	b = appendAddrPort(b, f.Host)
	b = append(b, byte(len(f.Path)))
	b = append(b, f.Path...)
	b = binary.LittleEndian.AppendUint16(b, f.GuestPort)
	if f.Guest == "" {
		return b, nil
	}
	if !validSelector(f.Guest) {
		return nil, fmt.Errorf("device state: port forward %s %v to guest %q", f.Proto, f.Host, f.Guest)
	}
	b = append(b, byte(len(f.Guest)))
	return append(b, f.Guest...), nil
}

// validSelector is the form a guest selector must have in the state: 1 to
// MaxSelector printable ASCII bytes.
func validSelector(s string) bool {
	if len(s) == 0 || len(s) > MaxSelector {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

func (f UDPFlow) encode(b []byte) ([]byte, error) {
	b = appendAddrPort(b, f.Guest)
	b = appendAddrPort(b, f.Remote)
	b = binary.LittleEndian.AppendUint16(b, f.HostPort)
	return appendDuration(b, f.Idle)
}

// Decode parses and validates a blob from Encode. Every error wraps one of
// ErrFormat, ErrVersion, ErrCorrupt or ErrLimit.
func Decode(b []byte) (*State, error) {
	if len(b) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes (at most %d)", ErrLimit, len(b), MaxSize)
	}
	if len(b) < headerSize+crcSize || string(b[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w (%d bytes, no vunet magic)", ErrFormat, len(b))
	}
	if v := binary.LittleEndian.Uint16(b[len(magic):]); v < minVersion || v > Version {
		return nil, fmt.Errorf("%w %d (this vunet reads versions %d to %d; migrate between matching vunet releases)", ErrVersion, v, minVersion, Version)
	}
	body, sum := b[:len(b)-crcSize], binary.LittleEndian.Uint32(b[len(b)-crcSize:])
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return nil, fmt.Errorf("%w: checksum %#08x, expected %#08x (truncated or altered)", ErrCorrupt, got, sum)
	}
	if r := binary.LittleEndian.Uint16(b[len(magic)+2:]); r != 0 {
		return nil, fmt.Errorf("%w: reserved field %#x", ErrCorrupt, r)
	}
	st := &State{SavedAt: time.UnixMilli(int64(binary.LittleEndian.Uint64(b[len(magic)+4:])))}
	rest := body[headerSize:]
	for len(rest) > 0 {
		if len(rest) < recordHead {
			return nil, fmt.Errorf("%w: %d stray bytes at the end", ErrCorrupt, len(rest))
		}
		kind := binary.LittleEndian.Uint16(rest)
		n := binary.LittleEndian.Uint32(rest[2:])
		rest = rest[recordHead:]
		if uint64(n) > uint64(len(rest)) {
			return nil, fmt.Errorf("%w: record of kind %d claims %d bytes, %d left", ErrCorrupt, kind, n, len(rest))
		}
		r := &reader{b: rest[:n]}
		rest = rest[n:]
		if err := st.decodeRecord(kind, r); err != nil {
			return nil, err
		}
		if r.err == nil && len(r.b) != 0 {
			r.err = fmt.Errorf("%d bytes left over", len(r.b))
		}
		if r.err != nil {
			return nil, fmt.Errorf("%w: record of kind %d: %v", ErrCorrupt, kind, r.err)
		}
	}
	return st, nil
}

func (st *State) decodeRecord(kind uint16, r *reader) error {
	switch kind {
	case kindLease4:
		if len(st.Leases4)+len(st.Leases6) >= MaxLeases {
			return fmt.Errorf("%w: more than %d leases", ErrLimit, MaxLeases)
		}
		var l Lease4
		copy(l.MAC[:], r.bytes(6))
		l.Addr = r.addr()
		l.Remaining = r.duration()
		if r.err == nil && !l.Addr.Is4() {
			r.err = fmt.Errorf("DHCPv4 lease address %v", l.Addr)
		}
		st.Leases4 = append(st.Leases4, l)
	case kindLease6:
		if len(st.Leases4)+len(st.Leases6) >= MaxLeases {
			return fmt.Errorf("%w: more than %d leases", ErrLimit, MaxLeases)
		}
		var l Lease6
		n := int(r.u8())
		if r.err == nil && (n == 0 || n > MaxDUID) {
			r.err = fmt.Errorf("DUID of %d bytes", n)
		}
		l.DUID = append([]byte(nil), r.bytes(n)...)
		l.IAID = r.u32()
		l.Addr = r.addr()
		l.Remaining = r.duration()
		if r.err == nil && !l.Addr.Is6() {
			r.err = fmt.Errorf("DHCPv6 lease address %v", l.Addr)
		}
		st.Leases6 = append(st.Leases6, l)
	case kindForward, kindForwardGuest:
		if len(st.Forwards) >= MaxForwards {
			return fmt.Errorf("%w: more than %d port forwards", ErrLimit, MaxForwards)
		}
		var f Forward
		code := r.u8()
		for p, c := range protoCodes {
			if c == code {
				f.Proto = p
			}
		}
		f.Host = r.addrPort()
		n := int(r.u8())
		if r.err == nil && n > MaxUnixPath {
			r.err = fmt.Errorf("socket path of %d bytes", n)
		}
		f.Path = string(r.bytes(n))
		f.GuestPort = r.u16()
		if kind == kindForwardGuest {
			n := int(r.u8())
			f.Guest = string(r.bytes(n))
			if r.err == nil && !validSelector(f.Guest) {
				r.err = fmt.Errorf("forward to guest %q", f.Guest)
			}
		}
		if r.err == nil {
			r.err = f.check()
		}
		st.Forwards = append(st.Forwards, f)
	case kindExpose:
		if len(st.Exposes) >= MaxExposes {
			return fmt.Errorf("%w: more than %d exposes", ErrLimit, MaxExposes)
		}
		var e Expose
		e.Port = r.u16()
		n := int(r.u8())
		e.Path = string(r.bytes(n))
		if r.err == nil {
			r.err = e.check()
		}
		st.Exposes = append(st.Exposes, e)
	case kindUDPFlow:
		if len(st.UDPFlows) >= MaxUDPFlows {
			return fmt.Errorf("%w: more than %d UDP flows", ErrLimit, MaxUDPFlows)
		}
		var f UDPFlow
		f.Guest = r.addrPort()
		f.Remote = r.addrPort()
		f.HostPort = r.u16()
		f.Idle = r.duration()
		if r.err == nil && (!f.Guest.Addr().IsValid() || !f.Remote.Addr().IsValid() || f.Guest.Addr().Is4() != f.Remote.Addr().Is4()) {
			r.err = fmt.Errorf("UDP flow %v -> %v", f.Guest, f.Remote)
		}
		st.UDPFlows = append(st.UDPFlows, f)
	case kindTCPFlow:
		if len(st.TCPFlows) >= MaxTCPFlows {
			return fmt.Errorf("%w: more than %d TCP connections", ErrLimit, MaxTCPFlows)
		}
		st.TCPFlows = append(st.TCPFlows, r.tcpFlow())
	default:
		r.b = nil // a later kind: skipped
	}
	return nil
}

// check is the forward's own consistency; whether the destination can
// listen there is its business.
func (f Forward) check() error {
	switch {
	case f.Proto == "":
		return errors.New("unknown forward protocol")
	case f.GuestPort == 0:
		return errors.New("forward to guest port 0")
	case (f.Proto == "unix") != (f.Path != ""):
		return fmt.Errorf("%s forward with socket path %q", f.Proto, f.Path)
	case f.Proto != "unix" && !f.Host.Addr().IsValid():
		return fmt.Errorf("%s forward without a host address", f.Proto)
	case f.Proto == "unix" && (f.Path[0] != '/' || f.Host.IsValid()):
		return fmt.Errorf("unix forward %q must have an absolute path and no host address", f.Path)
	}
	for i := 0; i < len(f.Path); i++ {
		if f.Path[i] == 0 {
			return errors.New("socket path with a NUL byte")
		}
	}
	return nil
}

// reader consumes a record body; the first error sticks and later reads
// return zero values, so decoders read straight through and check once.
type reader struct {
	b   []byte
	err error
}

func (r *reader) bytes(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = fmt.Errorf("need %d bytes, %d left", n, len(r.b))
		r.b = nil
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() byte {
	if b := r.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.bytes(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.bytes(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *reader) duration() time.Duration {
	b := r.bytes(8)
	if b == nil {
		return 0
	}
	ms := binary.LittleEndian.Uint64(b)
	if ms > uint64(MaxRemaining.Milliseconds()) {
		r.err = fmt.Errorf("duration of %d ms (at most %v)", ms, MaxRemaining)
		return 0
	}
	return time.Duration(ms) * time.Millisecond
}

// addr reads a length-prefixed address: 0 (none), 4 or 16 bytes.
func (r *reader) addr() netip.Addr {
	n := int(r.u8())
	if r.err != nil {
		return netip.Addr{}
	}
	if n != 0 && n != 4 && n != 16 {
		r.err = fmt.Errorf("address of %d bytes", n)
		return netip.Addr{}
	}
	a, _ := netip.AddrFromSlice(r.bytes(n))
	return a.Unmap()
}

func (r *reader) addrPort() netip.AddrPort {
	a := r.addr()
	p := r.u16()
	if !a.IsValid() {
		if p != 0 && r.err == nil {
			r.err = fmt.Errorf("port %d without an address", p)
		}
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(a, p)
}
