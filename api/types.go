// Package api is vunet's runtime control API: HTTP over a Unix socket
// (vunet --api PATH). The server side is NewServer over a Backend (the
// appliance implements it); the client side is Client, used by the
// `vunet forward` and `vunet stats` commands. Both sides share the JSON
// types in this file, so they cannot drift apart. See docs/api.md.
package api

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"
)

// Sentinel errors a Backend returns (through Errorf, or wrapped with %w) to
// choose the HTTP status; the Client maps the status back, so errors.Is
// works on both sides.
var (
	// ErrInvalid: the request is malformed or names impossible values (400).
	ErrInvalid = errors.New("invalid request")
	// ErrNotFound: the named object does not exist (404).
	ErrNotFound = errors.New("not found")
	// ErrConflict: the object already exists or the address is in use (409).
	ErrConflict = errors.New("conflict")
)

// Errorf returns an error with the formatted message that matches kind
// (ErrInvalid, ErrNotFound, ErrConflict) under errors.Is, without the
// kind's text in the message: users read "tcp 127.0.0.1:80: address
// already in use", not "conflict: ...".
func Errorf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf(format, args...)}
}

type kindError struct{ kind, err error }

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.kind, e.err} }

// Forward is one host→guest port forward. In requests Guest is ignored;
// the guest address is always the guest's IPv4 address.
type Forward struct {
	// Proto is "tcp" or "udp".
	Proto string `json:"proto"`
	// Host is the host address and port vunet listens on, "ip:port" (IPv6
	// in brackets). Port 0 asks the kernel for a free port; the reply
	// carries the one it got.
	Host netip.AddrPort `json:"host"`
	// GuestPort is the port on the guest connections are relayed to.
	GuestPort uint16 `json:"guest_port"`
	// Guest is the full guest address ("10.0.2.15:22"); set in replies only.
	Guest netip.AddrPort `json:"guest,omitzero"`
}

// String formats f in the --forward spec syntax, "tcp:127.0.0.1:2222:22",
// so that output can be pasted back into `vunet forward remove`.
func (f Forward) String() string {
	return f.Proto + ":" + f.Host.String() + ":" + strconv.Itoa(int(f.GuestPort))
}

// Forwards is the body of GET /v1/forwards. The list is wrapped in an
// object so fields can be added without breaking clients.
type Forwards struct {
	Forwards []Forward `json:"forwards"`
}

// Health is the body of GET /v1/health.
type Health struct {
	// Status is "ok" whenever the API answers.
	Status  string `json:"status"`
	Version string `json:"version"`
	// Started is when the appliance was built.
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`
}

// ErrorBody is the JSON body of every error reply.
type ErrorBody struct {
	Error string `json:"error"`
}

// StatusError is an error reply as seen by the Client.
type StatusError struct {
	// Status is the HTTP status code.
	Status int
	// Message is the server's error text.
	Message string
}

func (e *StatusError) Error() string { return e.Message }

// Unwrap maps the status back to the sentinel the server started from.
func (e *StatusError) Unwrap() error {
	switch e.Status {
	case 400:
		return ErrInvalid
	case 404:
		return ErrNotFound
	case 409:
		return ErrConflict
	}
	return nil
}

// Stats is the body of GET /v1/stats: a snapshot of every counter. Metrics
// (GET /metrics) are rendered from the same snapshot. Counters are
// monotonic since start; fields documented as gauges are current values.
// Optional services are nil when they are not running.
type Stats struct {
	Version       string    `json:"version"`
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`

	Link    LinkStats    `json:"link"`
	VHost   VHostStats   `json:"vhost"`
	Forward ForwardStats `json:"forward"`
	DHCP    DHCPStats    `json:"dhcp"`
	DNS     DNSStats     `json:"dns"`
	RA      *RAStats     `json:"ra,omitempty"`
	DHCPv6  *DHCPv6Stats `json:"dhcpv6,omitempty"`
	TFTP    *TFTPStats   `json:"tftp,omitempty"`
	Egress  EgressStats  `json:"egress"`
	Log     LogStats     `json:"log"`
}

// LogStats are the log limiter's counters.
type LogStats struct {
	// Suppressed counts log records held back by the per-message rate
	// limit (a flood triggered by a guest or a remote peer).
	Suppressed uint64 `json:"suppressed"`
}

