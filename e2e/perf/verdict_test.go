package perf

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// TestRunProblems: a column that could not run or failed fails the run
// only if it is vunet's, or if nothing was measured, or if no other
// backend's column was; otherwise the run passes with the column
// reported.
func TestRunProblems(t *testing.T) {
	vunet := backendSpec{Kind: "vunet", Front: frontQEMU}
	passt := backendSpec{Kind: "passt-vhost", Front: frontQEMU}
	tpVunet := backendSpec{Kind: "vunet", Front: frontTestpmd}
	tpPasst := backendSpec{Kind: "passt-vhost", Front: frontTestpmd}
	loop := backendSpec{Kind: kindLoopback, Front: frontHost}
	up := perfTest{Name: "up-1", Streams: 1}
	ok := func(spec backendSpec) sample { return sample{Spec: spec, Test: up, Mbps: 100} }
	bad := func(spec backendSpec) sample { return sample{Spec: spec, Test: up, Err: "iperf3: nothing received"} }
	rr := sample{Spec: passt, Test: perfTest{Name: "rr", Lat: "rr"}, Lat: latResult{N: 10}}

	for _, c := range []struct {
		name        string
		cols        []backendSpec
		samples     []sample
		unavailable map[string]string
		failed      map[string]string
		want        []string // substrings, one per problem
	}{
		{"all measured", []backendSpec{vunet, passt}, []sample{ok(vunet), ok(passt)}, nil, nil, nil},
		{"testpmd/passt-vhost unavailable, the rest compared",
			[]backendSpec{vunet, passt, loop, tpVunet, tpPasst},
			[]sample{ok(vunet), ok(passt), ok(loop), ok(tpVunet)},
			map[string]string{"testpmd/passt-vhost": "no TCP connection"}, nil, nil},
		{"another backend failed after it started", []backendSpec{vunet, passt, tpVunet, tpPasst},
			[]sample{ok(vunet), bad(passt), ok(tpVunet), ok(tpPasst)}, nil, map[string]string{"passt-vhost": "rep 1: iperf3"}, nil},
		{"a latency test is a measurement", []backendSpec{vunet, passt}, []sample{ok(vunet), rr}, nil, nil, nil},
		{"vunet alone", []backendSpec{vunet}, []sample{ok(vunet)}, nil, nil, nil},
		{"passt alone", []backendSpec{passt}, []sample{ok(passt)}, nil, nil, nil},
		{"a vunet column unavailable", []backendSpec{vunet, passt, tpVunet, tpPasst},
			[]sample{ok(vunet), ok(passt), ok(tpPasst)}, map[string]string{"testpmd/vunet": "testpmd exited"}, nil,
			[]string{"testpmd/vunet unavailable: testpmd exited"}},
		{"a vunet column failed", []backendSpec{vunet, passt}, []sample{ok(vunet), bad(vunet), ok(passt)},
			nil, map[string]string{"vunet": "rep 2: iperf3: nothing received"}, []string{"vunet failed (rep 2: iperf3"}},
		{"nothing measured", []backendSpec{vunet, passt}, []sample{bad(vunet), bad(passt)},
			map[string]string{"passt-vhost": "passt not found"}, map[string]string{"vunet": "rep 1: x"},
			[]string{"vunet failed", "nothing was measured"}},
		{"only loopback measured", []backendSpec{loop, tpPasst}, []sample{ok(loop)},
			map[string]string{"testpmd/passt-vhost": "no TCP connection"}, nil, nil},
		{"no comparison", []backendSpec{vunet, passt, loop, tpPasst}, []sample{ok(vunet), ok(loop)},
			map[string]string{"passt-vhost": "passt not found", "testpmd/passt-vhost": "passt not found"}, nil,
			[]string{"no comparison ran"}},
	} {
		got := runProblems(c.cols, c.samples, c.unavailable, c.failed)
		if len(got) != len(c.want) {
			t.Errorf("%s: problems %q, want %d like %q", c.name, got, len(c.want), c.want)
			continue
		}
		for i, w := range c.want {
			if !strings.Contains(got[i], w) {
				t.Errorf("%s: problem %d is %q, want it to contain %q", c.name, i, got[i], w)
			}
		}
	}
}

