package endpoint

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/vhost/virtqueue"
	vqt "github.com/vunet/vunet/vhost/virtqueue/virtqueuetest"
)

// txFeatures are the feature sets FuzzTX picks from: with and without
// VERSION_1 (12- or 10-byte header), with and without host TSO and
// checksum offload.
var txFeatures = []uint64{
	v1 | 1<<FeatureCsum | 1<<FeatureHostTSO4 | 1<<FeatureHostTSO6 | 1<<FeatureHostECN,
	v1,
	0,
	1 << FeatureMrgRxbuf,
	1<<FeatureCsum | 1<<FeatureHostTSO4,
}

// Addresses a fuzzed frame may be sent to. The destination of every IP
// frame is rewritten to one of these, so that the forwarder (with
// MapHostLoopback off) never opens a host socket to an arbitrary address:
// the gateway refuses, the DNS address has no service here, broadcast and
// multicast stay in the stack.
var (
	safe4 = []netip.Addr{netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("10.0.2.3"),
		netip.MustParseAddr("10.0.2.255"), netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("224.0.0.1")}
	safe6 = []netip.Addr{netip.MustParseAddr("fd00::2"), netip.MustParseAddr("fd00::3"),
		netip.MustParseAddr("ff02::1"), netip.MustParseAddr("ff02::2"), netip.MustParseAddr("ff02::1:ff00:2")}
)

// pinDestination rewrites an IPv4 or IPv6 frame's destination address
// into the safe set (keeping the IPv4 header checksum valid if it was).
func pinDestination(frame []byte) {
	if len(frame) < header.EthernetMinimumSize {
		return
	}
	ip := frame[header.EthernetMinimumSize:]
	switch header.Ethernet(frame).Type() {
	case header.IPv4ProtocolNumber:
		if len(ip) < header.IPv4MinimumSize {
			return
		}
		a := safe4[int(ip[19])%len(safe4)].As4()
		copy(ip[16:20], a[:])
		h := header.IPv4(ip)
		if hl := int(h.HeaderLength()); hl >= header.IPv4MinimumSize && hl <= len(ip) {
			h.SetChecksum(0)
			h.SetChecksum(^h.CalculateChecksum())
		}
	case header.IPv6ProtocolNumber:
		if len(ip) < header.IPv6MinimumSize {
			return
		}
		a := safe6[int(ip[39])%len(safe6)].As16()
		copy(ip[24:40], a[:])
	}
}

// txRig is an endpoint attached to vunet's real gVisor stack and NAT, fed
// from a mock driver's TX ring. The fuzz target pops and delivers on its
// own goroutine (no worker), so each input is processed to the end.
type txRig struct {
	ep *Endpoint
	ns *netstack.Stack
	f  *forward.Forwarder
}

func newTXRig(tb testing.TB) *txRig {
	ep, err := New(Options{LinkAddress: gwMAC, GuestMAC: guestMAC})
	if err != nil {
		tb.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ns, err := netstack.New(netstack.Options{Endpoint: ep, Logger: log,
		Gateway4: netip.MustParsePrefix("10.0.2.2/24"), DNS4: netip.MustParseAddr("10.0.2.3"),
		Gateway6: netip.MustParsePrefix("fd00::2/64"), DNS6: netip.MustParseAddr("fd00::3")})
	if err != nil {
		tb.Fatal(err)
	}
	f, err := forward.New(forward.Options{Stack: ns.Stack(), NIC: ns.NIC(), Logger: log,
		Gateway4: netip.MustParseAddr("10.0.2.2"), DNS4: netip.MustParseAddr("10.0.2.3"),
		Gateway6: netip.MustParseAddr("fd00::2"), DNS6: netip.MustParseAddr("fd00::3")})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = f.Close()
		ns.Close()
	})
	return &txRig{ep: ep, ns: ns, f: f}
}

func txOutcomes(s *Stats) uint64 {
	return s.Queues[txQueue].Frames.Load() + s.TXBadHeader.Load() + s.TXShort.Load() + s.TXTooBig.Load() + s.TXBadGSO.Load()
}

