package perf

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
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
	specs, err = parseBackends("vunet:mtu=65520:bin=/tmp/old,vunet:bin=/tmp/new")
	if err != nil {
		t.Fatal(err)
	}
	if want := (backendSpec{Kind: "vunet", MTU: 65520, Bin: "/tmp/old"}); specs[0] != want || specs[1].String() != "vunet:bin=/tmp/new" {
		t.Fatalf("parseBackends with bin=: %+v", specs)
	}
	for _, bad := range []string{"passt:bin=/x", "vunet:bin=", "vunet:mtu=100", "vunet:speed=9"} {
		if _, err := parseBackends(bad); err == nil {
			t.Errorf("parseBackends(%q) accepted", bad)
		}
	}
}

// TestParseBackendsQueues: vunet takes queues=N next to mtu=N, in either
// order; other backends and bad counts are refused.
func TestParseBackendsQueues(t *testing.T) {
	specs, err := parseBackends("vunet:queues=2,vunet:queues=2:mtu=65520,vunet:mtu=9000:queues=1")
	if err != nil {
		t.Fatal(err)
	}
	want := []backendSpec{{Kind: "vunet", Queues: 2}, {Kind: "vunet", MTU: 65520, Queues: 2}, {Kind: "vunet", MTU: 9000, Queues: 1}}
	if len(specs) != 3 || specs[0] != want[0] || specs[1] != want[1] || specs[2] != want[2] || specs[1].String() != "vunet:mtu=65520:queues=2" {
		t.Fatalf("parseBackends: %+v", specs)
	}
	for _, bad := range []string{"passt-vhost:queues=2", "vunet:queues=0", "vunet:queues=17", "vunet:mq=on"} {
		if _, err := parseBackends(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
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
		Mbps: 4998, CPU: 2500 * time.Millisecond, Host: 4 * time.Second, Retr: 6, HWMKB: 22000, AnonKB: 13700,
		Net: map[string]uint64{"Tcp:RetransSegs": 7}}
	data, err := jsonReport([]sample{s}, nil, nil, "m")
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
		CPUS: 2.5, OtherCPUS: 1.5, Retr: 6, HWMKB: 22000, AnonKB: 13700, HostTCP: map[string]uint64{"Tcp:RetransSegs": 7}}
	if len(got.Samples) != 1 || !reflect.DeepEqual(got.Samples[0], want) {
		t.Fatalf("JSON samples %+v, want [%+v]\n%s", got.Samples, want, data)
	}
}

// TestNetCounters parses the Tcp and TcpExt lines of /proc/net/snmp and
// /proc/net/netstat (other protocols' lines ignored) and reports what grew.
func TestNetCounters(t *testing.T) {
	before, after := netCounters{}, netCounters{}
	snmp := "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm MaxConn RetransSegs\nTcp: 1 -1 10\n"
	ext := "TcpExt: TCPRcvQDrop TCPLossProbes\nTcpExt: 0 3\nIpExt: InOctets\nIpExt: 99\n"
	for _, d := range []string{snmp, ext} {
		if err := parseNetCounters(d, before); err != nil {
			t.Fatal(err)
		}
	}
	snmp2 := "Tcp: RtoAlgorithm MaxConn RetransSegs\nTcp: 1 -1 25\n"
	ext2 := "TcpExt: TCPRcvQDrop TCPLossProbes\nTcpExt: 4 3\n"
	for _, d := range []string{snmp2, ext2} {
		if err := parseNetCounters(d, after); err != nil {
			t.Fatal(err)
		}
	}
	d := after.delta(before)
	want := map[string]uint64{"Tcp:RetransSegs": 15, "TcpExt:TCPRcvQDrop": 4}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("delta %v, want %v", d, want)
	}
	if got := formatNet(d); got != "RetransSegs=15 TCPRcvQDrop=4" {
		t.Fatalf("formatNet: %q", got)
	}
	if err := parseNetCounters("Tcp: A B\nTcp: 1\n", netCounters{}); err == nil {
		t.Fatal("mismatched Tcp lines accepted")
	}
	if _, err := readNetCounters(); err != nil {
		t.Fatal(err)
	}
}

