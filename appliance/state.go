package appliance

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/netstack"
)

// What moves with a live-migrated guest (docs/migration.md, "What moves
// with the VM"): the source's SaveState becomes the destination's
// LoadState, through the vhost-user DEVICE_STATE pipe or the control API.

// Timing of carried-over port forwards whose host port is still taken: on
// one host the source vunet holds it until it stops, so the destination
// tries again for a while.
const (
	forwardRetryEvery = 250 * time.Millisecond
	forwardRetryFor   = 30 * time.Second
)

// MigrationStats count device-state transfers and what they restored.
type MigrationStats struct {
	Saves   atomic.Uint64 `metric:"migration_state_saves_total" help:"Device states handed to a destination vunet (vhost-user DEVICE_STATE or GET /v1/state)."`
	Loads   atomic.Uint64 `metric:"migration_state_loads_total" help:"Device states taken from a source vunet and applied."`
	Invalid atomic.Uint64 `metric:"migration_state_invalid_total" help:"Device states refused as malformed, of another version or over a limit (a hostile or mismatched source)." hostile:"migration"`

	RestoredLeases   atomic.Uint64 `metric:"migration_restored_total{kind=lease}" help:"Entries of loaded device states applied here, by kind."`
	RestoredForwards atomic.Uint64 `metric:"migration_restored_total{kind=forward}"`
	RestoredUDP      atomic.Uint64 `metric:"migration_restored_total{kind=udp_flow}"`
	RestoredExposes  atomic.Uint64 `metric:"migration_restored_total{kind=expose}"`
	RefusedLeases    atomic.Uint64 `metric:"migration_refused_total{kind=lease}" help:"Entries of loaded device states that could not be applied (address held or outside the pool, port still in use after the retry time, an expose socket outside the allowed directories, ...), by kind."`
	RefusedForwards  atomic.Uint64 `metric:"migration_refused_total{kind=forward}"`
	RefusedExposes   atomic.Uint64 `metric:"migration_refused_total{kind=expose}"`
	PendingForwards  atomic.Int64  `metric:"migration_forwards_pending" kind:"gauge" help:"Carried-over port forwards waiting for their host port (the source vunet on this host still holds it)."`
}

// fwdKey names a forward by its host socket.
type fwdKey struct {
	proto string
	host  netip.AddrPort
	path  string
}

func keyOf(pf forward.PortForward) fwdKey { return fwdKey{pf.Proto, pf.Host, pf.Path} }

// runtimeForwards remembers which running forwards were added at run time
// (through the API or a loaded state): those move with the guest, the
// configured ones are each vunet's own.
type runtimeForwards struct {
	mu      sync.Mutex
	keys    map[fwdKey]bool
	pending map[fwdKey]bool // waiting for their host port
	// exposes are the gateway exposes added at run time.
	exposes map[forward.Expose]bool
}

func (r *runtimeForwards) setExpose(e forward.Expose, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.exposes == nil {
		r.exposes = map[forward.Expose]bool{}
	}
	if on {
		r.exposes[e] = true
	} else {
		delete(r.exposes, e)
	}
}

func (r *runtimeForwards) hasExpose(e forward.Expose) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.exposes[e]
}

// wait marks k as waiting for its port; false if it already was.
func (r *runtimeForwards) wait(k fwdKey, on bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending == nil {
		r.pending = map[fwdKey]bool{}
	}
	if on && r.pending[k] {
		return false
	}
	if on {
		r.pending[k] = true
	} else {
		delete(r.pending, k)
	}
	return true
}

func (r *runtimeForwards) set(k fwdKey, on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys == nil {
		r.keys = map[fwdKey]bool{}
	}
	if on {
		r.keys[k] = true
	} else {
		delete(r.keys, k)
	}
}

func (r *runtimeForwards) has(k fwdKey) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keys[k]
}

