package endpoint

import (
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// flowPacket builds an outbound packet as the stack does: transport,
// network and link headers pushed in front of a payload.
func flowPacket(t *testing.T, v6 bool, proto tcpip.TransportProtocolNumber, sport, dport uint16, ipID uint16, fragOff uint16, more bool) *stack.PacketBuffer {
	t.Helper()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 128})
	th := pkt.TransportHeader().Push(header.UDPMinimumSize)
	header.UDP(th).Encode(&header.UDPFields{SrcPort: sport, DstPort: dport})
	pkt.TransportProtocolNumber = proto
	src, dst := tcpip.AddrFrom4([4]byte{10, 0, 2, 2}), tcpip.AddrFrom4([4]byte{10, 0, 2, 15})
	if v6 {
		ip := header.IPv6(pkt.NetworkHeader().Push(header.IPv6MinimumSize))
		ip.Encode(&header.IPv6Fields{TransportProtocol: proto, HopLimit: 64,
			SrcAddr: tcpip.AddrFrom16([16]byte{0xfd, 15: 2}), DstAddr: tcpip.AddrFrom16([16]byte{0xfd, 15: 0x15})})
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	} else {
		ip := header.IPv4(pkt.NetworkHeader().Push(header.IPv4MinimumSize))
		var flags uint8
		if more {
			flags = header.IPv4FlagMoreFragments
		}
		ip.Encode(&header.IPv4Fields{TotalLength: 28, ID: ipID, Flags: flags, FragmentOffset: fragOff, TTL: 64,
			Protocol: uint8(proto), SrcAddr: src, DstAddr: dst})
		pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	}
	t.Cleanup(pkt.DecRef)
	return pkt
}

// TestFlowHash: the hash depends on the flow (addresses, protocol, ports)
// and on nothing per packet; fragments of a datagram hash alike; flows
// spread evenly over two and three queues. Mutations checked by hand:
// hashing the IP ID fails "per-packet field" and "fragments"; leaving out
// the ports fails "ports not hashed"; hashing the ports of fragments fails
// "fragments".
func TestFlowHash(t *testing.T) {
	tcp, udp := header.TCPProtocolNumber, header.UDPProtocolNumber
	for _, v6 := range []bool{false, true} {
		a := flowHash(flowPacket(t, v6, tcp, 80, 40000, 1, 0, false))
		if b := flowHash(flowPacket(t, v6, tcp, 80, 40000, 2, 0, false)); a != b {
			t.Errorf("v6=%v: per-packet field (IP ID) changes the hash: %#x, %#x", v6, a, b)
		}
		if b := flowHash(flowPacket(t, v6, tcp, 80, 40001, 1, 0, false)); a == b {
			t.Errorf("v6=%v: ports not hashed", v6)
		}
		if b := flowHash(flowPacket(t, v6, udp, 80, 40000, 1, 0, false)); a == b {
			t.Errorf("v6=%v: protocol not hashed", v6)
		}
	}
	// The first fragment carries the ports, the others do not: all hash
	// without them.
	first := flowHash(flowPacket(t, false, udp, 53, 40000, 7, 0, true))
	if later := flowHash(flowPacket(t, false, udp, 9, 9, 7, 1480, false)); first != later {
		t.Errorf("fragments of one datagram hash apart: %#x, %#x", first, later)
	}
	arp := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 64})
	defer arp.DecRef()
	arp.NetworkProtocolNumber = header.ARPProtocolNumber
	arp.NetworkHeader().Push(header.ARPSize)
	if h := flowHash(arp); h != 0 {
		t.Errorf("ARP hashes to %#x, want 0", h)
	}
	for _, n := range []uint32{2, 3} {
		count := make([]int, n)
		const flows = 3000
		for port := range flows {
			pkt := flowPacket(t, false, tcp, 443, uint16(32768+port), 0, 0, false)
			q := pickQueue(flowHash(pkt), n)
			if q >= n {
				t.Fatalf("queue %d of %d", q, n)
			}
			count[q]++
		}
		for q, c := range count {
			if want := flows / int(n); c < want*8/10 || c > want*12/10 {
				t.Errorf("%d queues: queue %d got %d of %d flows (%v)", n, q, c, flows, count)
			}
		}
	}
}

// TestFrameHash: a frame switched from another guest (no parsed headers,
// the whole Ethernet frame in its data) hashes as the same flow from the
// stack does, so both land on the same receive queue. Mutation checked by
// hand: frameHash skipping the IPv4 header length (ports read from the IP
// header) fails it.
func TestFrameHash(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		pkt := flowPacket(t, v6, header.UDPProtocolNumber, 53, 40000, 9, 0, false)
		eth := make([]byte, header.EthernetMinimumSize)
		header.Ethernet(eth).Encode(&header.EthernetFields{Type: pkt.NetworkProtocolNumber})
		raw := append(eth, pkt.NetworkHeader().Slice()...)
		raw = append(raw, pkt.TransportHeader().Slice()...)
		sw := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(raw)})
		defer sw.DecRef()
		if a, b := flowHash(pkt), flowHash(sw); a != b || a == 0 {
			t.Errorf("v6=%v: stack packet hashes to %#x, the same frame switched to %#x", v6, a, b)
		}
	}
	short := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData([]byte{1, 2, 3})})
	defer short.DecRef()
	if h := flowHash(short); h != 0 {
		t.Errorf("a 3-byte frame hashes to %#x", h)
	}
}
