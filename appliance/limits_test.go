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
// Stats().Log and /metrics, not in the log.
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
	if st.Log.Suppressed < 4900 {
		t.Fatalf("Log.Suppressed = %d", st.Log.Suppressed)
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
	for _, r := range st.Egress.Rules {
		rules = append(rules, r.Rule)
	}
	want := "deny tcp:[2001:db8::/32]:22, deny 169.254.0.0/16, deny fe80::/10, deny fd00:ec2::254/128, deny host-addresses, allow gateway, deny any"
	if got := strings.Join(rules, ", "); got != want || st.Egress.Mode != "none" || st.Egress.HostAddresses == nil || *st.Egress.HostAddresses == 0 {
		t.Fatalf("egress stats %q mode %q host %v; want %q", got, st.Egress.Mode, st.Egress.HostAddresses, want)
	}
	var m bytes.Buffer
	if err := api.WriteMetrics(&m, st); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`vunet_egress_rule_hits_total{index="1",rule="deny tcp:[2001:db8::/32]:22",action="deny"} 0`,
		`vunet_egress_rule_hits_total{index="default",rule="allow gateway",action="allow"} 0`, "vunet_egress_host_addresses "} {
		if !strings.Contains(m.String(), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
