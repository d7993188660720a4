package endpoint

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Steering (stack → guest). With several queue pairs, each packet goes to
// the receive queue its flow hashes to, among the receive queues that run
// now (Endpoint.activeRX): one TCP connection always lands on one queue, so
// its segments reach the guest in the order the stack sent them, and
// different connections spread over the guest's vCPUs. This is what a
// multiqueue NIC's RSS does; the guest does the same for its transmit
// queues (Linux picks one by the sending CPU, XPS). When the driver enables
// or disables pairs (the frontend's SET_VRING_ENABLE), flows are re-spread
// over the new set; that is the only time a flow changes queue.

// steer writes each packet to its flow's receive queue. Consecutive
// packets of one queue go in one call (one flush, one notify): the stack
// hands over one connection's burst at a time, so a batch is rarely split.
func (e *Endpoint) steer(list []*stack.PacketBuffer) {
	act := *e.activeRX.Load()
	switch len(act) {
	case 0:
		e.Stats.RXNotConnected.Add(uint64(len(list)))
		return
	case 1:
		act[0].write(e, list)
		return
	}
	n := uint32(len(act))
	for i := 0; i < len(list); {
		q := pickQueue(flowHash(list[i]), n)
		j := i + 1
		for j < len(list) && pickQueue(flowHash(list[j]), n) == q {
			j++
		}
		act[q].write(e, list[i:j])
		i = j
	}
}

// rxFor returns the receive queue pkt's flow is steered to, or nil when
// no receive queue runs. It is for single packets (a switched frame).
func (e *Endpoint) rxFor(pkt *stack.PacketBuffer) *rxState {
	act := *e.activeRX.Load()
	switch len(act) {
	case 0:
		return nil
	case 1:
		return act[0]
	}
	return act[pickQueue(flowHash(pkt), uint32(len(act)))]
}

// pickQueue maps a hash onto 0..n-1 by its high bits (multiply and shift),
// which the avalanche in flowHash makes as good as its low ones.
func pickQueue(h, n uint32) uint32 { return uint32(uint64(h) * uint64(n) >> 32) }

// flowHash hashes a packet's flow: addresses and protocol, plus the ports
// for TCP and UDP. IPv4 fragments and IPv6 packets with extension headers
// hash without ports, so every fragment of a datagram takes one queue
// (Linux's flow dissector does the same). Packets that are not IP (ARP)
// hash to 0. The hash is deterministic: the same flow picks the same queue
// for the endpoint's whole life, and tests can predict it.
//
// A frame switched from another guest has no parsed headers: its flow is
// read from the frame itself.
func flowHash(pkt *stack.PacketBuffer) uint32 {
	if pkt.NetworkProtocolNumber == 0 {
		return frameHash(pkt)
	}
	return ipHash(pkt.NetworkProtocolNumber, pkt.NetworkHeader().Slice(), pkt.TransportHeader().Slice())
}

// frameHash is flowHash of a whole Ethernet frame in pkt's data.
func frameHash(pkt *stack.PacketBuffer) uint32 {
	const most = header.EthernetMinimumSize + header.IPv4MaximumHeaderSize + 4
	b, ok := pkt.Data().PullUp(min(pkt.Data().Size(), most))
	if !ok || len(b) < header.EthernetMinimumSize {
		return 0
	}
	nh := b[header.EthernetMinimumSize:]
	proto := header.Ethernet(b).Type()
	var th []byte
	switch {
	case proto == header.IPv4ProtocolNumber && len(nh) >= header.IPv4MinimumSize:
		if ihl := int(nh[0]&0xf) * 4; ihl >= header.IPv4MinimumSize && ihl <= len(nh) {
			th = nh[ihl:]
		}
	case proto == header.IPv6ProtocolNumber && len(nh) >= header.IPv6MinimumSize:
		th = nh[header.IPv6MinimumSize:]
	}
	return ipHash(proto, nh, th)
}

// ipHash hashes a network header nh of protocol proto and the transport
// header th after it (which may be short or empty).
func ipHash(netProto tcpip.NetworkProtocolNumber, nh, th []byte) uint32 {
	h := uint32(fnvBasis)
	var proto uint8
	ports := false
	switch netProto {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return 0
		}
		ip := header.IPv4(nh)
		proto = ip.Protocol()
		h = fnv(h, nh[12:20]) // source and destination
		ports = ip.FragmentOffset() == 0 && ip.Flags()&header.IPv4FlagMoreFragments == 0
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return 0
		}
		proto = header.IPv6(nh).NextHeader()
		h = fnv(h, nh[8:40])
		ports = true
	default:
		return 0
	}
	h = (h ^ uint32(proto)) * fnvPrime
	if ports && (proto == uint8(header.TCPProtocolNumber) || proto == uint8(header.UDPProtocolNumber)) && len(th) >= 4 {
		h = fnv(h, th[:4])
	}
	return fmix32(h)
}

const (
	fnvBasis = 2166136261
	fnvPrime = 16777619
)

// fnv is 32-bit FNV-1a over b.
func fnv(h uint32, b []byte) uint32 {
	for _, c := range b {
		h ^= uint32(c)
		h *= fnvPrime
	}
	return h
}

// fmix32 is MurmurHash3's finaliser: FNV-1a alone leaves its low and high
// bits poorly mixed for inputs that differ in one port bit.
func fmix32(h uint32) uint32 {
	h ^= h >> 16
	h *= 0x85ebca6b
	h ^= h >> 13
	h *= 0xc2b2ae35
	h ^= h >> 16
	return h
}
