package dns

// Tests on the forwarder's limits and decisions that `make mutate` found
// unchecked; the mutant each kills is named next to it, and each was run
// once against that mutant by hand.

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// rcodeUpstream answers every query on 127.0.0.1 with rcode (and, for
// success, one A record), counting the queries it sees.
func rcodeUpstream(t *testing.T, rcode int, seen *atomic.Int32) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		seen.Add(1)
		m := new(mdns.Msg)
		m.SetRcode(r, rcode)
		if rcode == mdns.RcodeSuccess {
			rr, _ := mdns.NewRR(r.Question[0].Name + " 300 IN A 192.0.2.7")
			m.Answer = append(m.Answer, rr)
		}
		w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

func packQuery(t *testing.T, name string, qtype uint16) ([]byte, uint16) {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b, m.Id
}

// TestForwardSkipsRefusedAndServfail: an upstream that answers REFUSED or
// SERVFAIL is passed over for the next (mutants: != for either ==), and
// exactly Attempts upstream queries are made (mutant: <= Attempts).
func TestForwardSkipsRefusedAndServfail(t *testing.T) {
	for _, bad := range []int{mdns.RcodeRefused, mdns.RcodeServerFailure} {
		var badSeen, goodSeen atomic.Int32
		s, err := New(Options{Upstreams: []netip.AddrPort{rcodeUpstream(t, bad, &badSeen), rcodeUpstream(t, mdns.RcodeSuccess, &goodSeen)},
			Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		q, id := packQuery(t, "x.example.test.", mdns.TypeA)
		raw, err := s.forward(context.Background(), q, id)
		if err != nil {
			t.Fatalf("%s first: %v", mdns.RcodeToString[bad], err)
		}
		var r mdns.Msg
		if err := r.Unpack(raw); err != nil || r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 1 {
			t.Errorf("%s first: got rcode %s answers %d, want the second upstream's answer",
				mdns.RcodeToString[bad], mdns.RcodeToString[r.Rcode], len(r.Answer))
		}
		if badSeen.Load() != 1 || goodSeen.Load() != 1 {
			t.Errorf("%s first: upstream queries %d and %d, want 1 and 1", mdns.RcodeToString[bad], badSeen.Load(), goodSeen.Load())
		}
	}

	var seen atomic.Int32
	s, err := New(Options{Upstreams: []netip.AddrPort{rcodeUpstream(t, mdns.RcodeRefused, &seen)}, Attempts: 3, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	q, id := packQuery(t, "x.example.test.", mdns.TypeA)
	raw, err := s.forward(context.Background(), q, id)
	if err != nil || len(raw) < 4 || int(raw[3]&0xf) != mdns.RcodeRefused {
		t.Errorf("all refused: %v %x, want the REFUSED answer as the fallback", err, raw)
	}
	if n := seen.Load(); n != 3 {
		t.Errorf("upstream queried %d times with Attempts 3", n)
	}
}

// TestErrorReplyEdges: a 12-byte header is enough to answer (mutant: <= 12),
// a response is never answered, RD is echoed both ways (mutant: == 0) and
// the question is echoed when it parses (mutants of the Unpack check).
func TestErrorReplyEdges(t *testing.T) {
	s, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	hdr := []byte{0x12, 0x34, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0} // RD set, no question
	if r := s.errorReply(hdr[:11], mdns.RcodeFormatError); r != nil {
		t.Errorf("11-byte query answered")
	}
	for _, rd := range []bool{true, false} {
		h := bytes.Clone(hdr)
		if !rd {
			h[2] = 0
		}
		b := s.errorReply(h, mdns.RcodeFormatError)
		var r mdns.Msg
		if b == nil || r.Unpack(b) != nil {
			t.Fatalf("12-byte query (rd=%v): reply %x", rd, b)
		}
		if r.Id != 0x1234 || !r.Response || r.Rcode != mdns.RcodeFormatError || r.RecursionDesired != rd {
			t.Errorf("reply to 12-byte query (rd=%v): %v", rd, r.MsgHdr)
		}
	}
	resp := bytes.Clone(hdr)
	resp[2] |= 0x80
	if r := s.errorReply(resp, mdns.RcodeFormatError); r != nil {
		t.Errorf("a response was answered")
	}
	q, _ := packQuery(t, "q.example.test.", mdns.TypeA)
	var r mdns.Msg
	if err := r.Unpack(s.errorReply(q, mdns.RcodeNotImplemented)); err != nil || len(r.Question) != 1 || r.Question[0].Name != "q.example.test." {
		t.Errorf("question not echoed: %v %v", err, r.Question)
	}
}

// TestGuestUDPSize: EDNS raises the guest's limit above 512 (mutant: <=).
func TestGuestUDPSize(t *testing.T) {
	for _, c := range []struct {
		edns uint16 // 0: no OPT record
		want int
	}{{0, 512}, {1232, 1232}, {513, 513}, {100, 512}} {
		m := new(mdns.Msg)
		m.SetQuestion("a.", mdns.TypeA)
		if c.edns != 0 {
			m.SetEdns0(c.edns, false)
		}
		if got := guestUDPSize(m); got != c.want {
			t.Errorf("EDNS %d: size %d, want %d", c.edns, got, c.want)
		}
	}
}

// TestFitTruncatesOnlyWhatIsTooBig: a response of exactly the guest's size
// goes out whole (mutant: >= size).
func TestFitTruncatesOnlyWhatIsTooBig(t *testing.T) {
	s, err := New(Options{})
	if err != nil {
		t.Fatal(err)
	}
	req := new(mdns.Msg)
	req.SetQuestion("t.example.test.", mdns.TypeTXT)
	resp := new(mdns.Msg)
	resp.SetReply(req)
	// Grow TXT data until the packed response is exactly 512 bytes.
	txt := &mdns.TXT{Hdr: mdns.RR_Header{Name: "t.example.test.", Rrtype: mdns.TypeTXT, Class: mdns.ClassINET, Ttl: 1}, Txt: []string{""}}
	resp.Answer = []mdns.RR{txt}
	for resp.Len() < mdns.MinMsgSize {
		if last := len(txt.Txt) - 1; len(txt.Txt[last]) < 200 {
			txt.Txt[last] += "x"
		} else {
			txt.Txt = append(txt.Txt, "")
		}
	}
	if resp.Len() != mdns.MinMsgSize {
		t.Fatalf("could not build a %d-byte response (got %d)", mdns.MinMsgSize, resp.Len())
	}
	b := s.fit(resp, req, false)
	var r mdns.Msg
	if err := r.Unpack(b); err != nil || r.Truncated || len(r.Answer) != 1 || s.Stats().Truncated.Load() != 0 {
		t.Errorf("512-byte response: truncated=%v answers=%d counted %d, want it whole", r.Truncated, len(r.Answer), s.Stats().Truncated.Load())
	}
}

// TestTCPFraming: a 12-byte message is read (mutant: <= 12) and a 65535-byte
// one written (mutant: >= 0xffff); one byte more is refused.
func TestTCPFraming(t *testing.T) {
	for _, n := range []int{11, 12} {
		a, b := net.Pipe()
		go func() {
			a.Write(append([]byte{0, byte(n)}, make([]byte, n)...))
			a.Close()
		}()
		got, err := readTCPMsg(b)
		if (err == nil) != (n >= 12) || (err == nil && len(got) != n) {
			t.Errorf("read %d-byte message: %d bytes, %v", n, len(got), err)
		}
		b.Close()
	}
	for _, n := range []int{0xffff, 0x10000} {
		a, b := net.Pipe()
		go func() {
			buf := make([]byte, 0x10000+2)
			for {
				if _, err := b.Read(buf); err != nil {
					return
				}
			}
		}()
		err := writeTCPMsg(a, make([]byte, n))
		if (err == nil) != (n <= 0xffff) {
			t.Errorf("write %d-byte message: %v", n, err)
		}
		a.Close()
		b.Close()
	}
}

// TestIsResponseToHeaderOnly: a bare 12-byte response header matches
// (mutant: > 12).
func TestIsResponseToHeaderOnly(t *testing.T) {
	h := []byte{0xab, 0xcd, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if !isResponseTo(h, 0xabcd) {
		t.Error("12-byte response header not matched")
	}
	if isResponseTo(h[:11], 0xabcd) {
		t.Error("11 bytes matched")
	}
}

// TestStaticClassesAndANY: class ANY and type ANY get static answers, PTR
// included; another class goes upstream (mutants of both checks), and the
// TTL is StaticTTL in seconds (mutant: * for /).
func TestStaticClassesAndANY(t *testing.T) {
	tab, err := newStaticTable(map[string][]netip.Addr{"h.vunet.internal": {netip.MustParseAddr("10.0.2.2")}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ask := func(name string, qtype, qclass uint16) *mdns.Msg {
		m := new(mdns.Msg)
		m.SetQuestion(name, qtype)
		m.Question[0].Qclass = qclass
		return tab.answer(m, 60, new(atomic.Uint64))
	}
	if r := ask("h.vunet.internal.", mdns.TypeA, mdns.ClassANY); r == nil || len(r.Answer) != 1 {
		t.Errorf("class ANY: %v, want the static answer", r)
	}
	if r := ask("h.vunet.internal.", mdns.TypeA, mdns.ClassCHAOS); r != nil {
		t.Errorf("class CHAOS answered statically: %v", r)
	}
	if r := ask("2.2.0.10.in-addr.arpa.", mdns.TypeANY, mdns.ClassINET); r == nil || len(r.Answer) != 1 {
		t.Errorf("PTR name, type ANY: %v, want the PTR", r)
	}
	if r := ask("2.2.0.10.in-addr.arpa.", mdns.TypeA, mdns.ClassINET); r == nil || len(r.Answer) != 0 {
		t.Errorf("PTR name, type A: %v, want NODATA", r)
	}

	s, err := New(Options{Static: map[string][]netip.Addr{"h.vunet.internal": {netip.MustParseAddr("10.0.2.2")}}, StaticTTL: 90 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	q, _ := packQuery(t, "h.vunet.internal.", mdns.TypeA)
	var r mdns.Msg
	if err := r.Unpack(s.answer(context.Background(), q, false)); err != nil || len(r.Answer) != 1 || r.Answer[0].Header().Ttl != 90 {
		t.Errorf("static answer: %v %v, want one record with TTL 90", err, r.Answer)
	}
}
