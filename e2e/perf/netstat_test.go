package perf

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/vunet/vunet/api"
)

// netCounters are the namespace's TCP counters (/proc/net/snmp "Tcp:" and
// /proc/net/netstat "TcpExt:" lines), keyed "Tcp:RetransSegs",
// "TcpExt:TCPLossProbes" and so on. Everything in the test's namespace is
// the iperf3 server, the backend's host sockets and nothing else, so the
// difference over a test says what happened on the loopback TCP between
// iperf3 and the backend: retransmissions, and why (receive-queue drops,
// prunes, loss probes, timeouts).
type netCounters map[string]uint64

// readNetCounters reads both files; a missing file is an error.
func readNetCounters() (netCounters, error) {
	out := netCounters{}
	for _, f := range []string{"/proc/net/snmp", "/proc/net/netstat"} {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		if err := parseNetCounters(string(data), out); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
	}
	return out, nil
}

// parseNetCounters adds the Tcp and TcpExt counters of one /proc/net file
// (pairs of "Prefix: names..." and "Prefix: values..." lines) to out.
func parseNetCounters(data string, out netCounters) error {
	lines := strings.Split(data, "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || (names[0] != "Tcp:" && names[0] != "TcpExt:") || len(values) == 0 || values[0] != names[0] {
			continue
		}
		if len(names) != len(values) {
			return fmt.Errorf("%s %d names, %d values", names[0], len(names), len(values))
		}
		for j := 1; j < len(names); j++ {
			// Tcp:MaxConn is -1; gauges like CurrEstab are harmless here.
			v, err := strconv.ParseInt(values[j], 10, 64)
			if err != nil {
				return fmt.Errorf("%s%s: %q", names[0], names[j], values[j])
			}
			out[names[0]+names[j]] = uint64(v)
		}
		i++
	}
	return nil
}

// delta returns the counters that grew from before to c.
func (c netCounters) delta(before netCounters) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range c {
		if v > before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// netKeys are the counters the log line and the markdown report show: how
// many segments were retransmitted and the kernel's own reasons for it.
var netKeys = []string{
	"Tcp:RetransSegs",       // segments retransmitted
	"TcpExt:TCPLossProbes",  // tail loss probes sent
	"TcpExt:TCPTimeouts",    // RTOs
	"TcpExt:TCPRcvQDrop",    // receiver dropped: no receive memory
	"TcpExt:TCPBacklogDrop", // receiver dropped: socket backlog full
	"TcpExt:PruneCalled",    // receive queue pruned (memory pressure)
	"TcpExt:RcvPruned",      // ... and packets dropped by it
	"TcpExt:TCPZeroWindowDrop",
	"TcpExt:TCPWantZeroWindowAdv",
	"TcpExt:TCPSpuriousRTOs",
	"TcpExt:TCPSackRecovery",
	"TcpExt:TCPDSACKRecv", // the receiver had it already: a spurious retransmission
	// Receiver side (the guest during a download):
	"TcpExt:TCPOFOQueue",     // segments that arrived out of order (a hole: loss)
	"TcpExt:TCPDSACKOldSent", // duplicates received (spurious retransmissions)
	"TcpExt:TCPDSACKOfoSent",
	// The VM-less guest's qdiscs (a frontend that reads its tap late).
	"Qdisc:Dropped",
	"Dev:TxDrop",
}

// formatNet renders the non-zero netKeys of d with short names, in
// netKeys' order; "–" when none moved.
func formatNet(d map[string]uint64) string {
	var parts []string
	for _, k := range netKeys {
		if d[k] > 0 {
			_, name, _ := strings.Cut(k, ":")
			parts = append(parts, fmt.Sprintf("%s=%d", name, d[k]))
		}
	}
	if len(parts) == 0 {
		return "–"
	}
	return strings.Join(parts, " ")
}

// vunetCounters snapshots a vunet's counters over its API socket, keyed by
// metric name and labels ("vunet_link_drops_total{reason=rx_backlog_full}"),
// so a test's delta shows its drops, backlog and kicks. Gauges are left out.
func vunetCounters(ctx context.Context, apiPath string) (netCounters, error) {
	cl := api.NewClient(apiPath)
	defer cl.Close()
	st, err := cl.Stats(ctx)
	if err != nil {
		return nil, err
	}
	out := netCounters{}
	for _, m := range st.Metrics {
		if m.Kind != "counter" || m.Value <= 0 {
			continue
		}
		out[metricKey(m)] = uint64(m.Value)
	}
	return out, nil
}

func metricKey(m api.Metric) string {
	if len(m.Labels) == 0 {
		return m.Name
	}
	var kv []string
	for _, k := range slices.Sorted(maps.Keys(m.Labels)) {
		kv = append(kv, k+"="+m.Labels[k])
	}
	return m.Name + "{" + strings.Join(kv, ",") + "}"
}

// formatVunet renders the link-layer counters of a vunet delta that say
// whether frames to the guest were lost or had to wait.
func formatVunet(d map[string]uint64) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(d)) {
		if strings.Contains(k, "drops") || strings.Contains(k, "dropped") || strings.Contains(k, "backlogged") || strings.Contains(k, "retrans") || strings.Contains(k, "timeouts") {
			parts = append(parts, fmt.Sprintf("%s=%d", strings.TrimPrefix(k, "vunet_"), d[k]))
		}
	}
	if len(parts) == 0 {
		return "–"
	}
	return strings.Join(parts, " ")
}

// parseGuestNet returns the growth of the guest's TCP counters over test
// name, from the "PERF-GNET name 0|1 <line of /proc/net/...>" lines the
// guest script prints before and after it; nil if either is missing or
// garbled (a kernel message can split a console line).
func parseGuestNet(console, name string) map[string]uint64 {
	var phase [2]strings.Builder
	for _, line := range strings.Split(console, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimRight(line, "\r"), "PERF-GNET "+name+" ")
		if !ok || len(rest) < 2 || (rest[0] != '0' && rest[0] != '1') || rest[1] != ' ' {
			continue
		}
		phase[rest[0]-'0'].WriteString(rest[2:] + "\n")
	}
	var c [2]netCounters
	for i := range c {
		c[i] = netCounters{}
		if phase[i].Len() == 0 || parseNetCounters(phase[i].String(), c[i]) != nil {
			return nil
		}
	}
	return c[1].delta(c[0])
}
