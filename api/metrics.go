package api

import (
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// sample is one series of a metric family: label pairs and a value
// already formatted (integers are printed exactly, not through float64,
// which would round counters above 2^53).
type sample struct {
	labels []string // name, value, name, value, ...
	value  string
}

func u(v uint64, labels ...string) sample { return sample{labels, strconv.FormatUint(v, 10)} }
func i(v int64, labels ...string) sample  { return sample{labels, strconv.FormatInt(v, 10)} }
func f(v float64, labels ...string) sample {
	return sample{labels, strconv.FormatFloat(v, 'f', -1, 64)}
}

// exposition accumulates the Prometheus text format (version 0.0.4).
type exposition struct{ b strings.Builder }

// family writes one metric family: # HELP, # TYPE, then its samples. Every
// family is written exactly once, so HELP and TYPE always precede samples.
func (e *exposition) family(name, typ, help string, samples ...sample) {
	if len(samples) == 0 {
		return
	}
	e.b.WriteString("# HELP " + name + " " + escapeHelp(help) + "\n")
	e.b.WriteString("# TYPE " + name + " " + typ + "\n")
	for _, s := range samples {
		e.b.WriteString(name)
		if len(s.labels) > 0 {
			e.b.WriteByte('{')
			for j := 0; j+1 < len(s.labels); j += 2 {
				if j > 0 {
					e.b.WriteByte(',')
				}
				e.b.WriteString(s.labels[j] + `="` + escapeLabel(s.labels[j+1]) + `"`)
			}
			e.b.WriteByte('}')
		}
		e.b.WriteString(" " + s.value + "\n")
	}
}

func (e *exposition) counter(name, help string, s ...sample) { e.family(name, "counter", help, s...) }
func (e *exposition) gauge(name, help string, s ...sample)   { e.family(name, "gauge", help, s...) }

// byLabel turns a map of counters into samples labelled label=key, sorted
// so the output is stable between scrapes.
func byLabel(label string, m map[string]uint64) []sample {
	out := make([]sample, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, u(m[k], label, k))
	}
	return out
}

func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}

func escapeLabel(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(s)
}

