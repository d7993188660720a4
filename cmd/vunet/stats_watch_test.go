package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/api"
)

// snapshots returns a fetch that serves sts in turn.
func snapshots(sts ...api.Stats) func(context.Context) (api.Stats, error) {
	i := 0
	return func(context.Context) (api.Stats, error) {
		if i >= len(sts) {
			return api.Stats{}, errors.New("no more snapshots")
		}
		i++
		return sts[i-1], nil
	}
}

func metric(layer, name string, v int64, kv ...string) api.Metric {
	labels := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		labels[kv[i]] = kv[i+1]
	}
	kind := api.Gauge
	if strings.HasSuffix(name, "_total") {
		kind = api.Counter
	}
	return api.Metric{Layer: layer, Name: name, Kind: kind, Help: "h", Labels: labels, Value: v}
}

func watchPair() (api.Stats, api.Stats) {
	a := api.Stats{Version: "v1", UptimeSeconds: 10, Metrics: []api.Metric{
		metric("link", "vunet_link_frames_total", 100, "queue", "0", "direction", "to_guest"),
		metric("link", "vunet_link_bytes_total", 1000, "queue", "0", "direction", "to_guest"),
		metric("link", "vunet_link_drops_total", 7, "reason", "tx_short"),
		metric("forward", "vunet_flows", 3, "proto", "tcp"),
		metric("dns", "vunet_dns_malformed_total", 2),
	}}
	b := a
	b.UptimeSeconds = 12
	b.Metrics = []api.Metric{
		metric("link", "vunet_link_frames_total", 150, "queue", "0", "direction", "to_guest"),
		metric("link", "vunet_link_bytes_total", 1000+4<<20, "queue", "0", "direction", "to_guest"),
		metric("link", "vunet_link_drops_total", 7, "reason", "tx_short"),
		metric("forward", "vunet_flows", 9, "proto", "tcp"),
		metric("dns", "vunet_dns_malformed_total", 3),
	}
	return a, b
}

// TestWatchRates: the second frame shows per-second rates of the counters
// that moved, over the uptime between the snapshots, and none for gauges
// or counters that stood still.
func TestWatchRates(t *testing.T) {
	a, b := watchPair()
	var out bytes.Buffer
	if err := watchStats(context.Background(), &out, snapshots(a, b), time.Millisecond, false, false, 2); err != nil {
		t.Fatal(err)
	}
	first, second, ok := strings.Cut(out.String(), "\n\nvunet v1")
	if !ok {
		t.Fatalf("two frames expected:\n%s", out.String())
	}
	if strings.Contains(first, "/s") {
		t.Errorf("first frame has rates:\n%s", first)
	}
	for _, want := range []string{
		"rates over 2.0s",
		"  frames   0 to_guest 150 (+25/s)\n",
		"  bytes    0 to_guest 4.0 MiB (+2.0 MiB/s)\n",
		"  drops    tx_short 7\n",    // did not move
		"  flows   tcp 9\n",          // a gauge
		"  malformed   3 (+0.5/s)\n", // its own section, its own alignment
	} {
		if !strings.Contains(second, want) {
			t.Errorf("second frame lacks %q:\n%s", want, second)
		}
	}
}

// TestWatchTerminalAndJSON: on a terminal every frame clears the screen;
// --json prints one snapshot per line.
func TestWatchTerminalAndJSON(t *testing.T) {
	a, b := watchPair()
	var out bytes.Buffer
	if err := watchStats(context.Background(), &out, snapshots(a, b), time.Millisecond, false, true, 2); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out.String(), "\x1b[H\x1b[2J"); n != 2 {
		t.Errorf("%d screen clears, want 2", n)
	}
	out.Reset()
	if err := watchStats(context.Background(), &out, snapshots(a, b), time.Millisecond, true, false, 2); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d JSON lines, want 2:\n%s", len(lines), out.String())
	}
	var st api.Stats
	if err := json.Unmarshal([]byte(lines[1]), &st); err != nil || st.UptimeSeconds != 12 {
		t.Errorf("second line: %v %+v", err, st)
	}
	// A fetch error ends the watch with that error; a cancelled context
	// ends it quietly.
	if err := watchStats(context.Background(), &out, snapshots(a), time.Millisecond, false, false, 3); err == nil {
		t.Error("fetch error not returned")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := watchStats(ctx, &out, snapshots(a, b), time.Hour, false, false, -1); err != nil {
		t.Errorf("cancelled watch: %v", err)
	}
}

func TestParseInterval(t *testing.T) {
	for in, want := range map[string]time.Duration{"5s": 5 * time.Second, "500ms": 500 * time.Millisecond, "2": 2 * time.Second, "0.5": 500 * time.Millisecond} {
		if d, err := parseInterval(in); err != nil || d != want {
			t.Errorf("parseInterval(%q) = %v, %v; want %v", in, d, err, want)
		}
	}
	for _, in := range []string{"", "fast", "10ms", "-1s", "0"} {
		if _, err := parseInterval(in); err == nil {
			t.Errorf("parseInterval(%q) accepted", in)
		}
	}
}

// TestStatsGroupsByGuest: a guest's own series (label guest) are printed
// in sections of their own, "link (guest 1)", after the shared ones, with
// the guest's rings under its virtqueue section; the guest is not repeated
// in each cell.
func TestStatsGroupsByGuest(t *testing.T) {
	m := func(layer, name string, v int64, labels ...string) api.Metric {
		l := map[string]string{}
		for i := 0; i < len(labels); i += 2 {
			l[labels[i]] = labels[i+1]
		}
		return api.Metric{Layer: layer, Name: name, Kind: api.Counter, Labels: l, Value: v}
	}
	st := api.Stats{Version: "test", Metrics: []api.Metric{
		m("link", "vunet_link_frames_total", 5, "guest", "0", "queue", "0", "direction", "to_guest"),
		m("virtqueue", "vunet_virtqueue_popped_total", 7, "guest", "0", "queue", "1", "direction", "from_guest"),
		m("link", "vunet_link_frames_total", 9, "guest", "1", "queue", "0", "direction", "to_guest"),
		m("virtqueue", "vunet_virtqueue_popped_total", 11, "guest", "1", "queue", "1", "direction", "from_guest"),
		m("forward", "vunet_forward_drops_total", 3, "reason", "egress"),
		m("forward", "vunet_forward_guest_refused_total", 2, "guest", "1", "limit", "max_connections"),
	}, Rings: []api.RingState{{Guest: 0, Queue: 1, Direction: "from_guest", Size: 256}, {Guest: 1, Queue: 1, Direction: "from_guest", Size: 512}}}
	var b strings.Builder
	if err := writeStats(&b, st, nil); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	want := "\nforward\n  drops   egress 3\n\n" +
		"link (guest 0)\n  frames   0 to_guest 5\n\n" +
		"virtqueue (guest 0)\n  popped   1 from_guest 7\n  ring     1 from_guest: size 256, avail 0, next 0, used 0\n\n" +
		"link (guest 1)\n  frames   0 to_guest 9\n\n" +
		"virtqueue (guest 1)\n  popped   1 from_guest 11\n  ring     1 from_guest: size 512, avail 0, next 0, used 0\n\n" +
		"forward (guest 1)\n  guest_refused   max_connections 2\n"
	if !strings.HasSuffix(out, want) {
		t.Fatalf("vunet stats:\n%s\nwant it to end with:\n%s", out, want)
	}
}