// SaveState returns the device state for the destination vunet.
func (a *Appliance) SaveState() ([]byte, error) {
	now := time.Now()
	st := &devstate.State{SavedAt: now}
	for _, l := range a.DHCP.Leases() {
		hw, err := net.ParseMAC(l.MAC)
		if err != nil || len(hw) != 6 {
			continue
		}
		var m [6]byte
		copy(m[:], hw)
		st.Leases4 = append(st.Leases4, devstate.Lease4{MAC: m, Addr: l.Addr, Remaining: l.Expiry.Sub(now)})
	}
	if a.DHCPv6 != nil {
		for _, l := range a.DHCPv6.Leases() {
			duid, err := hex.DecodeString(l.DUID)
			if err != nil {
				continue
			}
			st.Leases6 = append(st.Leases6, devstate.Lease6{DUID: duid, IAID: l.IAID, Addr: l.Addr, Remaining: l.Expiry.Sub(now)})
		}
	}
	for _, pf := range a.Forward.ListPortForwards() {
		if a.runtime.has(keyOf(pf)) {
			st.Forwards = append(st.Forwards, devstate.Forward{Proto: pf.Proto, Host: pf.Host, Path: pf.Path, GuestPort: pf.Guest.Port(), Guest: pf.Select})
		}
	}
	for _, e := range a.Forward.Exposes() {
		if a.runtime.hasExpose(e) {
			st.Exposes = append(st.Exposes, devstate.Expose{Port: e.Port, Path: e.Path})
		}
	}
	for _, f := range a.Forward.UDPFlowStates() {
		st.UDPFlows = append(st.UDPFlows, devstate.UDPFlow{Guest: f.Guest, Remote: f.Remote, HostPort: f.HostPort, Idle: f.Idle})
	}
	// Over a limit (a guest with thousands of UDP flows): the flows are
	// the least valuable part, and the first to go.
	if len(st.UDPFlows) > devstate.MaxUDPFlows {
		st.UDPFlows = st.UDPFlows[:devstate.MaxUDPFlows]
	}
	// Last, once nothing else can fail: handing TCP connections over
	// ends them here (--migrate-tcp; forward bounds them within the
	// format's limits).
	for _, f := range a.Forward.SaveTCP() {
		st.TCPFlows = append(st.TCPFlows, tcpToState(f))
	}
	b, err := devstate.Encode(st)
	if err != nil {
		return nil, err
	}
	a.migStats.Saves.Add(1)
	a.log.Info("device state saved", "bytes", len(b), "leases", len(st.Leases4)+len(st.Leases6),
		"forwards", len(st.Forwards), "exposes", len(st.Exposes), "udp_flows", len(st.UDPFlows), "tcp_connections", len(st.TCPFlows))
	return b, nil
}

// LoadState applies a device state from the source vunet. A state that
// does not decode is refused as a whole (nothing is applied); entries that
// cannot be applied here (an address another client holds, a port in use)
// are skipped, reported in the summary and counted. A forward whose host
// port is in use is tried again in the background for forwardRetryFor.
func (a *Appliance) LoadState(b []byte) (api.StateSummary, error) {
	st, err := devstate.Decode(b)
	if err != nil {
		a.migStats.Invalid.Add(1)
		return api.StateSummary{}, api.Errorf(api.ErrInvalid, "%w", err)
	}
	now := time.Now()
	sum := api.StateSummary{SavedAt: st.SavedAt, Problems: []string{}}
	problem := func(c *atomic.Uint64, err error) {
		c.Add(1)
		if len(sum.Problems) < 32 {
			sum.Problems = append(sum.Problems, err.Error())
		}
		a.log.Warn("device state: entry not restored", "err", err)
	}
	for _, l := range st.Leases4 {
		if err := a.DHCP.RestoreLease(net.HardwareAddr(l.MAC[:]), l.Addr, now.Add(l.Remaining)); err != nil {
			problem(&a.migStats.RefusedLeases, err)
			continue
		}
		a.migStats.RestoredLeases.Add(1)
		sum.Leases++
	}
	for _, l := range st.Leases6 {
		err := errors.New("dhcpv6: restored lease: IPv6 is off here")
		if a.DHCPv6 != nil {
			err = a.DHCPv6.RestoreLease(l.DUID, l.IAID, l.Addr, now.Add(l.Remaining))
		}
		if err != nil {
			problem(&a.migStats.RefusedLeases, err)
			continue
		}
		a.migStats.RestoredLeases.Add(1)
		sum.Leases++
	}
	for _, f := range st.Forwards {
		pf := forward.PortForward{Proto: f.Proto, Host: f.Host, Path: f.Path, Guest: netip.AddrPortFrom(a.cfg.IPv4.Guest, f.GuestPort)}
		if f.Guest != "" {
			// Another process's selector: checked as an API request's.
			sel, err := config.ParseGuestSelector(f.Guest)
			if err != nil {
				problem(&a.migStats.RefusedForwards, fmt.Errorf("forward %s: %w", pf, err))
				continue
			}
			pf.Select = sel.String()
		}
		if f.Proto == "unix" {
			// Created here as at run time: in this vunet's
			// --unix-forward-dir only.
			if err := a.runtimeUnixPath("unix forward", f.Path); err != nil {
				problem(&a.migStats.RefusedForwards, fmt.Errorf("forward %s: %w", pf, err))
				continue
			}
		}
		switch err := a.restoreForward(pf); {
		case err == nil:
			sum.Forwards++
		case errors.Is(err, errPending):
			sum.Pending++
		default:
			problem(&a.migStats.RefusedForwards, err)
		}
	}
	for _, e := range st.Exposes {
		switch err := a.restoreExpose(forward.Expose{Port: e.Port, Path: e.Path}); {
		case err == nil:
			sum.Exposes++
		default:
			problem(&a.migStats.RefusedExposes, err)
		}
	}
	flows := make([]forward.UDPFlowState, 0, len(st.UDPFlows))
	for _, f := range st.UDPFlows {
		flows = append(flows, forward.UDPFlowState{Guest: f.Guest, Remote: f.Remote, HostPort: f.HostPort, Idle: f.Idle})
	}
	n := a.Forward.RestoreUDPPorts(flows)
	a.migStats.RestoredUDP.Add(uint64(n))
	sum.UDPFlows = n
	if len(st.TCPFlows) > 0 {
		tcp := make([]forward.TCPFlowState, 0, len(st.TCPFlows))
		for _, f := range st.TCPFlows {
			tcp = append(tcp, tcpFromState(f))
		}
		sum.TCP = a.Forward.RestoreTCP(tcp)
		if lost := len(tcp) - sum.TCP; lost > 0 && len(sum.Problems) < 32 {
			// Counted by reason in vunet_forward_tcp_restores_total.
			sum.Problems = append(sum.Problems, fmt.Sprintf("tcp: %d of %d connections not restored (reset)", lost, len(tcp)))
		}
	}
	a.migStats.Loads.Add(1)
	a.log.Info("device state loaded", "saved_at", st.SavedAt, "leases", sum.Leases, "forwards", sum.Forwards,
		"forwards_pending", sum.Pending, "exposes", sum.Exposes, "udp_flows", n, "tcp_connections", sum.TCP, "problems", len(sum.Problems))
	return sum, nil
}

