package forward

import (
	"net/netip"
	"time"
)

// What of the NAT moves with a live-migrated guest (see docs/migration.md):
// the host ports of its outbound UDP flows, so that a peer keeps seeing the
// same source port where the destination can bind it. TCP connections do
// not move: their host sockets stay on the source, and the guest's next
// segment of such a connection reaches a stack that has no endpoint for it
// and answers RST (TestUnknownConnectionGetsRST).

// maxUDPPorts bounds the carried-over ports held at once, whatever the
// state said (the state format has its own, equal, limit).
const maxUDPPorts = 4096

// UDPFlowState is an outbound UDP flow as the device state carries it.
type UDPFlowState struct {
	// Guest and Remote are the guest's socket and the destination it
	// sends to, as the guest sees them.
	Guest, Remote netip.AddrPort
	// HostPort is the host port the flow sends from.
	HostPort uint16
	// Idle is the time since the flow's last datagram.
	Idle time.Duration
}

// udpFlowKey names an outbound flow by the guest's 4-tuple.
type udpFlowKey struct{ guest, remote netip.AddrPort }

// udpPort is a carried-over host port and when the offer lapses.
type udpPort struct {
	port    uint16
	expires time.Time
}

// UDPFlowStates lists the outbound UDP flows.
func (f *Forwarder) UDPFlowStates() []UDPFlowState {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Since(f.epoch)
	var out []UDPFlowState
	for fl := range f.udp {
		if fl.out == nil || fl.out.local == 0 {
			continue // inbound flows belong to their port forward
		}
		out = append(out, UDPFlowState{Guest: fl.out.src, Remote: fl.out.dst, HostPort: fl.out.local,
			Idle: max(now-time.Duration(fl.last.Load()), 0)})
	}
	return out
}

// RestoreUDPPorts records the host ports of flows carried over from the
// vunet the guest migrated from: when the guest next sends on one of them,
// the new host socket is bound to the same port if it is free. An entry
// lapses when the flow would have expired on the source. It returns how
// many were recorded (at most maxUDPPorts are held).
func (f *Forwarder) RestoreUDPPorts(flows []UDPFlowState) int {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.expireUDPPorts(now)
	n := 0
	for _, fl := range flows {
		left := f.opts.UDPStreamIdleTimeout - fl.Idle
		if fl.HostPort == 0 || left <= 0 || len(f.udpPorts) >= maxUDPPorts {
			continue
		}
		f.udpPorts[udpFlowKey{fl.Guest, fl.Remote}] = udpPort{fl.HostPort, now.Add(left)}
		n++
	}
	return n
}

// takeUDPPort returns (and forgets) the carried-over host port of the
// flow src->dst, or 0.
func (f *Forwarder) takeUDPPort(src, dst netip.AddrPort) uint16 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.udpPorts) == 0 {
		return 0
	}
	k := udpFlowKey{src, dst}
	p, ok := f.udpPorts[k]
	if !ok {
		return 0
	}
	delete(f.udpPorts, k)
	if time.Now().After(p.expires) {
		return 0
	}
	return p.port
}

// expireUDPPorts drops lapsed entries; f.mu is held.
func (f *Forwarder) expireUDPPorts(now time.Time) {
	for k, p := range f.udpPorts {
		if now.After(p.expires) {
			delete(f.udpPorts, k)
		}
	}
}
