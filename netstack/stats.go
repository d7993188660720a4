package netstack

import "gvisor.dev/gvisor/pkg/tcpip"

// Stats are the counters gVisor keeps for the stack that say whether it
// lost or refused what the guest sent, or had to send again: the link and
// forward layers count their own drops, these are the ones inside gVisor
// (a full TCP segment queue drops a segment the guest must retransmit).
type Stats struct {
	Dropped          *tcpip.StatCounter `metric:"netstack_dropped_packets_total" help:"Packets gVisor's stack dropped (a TCP connection's full segment queue, no endpoint, no route)."`
	IPMalformed      *tcpip.StatCounter `metric:"netstack_ip_malformed_total" help:"IP packets from the guest that failed gVisor's header checks."`
	TCPInvalid       *tcpip.StatCounter `metric:"netstack_tcp_invalid_segments_total" help:"TCP segments from the guest gVisor found invalid (bad header or length)."`
	TCPChecksum      *tcpip.StatCounter `metric:"netstack_tcp_checksum_errors_total" help:"TCP segments from the guest with a bad checksum."`
	TCPRetransmits   *tcpip.StatCounter `metric:"netstack_tcp_retransmits_total" help:"TCP segments gVisor sent the guest again."`
	TCPTimeouts      *tcpip.StatCounter `metric:"netstack_tcp_timeouts_total" help:"TCP retransmission timeouts toward the guest."`
	TCPSynDrops      *tcpip.StatCounter `metric:"netstack_tcp_listen_syn_drops_total" help:"Guest SYNs dropped because a listen backlog was full."`
	TCPResetsSent    *tcpip.StatCounter `metric:"netstack_tcp_resets_sent_total" help:"TCP resets gVisor sent the guest."`
	TCPSegmentsRecvd *tcpip.StatCounter `metric:"netstack_tcp_segments_received_total" help:"Valid TCP segments received from the guest."`
	TCPSegmentsSent  *tcpip.StatCounter `metric:"netstack_tcp_segments_sent_total" help:"TCP segments sent to the guest."`
}

// Stats returns the stack's counters (live: each read is current).
func (s *Stack) Stats() *Stats {
	st := s.s.Stats()
	return &Stats{
		Dropped:          st.DroppedPackets,
		IPMalformed:      st.IP.MalformedPacketsReceived,
		TCPInvalid:       st.TCP.InvalidSegmentsReceived,
		TCPChecksum:      st.TCP.ChecksumErrors,
		TCPRetransmits:   st.TCP.Retransmits,
		TCPTimeouts:      st.TCP.Timeouts,
		TCPSynDrops:      st.TCP.ListenOverflowSynDrop,
		TCPResetsSent:    st.TCP.ResetsSent,
		TCPSegmentsRecvd: st.TCP.ValidSegmentsReceived,
		TCPSegmentsSent:  st.TCP.SegmentsSent,
	}
}
