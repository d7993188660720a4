package api

import (
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// WriteMetrics writes st in the Prometheus text exposition format (0.0.4):
// every series of st.Metrics, grouped into families with # HELP and
// # TYPE, then vunet_hostile_input_total, the sum of the series declared
// hostile by source. Metric names are documented in docs/api.md.
func WriteMetrics(w io.Writer, st Stats) error {
	var b strings.Builder
	b.Grow(64 * (len(st.Metrics) + 8))
	family(&b, "vunet_build_info", Gauge, "vunet version; the value is always 1.")
	sample(&b, "vunet_build_info", map[string]string{"version": st.Version}, "1")
	if !st.Started.IsZero() {
		family(&b, "vunet_start_time_seconds", Gauge, "When the appliance started, in seconds since the Unix epoch.")
		sample(&b, "vunet_start_time_seconds", nil,
			strconv.FormatFloat(float64(st.Started.Unix())+float64(st.Started.Nanosecond())/1e9, 'f', -1, 64))
	}

	// A family's series are written together even when several layers
	// (or several queues) declared them apart.
	var order []string
	byName := map[string][]Metric{}
	hostile := map[string]int64{}
	for _, m := range st.Metrics {
		if _, ok := byName[m.Name]; !ok {
			order = append(order, m.Name)
		}
		byName[m.Name] = append(byName[m.Name], m)
		if m.Hostile != "" {
			hostile[m.Hostile] += m.Value
		}
	}
	var num [20]byte
	for _, name := range order {
		ms := byName[name]
		family(&b, name, ms[0].Kind, ms[0].Help)
		for _, m := range ms {
			sample(&b, name, m.Labels, string(strconv.AppendInt(num[:0], m.Value, 10)))
		}
	}
	if len(hostile) > 0 {
		const name = "vunet_hostile_input_total"
		family(&b, name, Counter, "Malformed or hostile input rejected, by source (a rollup of the per-layer counters).")
		for _, src := range slices.Sorted(maps.Keys(hostile)) {
			sample(&b, name, map[string]string{"source": src}, strconv.FormatInt(hostile[src], 10))
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Kinds of Metric.
const (
	Counter = "counter"
	Gauge   = "gauge"
)

func family(b *strings.Builder, name, kind, help string) {
	for _, s := range []string{"# HELP ", name, " ", escapeHelp(help), "\n# TYPE ", name, " ", kind, "\n"} {
		b.WriteString(s)
	}
}

// sample writes one series; labels are sorted so the output is stable.
func sample(b *strings.Builder, name string, labels map[string]string, value string) {
	b.WriteString(name)
	if len(labels) > 0 {
		b.WriteByte('{')
		keys := make([]string, 0, 4)
		for k := range labels {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for j, k := range keys {
			if j > 0 {
				b.WriteByte(',')
			}
			for _, s := range []string{k, `="`, escapeLabel(labels[k]), `"`} {
				b.WriteString(s)
			}
		}
		b.WriteByte('}')
	}
	b.WriteByte(' ')
	b.WriteString(value)
	b.WriteByte('\n')
}

// escapeHelp and escapeLabel escape as the text format requires; most
// strings need nothing, and are returned without allocating.
func escapeHelp(s string) string { return escape(s, false) }

func escapeLabel(s string) string { return escape(s, true) }

func escape(s string, quote bool) string {
	if !strings.ContainsAny(s, "\\\n\"") {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '"' && quote:
			b.WriteString(`\"`)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