// TestReportUnavailableAndFailed: both reports carry every column that
// could not run and every one that failed, with the reason, in a stable
// order.
func TestReportUnavailableAndFailed(t *testing.T) {
	v := backendSpec{Kind: "vunet", Front: frontQEMU}
	up := perfTest{Name: "up-1", Streams: 1}
	samples := []sample{{Spec: v, Test: up, Mbps: 100, Retr: -1}}
	unavailable := map[string]string{"testpmd/passt-vhost": "testpmd: no TCP connection", "gvproxy": "VUNET_PERF_GVPROXY is not set"}
	failed := map[string]string{"passt-vhost": "rep 2: iperf3: nothing received"}
	r := formatReport([]backendSpec{v}, []perfTest{up}, samples, unavailable, failed, 1, 10, 512, 1, 0.1, "m\n")
	a := strings.Index(r, "**gvproxy unavailable**: VUNET_PERF_GVPROXY is not set")
	b := strings.Index(r, "**testpmd/passt-vhost unavailable**: testpmd: no TCP connection")
	c := strings.Index(r, "**passt-vhost failed** (rep 2: iperf3: nothing received)")
	if a < 0 || b < a || c < b {
		t.Errorf("report lacks or misorders the unavailable and failed columns:\n%s", r)
	}
	data, err := jsonReport(samples, unavailable, failed, "m")
	if err != nil {
		t.Fatal(err)
	}
	var j struct {
		Unavailable map[string]string `json:"unavailable"`
		Failed      map[string]string `json:"failed"`
	}
	if err := json.Unmarshal(data, &j); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(j.Unavailable, unavailable) || !reflect.DeepEqual(j.Failed, failed) {
		t.Errorf("JSON unavailable %v failed %v, want %v and %v", j.Unavailable, j.Failed, unavailable, failed)
	}
}

// TestScaleProblems: the scale run follows the same rule.
func TestScaleProblems(t *testing.T) {
	specs := []backendSpec{{Kind: "vunet"}, {Kind: "passt-vhost"}}
	good := func(name string) scaleResult { return scaleResult{Backend: name, Conns: 10, Opened: 10} }
	for _, c := range []struct {
		name    string
		results []scaleResult
		want    []string
	}{
		{"both", []scaleResult{good("vunet"), good("passt-vhost")}, nil},
		{"passt failed", []scaleResult{good("vunet"), {Backend: "passt-vhost", Conns: 10, Err: "unavailable: passt not found"}}, nil},
		{"passt opened fewer", []scaleResult{good("vunet"), {Backend: "passt-vhost", Conns: 10, Opened: 3}}, nil},
		{"vunet opened fewer", []scaleResult{{Backend: "vunet", Conns: 10, Opened: 3}, good("passt-vhost")}, []string{"vunet: opened 3 of 10"}},
		{"vunet failed", []scaleResult{{Backend: "vunet", Conns: 10, Err: "vunet exited"}, good("passt-vhost")}, []string{"vunet: vunet exited"}},
		{"nothing", []scaleResult{{Backend: "vunet", Conns: 10, Err: "x"}, {Backend: "passt-vhost", Conns: 10, Err: "y"}},
			[]string{"vunet: x", "nothing was measured"}},
	} {
		got := scaleProblems(specs, c.results)
		if len(got) != len(c.want) {
			t.Errorf("%s: problems %q, want %q", c.name, got, c.want)
			continue
		}
		for i, w := range c.want {
			if !strings.Contains(got[i], w) {
				t.Errorf("%s: problem %d is %q, want it to contain %q", c.name, i, got[i], w)
			}
		}
	}
}

// TestTestpmdArgs: the harness's testpmd runs the csum engine with the
// commands that keep the MAC addresses and retry a full TX ring, and
// VUNET_PERF_TESTPMD_ARGS replaces testpmd's own arguments only.
func TestTestpmdArgs(t *testing.T) {
	args := testpmdArgs("pfx", "/d/b.sock", "/d/c.cmds", "")
	joined := strings.Join(args, " ")
	for _, w := range []string{"--file-prefix pfx", "--vdev=net_virtio_user0,path=/d/b.sock", "--vdev=net_tap0,iface=" + nsDev,
		"-- --total-num-mbufs=16384 --forward-mode=csum --cmdline-file=/d/c.cmds --auto-start"} {
		if !strings.Contains(joined, w) {
			t.Errorf("testpmd arguments %q lack %q", joined, w)
		}
	}
	for _, w := range []string{"csum mac-swap off 0\n", "csum mac-swap off 1\n", "set fwd csum retry\n", "set burst tx delay 50 retry 200\n"} {
		if !strings.Contains(testpmdCmds, w) {
			t.Errorf("testpmdCmds lacks %q", w)
		}
	}
	o := testpmdArgs("pfx", "/d/b.sock", "/d/c.cmds", " --forward-mode=io  --auto-start")
	if got := strings.Join(o[len(o)-3:], " "); got != "-- --forward-mode=io --auto-start" || !reflect.DeepEqual(o[:len(o)-2], args[:len(args)-4]) {
		t.Errorf("override: %q", o)
	}
}
