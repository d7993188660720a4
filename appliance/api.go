package appliance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"runtime"
	rtmetrics "runtime/metrics"
	"strconv"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/internal/metrics"
	"github.com/vunet/vunet/internal/version"
)

// The appliance is the API's backend.
var (
	_ api.Backend       = (*Appliance)(nil)
	_ api.ExposeBackend = (*Appliance)(nil)
)

// registerMetrics declares every layer's counters (see internal/metrics):
// the one place a new counter struct is added; a new field of a struct
// already here needs no edit.
func (a *Appliance) registerMetrics() (*metrics.Registry, error) {
	r := metrics.New()
	var errs []error
	add := func(layer string, set any, labels ...string) { errs = append(errs, r.Register(layer, set, labels...)) }
	// Each guest port's counters carry its port index as `guest`; its
	// queues' as well `queue` and `direction`.
	for _, p := range a.Link.Ports() {
		g := strconv.Itoa(p.PortID())
		for i := range p.NumQueues() {
			add("link", &p.Stats.Queues[i], "guest", g, "queue", strconv.Itoa(i), "direction", direction(i))
		}
		add("link", &p.Stats, "guest", g)
		for i := range p.NumQueues() {
			add("virtqueue", p.QueueStats(i), "guest", g, "queue", strconv.Itoa(i), "direction", direction(i))
		}
	}
	add("switch", &a.Link.Stats)
	add("netstack", a.Stack.Stats())
	add("vhost", &a.VHost.Stats)
	add("vhost", &a.dialStats)
	add("forward", a.Forward.Stats())
	add("dhcp", a.DHCP.Stats())
	add("dns", a.DNS.Stats())
	add("names", a.Names.Stats())
	if a.RA != nil {
		add("ra", a.RA.Stats())
	}
	if a.DHCPv6 != nil {
		add("dhcpv6", a.DHCPv6.Stats())
	}
	if a.TFTP != nil {
		add("tftp", a.TFTP.Stats())
	}
	for _, rule := range a.egress.Stats() {
		idx := "default"
		if rule.Index > 0 {
			idx = strconv.Itoa(rule.Index)
		}
		add("egress", rule.Counters, "index", idx, "rule", rule.Rule, "action", rule.Action)
	}
	if a.hostAddrs != nil {
		add("egress", a.hostAddrs.Stats())
	}
	if a.pcap != nil {
		add("pcap", &a.pcap.Stats)
	}
	add("log", a.logLimit.Stats())
	add("sandbox", &a.Sandbox)
	add("migration", &a.migStats)
	add("process", newProcessStats())
	add("netstack", newNetstackStats(a.Stack.Stack()))
	memOut, memIn := a.Forward.MemoryShares()
	for _, m := range []struct {
		share string
		b     *budget.Budget
	}{{"total", a.Memory}, {"outbound", memOut}, {"inbound", memIn}, {"link", a.linkMem}} {
		add("memory", m.b.Counters(), "share", m.share)
	}
	// Each guest's own limits: its NAT flows and refusals, its part of
	// the outbound memory (share=guest) and of the link's (guest_link).
	for i := range a.cfg.MaxGuests {
		g := strconv.Itoa(i)
		st, mem := a.Forward.GuestCounters(i)
		add("forward", st, "guest", g)
		add("memory", mem.Counters(), "share", "guest", "guest", g)
		add("memory", a.portMem[i].Counters(), "share", "guest_link", "guest", g)
	}
	return r, errors.Join(errs...)
}

// ProcessStats are gauges of the vunet process itself.
type ProcessStats struct {
	// Goroutines shows what connections and flows hold: an idle TCP
	// connection holds none (docs/performance.md, connection scale).
	Goroutines func() int64 `metric:"process_goroutines" kind:"gauge" help:"Goroutines in the vunet process."`
	// The Go heap (runtime/metrics, read without stopping the world):
	// what its objects, live or not yet swept, occupy, the goroutine
	// stacks, and the heap memory free for reuse that is still resident
	// (not yet returned to the kernel) or already returned. Together
	// they tell a resident set that is held from one that is only not
	// yet given back.
	HeapObjects  func() int64 `metric:"process_heap_objects_bytes" kind:"gauge" help:"Go heap memory occupied by objects, live or not yet swept."`
	Stacks       func() int64 `metric:"process_stack_bytes" kind:"gauge" help:"Go heap memory used for goroutine stacks."`
	HeapFree     func() int64 `metric:"process_heap_free_bytes" kind:"gauge" help:"Go heap memory free for reuse and still resident (not yet returned to the kernel)."`
	HeapReleased func() int64 `metric:"process_heap_released_bytes" kind:"gauge" help:"Go heap memory free and returned to the kernel."`
}