// deviceState is the appliance as the vhost-user DEVICE_STATE back-end.
type deviceState struct{ a *Appliance }

func (d deviceState) SaveState() ([]byte, error) { return d.a.SaveState() }

func (d deviceState) LoadState(b []byte) error {
	_, err := d.a.LoadState(b)
	return err
}

// errPending says a forward waits for its host port in the background.
var errPending = errors.New("host port in use; retrying")

// restoreForward starts a carried-over forward, unless the same one runs
// already (the destination was started with it). A host port in use is
// retried in the background.
func (a *Appliance) restoreForward(pf forward.PortForward) error {
	for _, cur := range a.Forward.ListPortForwards() {
		if keyOf(cur) == keyOf(pf) {
			if cur.Guest.Port() == pf.Guest.Port() && cur.Select == pf.Select {
				return nil
			}
			if cur.Select != pf.Select {
				return fmt.Errorf("forward %s: this vunet forwards %s to guest %q", pf, pf.Host, cur.Select)
			}
			return fmt.Errorf("forward %s: this vunet forwards %s to guest port %d", pf, pf.Host, cur.Guest.Port())
		}
	}
	k := keyOf(pf)
	if !a.runtime.wait(k, true) {
		return errPending // a retry of an earlier load is on it
	}
	err := a.addRuntimeForward(pf)
	if !errors.Is(err, syscall.EADDRINUSE) {
		a.runtime.wait(k, false)
		return err
	}
	a.migStats.PendingForwards.Add(1)
	started := a.goBackground(func() {
		defer a.runtime.wait(k, false)
		defer a.migStats.PendingForwards.Add(-1)
		t := time.NewTicker(forwardRetryEvery)
		defer t.Stop()
		deadline := time.Now().Add(forwardRetryFor)
		for {
			select {
			case <-a.stop:
				return
			case <-t.C:
			}
			err := a.addRuntimeForward(pf)
			if err == nil {
				return
			}
			if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
				a.migStats.RefusedForwards.Add(1)
				a.log.Warn("device state: carried-over port forward not restored", "forward", pf.String(), "err", err)
				return
			}
		}
	})
	if !started {
		a.migStats.PendingForwards.Add(-1)
		a.runtime.wait(k, false)
		return fmt.Errorf("forward %s: vunet is shutting down", pf)
	}
	return errPending
}

