package main

import (
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/services/names"
)

func guestsCommand() *cli.Command {
	return &cli.Command{
		Name:      "guests",
		Usage:     "list the VMs on a running vunet's network (over its --api socket)",
		UsageText: "vunet guests --api PATH [--json]",
		Description: "Prints one line per connected guest: its switch port (the guest label of its counters), " +
			"MAC, DHCP host name, addresses, DHCP lease expiry, frames and bytes each way, drops, and the state " +
			"of its virtqueues (receive buffers the guest offers, transmit chains not yet taken). --json prints " +
			"GET /v1/guests as is (docs/api.md).",
		Flags: []cli.Flag{
			apiFlag(),
			&cli.BoolFlag{Name: "json", Usage: "print the JSON list (docs/api.md)"},
		},
		Action:          guestsAction,
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
	}
}

func guestsAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usagef("guests: unexpected argument %q", c.Args().First())
	}
	cl, err := apiClient(c, "guests")
	if err != nil {
		return err
	}
	defer cl.Close()
	gs, err := cl.Guests(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return writeJSON(c.App.Writer, api.Guests{Guests: gs})
	}
	return writeGuests(c.App.Writer, gs, time.Now())
}

// writeGuests prints the human table of gs.
func writeGuests(w io.Writer, gs []api.Guest, now time.Time) error {
	if len(gs) == 0 {
		_, err := io.WriteString(w, "no guests connected\n")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GUEST\tMAC\tNAME\tADDRESSES\tLEASE\tRX (to guest)\tTX (from guest)\tDROPS\tQUEUES\tNAT FLOWS")
	for _, g := range gs {
		name := "-"
		if g.Name != "" {
			name = g.Name + "." + names.Domain
		}
		mac := g.MAC
		if mac == "" {
			mac = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", g.Port, mac, name, addrList(g),
			leaseText(g.Leases, now), traffic(g.Metrics, api.ToGuest), traffic(g.Metrics, api.FromGuest),
			sumMetric(g.Metrics, "vunet_link_drops_total", ""), queueText(g.Rings), natText(g.Metrics))
	}
	return tw.Flush()
}

func addrList(g api.Guest) string {
	var out []string
	for _, a := range append(append([]netip.Addr(nil), g.IPv4...), g.IPv6...) {
		out = append(out, a.String())
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ",")
}

// leaseText is the DHCPv4 lease's expiry (the earliest if several), with
// the time left.
func leaseText(ls []api.Lease, now time.Time) string {
	var exp time.Time
	for _, l := range ls {
		if l.Addr.Is4() && (exp.IsZero() || l.Expiry.Before(exp)) {
			exp = l.Expiry
		}
	}
	if exp.IsZero() {
		return "-"
	}
	return fmt.Sprintf("%s (in %s)", exp.Local().Format("2006-01-02 15:04"), exp.Sub(now).Round(time.Minute))
}

// traffic is "FRAMES frames BYTES" in direction dir.
func traffic(ms []api.Metric, dir string) string {
	return fmt.Sprintf("%d / %s", sumMetric(ms, "vunet_link_frames_total", dir),
		humanBytes(sumMetric(ms, "vunet_link_bytes_total", dir)))
}

// sumMetric adds the series of name (with direction dir, unless "") over
// the guest's queues and reasons.
func sumMetric(ms []api.Metric, name, dir string) uint64 {
	var n uint64
	for _, m := range ms {
		if m.Name == name && (dir == "" || m.Labels["direction"] == dir) && m.Value > 0 {
			n += uint64(m.Value)
		}
	}
	return n
}

// natText is the guest's own NAT flows, each against its own limit, and
// how many new ones its limits refused: "tcp 40, udp 2, icmp 0; refused 1".
func natText(ms []api.Metric) string {
	flows := map[string]int64{}
	for _, m := range ms {
		if m.Name == "vunet_forward_guest_flows" {
			flows[m.Labels["proto"]] = m.Value
		}
	}
	return fmt.Sprintf("tcp %d, udp %d, icmp %d; refused %d", flows["tcp"], flows["udp"], flows["icmp"],
		sumMetric(ms, "vunet_forward_guest_refused_total", ""))
}

// queueText summarises the rings: receive buffers the guest has posted and
// vunet not yet filled, transmit chains the guest posted and vunet not yet
// taken.
func queueText(rs []api.RingState) string {
	if len(rs) == 0 {
		return "-"
	}
	var rxFree, txPending int
	for _, r := range rs {
		n := int(r.AvailIdx - r.NextAvail) // uint16 wrap-around
		if r.Direction == api.ToGuest {
			rxFree += n
		} else {
			txPending += n
		}
	}
	return fmt.Sprintf("%d rings, rx free %d, tx pending %d", len(rs), rxFree, txPending)
}
