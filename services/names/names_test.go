package names

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestCanonical(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"vm1", "vm1"},
		{"VM-One", "vm-one"},
		{"vm1.example.com", "vm1"},
		{"vm1.vunet.internal.", "vm1"},
		{"1", "1"},
		{"123abc", "123abc"},
		{strings.Repeat("a", 63), strings.Repeat("a", 63)},
	} {
		got, err := Canonical(c.in)
		if err != nil || got != c.want {
			t.Errorf("Canonical(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", ".", ".vm1", "-vm", "vm-", "vm_1", "vm 1", "vm\x00", "vm\xff", "é",
		strings.Repeat("a", 64), strings.Repeat("a.", 200), "10.0.2.15", "192.168.1.1", "*"} {
		if got, err := Canonical(bad); err == nil {
			t.Errorf("Canonical(%q) = %q, nil; want an error", bad, got)
		}
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func mac(b byte) net.HardwareAddr { return net.HardwareAddr{0x52, 0x54, 0, 0, 0, b} }

func newTest(t *testing.T) (*Registry, *clock) {
	c := &clock{t: time.Unix(1e9, 0)}
	r := New(Options{Now: c.now, Reserved: []string{"host"},
		Addrs6: func(m net.HardwareAddr) []netip.Addr {
			return []netip.Addr{netip.AddrFrom16([16]byte{0: 0xfd, 15: m[5]})}
		}})
	return r, c
}

func TestBindLookupRelease(t *testing.T) {
	r, c := newTest(t)
	a1 := netip.MustParseAddr("10.0.2.15")
	r.Bind(mac(1), "VM1", a1, c.t.Add(time.Hour))
	g, ok := r.Lookup("vm1")
	if !ok || g.Addr4 != a1 || g.MAC.String() != mac(1).String() || g.FQDN() != "vm1.vunet.internal" {
		t.Fatalf("Lookup(vm1) = %+v, %v", g, ok)
	}
	if want := netip.MustParseAddr("fd00::1"); !slices.Equal(g.Addrs6, []netip.Addr{want}) {
		t.Errorf("Addrs6 = %v, want [%s]", g.Addrs6, want)
	}
	if g, ok := r.LookupAddr(a1); !ok || g.Name != "vm1" {
		t.Errorf("LookupAddr(%s) = %+v, %v", a1, g, ok)
	}
	if g, ok := r.LookupAddr(netip.MustParseAddr("fd00::1")); !ok || g.Name != "vm1" {
		t.Errorf("LookupAddr(fd00::1) = %+v, %v", g, ok)
	}
	if r.Stats().Bound.Load() != 1 || r.Stats().Active() != 1 {
		t.Errorf("bound %d active %d, want 1 1", r.Stats().Bound.Load(), r.Stats().Active())
	}
	// A renewal under the same name is not a new binding.
	r.Bind(mac(1), "vm1", a1, c.t.Add(2*time.Hour))
	if r.Stats().Bound.Load() != 1 {
		t.Errorf("renewal counted as a binding: %d", r.Stats().Bound.Load())
	}
	r.Release(mac(1))
	if _, ok := r.Lookup("vm1"); ok {
		t.Error("vm1 still resolves after release")
	}
	if r.NameOf(mac(1)) != "" {
		t.Error("NameOf after release")
	}
}

func TestExpiry(t *testing.T) {
	r, c := newTest(t)
	r.Bind(mac(1), "vm1", netip.MustParseAddr("10.0.2.15"), c.t.Add(time.Minute))
	c.t = c.t.Add(59 * time.Second)
	if _, ok := r.Lookup("vm1"); !ok {
		t.Fatal("vm1 gone before its lease expired")
	}
	c.t = c.t.Add(time.Second)
	if _, ok := r.Lookup("vm1"); ok {
		t.Fatal("vm1 resolves after its lease expired")
	}
	// Once expired, another guest may take the name.
	r.Bind(mac(2), "vm1", netip.MustParseAddr("10.0.2.16"), c.t.Add(time.Hour))
	if g, ok := r.Lookup("vm1"); !ok || g.MAC.String() != mac(2).String() {
		t.Errorf("vm1 after expiry = %+v, %v; want the second guest", g, ok)
	}
}

func TestFirstHolderKeepsName(t *testing.T) {
	r, c := newTest(t)
	a1, a2 := netip.MustParseAddr("10.0.2.15"), netip.MustParseAddr("10.0.2.16")
	r.Bind(mac(1), "vm", a1, c.t.Add(time.Hour))
	r.Bind(mac(2), "VM", a2, c.t.Add(time.Hour))
	if g, _ := r.Lookup("vm"); g.Addr4 != a1 {
		t.Errorf("vm = %s, want the first holder's %s", g.Addr4, a1)
	}
	if r.Stats().Taken.Load() != 1 {
		t.Errorf("taken = %d, want 1", r.Stats().Taken.Load())
	}
	if r.NameOf(mac(2)) != "" {
		t.Error("the second claimant got a name")
	}
	// Reserved names are refused the same way.
	r.Bind(mac(3), "host", netip.MustParseAddr("10.0.2.17"), c.t.Add(time.Hour))
	if _, ok := r.Lookup("host"); ok || r.Stats().Taken.Load() != 2 {
		t.Errorf("reserved name bound (taken %d)", r.Stats().Taken.Load())
	}
	// Once the holder leaves, the next claim wins.
	r.Release(mac(1))
	r.Bind(mac(2), "vm", a2, c.t.Add(time.Hour))
	if g, _ := r.Lookup("vm"); g.Addr4 != a2 {
		t.Errorf("vm after release = %s, want %s", g.Addr4, a2)
	}
}

func TestRenameAndInvalid(t *testing.T) {
	r, c := newTest(t)
	a1 := netip.MustParseAddr("10.0.2.15")
	r.Bind(mac(1), "old", a1, c.t.Add(time.Hour))
	r.Bind(mac(1), "new", a1, c.t.Add(time.Hour))
	if _, ok := r.Lookup("old"); ok {
		t.Error("old name kept after rename")
	}
	if _, ok := r.Lookup("new"); !ok {
		t.Error("new name not bound")
	}
	// A bad name is refused, counted, and the guest asked for another name,
	// so its old one goes.
	r.Bind(mac(1), "bad_name", a1, c.t.Add(time.Hour))
	if r.Stats().Invalid.Load() != 1 {
		t.Errorf("invalid = %d, want 1", r.Stats().Invalid.Load())
	}
	if _, ok := r.Lookup("bad_name"); ok {
		t.Error("bad name bound")
	}
	if _, ok := r.Lookup("new"); ok {
		t.Error("old name kept after an invalid rename")
	}
	// No name at all drops it too.
	r.Bind(mac(1), "again", a1, c.t.Add(time.Hour))
	r.Bind(mac(1), "", a1, c.t.Add(time.Hour))
	if r.NameOf(mac(1)) != "" {
		t.Error("name kept when the client stopped sending one")
	}
}

func TestBounded(t *testing.T) {
	r, c := newTest(t)
	for i := range MaxNames + 10 {
		m := net.HardwareAddr{2, 0, 0, 0, byte(i >> 8), byte(i)}
		r.Bind(m, "g"+strings.Repeat("x", i%5)+string(rune('a'+i%26))+itoa(i), netip.Addr{}, c.t.Add(time.Hour))
	}
	if n := r.Stats().Active(); n != MaxNames {
		t.Errorf("active = %d, want %d", n, MaxNames)
	}
	if r.Stats().Full.Load() != 10 {
		t.Errorf("full = %d, want 10", r.Stats().Full.Load())
	}
}

func itoa(i int) string {
	b := []byte{}
	for {
		b = append([]byte{byte('0' + i%10)}, b...)
		i /= 10
		if i == 0 {
			return string(b)
		}
	}
}

func FuzzBind(f *testing.F) {
	for _, s := range []string{"vm1", "VM1.example.com", "-x", "a..b", "\x00", strings.Repeat("z", 300)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		r, c := newTest(t)
		r.Bind(mac(1), raw, netip.MustParseAddr("10.0.2.15"), c.t.Add(time.Hour))
		name := r.NameOf(mac(1))
		if name == "" {
			return
		}
		if len(name) > MaxLabel || name != strings.ToLower(name) || strings.Contains(name, ".") {
			t.Fatalf("bound %q from %q", name, raw)
		}
		if _, err := Canonical(name); err != nil {
			t.Fatalf("bound name %q does not pass Canonical: %v", name, err)
		}
	})
}