// EgressStats are the egress policy's counters.
type EgressStats struct {
	// Mode is "all" or "none" (--egress).
	Mode string `json:"mode"`
	// Rules are the user rules and then the active defaults, in evaluation
	// order, each with its hit count.
	Rules []EgressRule `json:"rules"`
	// HostAddresses, with --no-host-addresses, is how many addresses the
	// host owns right now, and HostAddressRefreshes how often the set was
	// re-read (on each kernel notification).
	HostAddresses        *int   `json:"host_addresses,omitempty"`
	HostAddressRefreshes uint64 `json:"host_address_refreshes,omitempty"`
}

// EgressRule is one rule of the egress policy.
type EgressRule struct {
	// Index is the 1-based position among the user rules, 0 for defaults.
	Index int `json:"index"`
	// Rule is the rule ("allow tcp:10.0.0.0/8:80") or default ("deny
	// 169.254.0.0/16", "deny host-addresses", "allow gateway", "deny any",
	// "allow any").
	Rule   string `json:"rule"`
	Action string `json:"action"`
	Hits   uint64 `json:"hits"`
}

// Queue directions, seen from the guest.
const (
	ToGuest   = "to_guest"   // virtio receive queue: host → guest
	FromGuest = "from_guest" // virtio transmit queue: guest → host
)

// LinkStats are the virtio-net endpoint's counters.
type LinkStats struct {
	// Queues has one entry per virtqueue, by index.
	Queues []QueueStats `json:"queues"`
	// Drops counts frames dropped by the endpoint, by reason
	// ("tx_bad_header", "rx_backlog_full", ...; see docs/api.md).
	Drops map[string]uint64 `json:"drops"`
	// RXBacklogged counts frames that waited for guest receive buffers.
	RXBacklogged uint64 `json:"rx_backlogged"`
}

// QueueStats are one virtqueue's counters.
type QueueStats struct {
	Queue     int    `json:"queue"`
	Direction string `json:"direction"` // ToGuest or FromGuest
	Frames    uint64 `json:"frames"`
	Bytes     uint64 `json:"bytes"`
	// Errors counts malformed descriptor chains and broken rings.
	Errors uint64 `json:"errors"`
	// Backlog is the number of packets waiting for guest buffers (gauge;
	// the to_guest queue only).
	Backlog int `json:"backlog,omitempty"`
	// Ring is the ring's state while a frontend drives it.
	Ring *RingState `json:"ring,omitempty"`
}

// RingState is a virtqueue's indexes, for diagnosing a stalled queue:
// avail_idx ahead of next_avail means buffers the device has not taken;
// with EVENT_IDX the guest kicks when avail_idx passes avail_event and
// wants an interrupt when used_idx passes used_event.
type RingState struct {
	Size       uint16 `json:"size"`
	AvailIdx   uint16 `json:"avail_idx"`
	NextAvail  uint16 `json:"next_avail"`
	UsedIdx    uint16 `json:"used_idx"`
	EventIdx   bool   `json:"event_idx"`
	AvailEvent uint16 `json:"avail_event,omitempty"`
	UsedEvent  uint16 `json:"used_event,omitempty"`
}

// VHostStats are the vhost-user control plane's counters.
type VHostStats struct {
	Messages    uint64 `json:"messages"`
	BadMessages uint64 `json:"bad_messages"` // rejected: size, fd count, values
	Sessions    uint64 `json:"sessions"`     // frontends served
	MapFailures uint64 `json:"map_failures"` // guest memory regions that could not be mapped
	QueueStarts uint64 `json:"queue_starts"`
	BadFDs      uint64 `json:"bad_fds"` // descriptors of the wrong kind (kick not an eventfd, memory not a file)
}