// TestParseGuestNet reads the guest's counter lines around one test and
// ignores another test's and unprefixed lines.
func TestParseGuestNet(t *testing.T) {
	console := "PERF-GNET down-1 0 Tcp: RetransSegs InSegs\r\n" +
		"PERF-GNET down-1 0 Tcp: 5 100\n" +
		"PERF-GNET up-1 1 Tcp: RetransSegs InSegs\nPERF-GNET up-1 1 Tcp: 99 999\n" +
		"Tcp: 1 1\n" +
		"PERF-GNET down-1 1 Tcp: RetransSegs InSegs\n" +
		"PERF-GNET down-1 1 Tcp: 5 300\n"
	got := parseGuestNet(console, "down-1")
	if want := map[string]uint64{"Tcp:InSegs": 200}; !reflect.DeepEqual(got, want) {
		t.Fatalf("parseGuestNet = %v, want %v", got, want)
	}
	if got := parseGuestNet(console, "down-4"); got != nil {
		t.Fatalf("parseGuestNet of a missing test = %v", got)
	}
}

// TestParseLat reads latclient's line as the guest script frames it, and
// reports a failed or missing run.
func TestParseLat(t *testing.T) {
	console := "PERF-LAT rr LAT mode=rr n=31000 p50_us=150 p90_us=170 p99_us=310 max_us=2000 rc=0\n" +
		"PERF-LAT crr  rc=1\n"
	got, errText := parseLat(console, "rr")
	if want := (latResult{N: 31000, P50: 150, P90: 170, P99: 310, MaxUS: 2000}); got != want || errText != "" {
		t.Fatalf("parseLat(rr) = %+v %q, want %+v", got, errText, want)
	}
	for _, name := range []string{"crr", "missing"} {
		if _, errText := parseLat(console, name); errText == "" {
			t.Errorf("parseLat(%s) reported no error", name)
		}
	}
}

// TestLatencyReport: the latency section shows each backend's p50/p99
// and vunet's ratio to the other backend; the throughput tables do not
// list the latency tests.
func TestLatencyReport(t *testing.T) {
	tests, err := latTests("rr,crr")
	if err != nil || len(tests) != 2 {
		t.Fatalf("latTests: %v %v", tests, err)
	}
	if _, err := latTests("rr,udp_rr"); err == nil {
		t.Fatal("unknown latency test accepted")
	}
	if l, err := latTests("none"); err != nil || len(l) != 0 {
		t.Fatalf("latTests(none) = %v, %v", l, err)
	}
	up := perfTest{Name: "up-1", Streams: 1}
	v, p := backendSpec{Kind: "vunet"}, backendSpec{Kind: "passt-vhost"}
	samples := []sample{
		{Spec: v, Rep: 1, Test: tests[0], Lat: latResult{N: 1000, P50: 120, P99: 400}, CPU: time.Second},
		{Spec: p, Rep: 1, Test: tests[0], Lat: latResult{N: 900, P50: 100, P99: 500}},
		{Spec: v, Rep: 1, Test: up, Mbps: 1000, Bytes: 1e9},
	}
	r := formatReport([]backendSpec{v, p}, append([]perfTest{up}, tests...), samples, nil, nil, 1, 10, 512, 1, 0.1, "m")
	for _, want := range []string{
		"| vunet | TCP_RR | 1 | 120 | 400 | 1000 | 1000.0 |",
		"| passt-vhost | TCP_RR | 1 | 100 | 500 | 900 | 0.0 |",
		"| vunet / passt-vhost | 1.20 | 0.80 | – | – |",
		"| 1 | vunet | rr | 120 / 400 |",
	} {
		if !strings.Contains(r, want) {
			t.Errorf("report lacks %q:\n%s", want, r)
		}
	}
	if strings.Contains(r, "| vunet | rr | guest↔host") {
		t.Errorf("latency test in the throughput table:\n%s", r)
	}
	script := guestScript("10.0.2.2", 5201, append([]perfTest{up}, tests...), 10, guestFiles{echoPort: 7777, latSecs: 5})
	if !strings.Contains(script, "/bin/latclient -mode \"$2\" -addr 10.0.2.2:7777 -d 5s") || !strings.Contains(script, "lat crr crr\n") {
		t.Errorf("guest script lacks the latency runs:\n%s", script)
	}
}
