package dns

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"

	"github.com/vunet/vunet/services/internal/gnet"
	"github.com/vunet/vunet/services/internal/testnet"
)

// upstream runs a miekg/dns server on 127.0.0.1 (UDP and TCP, same port)
// with a fixed zone. The addresses in it are test data only; nothing is sent
// to them.
func upstream(t *testing.T) netip.AddrPort {
	t.Helper()
	mux := mdns.NewServeMux()
	mux.HandleFunc(".", func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		rr := func(s string) {
			x, err := mdns.NewRR(s)
			if err != nil {
				t.Errorf("NewRR(%q): %v", s, err)
				return
			}
			m.Answer = append(m.Answer, x)
		}
		switch strings.ToLower(q.Name) + mdns.TypeToString[q.Qtype] {
		case "example.test.A":
			rr("example.test. 300 IN A 192.0.2.10")
		case "example.test.AAAA":
			rr("example.test. 300 IN AAAA 2001:db8::10")
		case "example.test.TXT":
			rr(`example.test. 300 IN TXT "hello world"`)
		case "_sip._tcp.example.test.SRV":
			rr("_sip._tcp.example.test. 300 IN SRV 10 20 5060 sip.example.test.")
		case "10.2.0.192.in-addr.arpa.PTR":
			rr("10.2.0.192.in-addr.arpa. 300 IN PTR example.test.")
		case "example.test.MX":
			rr("example.test. 300 IN MX 10 mail.example.test.")
		case "big.example.test.TXT":
			for i := range 40 {
				rr("big.example.test. 300 IN TXT \"" + strings.Repeat(string(rune('a'+i%26)), 200) + "\"")
			}
		case "slow.example.test.A":
			return // never answer: the forwarder must time out
		default:
			m.Rcode = mdns.RcodeNameError
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			size := mdns.MinMsgSize
			if o := r.IsEdns0(); o != nil {
				size = int(o.UDPSize())
			}
			m.Truncate(size)
		}
		w.WriteMsg(m)
	})
	var pc net.PacketConn
	var ln net.Listener
	for range 20 {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		pc = nil
	}
	if pc == nil {
		t.Fatal("no free port pair on 127.0.0.1")
	}
	us := &mdns.Server{PacketConn: pc, Handler: mux}
	ts := &mdns.Server{Listener: ln, Handler: mux}
	go us.ActivateAndServe()
	go ts.ActivateAndServe()
	t.Cleanup(func() { us.Shutdown(); ts.Shutdown() })
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