func newProcessStats() *ProcessStats {
	heap := func(name string) func() int64 {
		return func() int64 {
			s := []rtmetrics.Sample{{Name: name}}
			rtmetrics.Read(s)
			if s[0].Value.Kind() != rtmetrics.KindUint64 {
				return 0
			}
			return int64(s[0].Value.Uint64())
		}
	}
	return &ProcessStats{
		Goroutines:   func() int64 { return int64(runtime.NumGoroutine()) },
		HeapObjects:  heap("/memory/classes/heap/objects:bytes"),
		Stacks:       heap("/memory/classes/heap/stacks:bytes"),
		HeapFree:     heap("/memory/classes/heap/free:bytes"),
		HeapReleased: heap("/memory/classes/heap/released:bytes"),
	}
}

// NetstackStats are gauges of vunet's gVisor stack.
type NetstackStats struct {
	// TCPConnected counts the endpoints a closed connection leaves
	// behind as well as the open ones: TIME_WAIT and the closing states
	// hold a whole endpoint until they end.
	TCPConnected   func() int64 `metric:"netstack_tcp_connected" kind:"gauge" help:"gVisor TCP endpoints in a connected state (ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1/2, CLOSING, LAST_ACK, TIME_WAIT)."`
	TCPEstablished func() int64 `metric:"netstack_tcp_established" kind:"gauge" help:"gVisor TCP endpoints in ESTABLISHED."`
}

func newNetstackStats(s *stack.Stack) *NetstackStats {
	st := s.Stats().TCP
	return &NetstackStats{
		TCPConnected:   func() int64 { return int64(st.CurrentConnected.Value()) },
		TCPEstablished: func() int64 { return int64(st.CurrentEstablished.Value()) },
	}
}

// direction names virtio-net queue i seen from the guest: even queues
// receive (to the guest), odd ones transmit.
func direction(i int) string {
	if i%2 == 0 {
		return api.ToGuest
	}
	return api.FromGuest
}

// Health implements api.Backend.
func (a *Appliance) Health() api.Health {
	return api.Health{Status: "ok", Version: version.Version, Started: a.started,
		UptimeSeconds: time.Since(a.started).Seconds()}
}

// Stats implements api.Backend: every registered series, the rings a
// frontend drives, and the DHCP leases.
func (a *Appliance) Stats() api.Stats {
	st := api.Stats{Version: version.Version, Started: a.started, UptimeSeconds: time.Since(a.started).Seconds(),
		Metrics: a.metrics.Snapshot(), Rings: []api.RingState{}, Leases: []api.Lease{}}
	for _, g := range a.Link.Guests() {
		st.Rings = append(st.Rings, rings(g.Endpoint)...)
	}
	for _, l := range a.DHCP.Leases() {
		st.Leases = append(st.Leases, api.Lease{MAC: l.MAC, Addr: l.Addr, Expiry: l.Expiry})
	}
	if a.DHCPv6 != nil {
		for _, l := range a.DHCPv6.Leases() {
			st.Leases = append(st.Leases, api.Lease{MAC: l.MAC, Addr: l.Addr, Expiry: l.Expiry, DUID: l.DUID, IAID: l.IAID})
		}
	}
	return st
}

// toAPI converts a running forward.
func toAPI(pf forward.PortForward) api.Forward {
	if pf.Select != "" {
		return api.Forward{Proto: pf.Proto, Host: pf.Host, Path: pf.Path, GuestPort: pf.Guest.Port(), GuestSelector: pf.Select}
	}
	return api.Forward{Proto: pf.Proto, Host: pf.Host, Path: pf.Path, GuestPort: pf.Guest.Port(), Guest: pf.Guest}
}

// Forwards implements api.Backend.
func (a *Appliance) Forwards() []api.Forward {
	var out []api.Forward
	for _, pf := range a.Forward.ListPortForwards() {
		out = append(out, toAPI(pf))
	}
	return out
}

// AddForward implements api.Backend. Like --forward, the target is the
// guest's IPv4 address: the guest's IPv6 address comes from SLAAC and is
// not known here. The host address may be IPv4 or IPv6.
func (a *Appliance) AddForward(f api.Forward) (api.Forward, error) {
	if f.Proto == "unix" {
		if err := a.runtimeUnixPath("unix forward", f.Path); err != nil {
			return api.Forward{}, err
		}
		if _, ok := a.findForward(f); ok {
			return api.Forward{}, api.Errorf(api.ErrConflict, "a unix port forward already listens on %s", f.Path)
		}
	}
	if f.Host.Port() != 0 {
		// The forwarder checks too, but its error does not say which kind
		// it is; an API client deserves a 409.
		if _, ok := a.findForward(f); ok {
			return api.Forward{}, api.Errorf(api.ErrConflict, "a %s port forward already listens on %s", f.Proto, f.Host)
		}
	}
	pf := forward.PortForward{Proto: f.Proto, Host: f.Host, Path: f.Path, Guest: netip.AddrPortFrom(a.cfg.IPv4.Guest, f.GuestPort)}
	if f.GuestSelector != "" {
		// The same guests --forward tcp:2222:vm1:22 may name, checked
		// by the same parser.
		sel, err := config.ParseGuestSelector(f.GuestSelector)
		if err != nil {
			return api.Forward{}, api.Errorf(api.ErrInvalid, "guest_selector: %w", err)
		}
		pf.Select = sel.String()
	}
	pf, err := a.Forward.AddPortForward(pf)
	switch {
	case err == nil:
		a.runtime.set(keyOf(pf), true)
		return toAPI(pf), nil
	case errors.Is(err, syscall.EADDRINUSE):
		return api.Forward{}, api.Errorf(api.ErrConflict, "%w", err)
	case errors.Is(err, syscall.EADDRNOTAVAIL), errors.Is(err, syscall.EACCES):
		// Not a local address, or a privileged port: the request, not
		// vunet, is at fault.
		return api.Forward{}, api.Errorf(api.ErrInvalid, "%w", err)
	}
	return api.Forward{}, err
}

