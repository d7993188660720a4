package appliance

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/internal/tcprepair"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestStateMoves plays a migration between two appliances on one host:
// the source's lease and its runtime forward (not its configured one)
// travel in the device state; the destination takes the lease at once and
// the forward's host port as soon as the source lets it go, and the
// forward then reaches the destination's guest.
func TestStateMoves(t *testing.T) {
	newApp := func() (*Appliance, *config.Config) {
		cfg := testConfig(t, t.TempDir())
		cfg.Forwards = []config.Forward{{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 80}}
		a, err := New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		return a, cfg
	}
	src, _ := newApp()
	stopSrc, _ := start(t, src)
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	lease := netip.MustParseAddr("10.0.2.16")
	if err := src.DHCP.RestoreLease(mac, lease, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	rt, err := src.AddForward(api.Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 22})
	if err != nil {
		t.Fatal(err)
	}
	blob, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	st, err := devstate.Decode(blob)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Leases4) != 1 || st.Leases4[0].Addr != lease || len(st.Forwards) != 1 || st.Forwards[0].Host != rt.Host || st.Forwards[0].GuestPort != 22 {
		t.Fatalf("saved state %+v (want the lease and only the runtime forward %s)", st, rt.Host)
	}

	dst, dcfg := newApp()
	start(t, dst)
	sum, err := dst.LoadState(blob)
	if err != nil {
		t.Fatal(err)
	}
	// The source still listens on the forward's port.
	if sum.Leases != 1 || sum.Forwards != 0 || sum.Pending != 1 || len(sum.Problems) != 0 {
		t.Fatalf("summary %+v, want the lease restored and the forward pending", sum)
	}
	if ls := dst.DHCP.Leases(); len(ls) != 1 || ls[0].Addr != lease || ls[0].MAC != mac.String() {
		t.Errorf("destination leases %+v", ls)
	}
	// Loading again while the forward waits starts no second retry.
	if sum, err := dst.LoadState(blob); err != nil || sum.Pending != 1 {
		t.Fatalf("second load while pending: %+v, %v", sum, err)
	}
	// The source vunet exits.
	if err := stopSrc(); err != nil {
		t.Fatal(err)
	}
	src.Close()
	g := guestOn(t, dcfg.Socket)
	ln := guestListener(t, g)
	deadline := time.Now().Add(10 * time.Second)
	for !hasForward(dst, rt.Host) {
		if time.Now().After(deadline) {
			t.Fatalf("the runtime forward %s did not come up on the destination: %+v", rt.Host, dst.Forwards())
		}
		time.Sleep(50 * time.Millisecond)
	}
	c, err := net.DialTimeout("tcp", rt.Host.String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	gc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if at := netstacktest.AddrOf(gc.LocalAddr()); at.Port() != 22 {
		t.Errorf("forward reached guest port %d", at.Port())
	}
	gc.Close()
	// The restored forward moves on again with the next migration.
	if b, err := dst.SaveState(); err != nil {
		t.Fatal(err)
	} else if st2, _ := devstate.Decode(b); st2 == nil || len(st2.Forwards) != 1 {
		t.Errorf("the restored forward is not in the destination's state: %+v", st2)
	}
	// A second load finds everything in place.
	if sum, err := dst.LoadState(blob); err != nil || sum.Pending != 0 || len(sum.Problems) != 0 {
		t.Errorf("second load: %+v, %v", sum, err)
	}
	if got, refused := dst.migStats.RestoredForwards.Load(), dst.migStats.RefusedForwards.Load(); got != 1 || refused != 0 {
		t.Errorf("restored forwards %d, refused %d; want 1 and 0", got, refused)
	}

	// A state that does not decode changes nothing and is counted.
	bad := append([]byte(nil), blob...)
	bad[len(bad)-1] ^= 0xff
	if _, err := dst.LoadState(bad); !errors.Is(err, api.ErrInvalid) || !errors.Is(err, devstate.ErrCorrupt) {
		t.Errorf("corrupt state: %v", err)
	}
	if dst.migStats.Invalid.Load() != 1 || dst.migStats.Loads.Load() != 3 {
		t.Errorf("invalid %d loads %d", dst.migStats.Invalid.Load(), dst.migStats.Loads.Load())
	}
}

