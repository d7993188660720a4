package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/api"
)

// defaultWatch is the interval of `vunet stats --watch` without one.
const defaultWatch = 2 * time.Second

func statsCommand() *cli.Command {
	return &cli.Command{
		Name:  "stats",
		Usage: "print the counters of a running vunet (over its --api socket)",
		UsageText: "vunet stats --api PATH [--json | --metrics]\n" +
			"vunet stats --api PATH --watch [INTERVAL] [--json]",
		Description: "Prints every counter, grouped by layer. --watch repeats every INTERVAL (default 2s; " +
			"\"5s\", \"500ms\" or seconds) and shows per-second rates of the counters that moved; with --json it " +
			"prints one JSON snapshot per line.",
		Flags: []cli.Flag{
			apiFlag(),
			&cli.BoolFlag{Name: "json", Usage: "print the full JSON snapshot (docs/api.md)"},
			&cli.BoolFlag{Name: "metrics", Usage: "print the Prometheus metrics text"},
			&cli.BoolFlag{Name: "watch", Usage: "repeat every INTERVAL (the argument; default 2s) with rates, until interrupted"},
		},
		Action:          statsAction,
		HideHelpCommand: true,
		OnUsageError:    onUsageError,
	}
}

func statsAction(c *cli.Context) error {
	watch := c.Bool("watch")
	interval := defaultWatch
	switch {
	case watch && c.NArg() == 1:
		d, err := parseInterval(c.Args().First())
		if err != nil {
			return usagef("stats: --watch %q: %v", c.Args().First(), err)
		}
		interval = d
	case c.NArg() > 0:
		return usagef("stats: unexpected argument %q", c.Args().First())
	}
	if c.Bool("json") && c.Bool("metrics") {
		return usagef("stats: --json and --metrics are mutually exclusive")
	}
	if watch && c.Bool("metrics") {
		return usagef("stats: --watch and --metrics are mutually exclusive (a scraper polls /metrics itself)")
	}
	cl, err := apiClient(c, "stats")
	if err != nil {
		return err
	}
	defer cl.Close()
	w := c.App.Writer
	if c.Bool("metrics") {
		m, err := cl.Metrics(c.Context)
		if err != nil {
			return err
		}
		_, err = io.WriteString(w, m)
		return err
	}
	if watch {
		return watchStats(c.Context, w, cl.Stats, interval, c.Bool("json"), isTerminal(w), -1)
	}
	st, err := cl.Stats(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return writeJSON(w, st)
	}
	return writeStats(w, st, nil)
}

