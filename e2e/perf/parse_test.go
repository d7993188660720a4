package perf

import (
	"encoding/json"
	"os"
	"testing"
	"time"
)

// TestParseRetr reads iperf3's sender Retr column as the guest script
// prints it, for one stream, [SUM] of several, and a sender without it.
func TestParseRetr(t *testing.T) {
	console := "PERF-SENDER up-1 [  5]   0.00-10.00  sec   262 MBytes   220 Mbits/sec   17             sender\n" +
		"PERF-SENDER up-4 [SUM]   0.00-10.00  sec  1.10 GBytes   943 Mbits/sec  3              sender\n" +
		"PERF-SENDER down-1 [  5]   0.00-10.00  sec   262 MBytes   220 Mbits/sec                  sender\n"
	for name, want := range map[string]int{"up-1": 17, "up-4": 3, "down-1": -1, "missing": -1} {
		if got := parseRetr(console, name); got != want {
			t.Errorf("parseRetr(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestParseBackendsPasstVhost(t *testing.T) {
	specs, err := parseBackends("vunet,passt-vhost:mtu=1500,passt-vhost")
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 3 || specs[1] != (backendSpec{Kind: "passt-vhost", MTU: 1500}) || specs[2].String() != "passt-vhost" {
		t.Fatalf("parseBackends: %+v", specs)
	}
	if _, err := parseBackends("passt-vhostx"); err == nil {
		t.Fatal("unknown backend accepted")
	}
}

// TestMemKB reads this process's own VmHWM and RssAnon: both present and
// the peak at least the private part.
func TestMemKB(t *testing.T) {
	hwm, anon, err := memKB(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if anon <= 0 || hwm < anon {
		t.Fatalf("memKB: VmHWM %d KiB, RssAnon %d KiB", hwm, anon)
	}
}

// TestJSONReport checks that a sample's numbers reach the JSON report in
// plain units.
func TestJSONReport(t *testing.T) {
	s := sample{Spec: backendSpec{Kind: "passt-vhost", MTU: 65520}, Rep: 2, Test: perfTest{Name: "down-1", Reverse: true, Streams: 1},
		Mbps: 4998, CPU: 2500 * time.Millisecond, Host: 4 * time.Second, Retr: 6, HWMKB: 22000, AnonKB: 13700}
	data, err := jsonReport([]sample{s}, nil, "m")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Samples []jsonSample `json:"samples"`
	}
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	want := jsonSample{Backend: "passt-vhost", MTU: 65520, Rep: 2, Test: "down-1", Reverse: true, Streams: 1, Mbps: 4998,
		CPUS: 2.5, OtherCPUS: 1.5, Retr: 6, HWMKB: 22000, AnonKB: 13700}
	if len(got.Samples) != 1 || got.Samples[0] != want {
		t.Fatalf("JSON samples %+v, want [%+v]\n%s", got.Samples, want, data)
	}
}
