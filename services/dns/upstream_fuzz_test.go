package dns

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// fakeUpstream is a resolver on 127.0.0.1 (UDP and TCP on one port) that
// answers every query with the bytes it is told to, patched to match the
// query's ID when asked: the upstream side of FuzzUpstreamAnswer.
type fakeUpstream struct {
	addr netip.AddrPort
	mu   sync.Mutex
	udp  []byte
	tcp  []byte
	fix  uint8 // fixMatchID, fixResponse, ...
}

const (
	fixMatchID   = 1 << iota // copy the query's ID into the answer
	fixResponse              // set QR
	fixClearTC               // clear TC in the UDP answer
	fixSetTC                 // set TC in the UDP answer (TCP fallback)
	fixSilentUDP             // do not answer over UDP (timeout)
)

func startFakeUpstream(tb testing.TB) *fakeUpstream {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ap := pc.LocalAddr().(*net.UDPAddr).AddrPort()
	l, err := net.Listen("tcp", ap.String())
	if err != nil {
		tb.Fatal(err)
	}
	u := &fakeUpstream{addr: ap}
	tb.Cleanup(func() { pc.Close(); l.Close() })
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			ans, ok := u.answer(buf[:n], false)
			if ok {
				pc.WriteTo(ans, from)
			}
		}
	}()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Second))
				q, err := readTCPMsg(c)
				if err != nil {
					return
				}
				ans, _ := u.answer(q, true)
				var l [2]byte
				binary.BigEndian.PutUint16(l[:], uint16(len(ans)))
				c.Write(append(l[:], ans...)) // the length may lie: it is fuzzed too
			}()
		}
	}()
	return u
}

func (u *fakeUpstream) set(udp, tcp []byte, fix uint8) {
	u.mu.Lock()
	u.udp, u.tcp, u.fix = udp, tcp, fix
	u.mu.Unlock()
}

func (u *fakeUpstream) answer(q []byte, tcp bool) ([]byte, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	src, fix := u.udp, u.fix
	if tcp {
		src = u.tcp
	} else if fix&fixSilentUDP != 0 {
		return nil, false
	}
	a := append([]byte(nil), src...)
	if len(a) >= 2 && len(q) >= 2 && fix&fixMatchID != 0 {
		copy(a, q[:2])
	}
	if len(a) >= 3 {
		if fix&fixResponse != 0 {
			a[2] |= 0x80
		}
		if !tcp && fix&fixClearTC != 0 {
			a[2] &^= 0x02
		}
		if !tcp && fix&fixSetTC != 0 {
			a[2] |= 0x02
		}
	}
	return a, true
}

// FuzzUpstreamAnswer: a hostile or broken upstream resolver answers the
// guest's query over UDP (and TCP when it sets TC) with arbitrary bytes.
// vunet must not panic, and what it sends the guest must be a response to
// the guest's query (its ID, QR set) that fits the guest's UDP size over
// UDP — truncated properly, or a SERVFAIL. Every query gets an answer (the
// upstream's, or an error reply), never silence.
func FuzzUpstreamAnswer(f *testing.F) {
	q := new(mdns.Msg)
	q.SetQuestion("test.vunet.example.", mdns.TypeA)
	qb, _ := q.Pack()
	q.SetEdns0(1232, false)
	qe, _ := q.Pack()
	a := new(mdns.Msg)
	a.SetReply(q)
	for i := 0; i < 100; i++ {
		a.Answer = append(a.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: "test.vunet.example.", Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
			A: net.IPv4(192, 0, 2, byte(i))})
	}
	big, _ := a.Pack()
	a.Answer = a.Answer[:1]
	small, _ := a.Pack()
	const ok = fixMatchID | fixResponse
	f.Add(qb, small, small, uint8(ok|fixClearTC))
	f.Add(qe, big, big, uint8(ok|fixSetTC))               // truncated over UDP, whole over TCP, too big for the guest
	f.Add(qb, small, []byte{0, 1, 2}, uint8(ok|fixSetTC)) // broken TCP answer
	f.Add(qb, []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, small, uint8(ok))
	f.Add(qe, small, small, uint8(fixResponse)) // wrong ID: ignored, times out
	f.Add(qb, small, big, uint8(ok|fixSilentUDP))
	up := startFakeUpstream(f)
	s, err := New(Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Upstreams: []netip.AddrPort{up.addr},
		Timeout: 10 * time.Millisecond, Attempts: 1})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, query, udpAns, tcpAns []byte, fix uint8) {
		if len(udpAns) > 65000 || len(tcpAns) > 65000 {
			return
		}
		var req mdns.Msg
		if req.Unpack(query) != nil || req.Response || req.Opcode != mdns.OpcodeQuery || len(req.Question) != 1 {
			return // FuzzAnswer covers bad queries; this target is about answers
		}
		up.set(udpAns, tcpAns, fix)
		for _, tcp := range []bool{false, true} {
			r := s.answer(context.Background(), query, tcp)
			if len(r) < 12 {
				t.Fatalf("tcp=%v: no usable answer (%d bytes) to a well-formed query", tcp, len(r))
			}
			if id := binary.BigEndian.Uint16(r); id != req.Id || r[2]&0x80 == 0 {
				t.Fatalf("tcp=%v: answer id %#x QR %v, query id %#x", tcp, id, r[2]&0x80 != 0, req.Id)
			}
			if !tcp && len(r) > guestUDPSize(&req) {
				t.Fatalf("UDP answer of %d bytes, guest takes %d", len(r), guestUDPSize(&req))
			}
		}
	})
}