// parseInterval reads "5s", "500ms" or a number of seconds; at least 100ms.
func parseInterval(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil {
			return 0, fmt.Errorf("want a duration (5s, 500ms) or seconds")
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d < 100*time.Millisecond {
		return 0, fmt.Errorf("want at least 100ms")
	}
	return d, nil
}

// isTerminal reports whether w is a terminal (the screen is redrawn then).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// watchStats prints a snapshot every interval until ctx is done (or after
// frames snapshots, for tests; -1 is no limit). Human frames after the
// first carry per-second rates; on a terminal each frame replaces the
// last. With asJSON every snapshot is one line of JSON.
func watchStats(ctx context.Context, w io.Writer, fetch func(context.Context) (api.Stats, error),
	interval time.Duration, asJSON, terminal bool, frames int) error {
	var prev *api.Stats
	t := time.NewTicker(interval)
	defer t.Stop()
	for n := 0; frames < 0 || n < frames; n++ {
		if n > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
		}
		st, err := fetch(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		switch {
		case asJSON:
			b, err := json.Marshal(st)
			if err != nil {
				return err
			}
			if _, err := w.Write(append(b, '\n')); err != nil {
				return err
			}
		default:
			if terminal {
				io.WriteString(w, "\x1b[H\x1b[2J") // home, clear
			} else if n > 0 {
				io.WriteString(w, "\n")
			}
			if err := writeStats(w, st, prev); err != nil {
				return err
			}
		}
		prev = &st
	}
	return nil
}

// statsWidth is where a family's line wraps.
const statsWidth = 100

// writeStats prints the snapshot for people: one section per layer, in the
// order the appliance registered them; one line per metric family, its
// name aligned, then each series as "label-values value". With prev (an
// earlier snapshot, --watch), counters that moved also show their rate per
// second, "+12.5/s". Series come from the registry, so every declared
// counter is printed.
func writeStats(w io.Writer, st api.Stats, prev *api.Stats) error {
	var b strings.Builder
	up := time.Duration(st.UptimeSeconds * float64(time.Second)).Round(time.Second)
	fmt.Fprintf(&b, "vunet %s, up %s", st.Version, up)
	var elapsed float64
	old := map[string]int64{}
	if prev != nil {
		elapsed = st.UptimeSeconds - prev.UptimeSeconds
		fmt.Fprintf(&b, "; rates over %.1fs", elapsed)
		for _, m := range prev.Metrics {
			old[seriesKey(m)] = m.Value
		}
	}
	b.WriteString("\n")

	for _, sec := range sections(st.Metrics) {
		fams := families(st.Metrics, sec)
		width := 0
		for _, f := range fams {
			width = max(width, len(shortName(f[0])))
		}
		fmt.Fprintf(&b, "\n%s\n", sec)
		for _, f := range fams {
			cells := make([]string, len(f))
			for i, m := range f {
				cells[i] = cellText(m)
				if v, ok := old[seriesKey(m)]; ok && m.Kind == api.Counter && m.Value != v && elapsed > 0 {
					cells[i] += " (" + rateText(m, float64(m.Value-v)/elapsed) + ")"
				}
			}
			writeLine(&b, fmt.Sprintf("  %-*s", width, shortName(f[0])), cells)
		}
		extras(&b, sec, st, width)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// section is where `vunet stats` prints a series: its layer, and for a
// guest's own series (those with a `guest` label: its link, virtqueues,
// NAT limits and memory shares) the guest too, "link (guest 1)", so
// every ring and queue is shown under the guest it belongs to.
type section struct {
	layer, guest string
}

func sectionOf(m api.Metric) section { return section{m.Layer, m.Labels["guest"]} }

func (s section) String() string {
	if s.guest == "" {
		return s.layer
	}
	return s.layer + " (guest " + s.guest + ")"
}

// sections returns the sections of ms: the shared layers in order of
// appearance, then each guest's (by guest number) in order of appearance.
func sections(ms []api.Metric) []section {
	var out []section
	for _, m := range ms {
		if s := sectionOf(m); !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	slices.SortStableFunc(out, func(a, b section) int {
		switch {
		case a.guest == b.guest:
			return 0
		case a.guest == "":
			return -1
		case b.guest == "":
			return 1
		}
		x, _ := strconv.Atoi(a.guest)
		y, _ := strconv.Atoi(b.guest)
		return x - y
	})
	return out
}

// writeLine writes head and the cells separated by three spaces, wrapping
// under the first cell past statsWidth.
func writeLine(b *strings.Builder, head string, cells []string) {
	line := head
	for i, c := range cells {
		if i > 0 && len(line)+3+len(c) > statsWidth {
			b.WriteString(line + "\n")
			line = strings.Repeat(" ", len(head))
		}
		line += "   " + c
	}
	b.WriteString(line + "\n")
}

// families groups sec's series by name, in order of appearance.
func families(ms []api.Metric, sec section) [][]api.Metric {
	var out [][]api.Metric
	idx := map[string]int{}
	for _, m := range ms {
		if sectionOf(m) != sec {
			continue
		}
		i, ok := idx[m.Name]
		if !ok {
			i = len(out)
			idx[m.Name] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], m)
	}
	return out
}

// extras prints the state that is not a counter after its section: a
// guest's rings after its virtqueue counters (or after the shared ones,
// from a vunet whose counters carry no guest).
func extras(b *strings.Builder, sec section, st api.Stats, width int) {
	switch sec.layer {
	case "virtqueue":
		own := map[string]bool{}
		for _, s := range sections(st.Metrics) {
			if s.layer == "virtqueue" && s.guest != "" {
				own[s.guest] = true
			}
		}
		for _, r := range st.Rings {
			if g := strconv.Itoa(r.Guest); sec.guest != g && (sec.guest != "" || own[g]) {
				continue
			}
			// A packed ring's indexes are positions: slot and wrap counter.
			idx := func(v uint16) string { return strconv.Itoa(int(v)) }
			if r.Packed {
				idx = func(v uint16) string { return fmt.Sprintf("%d/w%d", v&0x7fff, v>>15) }
			}
			fmt.Fprintf(b, "  %-*s   %d %s: size %d, avail %s, next %s, used %s", width, "ring", r.Queue, r.Direction,
				r.Size, idx(r.AvailIdx), idx(r.NextAvail), idx(r.UsedIdx))
			if r.EventIdx {
				fmt.Fprintf(b, ", avail_event %s, used_event %s", idx(r.AvailEvent), idx(r.UsedEvent))
			}
			if r.Packed {
				b.WriteString(", packed")
			}
			b.WriteString("\n")
		}
	case "dhcp":
		for _, l := range st.Leases {
			if l.DUID == "" {
				fmt.Fprintf(b, "  %-*s   %s %s until %s\n", width, "lease", l.MAC, l.Addr, l.Expiry.Local().Format(time.DateTime))
			}
		}
	case "dhcpv6":
		for _, l := range st.Leases {
			if l.DUID != "" {
				fmt.Fprintf(b, "  %-*s   duid %s iaid %d %s until %s\n", width, "lease", l.DUID, l.IAID, l.Addr, l.Expiry.Local().Format(time.DateTime))
			}
		}
	}
}

// shortName is a metric's name without vunet_, its layer and _total:
// vunet_dns_malformed_total in layer dns is "malformed".
func shortName(m api.Metric) string {
	n := strings.TrimPrefix(m.Name, "vunet_")
	n = strings.TrimPrefix(n, m.Layer+"_")
	return strings.TrimSuffix(n, "_total")
}

// cellText is one series: its label values (sorted by label name) and its
// value, "0 to_guest 1234"; the guest is its section's.
func cellText(m api.Metric) string {
	labels := m.Labels
	if _, ok := labels["guest"]; ok {
		labels = maps.Clone(labels)
		delete(labels, "guest")
	}
	if l := labelValues(labels); l != "" {
		return l + " " + valueText(m)
	}
	return valueText(m)
}

// labelOrder puts the labels that say which instance first (queue,
// egress rule); the others follow by name.
var labelOrder = []string{"queue", "index", "rule"}

// labelValues joins the label values, in labelOrder.
func labelValues(l map[string]string) string {
	keys := slices.SortedFunc(maps.Keys(l), func(a, b string) int {
		ia, ib := slices.Index(labelOrder, a), slices.Index(labelOrder, b)
		if ia < 0 {
			ia = len(labelOrder)
		}
		if ib < 0 {
			ib = len(labelOrder)
		}
		if ia != ib {
			return ia - ib
		}
		return strings.Compare(a, b)
	})
	var parts []string
	for _, k := range keys {
		// A value another label already says ("deny" beside the rule
		// "deny 169.254.0.0/16") is left out.
		if !slices.ContainsFunc(keys, func(o string) bool {
			return o != k && slices.Contains(strings.Fields(l[o]), l[k]) && l[o] != l[k]
		}) {
			parts = append(parts, l[k])
		}
	}
	return strings.Join(parts, " ")
}

// rateText formats a counter's rate per second: "+12/s", "+0.5/s",
// "+3.2k/s", bytes with a binary unit.
func rateText(m api.Metric, r float64) string {
	if strings.HasSuffix(m.Name, "bytes_total") && r >= 0 {
		return "+" + humanBytes(uint64(r)) + "/s"
	}
	sign := "+"
	if r < 0 {
		sign, r = "-", -r
	}
	switch {
	case r >= 1e6:
		return sign + strconv.FormatFloat(r/1e6, 'f', 1, 64) + "M/s"
	case r >= 1e4:
		return sign + strconv.FormatFloat(r/1e3, 'f', 1, 64) + "k/s"
	case r >= 10:
		return sign + strconv.FormatFloat(r, 'f', 0, 64) + "/s"
	}
	return sign + strconv.FormatFloat(r, 'g', 2, 64) + "/s"
}

// seriesKey identifies a series across snapshots.
func seriesKey(m api.Metric) string {
	k := m.Name
	for _, l := range slices.Sorted(maps.Keys(m.Labels)) {
		k += "," + l + "=" + m.Labels[l]
	}
	return k
}

// valueText formats m's value; byte counts get a binary unit.
func valueText(m api.Metric) string {
	if strings.HasSuffix(m.Name, "bytes_total") && m.Value >= 0 {
		return humanBytes(uint64(m.Value))
	}
	return strconv.FormatInt(m.Value, 10)
}