// FuzzTX feeds guest TX chains to readFrame and delivers the result into
// vunet's gVisor stack with the forwarder installed: the virtio-net header
// (flags, GSO type and sizes, checksum offsets) and the frame are fuzzed,
// split into descriptors at fuzzed points, with or without an indirect
// table. Nothing may panic; each chain has exactly one outcome (a frame
// delivered or one drop counter); every chain is returned to the guest.
func FuzzTX(f *testing.F) {
	ipv4 := func(proto uint8, l4 []byte) []byte {
		b := make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize+len(l4))
		header.Ethernet(b).Encode(&header.EthernetFields{SrcAddr: guestMAC, DstAddr: gwMAC, Type: header.IPv4ProtocolNumber})
		ip := header.IPv4(b[header.EthernetMinimumSize:])
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(header.IPv4MinimumSize + len(l4)), TTL: 64, Protocol: proto,
			SrcAddr: netstackAddr("10.0.2.15"), DstAddr: netstackAddr("10.0.2.2")})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(b[header.EthernetMinimumSize+header.IPv4MinimumSize:], l4)
		return b
	}
	syn := make([]byte, header.TCPMinimumSize)
	header.TCP(syn).Encode(&header.TCPFields{SrcPort: 40000, DstPort: 80, SeqNum: 1, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 65535})
	udp := make([]byte, header.UDPMinimumSize+4)
	header.UDP(udp).Encode(&header.UDPFields{SrcPort: 40000, DstPort: 53, Length: uint16(len(udp))})
	echo := make([]byte, header.ICMPv4MinimumSize+8)
	echo[0] = byte(header.ICMPv4Echo)
	hdr := func(flags, gso uint8, gsoSize uint16) []byte {
		h := make([]byte, 12)
		h[0], h[1] = flags, gso
		binary.LittleEndian.PutUint16(h[4:], gsoSize)
		return h
	}
	f.Add(uint8(0), append(hdr(0, 0, 0), ipv4(6, syn)...), []byte{12}, false)
	f.Add(uint8(0), append(hdr(hdrFNeedsCsum, 0, 0), ipv4(17, udp)...), []byte{5, 7, 3}, true)
	f.Add(uint8(1), append(hdr(hdrFDataValid, 0, 0), ipv4(1, echo)...), []byte{1, 1, 1, 1}, false)
	f.Add(uint8(0), append(hdr(hdrFNeedsCsum, gsoTCPv4, 1448), ipv4(6, append(syn, make([]byte, 3000)...))...), []byte{12, 100}, false)
	f.Add(uint8(2), append(make([]byte, 10), ethFrame(header.EthernetBroadcastAddress, header.ARPProtocolNumber, make([]byte, 28))...), []byte{}, false)
	f.Add(uint8(4), append(hdr(0, gsoTCPv6, 0), ethFrame(gwMAC, header.IPv6ProtocolNumber, make([]byte, 60))...), []byte{3}, true)
	f.Add(uint8(0), []byte{1, 2, 3}, []byte{1}, false)
	r := newTXRig(f)
	f.Fuzz(func(t *testing.T, feat uint8, chain []byte, splits []byte, indirect bool) {
		if len(chain) == 0 || len(chain) > maxFrame+64 {
			return
		}
		r.ep.SetFeatures(txFeatures[int(feat)%len(txFeatures)])
		hl := int(r.ep.hdrLen.Load())
		if len(chain) > hl {
			pinDestination(chain[hl:])
		}
		sizes := make([]int, 0, len(splits))
		for _, s := range splits {
			sizes = append(sizes, int(s))
		}
		before := txOutcomes(&r.ep.Stats)
		// A fresh ring and memory for each chain (the stack and NAT
		// persist): the mock driver recycles buffers by size only.
		d := vqt.New(1<<18, 256, true)
		q := d.Queue(nil)
		if _, err := d.Post(chain, sizes, nil, indirect); err != nil {
			t.Skip(err) // ring full: the fuzzer's input is too long to place
		}
		var el virtqueue.Element
		var scratch [hdrLenMrg]byte
		if err := q.Pop(&el); err != nil {
			t.Fatalf("posted chain not popped: %v", err)
		}
		if pkt, _ := r.ep.readFrame(&el, scratch[:], &r.ep.Stats.Queues[txQueue]); pkt != nil {
			r.ep.deliver(pkt)
		}
		q.Push(el.Head, 0)
		q.Flush()
		if got := txOutcomes(&r.ep.Stats) - before; got != 1 {
			t.Fatalf("one chain counted %d times (frames or drops)", got)
		}
		if used := d.Reap(); len(used) != 1 {
			t.Fatalf("%d used entries for one chain", len(used))
		}
	})
}

func netstackAddr(s string) tcpip.Address { return tcpip.AddrFrom4(netip.MustParseAddr(s).As4()) }