func hasForward(a *Appliance, host netip.AddrPort) bool {
	for _, f := range a.Forwards() {
		if f.Host == host {
			return true
		}
	}
	return false
}

// TestStateOverVhostUser moves the state the way QEMU 10 does, through
// the vhost-user DEVICE_STATE pipes of two mock frontends.
func TestStateOverVhostUser(t *testing.T) {
	newApp := func() (*Appliance, *vhosttest.Frontend) {
		cfg := testConfig(t, t.TempDir())
		cfg.IPv6.Enable = true
		cfg.IPv6.DHCPv6 = config.DHCPv6Stateful
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		a, err := New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(a.Close)
		start(t, a)
		f, err := vhosttest.Dial(cfg.Socket, vhosttest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		if err := f.Setup(^uint64(0)); err != nil {
			t.Fatal(err)
		}
		return a, f
	}
	src, sf := newApp()
	dst, df := newApp()
	mac := net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	if err := src.DHCP.RestoreLease(mac, netip.MustParseAddr("10.0.2.15"), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	duid := []byte{0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56}
	addr6 := netip.MustParseAddr("fd00::123")
	if err := src.DHCPv6.RestoreLease(duid, 7, addr6, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	blob, err := sf.SaveState(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := df.LoadState(blob); err != nil || c != 0 {
		t.Fatalf("load: CHECK_DEVICE_STATE %d, %v", c, err)
	}
	if ls := dst.DHCP.Leases(); len(ls) != 1 || ls[0].MAC != mac.String() {
		t.Errorf("destination leases %+v", ls)
	}
	if ls := dst.DHCPv6.Leases(); len(ls) != 1 || ls[0].Addr != addr6 || ls[0].IAID != 7 || ls[0].MAC != mac.String() {
		t.Errorf("destination DHCPv6 leases %+v", ls)
	}
	// A corrupt state fails CHECK_DEVICE_STATE, so QEMU fails the
	// migration instead of running the guest on a half-restored vunet.
	blob[len(blob)/2] ^= 1
	if c, err := df.LoadState(blob); err != nil || c == 0 {
		t.Errorf("corrupt state: CHECK_DEVICE_STATE %d, %v", c, err)
	}
	if dst.migStats.Invalid.Load() != 1 || src.migStats.Saves.Load() != 1 {
		t.Errorf("invalid %d saves %d", dst.migStats.Invalid.Load(), src.migStats.Saves.Load())
	}
}

// TestTCPStateConversion: a moved connection survives the device state's
// form unchanged (the guest's socket is the stack's remote end).
func TestTCPStateConversion(t *testing.T) {
	in := forward.TCPFlowState{
		Guest: netstack.TCPConnState{
			Local: netip.MustParseAddrPort("10.0.2.2:8080"), Remote: netip.MustParseAddrPort("10.0.2.15:41000"),
			GuestMAC: tcpip.LinkAddress("\x52\x54\x00\x12\x34\x56"),
			SndNxt:   1, RcvNxt: 2, SndWnd: 3, RcvWnd: 4, SndWndScale: 5, RcvWndScale: 6, MaxPayload: 1448,
			SACK: true, Timestamps: true, TSVal: 7, RecentTS: 8,
		},
		Host: tcprepair.State{
			Local: netip.MustParseAddrPort("127.0.0.1:50000"), Remote: netip.MustParseAddrPort("127.0.0.1:8080"),
			SndSeq: 9, RcvSeq: 10, SndQueue: []byte("s"), RcvQueue: []byte("r"), MSS: 65483,
			Timestamps: true, SACK: true, WScale: true, SndWScale: 7, RcvWScale: 8, TSVal: 11,
			Window: tcprepair.Window{SndWL1: 12, SndWnd: 13, MaxWindow: 14, RcvWnd: 15, RcvWup: 16},
		},
	}
	b, err := devstate.Encode(&devstate.State{TCPFlows: []devstate.TCPFlow{tcpToState(in)}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := devstate.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if out := tcpFromState(st.TCPFlows[0]); !reflect.DeepEqual(in, out) {
		t.Fatalf("got  %+v\nwant %+v", out, in)
	}
}
