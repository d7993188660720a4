package appliance

import (
	"io"
	"log/slog"
	"testing"

	"github.com/vunet/vunet/api"
)

// BenchmarkScrape is one GET /metrics worth of work with every service on:
// a registry snapshot and the text exposition (docs/architecture.md
// compares it with prometheus/client_golang).
func BenchmarkScrape(b *testing.B) {
	cfg := testConfig(&testing.T{}, b.TempDir())
	cfg.IPv6.Enable = true
	cfg.Boot.TFTPRoot = b.TempDir()
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	b.ReportMetric(float64(len(a.metrics.Snapshot())), "series")
	b.ReportAllocs()
	for b.Loop() {
		if err := api.WriteMetrics(io.Discard, a.Stats()); err != nil {
			b.Fatal(err)
		}
	}
}