// WriteMetrics writes st in the Prometheus text exposition format. Metric
// names are documented in docs/api.md; they are derived from the same
// snapshot as GET /v1/stats.
func WriteMetrics(w io.Writer, st Stats) error {
	var e exposition
	e.gauge("vunet_build_info", "vunet version; the value is always 1.", u(1, "version", st.Version))
	if !st.Started.IsZero() {
		e.gauge("vunet_start_time_seconds", "When the appliance started, in seconds since the Unix epoch.",
			f(float64(st.Started.Unix())+float64(st.Started.Nanosecond())/1e9))
	}

	// Link: frames and bytes per virtqueue and direction.
	var frames, bytes, qerrs []sample
	for _, q := range st.Link.Queues {
		idx := strconv.Itoa(q.Queue)
		frames = append(frames, u(q.Frames, "queue", idx, "direction", q.Direction))
		bytes = append(bytes, u(q.Bytes, "queue", idx, "direction", q.Direction))
		qerrs = append(qerrs, u(q.Errors, "queue", idx, "direction", q.Direction))
	}
	e.counter("vunet_link_frames_total", "Ethernet frames carried, by virtqueue and direction (to_guest, from_guest).", frames...)
	e.counter("vunet_link_bytes_total", "Ethernet bytes carried, by virtqueue and direction (to_guest, from_guest).", bytes...)
	e.counter("vunet_link_drops_total", "Frames dropped by the virtio-net endpoint, by reason.", byLabel("reason", st.Link.Drops)...)
	e.counter("vunet_link_rx_backlogged_total", "Frames to the guest that waited for receive buffers.", u(st.Link.RXBacklogged))
	e.counter("vunet_virtqueue_errors_total", "Malformed descriptor chains and broken rings, by virtqueue (hostile or buggy guest).", qerrs...)

	// vhost-user control plane.
	e.counter("vunet_vhost_messages_total", "vhost-user messages handled.", u(st.VHost.Messages))
	e.counter("vunet_vhost_bad_messages_total", "vhost-user messages rejected as malformed (hostile or buggy frontend).", u(st.VHost.BadMessages))
	e.counter("vunet_vhost_sessions_total", "vhost-user frontends served.", u(st.VHost.Sessions))
	e.counter("vunet_vhost_map_failures_total", "Guest memory regions that could not be mapped.", u(st.VHost.MapFailures))
	e.counter("vunet_vhost_queue_starts_total", "Virtqueues started.", u(st.VHost.QueueStarts))
	e.counter("vunet_vhost_bad_fds_total", "Descriptors refused for their kind (a kick/call that is not an eventfd, memory that is not a regular file).", u(st.VHost.BadFDs))

	// Forwarding: flows by protocol.
	fw := st.Forward
	e.gauge("vunet_flows", "Open NAT flows by protocol: spliced TCP connections, UDP flows, ICMP echo sockets.",
		i(fw.TCPConns, "proto", "tcp"), i(fw.UDPFlows, "proto", "udp"), i(fw.PingFlows, "proto", "icmp"))
	e.counter("vunet_flows_created_total", "NAT flows created by protocol (outbound and port-forwarded).",
		u(fw.TCPConnsTotal, "proto", "tcp"), u(fw.UDPFlowsTotal, "proto", "udp"))
	e.counter("vunet_forward_inbound_total", "Connections (tcp) and flows (udp) accepted by port forwards.",
		u(fw.InboundTCPConns, "proto", "tcp"), u(fw.InboundUDPFlows, "proto", "udp"))
	e.gauge("vunet_port_forwards", "Active port forwards.", i(int64(fw.PortForwards)))
	e.gauge("vunet_forward_tcp_dials_in_flight", "Outbound host connects under way.", i(fw.TCPDialsInFlight))
	e.counter("vunet_forward_tcp_dial_failures_total", "Outbound host connects that failed (the guest got a RST), by reason.",
		u(fw.TCPRefused, "reason", "refused"), u(fw.TCPTimeouts, "reason", "timeout"), u(fw.TCPDialErrors, "reason", "error"))
	e.counter("vunet_forward_tcp_rejected_total", "Guest connections refused by a limit, by limit.",
		u(fw.TCPRejectedInFlight, "limit", "max_inflight_dials"), u(fw.TCPRejectedConns, "limit", "max_connections"))
	e.counter("vunet_forward_udp_flows_expired_total", "UDP flows closed by an idle timeout.", u(fw.UDPFlowsExpired))
	e.counter("vunet_forward_ping_requests_total", "ICMP echo requests sent to the host.", u(fw.PingRequests))
	e.counter("vunet_forward_ping_replies_total", "ICMP echo replies delivered to the guest.", u(fw.PingReplies))
	e.counter("vunet_forward_icmp_errors_total", "Host ICMP errors (unreachable, time exceeded) translated for the guest, by outcome.",
		u(fw.ICMPErrors, "outcome", "sent"), u(fw.ICMPErrorsLimited, "outcome", "rate_limited"))
	e.counter("vunet_forward_drops_total", "Packets and connections the forwarder refused, by reason.", byLabel("reason", fw.Drops)...)

	// DHCPv4.
	d := st.DHCP
	e.counter("vunet_dhcp_packets_total", "DHCP packets received.", u(d.Received))
	e.counter("vunet_dhcp_malformed_total", "DHCP packets that were not valid requests.", u(d.Malformed))
	e.counter("vunet_dhcp_messages_total", "DHCP messages by type, received and sent.", byLabel("type", d.Messages)...)
	e.counter("vunet_dhcp_pool_exhausted_total", "DISCOVERs left unanswered because the pool was full.", u(d.PoolExhausted))
	e.counter("vunet_dhcp_send_errors_total", "DHCP replies that could not be sent.", u(d.SendErrors))
	e.gauge("vunet_dhcp_leases", "Bound, unexpired DHCP leases.", i(int64(d.ActiveLeases)))
	e.gauge("vunet_dhcp_pool_size", "Addresses in the DHCP pool.", i(int64(d.PoolSize)))

	// DNS.
	n := st.DNS
	udp := n.Queries - min(n.TCPQueries, n.Queries)
	e.counter("vunet_dns_queries_total", "DNS queries received, by transport.",
		u(udp, "transport", "udp"), u(n.TCPQueries, "transport", "tcp"))
	e.counter("vunet_dns_answers_total", "DNS answers, by source.",
		u(n.Static, "source", "static"), u(n.Forwarded, "source", "upstream"))
	e.counter("vunet_dns_upstream_errors_total", "Failed upstream attempts, including timeouts.", u(n.UpstreamErrors))
	e.counter("vunet_dns_upstream_timeouts_total", "Upstream attempts that timed out.", u(n.Timeouts))
	e.counter("vunet_dns_tcp_fallbacks_total", "Truncated upstream UDP answers retried over TCP.", u(n.TCPFallbacks))
	e.counter("vunet_dns_truncated_total", "Answers truncated to fit the guest's UDP size.", u(n.Truncated))
	e.counter("vunet_dns_servfail_total", "SERVFAIL answers generated by vunet.", u(n.ServFail))
	e.counter("vunet_dns_overloaded_total", "Queries refused because too many were in flight.", u(n.Overloaded))
	e.counter("vunet_dns_malformed_total", "Malformed DNS queries.", u(n.Malformed))
	e.counter("vunet_dns_static_denied_total", "Static addresses left out of DNS answers because the egress policy denies them.", u(n.StaticDenied))

	// Egress policy.
	var hits []sample
	for _, r := range st.Egress.Rules {
		idx := "default"
		if r.Index > 0 {
			idx = strconv.Itoa(r.Index)
		}
		hits = append(hits, u(r.Hits, "index", idx, "rule", r.Rule, "action", r.Action))
	}
	e.counter("vunet_egress_rule_hits_total", "Guest flows decided by each egress rule (index is the position among the user rules, or default).", hits...)
	if h := st.Egress.HostAddresses; h != nil {
		e.gauge("vunet_egress_host_addresses", "Addresses the host owns, denied by --no-host-addresses.", i(int64(*h)))
		e.counter("vunet_egress_host_address_refreshes_total", "Times the host's address set was re-read.", u(st.Egress.HostAddressRefreshes))
	}

	// Optional IPv6 and boot services.
	if r := st.RA; r != nil {
		e.counter("vunet_ra_sent_total", "Router advertisements sent.", u(r.Sent))
		e.counter("vunet_ra_solicitations_total", "Router solicitations received.", u(r.Solicitations))
		e.counter("vunet_ra_send_errors_total", "Router advertisements that could not be sent.", u(r.SendErrors))
	}
	if d6 := st.DHCPv6; d6 != nil {
		e.counter("vunet_dhcpv6_packets_total", "DHCPv6 packets received.", u(d6.Received))
		e.counter("vunet_dhcpv6_malformed_total", "Malformed DHCPv6 packets.", u(d6.Malformed))
		e.counter("vunet_dhcpv6_messages_total", "DHCPv6 messages by type, received and sent.",
			u(d6.InformationRequest, "type", "information_request"), u(d6.Replies, "type", "reply"),
			u(d6.Unsupported, "type", "unsupported"))
		e.counter("vunet_dhcpv6_send_errors_total", "DHCPv6 replies that could not be sent.", u(d6.SendErrors))
	}
	if t := st.TFTP; t != nil {
		e.counter("vunet_tftp_requests_total", "TFTP read and write requests received.", u(t.Requests))
		e.counter("vunet_tftp_transfers_total", "TFTP transfers by outcome.",
			u(t.Completed, "result", "completed"), u(t.Failed, "result", "failed"), u(t.NotFound, "result", "not_found"),
			u(t.Denied, "result", "denied"), u(t.Busy, "result", "busy"))
		e.counter("vunet_tftp_retransmissions_total", "TFTP packets retransmitted.", u(t.Retransmissions))
		e.counter("vunet_tftp_sent_bytes_total", "File bytes acknowledged by TFTP clients.", u(t.BytesSent))
		e.counter("vunet_tftp_malformed_total", "Malformed TFTP packets.", u(t.Malformed))
		e.gauge("vunet_tftp_active_transfers", "TFTP transfers under way.", i(t.Active))
	}

	e.counter("vunet_log_suppressed_total", "Log records held back by the per-message rate limit.", u(st.Log.Suppressed))

	// Hostile input, summed per source so one alert covers them all; each
	// also appears in its own metric above.
	hostile := []sample{
		u(st.VHost.BadMessages, "source", "vhost"),
		u(st.VHost.MapFailures, "source", "vhost_memory"),
		u(sumQueueErrors(st.Link.Queues), "source", "virtqueue"),
		u(st.Link.Drops["tx_bad_header"]+st.Link.Drops["tx_short"]+st.Link.Drops["tx_too_big"]+st.Link.Drops["tx_bad_gso"], "source", "link"),
		u(fw.Drops["invalid"], "source", "forward"),
		u(d.Malformed, "source", "dhcp"),
		u(n.Malformed, "source", "dns"),
	}
	if st.DHCPv6 != nil {
		hostile = append(hostile, u(st.DHCPv6.Malformed, "source", "dhcpv6"))
	}
	if st.TFTP != nil {
		hostile = append(hostile, u(st.TFTP.Malformed, "source", "tftp"))
	}
	e.counter("vunet_hostile_input_total", "Malformed or hostile input rejected, by source (a rollup of the per-layer counters).", hostile...)

	_, err := io.WriteString(w, e.b.String())
	return err
}

func sumQueueErrors(qs []QueueStats) uint64 {
	var n uint64
	for _, q := range qs {
		n += q.Errors
	}
	return n
}
