package appliance

import (
	"log/slog"
	"testing"
)

// TestMemoryShares: --max-memory becomes one budget, split so that the
// guest's own traffic gets 3/4, the link's backlog 1/8 and the last 1/8 is
// reachable only by port forwards; every share is in the stats.
func TestMemoryShares(t *testing.T) {
	cfg := testConfig(t, t.TempDir())
	cfg.MaxMemory = 64 << 20
	a, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	out, in := a.Forward.MemoryShares()
	want := map[string]int64{"total": 64 << 20, "outbound": 48 << 20, "inbound": 64 << 20, "link": 8 << 20}
	got := map[string]int64{"total": a.Memory.Limit(), "outbound": out.Limit(), "inbound": in.Limit(), "link": a.linkMem.Limit()}
	st := a.Stats()
	for share, w := range want {
		if got[share] != w {
			t.Errorf("%s share limit %d, want %d", share, got[share], w)
		}
		if n, ok := st.Find("vunet_memory_budget_bytes", "share", share); !ok || n != w {
			t.Errorf("vunet_memory_budget_bytes{share=%q} = %d, %v; want %d", share, n, ok, w)
		}
	}
	// Outbound and link together leave the inbound reserve untouched.
	if reserve := a.Memory.Limit() - out.Limit() - a.linkMem.Limit(); reserve < a.Memory.Limit()/8 {
		t.Errorf("inbound reserve %d, want at least an eighth of the budget", reserve)
	}
}
