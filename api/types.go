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
	"strings"
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
	// Path is the Unix socket of a unix forward (--forward
	// unix:PATH:PORT), whose Host is empty. At run time a unix forward
	// may be added only in the directory vunet was started with
	// (--unix-forward-dir): the sandbox forbids creating sockets
	// anywhere else.
	Path string `json:"path,omitempty"`
	// GuestPort is the port on the guest connections are relayed to.
	GuestPort uint16 `json:"guest_port"`
	// Guest is the full guest address ("10.0.2.15:22"); set in replies only,
	// and not for a forward that names its guest.
	Guest netip.AddrPort `json:"guest,omitzero"`
	// GuestSelector names the guest the forward reaches, as in --forward
	// tcp:2222:vm1:22: its DHCP host name, MAC (dashes, or colons in
	// brackets) or address (IPv6 in brackets), resolved per connection.
	// Empty means the first guest. In requests and replies.
	GuestSelector string `json:"guest_selector,omitempty"`
}

// String formats f in the --forward spec syntax, "tcp:127.0.0.1:2222:22",
// so that output can be pasted back into `vunet forward remove`.
func (f Forward) String() string {
	guest := ""
	if f.GuestSelector != "" {
		guest = f.GuestSelector + ":"
	}
	if f.Proto == "unix" {
		return "unix:" + f.Path + ":" + guest + strconv.Itoa(int(f.GuestPort))
	}
	return f.Proto + ":" + f.Host.String() + ":" + guest + strconv.Itoa(int(f.GuestPort))
}

// Forwards is the body of GET /v1/forwards. The list is wrapped in an
// object so fields can be added without breaking clients.
type Forwards struct {
	Forwards []Forward `json:"forwards"`
}

// Expose is a gateway TCP port mapped to a host Unix socket, as with
// --expose tcp:GATEWAYPORT:unix:PATH: a guest connection to the gateway
// address (10.0.2.2, fd00::2) on GatewayPort is relayed to a connect on
// Path. The port is the gateway's, so every guest reaches the same
// socket (there is no guest selector).
type Expose struct {
	// Proto is "tcp", the only kind; empty in a request means tcp.
	Proto string `json:"proto"`
	// GatewayPort is the port on the gateway addresses, 1..65535.
	GatewayPort uint16 `json:"gateway_port"`
	// Path is the host socket, absolute and shorter than 108 bytes. At
	// run time under the sandbox it must be a file directly in
	// --unix-forward-dir or in the directory of an --expose socket given
	// at start-up: the sandbox lets vunet connect nowhere else.
	Path string `json:"path"`
	// Gateway lists the addresses guests connect to; set in replies
	// only.
	Gateway []netip.AddrPort `json:"gateway,omitempty"`
}

// String formats e in the --expose spec syntax, "tcp:2375:unix:PATH", so
// that output can be pasted back into `vunet expose remove`.
func (e Expose) String() string {
	return "tcp:" + strconv.Itoa(int(e.GatewayPort)) + ":unix:" + e.Path
}

// Exposes is the body of GET /v1/exposes.
type Exposes struct {
	Exposes []Expose `json:"exposes"`
}

// exposeRequest is the body of POST /v1/exposes as read: the port is
// wider than Expose's so that 0, -1 and 70000 get a message that says
// the range, not a JSON type error.
type exposeRequest struct {
	Proto       string `json:"proto"`
	GatewayPort int64  `json:"gateway_port"`
	Path        string `json:"path"`
}

