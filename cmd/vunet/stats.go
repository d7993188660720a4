package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vunet/vunet/api"
)

// writeStats prints the snapshot for people: one section per layer, in
// the order the appliance registered them, one aligned line per series.
// Series come from the registry, so every declared counter is printed.
func writeStats(w io.Writer, st api.Stats) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	up := time.Duration(st.UptimeSeconds * float64(time.Second)).Round(time.Second)
	fmt.Fprintf(tw, "vunet %s, up %s\n", st.Version, up)
	layer := ""
	for _, m := range st.Metrics {
		if m.Layer != layer {
			if layer != "" {
				extras(tw, layer, st)
			}
			layer = m.Layer
			fmt.Fprintf(tw, "\n%s\n", layer)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", shortName(m), labelText(m.Labels), valueText(m))
	}
	if layer != "" {
		extras(tw, layer, st)
	}
	return tw.Flush()
}

// extras prints the state that is not a counter after its layer.
func extras(tw io.Writer, layer string, st api.Stats) {
	switch layer {
	case "virtqueue":
		for _, r := range st.Rings {
			fmt.Fprintf(tw, "  ring\tdirection=%s queue=%d\tsize %d: avail %d, next %d, used %d", r.Direction, r.Queue, r.Size, r.AvailIdx, r.NextAvail, r.UsedIdx)
			if r.EventIdx {
				fmt.Fprintf(tw, ", avail_event %d, used_event %d", r.AvailEvent, r.UsedEvent)
			}
			fmt.Fprintln(tw)
		}
	case "dhcp":
		for _, l := range st.Leases {
			fmt.Fprintf(tw, "  lease\t%s %s\tuntil %s\n", l.MAC, l.Addr, l.Expiry.Local().Format(time.DateTime))
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

// labelText formats labels as "a=1 b=2", sorted by name.
func labelText(l map[string]string) string {
	parts := make([]string, 0, len(l))
	for _, k := range slices.Sorted(maps.Keys(l)) {
		parts = append(parts, k+"="+l[k])
	}
	return strings.Join(parts, " ")
}

// valueText formats m's value; byte counts get a binary unit.
func valueText(m api.Metric) string {
	if strings.HasSuffix(m.Name, "bytes_total") && m.Value >= 0 {
		return humanBytes(uint64(m.Value))
	}
	return strconv.FormatInt(m.Value, 10)
}