// blackhole is an upstream that reads queries and never answers.
func blackhole(t *testing.T) netip.AddrPort {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

type env struct {
	t   *testing.T
	p   *testnet.Pair
	srv *Server
}

func setup(t *testing.T, opts Options) *env {
	t.Helper()
	p := testnet.New(t, testnet.GuestOptions{})
	p.ConfigureGuest(t, netip.MustParsePrefix("10.0.2.15/24"))
	p.ConfigureGuest(t, netip.MustParsePrefix("fd00::15/64"))
	opts.Stack, opts.NIC, opts.Logger = p.Server, testnet.NIC, testnet.Logger(t)
	if opts.Static == nil {
		opts.Static = map[string][]netip.Addr{
			"host.vunet.internal":    {netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("fd00::2")},
			"v4only.vunet.internal.": {netip.MustParseAddr("10.0.2.2")},
		}
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	testnet.Serve(t, s)
	return &env{t: t, p: p, srv: s}
}

// query sends one query from the guest stack over UDP or TCP to server.
func (e *env) query(server netip.Addr, tcp bool, name string, qtype uint16, edns bool) *mdns.Msg {
	e.t.Helper()
	r, err := e.tryQuery(server, tcp, name, qtype, edns)
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

// tryQuery is query without t.Fatal, usable from other goroutines.
func (e *env) tryQuery(server netip.Addr, tcp bool, name string, qtype uint16, edns bool) (*mdns.Msg, error) {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	if edns {
		m.SetEdns0(1232, false)
	}
	proto := ipv4.ProtocolNumber
	if server.Is6() {
		proto = ipv6.ProtocolNumber
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var c net.Conn
	var err error
	raddr := gnet.FullAddr(testnet.NIC, netip.AddrPortFrom(server, Port))
	if tcp {
		c, err = gonet.DialContextTCP(ctx, e.p.Guest, raddr, proto)
	} else {
		c, err = gonet.DialUDP(e.p.Guest, nil, &raddr, proto)
	}
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", server, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	co := &mdns.Conn{Conn: c, UDPSize: 65535}
	if err := co.WriteMsg(m); err != nil {
		return nil, fmt.Errorf("write query: %w", err)
	}
	r, err := co.ReadMsg()
	if err != nil {
		return nil, fmt.Errorf("read answer for %s %s (tcp=%v): %w", name, mdns.TypeToString[qtype], tcp, err)
	}
	if r.Id != m.Id {
		return nil, fmt.Errorf("answer id %d, want %d", r.Id, m.Id)
	}
	return r, nil
}

func answers(r *mdns.Msg) []string {
	var out []string
	for _, rr := range r.Answer {
		f := strings.SplitN(rr.String(), "\t", 5)
		out = append(out, f[len(f)-1])
	}
	return out
}

func TestForwarding(t *testing.T) {
	up := upstream(t)
	e := setup(t, Options{Upstreams: []netip.AddrPort{up}})
	v4, v6 := testnet.DNS4, testnet.DNS6
	cases := []struct {
		name  string
		qtype uint16
		want  []string
		rcode int
	}{
		{"example.test.", mdns.TypeA, []string{"192.0.2.10"}, mdns.RcodeSuccess},
		{"example.test.", mdns.TypeAAAA, []string{"2001:db8::10"}, mdns.RcodeSuccess},
		{"example.test.", mdns.TypeTXT, []string{`"hello world"`}, mdns.RcodeSuccess},
		{"example.test.", mdns.TypeMX, []string{"10 mail.example.test."}, mdns.RcodeSuccess},
		{"_sip._tcp.example.test.", mdns.TypeSRV, []string{"10 20 5060 sip.example.test."}, mdns.RcodeSuccess},
		{"10.2.0.192.in-addr.arpa.", mdns.TypePTR, []string{"example.test."}, mdns.RcodeSuccess},
		{"missing.test.", mdns.TypeA, nil, mdns.RcodeNameError},
	}
	for _, server := range []netip.Addr{v4, v6} {
		for _, tcp := range []bool{false, true} {
			for _, tc := range cases {
				r := e.query(server, tcp, tc.name, tc.qtype, false)
				if r.Rcode != tc.rcode || !slices.Equal(answers(r), tc.want) {
					t.Errorf("%s %s via %s tcp=%v: rcode %s answers %q, want %s %q", tc.name, mdns.TypeToString[tc.qtype],
						server, tcp, mdns.RcodeToString[r.Rcode], answers(r), mdns.RcodeToString[tc.rcode], tc.want)
				}
			}
		}
	}
	st := e.srv.Stats()
	if st.Forwarded.Load() != uint64(4*len(cases)) || st.TCPQueries.Load() != uint64(2*len(cases)) {
		t.Errorf("stats = %+v", st)
	}
}

func TestTruncationAndTCPFallback(t *testing.T) {
	up := upstream(t)
	e := setup(t, Options{Upstreams: []netip.AddrPort{up}})
	// A 512-byte guest gets a truncated answer and retries over TCP.
	r := e.query(testnet.DNS4, false, "big.example.test.", mdns.TypeTXT, false)
	if !r.Truncated {
		t.Errorf("big answer over plain UDP not truncated (%d answers)", len(r.Answer))
	}
	r = e.query(testnet.DNS4, true, "big.example.test.", mdns.TypeTXT, false)
	if r.Truncated || len(r.Answer) != 40 {
		t.Errorf("over TCP: truncated=%v answers=%d, want 40", r.Truncated, len(r.Answer))
	}
	// An EDNS guest (1232 bytes) still cannot take ~8 KiB: truncated too.
	r = e.query(testnet.DNS4, false, "big.example.test.", mdns.TypeTXT, true)
	if !r.Truncated {
		t.Errorf("big answer over EDNS UDP not truncated")
	}
	st := e.srv.Stats()
	if st.TCPFallbacks.Load() < 2 || st.Truncated.Load() < 2 {
		t.Errorf("stats = %+v: want upstream TCP fallbacks and guest truncation", st)
	}
}

func TestStatic(t *testing.T) {
	e := setup(t, Options{}) // no upstream: static only
	for _, tcp := range []bool{false, true} {
		r := e.query(testnet.DNS4, tcp, "HOST.vunet.internal.", mdns.TypeA, false)
		if !r.Authoritative || !slices.Equal(answers(r), []string{"10.0.2.2"}) {
			t.Errorf("static A (tcp=%v): aa=%v %q", tcp, r.Authoritative, answers(r))
		}
	}
	r := e.query(testnet.DNS6, false, "host.vunet.internal.", mdns.TypeAAAA, true)
	if !slices.Equal(answers(r), []string{"fd00::2"}) || r.IsEdns0() == nil {
		t.Errorf("static AAAA: %q edns=%v", answers(r), r.IsEdns0() != nil)
	}
	// NODATA: the name exists, the type does not.
	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"v4only.vunet.internal.", mdns.TypeAAAA}, {"host.vunet.internal.", mdns.TypeMX}, {"host.vunet.internal.", mdns.TypeTXT}} {
		r := e.query(testnet.DNS4, false, q.name, q.qtype, false)
		if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
			t.Errorf("%s %s: rcode %s answers %q, want NODATA", q.name, mdns.TypeToString[q.qtype], mdns.RcodeToString[r.Rcode], answers(r))
		}
	}
	// NXDOMAIN below a static name.
	if r := e.query(testnet.DNS4, false, "x.host.vunet.internal.", mdns.TypeA, false); r.Rcode != mdns.RcodeNameError {
		t.Errorf("below static name: rcode %s", mdns.RcodeToString[r.Rcode])
	}
	// PTR of a static address.
	if r := e.query(testnet.DNS4, false, "2.2.0.10.in-addr.arpa.", mdns.TypePTR, false); !slices.Equal(answers(r), []string{"host.vunet.internal.", "v4only.vunet.internal."}) &&
		!slices.Equal(answers(r), []string{"v4only.vunet.internal.", "host.vunet.internal."}) {
		t.Errorf("static PTR: %q", answers(r))
	}
	// Without upstreams everything else is SERVFAIL.
	if r := e.query(testnet.DNS4, false, "example.test.", mdns.TypeA, false); r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("no upstream: rcode %s", mdns.RcodeToString[r.Rcode])
	}
}