// validate checks an expose request's form before it reaches the
// Backend (where the socket may be is the Backend's decision). A removal
// may leave Path empty (any).
func (r exposeRequest) validate(needPath bool) (Expose, error) {
	switch {
	case r.Proto != "" && r.Proto != "tcp":
		return Expose{}, Errorf(ErrInvalid, "proto %q: only tcp gateway ports can be exposed", r.Proto)
	case r.GatewayPort < 1 || r.GatewayPort > 65535:
		return Expose{}, Errorf(ErrInvalid, "gateway_port %d: expected 1..65535", r.GatewayPort)
	case r.Path == "" && !needPath:
	case r.Path == "" || r.Path[0] != '/' || len(r.Path) >= maxSocketPath || strings.IndexByte(r.Path, 0) >= 0:
		return Expose{}, Errorf(ErrInvalid, "path %q: expected an absolute socket path shorter than %d bytes", r.Path, maxSocketPath)
	}
	return Expose{Proto: "tcp", GatewayPort: uint16(r.GatewayPort), Path: r.Path}, nil
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

// Stats is the body of GET /v1/stats: every declared counter and gauge,
// and the state a person needs to read them (leases, ring indexes).
// Metrics (GET /metrics) and `vunet stats` are rendered from the same
// snapshot. Optional services' series are absent when they are not running.
type Stats struct {
	Version       string    `json:"version"`
	Started       time.Time `json:"started"`
	UptimeSeconds float64   `json:"uptime_seconds"`

	// Metrics has one entry per series, grouped by layer in a stable order.
	Metrics []Metric `json:"metrics"`
	// Rings has the indexes of each virtqueue a frontend drives.
	Rings []RingState `json:"rings"`
	// Leases are the bound DHCP leases: DHCPv4, then DHCPv6 (stateful
	// mode; an IPv6 Addr and a DUID).
	Leases []Lease `json:"leases"`
}

// Metric is one series: a counter (monotonic since start, the name ends in
// _total) or a gauge (a current value).
type Metric struct {
	// Layer is the component that declared it: "link", "virtqueue",
	// "vhost", "forward", "dhcp", ... (the sections of `vunet stats`).
	Layer string `json:"layer"`
	// Name is the Prometheus metric name, "vunet_dns_malformed_total".
	Name string `json:"name"`
	// Kind is "counter" or "gauge".
	Kind string `json:"kind"`
	Help string `json:"help"`
	// Labels tell a family's series apart ({"reason": "broadcast"}; per
	// virtqueue {"queue": "0", "direction": "to_guest"}).
	Labels map[string]string `json:"labels,omitempty"`
	// Hostile, when set, is the source under which the series is added to
	// vunet_hostile_input_total.
	Hostile string `json:"hostile,omitempty"`
	// Value is exact; counters saturate at 2^63-1.
	Value int64 `json:"value"`
}

// Find returns the value of the series name with exactly labels (name,
// value pairs), and whether it exists.
func (st *Stats) Find(name string, labels ...string) (int64, bool) {
	for _, m := range st.Metrics {
		if m.Name == name && m.hasLabels(labels) {
			return m.Value, true
		}
	}
	return 0, false
}

func (m *Metric) hasLabels(kv []string) bool {
	if len(kv) != 2*len(m.Labels) {
		return false
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if v, ok := m.Labels[kv[i]]; !ok || v != kv[i+1] {
			return false
		}
	}
	return true
}

// Queue directions, seen from the guest.
const (
	ToGuest   = "to_guest"   // virtio receive queue: host → guest
	FromGuest = "from_guest" // virtio transmit queue: guest → host
)

// RingState is a virtqueue's indexes, for diagnosing a stalled queue:
// avail_idx ahead of next_avail means buffers the device has not taken;
// with EVENT_IDX the guest kicks when avail_idx passes avail_event and
// wants an interrupt when used_idx passes used_event. On a packed ring
// (Packed) each index is a ring position: the slot in bits 0-14 and the
// wrap counter in bit 15; avail_idx is the position after the chains the
// guest has made available, avail_event and used_event are the positions
// in the device and driver event suppression structures.
type RingState struct {
	// Guest is the guest's port (the `guest` label of its counters).
	Guest      int    `json:"guest"`
	Queue      int    `json:"queue"`
	Direction  string `json:"direction"` // ToGuest or FromGuest
	Size       uint16 `json:"size"`
	AvailIdx   uint16 `json:"avail_idx"`
	NextAvail  uint16 `json:"next_avail"`
	UsedIdx    uint16 `json:"used_idx"`
	EventIdx   bool   `json:"event_idx"`
	AvailEvent uint16 `json:"avail_event,omitempty"`
	UsedEvent  uint16 `json:"used_event,omitempty"`
	Packed     bool   `json:"packed,omitempty"`
}

// Guests is the body of GET /v1/guests.
type Guests struct {
	Guests []Guest `json:"guests"`
}

// Guest is one VM on the network (GET /v1/guests, `vunet guests`): a
// connected vhost-user frontend and what vunet knows about it.
type Guest struct {
	// Port is the guest's switch port, the `guest` label of its counters
	// (0 .. --max-guests-1; the next VM reuses a free port).
	Port int `json:"port"`
	// Session numbers the frontends accepted since start, from 1.
	Session uint64 `json:"session"`
	// Since is when its frontend connected.
	Since time.Time `json:"since"`
	// MAC is the guest's MAC, "" until it has sent a frame.
	MAC string `json:"mac"`
	// Name is its DHCP host name (Name.vunet.internal), "" without one.
	Name string `json:"name,omitempty"`
	// IPv4 and IPv6 are the addresses it uses and was leased.
	IPv4 []netip.Addr `json:"ipv4"`
	IPv6 []netip.Addr `json:"ipv6"`
	// Leases are its DHCPv4 and DHCPv6 leases, with their expiry.
	Leases []Lease `json:"leases"`
	// Rings are its virtqueues' indexes (the queue state).
	Rings []RingState `json:"rings"`
	// Metrics are its series: those of Stats.Metrics with the label
	// guest=Port (frames, bytes, drops, virtqueue counters).
	Metrics []Metric `json:"metrics"`
}

// Lease is one bound DHCP lease.
type Lease struct {
	// MAC is the client's MAC address; for a DHCPv6 lease, the one in its
	// DUID, "" when the DUID has none.
	MAC    string     `json:"mac"`
	Addr   netip.Addr `json:"addr"`
	Expiry time.Time  `json:"expiry"`
	// DUID (hex) and IAID identify a DHCPv6 lease (stateful DHCPv6 only);
	// both are absent from DHCPv4 leases.
	DUID string `json:"duid,omitempty"`
	IAID uint32 `json:"iaid,omitempty"`
}

// validate checks a forward request before it reaches the Backend. A
// removal may leave GuestPort 0 (any).
// maxSocketPath is sockaddr_un's sun_path capacity, with its NUL.
const maxSocketPath = 108

// maxSelector bounds a guest selector: a host name is one label (at most
// 63 bytes), a MAC or an address in brackets is shorter.
const maxSelector = 64

func (f Forward) validate(needGuest bool) error {
	switch {
	case f.Proto == "unix":
		// Where the socket may be is the appliance's decision
		// (--unix-forward-dir); here only its form.
		if f.Path == "" || f.Path[0] != '/' || len(f.Path) >= maxSocketPath || strings.IndexByte(f.Path, 0) >= 0 {
			return Errorf(ErrInvalid, "path %q: expected an absolute socket path shorter than %d bytes", f.Path, maxSocketPath)
		}
		if f.Host.IsValid() {
			return Errorf(ErrInvalid, "host: a unix forward has a path, not a host address")
		}
	case f.Proto != "tcp" && f.Proto != "udp":
		return Errorf(ErrInvalid, "proto %q: expected tcp, udp or unix", f.Proto)
	case !f.Host.Addr().IsValid():
		return Errorf(ErrInvalid, "host: expected IP:PORT (IPv6 in brackets)")
	case f.Path != "":
		return Errorf(ErrInvalid, "path: only a unix forward has one")
	}
	if needGuest && f.GuestPort == 0 {
		return Errorf(ErrInvalid, "guest_port: expected 1..65535")
	}
	// The selector's form is the backend's to check (the --forward
	// parser); here only its size.
	if len(f.GuestSelector) > maxSelector {
		return Errorf(ErrInvalid, "guest_selector: longer than %d bytes", maxSelector)
	}
	return nil
}

// StateSummary is what POST /v1/state applied.
type StateSummary struct {
	// SavedAt is when the source vunet took the state.
	SavedAt time.Time `json:"saved_at"`
	// Leases, Forwards and UDPFlows count the entries restored.
	Leases   int `json:"leases"`
	Forwards int `json:"forwards"`
	UDPFlows int `json:"udp_flows"`
	// Exposes counts the runtime gateway exposes restored.
	Exposes int `json:"exposes"`
	// TCP counts the established TCP connections taken over (with
	// --migrate-tcp on both sides).
	TCP int `json:"tcp_connections"`
	// Pending counts forwards whose host port is still in use (the source
	// vunet on this host holds it): they are retried for 30 seconds.
	Pending int `json:"forwards_pending"`
	// Problems says which entries could not be applied (at most 32).
	Problems []string `json:"problems"`
}