// restoreExpose starts a carried-over expose under the same rules as one
// added over the API, unless this vunet exposes the port to the same
// socket already (it was started with it).
func (a *Appliance) restoreExpose(e forward.Expose) error {
	for _, cur := range a.Forward.Exposes() {
		if cur.Port != e.Port {
			continue
		}
		if cur == e {
			return nil
		}
		return fmt.Errorf("expose %s: this vunet exposes gateway port %d to unix:%s", e, e.Port, cur.Path)
	}
	if _, err := a.AddExpose(api.Expose{GatewayPort: e.Port, Path: e.Path}); err != nil {
		return fmt.Errorf("expose %s: %w", e, err)
	}
	a.migStats.RestoredExposes.Add(1)
	a.log.Info("gateway expose restored from the device state", "expose", e.String())
	return nil
}

// goBackground runs f in a goroutine that Close waits for, unless Close
// has begun.
func (a *Appliance) goBackground(f func()) bool {
	a.bgMu.Lock()
	defer a.bgMu.Unlock()
	if a.bgDone {
		return false
	}
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		f()
	}()
	return true
}

// stopBackground ends background work and waits for it (a closer).
func (a *Appliance) stopBackground() {
	a.bgMu.Lock()
	if !a.bgDone {
		a.bgDone = true
		close(a.stop)
	}
	a.bgMu.Unlock()
	a.bg.Wait()
}

// addRuntimeForward starts pf and marks it as one that moves with the
// guest.
func (a *Appliance) addRuntimeForward(pf forward.PortForward) error {
	got, err := a.Forward.AddPortForward(pf)
	if err != nil {
		return err
	}
	a.runtime.set(keyOf(got), true)
	a.migStats.RestoredForwards.Add(1)
	a.log.Info("port forward restored from the device state", "forward", got.String())
	return nil
}

// tcpToState and tcpFromState convert a moved connection to and from the
// device state's form.
func tcpToState(f forward.TCPFlowState) devstate.TCPFlow {
	g, h := f.Guest, f.Host
	var mac [6]byte
	copy(mac[:], g.GuestMAC)
	return devstate.TCPFlow{
		Guest: g.Remote, Remote: g.Local, GuestMAC: mac,
		SndNxt: g.SndNxt, RcvNxt: g.RcvNxt, SndWnd: g.SndWnd, RcvWnd: g.RcvWnd,
		SndWndScale: g.SndWndScale, RcvWndScale: g.RcvWndScale, MaxPayload: g.MaxPayload,
		SACK: g.SACK, Timestamps: g.Timestamps, TSVal: g.TSVal, RecentTS: g.RecentTS,
		Host: devstate.TCPHost{
			Local: h.Local, Remote: h.Remote, SndSeq: h.SndSeq, RcvSeq: h.RcvSeq, MSS: h.MSS,
			SACK: h.SACK, Timestamps: h.Timestamps, WScale: h.WScale, SndWScale: h.SndWScale, RcvWScale: h.RcvWScale,
			TSVal:    h.TSVal,
			Window:   [5]uint32{h.Window.SndWL1, h.Window.SndWnd, h.Window.MaxWindow, h.Window.RcvWnd, h.Window.RcvWup},
			SndQueue: h.SndQueue, RcvQueue: h.RcvQueue,
		},
	}
}

func tcpFromState(f devstate.TCPFlow) forward.TCPFlowState {
	h := f.Host
	var mac tcpip.LinkAddress
	if f.GuestMAC != ([6]byte{}) {
		mac = tcpip.LinkAddress(f.GuestMAC[:])
	}
	return forward.TCPFlowState{
		Guest: netstack.TCPConnState{
			Local: f.Remote, Remote: f.Guest, GuestMAC: mac,
			SndNxt: f.SndNxt, RcvNxt: f.RcvNxt, SndWnd: f.SndWnd, RcvWnd: f.RcvWnd,
			SndWndScale: f.SndWndScale, RcvWndScale: f.RcvWndScale, MaxPayload: f.MaxPayload,
			SACK: f.SACK, Timestamps: f.Timestamps, TSVal: f.TSVal, RecentTS: f.RecentTS,
		},
		Host: tcprepair.State{
			Local: h.Local, Remote: h.Remote, SndSeq: h.SndSeq, RcvSeq: h.RcvSeq, MSS: h.MSS,
			SACK: h.SACK, Timestamps: h.Timestamps, WScale: h.WScale, SndWScale: h.SndWScale, RcvWScale: h.RcvWScale,
			TSVal:    h.TSVal,
			Window:   tcprepair.Window{SndWL1: h.Window[0], SndWnd: h.Window[1], MaxWindow: h.Window[2], RcvWnd: h.Window[3], RcvWup: h.Window[4]},
			SndQueue: h.SndQueue, RcvQueue: h.RcvQueue,
		},
	}
}