func TestUpstreamTimeoutAndRetry(t *testing.T) {
	up := upstream(t)
	dead := blackhole(t)
	e := setup(t, Options{Upstreams: []netip.AddrPort{dead, up}, Timeout: 300 * time.Millisecond})
	start := time.Now()
	r := e.query(testnet.DNS4, false, "example.test.", mdns.TypeA, false)
	if !slices.Equal(answers(r), []string{"192.0.2.10"}) {
		t.Errorf("retry to second upstream: %q", answers(r))
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("answered in %s, before the first upstream could time out", d)
	}
	// The good upstream never answers this one either: SERVFAIL in bounded time.
	start = time.Now()
	r = e.query(testnet.DNS4, false, "slow.example.test.", mdns.TypeA, false)
	if r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("all upstreams timing out: rcode %s", mdns.RcodeToString[r.Rcode])
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("SERVFAIL took %s", d)
	}
	if st := e.srv.Stats(); st.Timeouts.Load() < 3 || st.ServFail.Load() != 1 {
		t.Errorf("stats = %+v", st)
	}
}

func TestOverload(t *testing.T) {
	dead := blackhole(t)
	e := setup(t, Options{Upstreams: []netip.AddrPort{dead}, MaxInFlight: 1, Attempts: 1, Timeout: time.Second})
	first := make(chan *mdns.Msg, 1)
	go func() {
		r, err := e.tryQuery(testnet.DNS4, false, "a.example.test.", mdns.TypeA, false)
		if err != nil {
			t.Error(err)
			r = new(mdns.Msg)
			r.Rcode = mdns.RcodeServerFailure
		}
		first <- r
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	r := e.query(testnet.DNS4, false, "b.example.test.", mdns.TypeA, false)
	if r.Rcode != mdns.RcodeServerFailure || time.Since(start) > 500*time.Millisecond {
		t.Errorf("overloaded query: rcode %s after %s, want an immediate SERVFAIL", mdns.RcodeToString[r.Rcode], time.Since(start))
	}
	if r := <-first; r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("first query: rcode %s", mdns.RcodeToString[r.Rcode])
	}
	if st := e.srv.Stats(); st.Overloaded.Load() != 1 {
		t.Errorf("stats = %+v", st)
	}
}