// ForwardStats are the NAT forwarder's counters.
type ForwardStats struct {
	// PortForwards is the number of active port forwards (gauge).
	PortForwards int `json:"port_forwards"`

	TCPConns            int64  `json:"tcp_conns"` // gauge
	TCPConnsTotal       uint64 `json:"tcp_conns_total"`
	TCPDialsInFlight    int64  `json:"tcp_dials_in_flight"` // gauge
	TCPRefused          uint64 `json:"tcp_refused"`
	TCPTimeouts         uint64 `json:"tcp_timeouts"`
	TCPDialErrors       uint64 `json:"tcp_dial_errors"`
	TCPRejectedInFlight uint64 `json:"tcp_rejected_in_flight"`
	TCPRejectedConns    uint64 `json:"tcp_rejected_conns"`

	UDPFlows        int64  `json:"udp_flows"` // gauge
	UDPFlowsTotal   uint64 `json:"udp_flows_total"`
	UDPFlowsExpired uint64 `json:"udp_flows_expired"`

	PingFlows    int64  `json:"ping_flows"` // gauge
	PingRequests uint64 `json:"ping_requests"`
	PingReplies  uint64 `json:"ping_replies"`
	// ICMPErrors counts host ICMP errors (unreachable, time exceeded)
	// translated for the guest; ICMPErrorsLimited those the rate limit held back.
	ICMPErrors        uint64 `json:"icmp_errors"`
	ICMPErrorsLimited uint64 `json:"icmp_errors_rate_limited"`

	InboundTCPConns uint64 `json:"inbound_tcp_conns"`
	InboundUDPFlows uint64 `json:"inbound_udp_flows"`

	// Drops counts what was not forwarded, by reason ("broadcast",
	// "invalid", ...; see docs/api.md).
	Drops map[string]uint64 `json:"drops"`
}

// DHCPStats are the DHCPv4 server's counters.
type DHCPStats struct {
	Received  uint64 `json:"received"`
	Malformed uint64 `json:"malformed"`
	// Messages counts DHCP messages by type, received ("discover",
	// "request", "decline", "release", "inform") and sent ("offer", "ack",
	// "nak").
	Messages      map[string]uint64 `json:"messages"`
	PoolExhausted uint64            `json:"pool_exhausted"`
	SendErrors    uint64            `json:"send_errors"`
	ActiveLeases  int               `json:"active_leases"` // gauge
	PoolSize      int               `json:"pool_size"`
	Leases        []Lease           `json:"leases"`
}

// Lease is one bound DHCP lease.
type Lease struct {
	MAC    string     `json:"mac"`
	Addr   netip.Addr `json:"addr"`
	Expiry time.Time  `json:"expiry"`
}

// DNSStats are the DNS server's counters.
type DNSStats struct {
	Queries    uint64 `json:"queries"` // UDP and TCP
	TCPQueries uint64 `json:"tcp_queries"`
	Static     uint64 `json:"static"`
	// StaticDenied counts static addresses left out of answers because the
	// egress policy denies them.
	StaticDenied   uint64 `json:"static_denied"`
	Forwarded      uint64 `json:"forwarded"`
	UpstreamErrors uint64 `json:"upstream_errors"`
	Timeouts       uint64 `json:"timeouts"`
	TCPFallbacks   uint64 `json:"tcp_fallbacks"`
	Truncated      uint64 `json:"truncated"`
	ServFail       uint64 `json:"servfail"`
	Overloaded     uint64 `json:"overloaded"`
	Malformed      uint64 `json:"malformed"`
}

// RAStats are the router advertisement sender's counters.
type RAStats struct {
	Sent          uint64 `json:"sent"`
	Solicitations uint64 `json:"solicitations"`
	SendErrors    uint64 `json:"send_errors"`
}

// DHCPv6Stats are the stateless DHCPv6 server's counters.
type DHCPv6Stats struct {
	Received           uint64 `json:"received"`
	Malformed          uint64 `json:"malformed"`
	InformationRequest uint64 `json:"information_request"`
	Replies            uint64 `json:"replies"`
	Unsupported        uint64 `json:"unsupported"`
	SendErrors         uint64 `json:"send_errors"`
}

// TFTPStats are the TFTP server's counters.
type TFTPStats struct {
	Requests        uint64 `json:"requests"`
	Malformed       uint64 `json:"malformed"`
	Completed       uint64 `json:"completed"`
	Failed          uint64 `json:"failed"`
	NotFound        uint64 `json:"not_found"`
	Denied          uint64 `json:"denied"`
	Busy            uint64 `json:"busy"`
	Retransmissions uint64 `json:"retransmissions"`
	BytesSent       uint64 `json:"bytes_sent"`
	Active          int64  `json:"active"` // gauge
}

// validate checks a forward request before it reaches the Backend. A
// removal may leave GuestPort 0 (any).
func (f Forward) validate(needGuest bool) error {
	if f.Proto != "tcp" && f.Proto != "udp" {
		return Errorf(ErrInvalid, "proto %q: expected tcp or udp", f.Proto)
	}
	if !f.Host.Addr().IsValid() {
		return Errorf(ErrInvalid, "host: expected IP:PORT (IPv6 in brackets)")
	}
	if needGuest && f.GuestPort == 0 {
		return Errorf(ErrInvalid, "guest_port: expected 1..65535")
	}
	return nil
}
