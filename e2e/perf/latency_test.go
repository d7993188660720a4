package perf

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Latency tests (VUNET_PERF_LATENCY, default "rr,crr"): the guest runs
// latclient against a 1-byte echo server on the host's loopback, through
// the backend, like netperf's TCP_RR (round trips on one connection) and
// TCP_CRR (connect, round trip, close).

// latResult is latclient's summary of one latency test.
type latResult struct {
	N                    int
	P50, P90, P99, MaxUS int64 // microseconds
}

// latRE matches latclient's output line as the guest script frames it:
// "PERF-LAT rr LAT mode=rr n=123 p50_us=150 p90_us=170 p99_us=300 max_us=2000".
var latRE = regexp.MustCompile(`(?m)^PERF-LAT (\S+) LAT mode=\S+ n=(\d+) p50_us=(\d+) p90_us=(\d+) p99_us=(\d+) max_us=(\d+)`)

// parseLat returns the latency result of test name, or an error text.
func parseLat(console, name string) (latResult, string) {
	for _, m := range latRE.FindAllStringSubmatch(console, -1) {
		if m[1] != name {
			continue
		}
		var v [5]int64
		for i := range v {
			v[i], _ = strconv.ParseInt(m[i+2], 10, 64)
		}
		if v[0] == 0 {
			return latResult{}, "no round trips"
		}
		return latResult{N: int(v[0]), P50: v[1], P90: v[2], P99: v[3], MaxUS: v[4]}, ""
	}
	return latResult{}, "no latency result (latclient failed or the guest did not get that far)"
}

// latTests parses VUNET_PERF_LATENCY: a comma-separated subset of rr and
// crr, or "none".
func latTests(s string) ([]perfTest, error) {
	var out []perfTest
	for _, f := range strings.Split(s, ",") {
		switch f = strings.TrimSpace(f); f {
		case "none", "":
		case "rr", "crr":
			out = append(out, perfTest{Name: f, Lat: f})
		default:
			return nil, fmt.Errorf("VUNET_PERF_LATENCY: unknown test %q (want rr, crr or none)", f)
		}
	}
	return out, nil
}

// buildLatClient builds latclient static for the guest.
func buildLatClient(t *testing.T, root, dir string) []byte {
	t.Helper()
	out := filepath.Join(dir, "latclient")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./e2e/perf/latclient")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building latclient: %v\n%s", err, b)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// echoServer answers every byte it reads on every connection with the
// same byte, at once: the host end of TCP_RR and TCP_CRR. It runs in the
// test process for the whole comparison and is closed by t.Cleanup.
func echoServer(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]bool{}
	)
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close() // a guest killed mid-test leaves its connection open
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					t.Logf("echo server: %v", err)
				}
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				var b [1]byte
				for {
					if _, err := io.ReadFull(c, b[:]); err != nil {
						return
					}
					if _, err := c.Write(b[:]); err != nil {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// splitTests separates the throughput tests from the latency tests.
func splitTests(tests []perfTest) (tput, lat []perfTest) {
	for _, pt := range tests {
		if pt.Lat != "" {
			lat = append(lat, pt)
		} else {
			tput = append(tput, pt)
		}
	}
	return tput, lat
}

// formatLatency renders the latency tests: medians over the repetitions
// of each sample's p50 and p99 (quiet samples where there are any), and
// the ratio of every vunet column's p50 and p99 to every other backend's
// (< 1: vunet faster).
func formatLatency(specs []backendSpec, tests []perfTest, samples []sample) string {
	var b strings.Builder
	b.WriteString("\nLatency (latclient in the guest against a 1-byte echo server on the host's loopback: TCP_RR = 1-byte request/response round trips on one connection, TCP_CRR = connect + request/response + close): median over the repetitions of each run's p50 and p99 in µs (min–max in brackets), round trips per run, backend CPU per 1000 round trips.\n\n")
	b.WriteString("| backend | test | n | p50 µs | p99 µs | round trips | backend CPU ms / 1000 |\n|---|---|---:|---:|---:|---:|---:|\n")
	type key struct{ spec, test string }
	p50s, p99s := map[key]float64{}, map[key]float64{}
	for _, spec := range specs {
		for _, pt := range tests {
			quiet := 0
			for _, s := range samples {
				if s.Spec == spec && s.Test == pt && s.Err == "" && !s.Noisy {
					quiet++
				}
			}
			var p50, p99, n, cpu []float64
			noisy := ""
			for _, s := range samples {
				if s.Spec != spec || s.Test != pt || s.Err != "" || s.Lat.N == 0 || (quiet > 0 && s.Noisy) {
					continue
				}
				if s.Noisy {
					noisy = " noisy"
				}
				p50 = append(p50, float64(s.Lat.P50))
				p99 = append(p99, float64(s.Lat.P99))
				n = append(n, float64(s.Lat.N))
				cpu = append(cpu, 1e6*s.CPU.Seconds()/float64(s.Lat.N))
			}
			if len(p50) == 0 {
				fmt.Fprintf(&b, "| %s | %s | 0 | – | – | – | – |\n", spec, pt.Name)
				continue
			}
			p50s[key{spec.String(), pt.Name}] = median(p50)
			p99s[key{spec.String(), pt.Name}] = median(p99)
			fmt.Fprintf(&b, "| %s | %s | %d%s | %s | %s | %s | %s |\n", spec, latLabel(pt), len(p50), noisy,
				spread(p50, "%.0f"), spread(p99, "%.0f"), fmtMedian(n, "%.0f"), fmtMedian(cpu, "%.1f"))
		}
	}
	var rows []string
	for _, a := range specs {
		for _, o := range specs {
			if a.Kind != "vunet" || o.Kind == "vunet" {
				continue
			}
			row := fmt.Sprintf("| %s / %s |", a, o)
			for _, pt := range tests {
				for _, m := range []map[key]float64{p50s, p99s} {
					x, y := m[key{a.String(), pt.Name}], m[key{o.String(), pt.Name}]
					if x == 0 || y == 0 {
						row += " – |"
					} else {
						row += fmt.Sprintf(" %.2f |", x/y)
					}
				}
			}
			rows = append(rows, row)
		}
	}
	if len(rows) > 0 {
		b.WriteString("\nLatency ratios (vunet's time over the other's: < 1, vunet faster).\n\n| ratio |")
		for _, pt := range tests {
			fmt.Fprintf(&b, " %s p50 | %s p99 |", latLabel(pt), latLabel(pt))
		}
		fmt.Fprintf(&b, "\n|---|%s\n", strings.Repeat("---:|", 2*len(tests)))
		b.WriteString(strings.Join(rows, "\n") + "\n")
	}
	return b.String()
}

func latLabel(pt perfTest) string {
	return map[string]string{"rr": "TCP_RR", "crr": "TCP_CRR"}[pt.Lat]
}
