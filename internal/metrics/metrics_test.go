package metrics

import (
	"strings"
	"sync/atomic"
	"testing"
)

type good struct {
	Hits   atomic.Uint64 `metric:"cache_hits_total{result=hit}" help:"Lookups by result." hostile:"cache"`
	Misses atomic.Uint64 `metric:"cache_hits_total{result=miss}"`
	Open   atomic.Int64  `metric:"cache_open" kind:"gauge" help:"Open entries."`
	Size   func() int64  `metric:"cache_size" kind:"gauge" help:"Size."`
	note   int           `metric:"-"` //lint:ignore U1000 read by reflection only
}

func TestRegisterSnapshot(t *testing.T) {
	r := New()
	var g good
	g.Size = func() int64 { return 42 }
	if err := r.Register("cache", &g, "queue", "0"); err != nil {
		t.Fatal(err)
	}
	var g2 good
	g2.Size = g.Size
	if err := r.Register("cache", &g2, "queue", "1"); err != nil {
		t.Fatalf("the same struct with other labels: %v", err)
	}
	g.Hits.Add(3)
	g.Open.Add(-1)
	g2.Misses.Add(1<<64 - 1)
	snap := r.Snapshot()
	if len(snap) != 8 {
		t.Fatalf("%d series, want 8: %+v", len(snap), snap)
	}
	got := map[string]int64{}
	for _, m := range snap {
		got[m.Name+"/"+m.Labels["queue"]+"/"+m.Labels["result"]] = m.Value
		if m.Layer != "cache" || m.Help == "" {
			t.Errorf("%+v", m)
		}
	}
	for k, v := range map[string]int64{
		"vunet_cache_hits_total/0/hit": 3, "vunet_cache_hits_total/1/miss": 1<<63 - 1,
		"vunet_cache_open/0/": -1, "vunet_cache_size/1/": 42,
	} {
		if got[k] != v {
			t.Errorf("%s = %d, want %d (%v)", k, got[k], v, got)
		}
	}
	if snap[1].Help != snap[0].Help || snap[1].Kind != Counter || snap[2].Kind != Gauge || snap[0].Hostile != "cache" {
		t.Errorf("family fields: %+v", snap[:3])
	}
}

func TestRegisterRefuses(t *testing.T) {
	type untagged struct{ X atomic.Uint64 }
	type noHelp struct {
		X atomic.Uint64 `metric:"x_total"`
	}
	type counterNoTotal struct {
		X atomic.Uint64 `metric:"x" help:"h"`
	}
	type gaugeTotal struct {
		X atomic.Int64 `metric:"x_total" kind:"gauge" help:"h"`
	}
	type signedCounter struct {
		X atomic.Int64 `metric:"x_total" help:"h"`
	}
	type badType struct {
		X uint64 `metric:"x_total" help:"h"`
	}
	type dup struct {
		X atomic.Uint64 `metric:"x_total{a=b}" help:"h"`
		Y atomic.Uint64 `metric:"x_total{a=b}"`
	}
	type twoHelps struct {
		X atomic.Uint64 `metric:"x_total{a=b}" help:"h"`
		Y atomic.Uint64 `metric:"x_total{a=c}" help:"other"`
	}
	type badLabel struct {
		X atomic.Uint64 `metric:"x_total{a}" help:"h"`
	}
	type nilFunc struct {
		X func() int64 `metric:"x" kind:"gauge" help:"h"`
	}
	type unexported struct {
		x atomic.Uint64 `metric:"x_total" help:"h"` //lint:ignore U1000 read by reflection only
	}
	for _, tc := range []struct {
		set  any
		want string
	}{
		{&untagged{}, "no metric tag"}, {&noHelp{}, "no help"}, {&counterNoTotal{}, "_total"},
		{&gaugeTotal{}, "_total"}, {&signedCounter{}, "atomic.Uint64"}, {&badType{}, "want atomic"},
		{&dup{}, "declared twice"}, {&twoHelps{}, "two help"}, {&badLabel{}, "bad label"},
		{&nilFunc{}, "must be set"}, {&unexported{}, "exported"}, {untagged{}, "pointer to a struct"},
	} {
		err := New().Register("l", tc.set)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%T: %v, want an error with %q", tc.set, err, tc.want)
		}
	}
	// Across calls: the same series twice, and one family as two kinds.
	r := New()
	r.MustRegister("l", &good{Size: func() int64 { return 0 }})
	if err := r.Register("l", &good{Size: func() int64 { return 0 }}); err == nil || !strings.Contains(err.Error(), "declared twice") {
		t.Errorf("same series twice: %v", err)
	}
	type kindClash struct {
		X atomic.Int64 `metric:"cache_open" help:"h"`
	}
	if err := r.Register("l", &kindClash{}, "queue", "9"); err == nil {
		t.Error("a family registered as a counter and a gauge")
	}
	// A failed Register adds nothing.
	if n := len(r.Snapshot()); n != 4 {
		t.Errorf("%d series after failed registrations, want 4", n)
	}
}

// TestIncrementIsPlainAtomic: the data path's increment is the struct's
// atomic add, with or without a registry, and never allocates.
func TestIncrementIsPlainAtomic(t *testing.T) {
	var g good
	g.Size = func() int64 { return 0 }
	New().MustRegister("cache", &g)
	if n := testing.AllocsPerRun(1000, func() { g.Hits.Add(1) }); n != 0 {
		t.Errorf("increment allocates %v times", n)
	}
}

func BenchmarkIncrement(b *testing.B) {
	var g good
	b.ReportAllocs()
	for b.Loop() {
		g.Hits.Add(1)
	}
}

func BenchmarkSnapshot(b *testing.B) {
	r := New()
	for i := range 20 {
		g := &good{Size: func() int64 { return 0 }}
		r.MustRegister("cache", g, "queue", string(rune('a'+i)))
	}
	b.ReportAllocs()
	for b.Loop() {
		r.Snapshot()
	}
}

// extCounter stands for a library's counter (gVisor's *tcpip.StatCounter).
type extCounter struct{ v uint64 }

func (c *extCounter) Value() uint64 { return c.v }

func TestRegisterLibraryCounter(t *testing.T) {
	type lib struct {
		Drops *extCounter `metric:"lib_drops_total" help:"Drops."`
	}
	r := New()
	c := &extCounter{v: 7}
	if err := r.Register("lib", &lib{Drops: c}); err != nil {
		t.Fatal(err)
	}
	c.v = 1<<64 - 1
	if snap := r.Snapshot(); len(snap) != 1 || snap[0].Value != 1<<63-1 || snap[0].Kind != Counter {
		t.Fatalf("%+v", snap)
	}
	if err := New().Register("lib", &lib{}); err == nil || !strings.Contains(err.Error(), "must be set") {
		t.Errorf("a nil counter: %v", err)
	}
	type gauge struct {
		Drops *extCounter `metric:"lib_drops" kind:"gauge" help:"Drops."`
	}
	if err := New().Register("lib", &gauge{Drops: c}); err == nil {
		t.Error("a library counter registered as a gauge")
	}
	type other struct {
		P *int `metric:"lib_p_total" help:"P."`
	}
	if err := New().Register("lib", &other{P: new(int)}); err == nil {
		t.Error("a pointer without Value registered")
	}
}
