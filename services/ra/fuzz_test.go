package ra

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv6"
)

// FuzzDHCPv6Handle feeds arbitrary datagrams to the DHCPv6 request handler:
// it must never panic, and any reply must parse as a REPLY. handle recovers
// from panics (and returns nil), so the target calls the inner reply step:
// a panic inserted before the reply is built fails the Information-request
// seed (checked by hand).
func FuzzDHCPv6Handle(f *testing.F) {
	req, _ := dhcpv6.NewMessage(dhcpv6.WithRequestedOptions(dhcpv6.OptionDNSRecursiveNameServer))
	req.MessageType = dhcpv6.MessageTypeInformationRequest
	f.Add(req.ToBytes())
	sol, _ := dhcpv6.NewSolicit(net.HardwareAddr{2, 0, 0, 0, 0, 1})
	f.Add(sol.ToBytes())
	s, err := NewDHCPv6(DHCPv6Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), DomainSearch: []string{"vunet.internal"}})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := s.reply(b)
		if r == nil {
			return
		}
		d, err := dhcpv6.FromBytes(r)
		if err != nil {
			t.Fatalf("unparseable reply: %v", err)
		}
		if m, ok := d.(*dhcpv6.Message); !ok || m.MessageType != dhcpv6.MessageTypeReply {
			t.Fatalf("reply is %v", d.Type())
		}
	})
}
