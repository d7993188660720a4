package dns

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"

	mdns "github.com/miekg/dns"
)

// FuzzAnswer feeds arbitrary guest queries to the query path (parsing,
// static answers, error replies, truncation) of a server without upstreams:
// it must never panic, and whatever it answers must parse.
func FuzzAnswer(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
	}{{"host.vunet.internal.", mdns.TypeA}, {"x.host.vunet.internal.", mdns.TypeAAAA}, {"2.2.0.10.in-addr.arpa.", mdns.TypePTR}, {"example.com.", mdns.TypeTXT}} {
		m := new(mdns.Msg)
		m.SetQuestion(q.name, q.qtype)
		m.SetEdns0(1232, true)
		b, _ := m.Pack()
		f.Add(b)
	}
	s, err := New(Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Static: map[string][]netip.Addr{
		"host.vunet.internal": {netip.MustParseAddr("10.0.2.2"), netip.MustParseAddr("fd00::2")},
	}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, q []byte) {
		for _, tcp := range []bool{false, true} {
			r := s.answer(context.Background(), q, tcp)
			if r == nil {
				continue
			}
			var m mdns.Msg
			if err := m.Unpack(r); err != nil {
				t.Fatalf("unparseable answer %x: %v", r, err)
			}
			if !tcp && len(r) > 65535 {
				t.Fatalf("answer of %d bytes", len(r))
			}
		}
	})
}