// RemoveForward implements api.Backend.
func (a *Appliance) RemoveForward(f api.Forward) error {
	cur, ok := a.findForward(f)
	on := f.Host.String()
	if f.Proto == "unix" {
		on = f.Path
	}
	if !ok {
		return api.Errorf(api.ErrNotFound, "no %s port forward on %s", f.Proto, on)
	}
	if f.GuestPort != 0 && cur.Guest.Port() != f.GuestPort {
		return api.Errorf(api.ErrNotFound, "the %s port forward on %s goes to guest port %d, not %d",
			f.Proto, on, cur.Guest.Port(), f.GuestPort)
	}
	if err := a.Forward.RemovePortForward(cur); err != nil {
		// Lost a race with another remove.
		return api.Errorf(api.ErrNotFound, "%w", err)
	}
	a.runtime.set(keyOf(cur), false)
	return nil
}

// findForward returns the running forward on f.Proto and f.Host (f.Path
// for unix).
func (a *Appliance) findForward(f api.Forward) (forward.PortForward, bool) {
	host := netip.AddrPortFrom(f.Host.Addr().Unmap(), f.Host.Port())
	for _, pf := range a.Forward.ListPortForwards() {
		if pf.Proto != f.Proto {
			continue
		}
		if f.Proto == "unix" && pf.Path == filepath.Clean(f.Path) || f.Proto != "unix" && pf.Host == host {
			return pf, true
		}
	}
	return forward.PortForward{}, false
}

// runtimeUnixPath says whether a unix socket at path may be created at
// run time (what names it in errors): only in
// --unix-forward-dir while the sandbox is on, since Landlock and the
// seccomp filter allow those nowhere else; anywhere with --sandbox=off
// and no --unix-forward-dir.
func (a *Appliance) runtimeUnixPath(what, path string) error {
	switch {
	case a.sockDir == nil && a.cfg.Sandbox == config.SandboxOff:
		return nil
	case a.sockDir == nil:
		return api.Errorf(api.ErrInvalid, "a %s at run time needs --unix-forward-dir (vunet was started without it, and its sandbox forbids sockets anywhere else): restart vunet with --unix-forward-dir DIR and put %s in DIR, or give it at start-up", what, path)
	case !a.sockDir.Holds(path):
		return api.Errorf(api.ErrInvalid, "%s is not in --unix-forward-dir %s: a %s added at run time must be a file directly in it (the sandbox allows sockets nowhere else)", path, a.sockDir.Path(), what)
	}
	return nil
}

// listenAPI creates the API socket (mode 0600) if configured; nil without
// cfg.API.
func (a *Appliance) listenAPI() (*net.UnixListener, error) {
	if a.cfg.API == "" {
		return nil, nil
	}
	return api.Listen(a.cfg.API)
}

// serveAPI serves the API on l until ctx is done and then removes the
// socket file.
func (a *Appliance) serveAPI(ctx context.Context, l *net.UnixListener) error {
	defer a.removeSocket(a.cfg.API)
	a.log.Info("control API listening", "socket", a.cfg.API)
	if err := api.NewServer(a, a.log.With("layer", "api")).Serve(ctx, l); err != nil {
		return fmt.Errorf("serving %s: %w", a.cfg.API, err)
	}
	return nil
}

// rings are the running rings of guest port p.
func rings(p *endpoint.Endpoint) []api.RingState {
	out := []api.RingState{}
	for i := range p.NumQueues() {
		if rs := p.RingState(i); rs.Ready {
			out = append(out, api.RingState{Guest: p.PortID(), Queue: i, Direction: direction(i), Size: rs.Size,
				AvailIdx: rs.AvailIdx, NextAvail: rs.NextAvail, UsedIdx: rs.UsedIdx,
				EventIdx: rs.EventIdx, AvailEvent: rs.AvailEvent, UsedEvent: rs.UsedEvent, Packed: rs.Packed})
		}
	}
	return out
}