func TestMalformed(t *testing.T) {
	s, err := New(Options{Logger: testnet.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	// Garbage gets FORMERR when it has a header, nothing otherwise.
	if r := s.answer(context.Background(), []byte{1, 2}, false); r != nil {
		t.Errorf("2-byte query answered")
	}
	bad := []byte{0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff}
	r := new(mdns.Msg)
	if err := r.Unpack(s.answer(context.Background(), bad, false)); err != nil || r.Rcode != mdns.RcodeFormatError || r.Id != 0xabcd {
		t.Errorf("malformed query: %v %v", r, err)
	}
	// Responses are never answered.
	resp := new(mdns.Msg)
	resp.SetQuestion("x.", mdns.TypeA)
	resp.Response = true
	b, _ := resp.Pack()
	if s.answer(context.Background(), b, false) != nil {
		t.Error("answered a response")
	}
}

func TestOptionsValidation(t *testing.T) {
	bad := []Options{
		{Upstreams: []netip.AddrPort{{}}},
		{Upstreams: []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:0")}},
		{Listen: []netip.Addr{netip.IPv4Unspecified()}},
		{Static: map[string][]netip.Addr{"bad..name": {netip.MustParseAddr("10.0.2.2")}}},
		{Static: map[string][]netip.Addr{"ok.name": {{}}}},
		{Timeout: -1},
		{Attempts: 100},
		{MaxInFlight: -1},
	}
	for i, o := range bad {
		if _, err := New(o); err == nil {
			t.Errorf("case %d: New succeeded", i)
		} else {
			t.Logf("case %d: %v", i, err)
		}
	}
}

func TestReadResolvConf(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "resolv.conf")
	os.WriteFile(p, []byte(`# comment
nameserver 127.0.0.53
nameserver ::1 ; trailing comment
nameserver fe80::1%eth0
nameserver not-an-address
nameserver 127.0.0.53
domain ignored.example
search corp.example. example.com
options edns0 trust-ad
`), 0o644)
	servers, search, err := ReadResolvConf(p)
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.53:53"), netip.MustParseAddrPort("[::1]:53"), netip.MustParseAddrPort("[fe80::1%eth0]:53")}
	if !slices.Equal(servers, want) {
		t.Errorf("servers = %v, want %v", servers, want)
	}
	if !slices.Equal(search, []string{"corp.example", "example.com"}) {
		t.Errorf("search = %q", search)
	}

	os.WriteFile(p, []byte("domain only.example\n"), 0o644)
	servers, search, err = ReadResolvConf(p)
	if err == nil || servers != nil || !slices.Equal(search, []string{"only.example"}) {
		t.Errorf("no nameservers: %v %v %v", servers, search, err)
	}
	if _, _, err := ReadResolvConf(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file: no error")
	}
}

// TestStaticDenied: the server never hands out a static address the egress
// policy denies; the rest of the name's addresses are still answered.
func TestStaticDenied(t *testing.T) {
	meta := netip.MustParseAddr("169.254.169.254")
	e := setup(t, Options{
		Static: map[string][]netip.Addr{
			"metadata.internal": {meta, netip.MustParseAddr("fd00:ec2::254")},
			"mixed.internal":    {meta, netip.MustParseAddr("192.0.2.1")},
		},
		StaticDenied: func(a netip.Addr) bool { return a == meta || a == netip.MustParseAddr("fd00:ec2::254") },
	})
	if r := e.query(testnet.DNS4, false, "metadata.internal.", mdns.TypeA, false); r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("denied A: rcode %s answers %q, want NODATA", mdns.RcodeToString[r.Rcode], answers(r))
	}
	if r := e.query(testnet.DNS4, false, "metadata.internal.", mdns.TypeAAAA, false); len(r.Answer) != 0 {
		t.Errorf("denied AAAA: answers %q", answers(r))
	}
	if r := e.query(testnet.DNS4, false, "mixed.internal.", mdns.TypeA, false); !slices.Equal(answers(r), []string{"192.0.2.1"}) {
		t.Errorf("mixed A: answers %q, want only 192.0.2.1", answers(r))
	}
	if st := e.srv.Stats(); st.StaticDenied.Load() != 3 {
		t.Errorf("StaticDenied = %d, want 3", st.StaticDenied.Load())
	}
}
