package main

import (
	"encoding/json"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/budget"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/forward"
	"github.com/vunet/vunet/forward/egress"
	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/internal/sandbox"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/pcap"
	"github.com/vunet/vunet/services/dhcp4"
	"github.com/vunet/vunet/services/dns"
	"github.com/vunet/vunet/services/names"
	"github.com/vunet/vunet/services/ra"
	"github.com/vunet/vunet/services/tftp"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// declared walks the metric tags of every layer's counter struct, the
// way internal/metrics does, independently of it: the counters a real
// appliance (IPv6, TFTP and --no-host-addresses on, --queues pairs) must
// export. A new counter
// struct is added here once; a new field of one of these needs nothing.
func declared(t *testing.T, a *appliance.Appliance, pairs int) int {
	t.Helper()
	n := 0
	count := func(v any, times int) {
		typ := reflect.TypeOf(v)
		for i := range typ.NumField() {
			if tag, ok := typ.Field(i).Tag.Lookup("metric"); ok && tag != "-" {
				n += times
			}
		}
	}
	count(endpoint.Stats{}, 1) // one guest port (max_guests 1)
	count(endpoint.SwitchStats{}, 1)
	count(endpoint.QueueStats{}, 2*pairs)
	count(virtqueue.Stats{}, 2*pairs)
	count(vhost.Stats{}, 1)
	count(vhost.DialStats{}, 1)
	count(forward.Stats{}, 1)
	count(dhcp4.Stats{}, 1)
	count(dns.Stats{}, 1)
	count(names.Stats{}, 1)
	count(ra.Stats{}, 1)
	count(ra.DHCPv6Stats{}, 1)
	count(tftp.Stats{}, 1)
	count(egress.RuleCounters{}, len(a.Forward.EgressRules()))
	count(egress.HostAddrStats{}, 1)
	count(ratelimit.Stats{}, 1)
	count(pcap.Stats{}, 1)
	count(netstack.Stats{}, 1)
	count(sandbox.Gauges{}, 1)
	count(appliance.MigrationStats{}, 1)
	count(appliance.ProcessStats{}, 1)
	count(appliance.NetstackStats{}, 1)
	count(budget.Counters{}, 4) // total, outbound, inbound, link
	// The guest's own limits (one guest): its NAT counters and its two
	// memory shares (guest, guest_link).
	count(forward.GuestStats{}, 1)
	count(budget.Counters{}, 2)
	return n
}

// TestEveryCounterInEveryOutput: every series the layers declare appears
// in GET /v1/stats (vunet stats --json), GET /metrics (--metrics) and the
// human `vunet stats`, served by a real appliance with two queue pairs:
// each of the four queues has its link and virtqueue counters everywhere.
func TestEveryCounterInEveryOutput(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Socket = filepath.Join(dir, "vhost.sock")
	cfg.DNSUpstream = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:1")}
	cfg.IPv6.Enable = true
	cfg.Boot.TFTPRoot = dir
	cfg.Egress.HostAddresses = false
	cfg.PCAP = filepath.Join(dir, "capture.pcap")
	cfg.Queues = 2
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := appliance.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	sock := fakeServer(t, a)

	want := a.Stats().Metrics
	if n := declared(t, a, cfg.Queues); len(want) != n {
		t.Fatalf("the appliance exports %d series, the layers declare %d", len(want), n)
	}

	r := runVunet(t, nil, "stats", "--api", sock, "--json")
	var st api.Stats
	if err := json.Unmarshal([]byte(r.stdout), &st); r.err != nil || err != nil {
		t.Fatalf("stats --json: %v %v", r.err, err)
	}
	metrics := runVunet(t, nil, "stats", "--api", sock, "--metrics")
	human := runVunet(t, nil, "stats", "--api", sock)
	if metrics.err != nil || human.err != nil {
		t.Fatalf("stats: %v %v", metrics.err, human.err)
	}
	for _, m := range want {
		labels := []string{}
		for k, v := range m.Labels {
			labels = append(labels, k, v)
		}
		if _, ok := st.Find(m.Name, labels...); !ok {
			t.Errorf("stats --json lacks %s %v", m.Name, m.Labels)
		}
		if m.Layer == "process" {
			// Live values (goroutines) change between the three calls:
			// only the series and its section must be there.
			if !strings.Contains(metrics.stdout, "\n"+exposition(m)) || !strings.Contains(human.stdout, "\nprocess\n  ") ||
				!strings.Contains(human.stdout, "\n  "+shortName(m)+" ") {
				t.Errorf("stats lack %s", m.Name)
			}
			continue
		}
		if line := exposition(m); !strings.Contains(metrics.stdout, "\n"+line) {
			t.Errorf("stats --metrics lacks %q", line)
		}
		if !humanHas(human.stdout, m) {
			t.Errorf("stats lacks %s %q in section %s", shortName(m), cellText(m), sectionOf(m))
		}
	}
	// Each of the counters that once never left their layer.
	for _, name := range []string{
		"vunet_link_arp_ignored_total", "vunet_link_guest_memory_faults_total", "vunet_link_rx_backlog",
		"vunet_virtqueue_popped_total", "vunet_virtqueue_used_total", "vunet_virtqueue_notifies_total",
		"vunet_virtqueue_notifies_suppressed_total", "vunet_virtqueue_bad_chains_total", "vunet_virtqueue_broken_total",
	} {
		if !strings.Contains(metrics.stdout, "\n"+name) {
			t.Errorf("metrics lack %s", name)
		}
	}
	for q := range 2 * cfg.Queues {
		dir := map[int]string{0: "to_guest", 1: "from_guest"}[q%2]
		for _, name := range []string{"vunet_link_frames_total", "vunet_virtqueue_popped_total"} {
			if _, ok := st.Find(name, "guest", "0", "queue", strconv.Itoa(q), "direction", dir); !ok {
				t.Errorf("stats lack %s of queue %d (%s)", name, q, dir)
			}
		}
	}
	if _, ok := st.Find("vunet_link_drops_total", "guest", "0", "reason", "rx_segment_no_buffer"); !ok {
		t.Error("stats lack the RX segment drops")
	}
	// And every family is documented.
	doc, err := os.ReadFile("../../docs/api.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range want {
		if !strings.Contains(string(doc), "`"+m.Name+"`") {
			t.Errorf("docs/api.md does not list %s", m.Name)
			doc = append(doc, "`"+m.Name+"`"...) // once per family
		}
	}
}

// exposition is the start of m's line in the Prometheus text:
// name{label="value",...} (labels sorted), then a space.
func exposition(m api.Metric) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m.Labels)) {
		parts = append(parts, k+`="`+m.Labels[k]+`"`)
	}
	if len(parts) == 0 {
		return m.Name + " "
	}
	return m.Name + "{" + strings.Join(parts, ",") + "} "
}

// humanHas reports whether the human output has m in its layer's
// section: on its family's line (or that line's continuation), the cell
// "label-values value".
func humanHas(out string, m api.Metric) bool {
	_, sec, ok := strings.Cut(out, "\n"+sectionOf(m).String()+"\n")
	if !ok {
		return false
	}
	sec, _, _ = strings.Cut(sec, "\n\n")
	lines := strings.Split(sec, "\n")
	for i, line := range lines {
		if f := strings.Fields(line); len(f) == 0 || f[0] != shortName(m) || !strings.HasPrefix(line, "  "+f[0]) {
			continue
		}
		fam := line
		for _, l := range lines[i+1:] {
			if !strings.HasPrefix(l, "   ") {
				break
			}
			fam += "\n" + l
		}
		cell := "   " + cellText(m)
		return strings.Contains(fam+"\n", cell+"\n") || strings.Contains(fam, cell+"   ") || strings.Contains(fam, cell+" (")
	}
	return false
}
