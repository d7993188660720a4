package appliance

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/forward/egress"
)

// TestLogsAreRateLimited: every layer logs through the appliance's root
// logger, which is rate-limited per message; a flood shows up in
// Stats() (vunet_log_suppressed_total) and /metrics, not in the log.
func TestLogsAreRateLimited(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	var buf bytes.Buffer
	a, err := New(cfg, slog.New(slog.NewTextHandler(&buf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	layer := a.log.With("layer", "forward") // as each layer derives its logger
	for range 5000 {
		layer.Warn("guest-triggered warning")
	}
	if n := strings.Count(buf.String(), "guest-triggered warning"); n > 50 {
		t.Fatalf("%d lines of a 5000-record flood reached the log", n)
	}
	st := a.Stats()
	if n, _ := st.Find("vunet_log_suppressed_total"); n < 4900 {
		t.Fatalf("log suppressed = %d", n)
	}
	var m bytes.Buffer
	if err := api.WriteMetrics(&m, st); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(m.String(), "vunet_log_suppressed_total ") {
		t.Fatal("no vunet_log_suppressed_total in /metrics")
	}
}

func TestEgressStats(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	r, err := egress.ParseRule("deny tcp:[2001:db8::/32]:22")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Egress.Rules = []egress.Rule{r}
	cfg.Egress.Mode = egress.AllowNone
	cfg.Egress.HostAddresses = false
	cfg.Hosts["meta.internal"] = egress.LinkLocal4.Addr().Next()
	var buf bytes.Buffer
	a, err := New(cfg, slog.New(slog.NewTextHandler(&buf, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if !strings.Contains(buf.String(), "static DNS name points at an address the egress policy denies") {
		t.Errorf("no warning about the denied static name:\n%s", buf.String())
	}
	st := a.Stats()
	var rules []string
	for _, m := range st.Metrics {
		if m.Name == "vunet_egress_rule_hits_total" {
			rules = append(rules, m.Labels["rule"])
		}
	}
	want := "deny tcp:[2001:db8::/32]:22, deny 169.254.0.0/16, deny fe80::/10, deny fd00:ec2::254/128, deny host-addresses, allow gateway, deny any"
	if got := strings.Join(rules, ", "); got != want {
		t.Fatalf("egress rules %q; want %q", got, want)
	}
	if n, ok := st.Find("vunet_egress_host_addresses"); !ok || n == 0 {
		t.Fatalf("host addresses %d, %v", n, ok)
	}
	var m bytes.Buffer
	if err := api.WriteMetrics(&m, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`vunet_egress_rule_hits_total{action="deny",index="1",rule="deny tcp:[2001:db8::/32]:22"} 0`,
		`vunet_egress_rule_hits_total{action="allow",index="default",rule="allow gateway"} 0`, "vunet_egress_host_addresses "} {
		if !strings.Contains(m.String(), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
