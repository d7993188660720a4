package ra

import (
	"io"
	"log/slog"
	"net"
	"testing"

	"github.com/insomniacslk/dhcp/dhcpv6"
)

// FuzzDHCPv6Handle feeds arbitrary datagrams to the DHCPv6 request handler,
// stateless and stateful: it must never panic, any reply must parse as a
// REPLY or ADVERTISE, and the lease table never outgrows the pool. handle
// recovers from panics (and returns nil), so the target calls the inner
// reply step: a panic inserted before the reply is built fails the
// Information-request seed, one inserted in call.extend the RENEW seed
// (both checked by hand).
func FuzzDHCPv6Handle(f *testing.F) {
	req, _ := dhcpv6.NewMessage(dhcpv6.WithRequestedOptions(dhcpv6.OptionDNSRecursiveNameServer))
	req.MessageType = dhcpv6.MessageTypeInformationRequest
	f.Add(req.ToBytes())
	sol, _ := dhcpv6.NewSolicit(net.HardwareAddr{2, 0, 0, 0, 0, 1})
	f.Add(sol.ToBytes())
	rapid, _ := dhcpv6.NewSolicit(net.HardwareAddr{2, 0, 0, 0, 0, 2}, dhcpv6.WithRapidCommit, dhcpv6.WithIAPD([4]byte{1}))
	f.Add(rapid.ToBytes())
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	less, err := NewDHCPv6(DHCPv6Options{Logger: log, DomainSearch: []string{"vunet.internal"}})
	if err != nil {
		f.Fatal(err)
	}
	ful, err := NewDHCPv6(DHCPv6Options{Logger: log, Stateful: true, PoolSize: 4})
	if err != nil {
		f.Fatal(err)
	}
	// One seed per stateful message type, with our server id where the
	// type needs one and an address in the IA.
	c := client{duid: &dhcpv6.DUIDLL{HWType: 1, LinkLayerAddr: net.HardwareAddr{2, 0, 0, 0, 0, 3}}, iaid: [4]byte{0, 0, 0, 1}}
	for _, typ := range []dhcpv6.MessageType{dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew, dhcpv6.MessageTypeRebind,
		dhcpv6.MessageTypeRelease, dhcpv6.MessageTypeDecline, dhcpv6.MessageTypeConfirm} {
		server := typ != dhcpv6.MessageTypeRebind && typ != dhcpv6.MessageTypeConfirm
		f.Add(c.msg(f, typ, ful, server, pool0))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, s := range []*DHCPv6{less, ful} {
			r := s.reply(b)
			if n := len(ful.leases.byAddr); n > 4 || len(ful.leases.byKey) > n {
				t.Fatalf("lease table %d/%d entries for a pool of 4", len(ful.leases.byKey), n)
			}
			if r == nil {
				continue
			}
			d, err := dhcpv6.FromBytes(r)
			if err != nil {
				t.Fatalf("unparseable reply: %v", err)
			}
			if m, ok := d.(*dhcpv6.Message); !ok || (m.MessageType != dhcpv6.MessageTypeReply && m.MessageType != dhcpv6.MessageTypeAdvertise) {
				t.Fatalf("reply is %v", d.Type())
			}
		}
	})
}
