// Command latclient measures TCP latency from inside the test guest of
// e2e/perf: TCP_RR (1-byte request, 1-byte response, round trips on one
// connection) and TCP_CRR (connect, 1-byte request/response, close, each
// a fresh connection), against the 1-byte echo server the host side of
// the comparison runs on its loopback. It prints one line,
//
//	LAT mode=rr n=12345 p50_us=150 p90_us=170 p99_us=300 max_us=2000
//
// and exits non-zero on any error. It is built static (CGO_ENABLED=0) by
// the test and copied into the guest's initramfs; it is not part of vunet.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"time"
)

func main() {
	mode := flag.String("mode", "rr", "rr (round trips on one connection) or crr (a connection per round trip)")
	addr := flag.String("addr", "", "host:port of the echo server")
	dur := flag.Duration("d", 5*time.Second, "how long to measure")
	warm := flag.Int("warmup", 20, "round trips (rr) or connections (crr) not counted")
	flag.Parse()
	lat, err := run(*mode, *addr, *dur, *warm)
	if err != nil {
		fmt.Fprintf(os.Stderr, "latclient: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(summary(*mode, lat))
}

func run(mode, addr string, dur time.Duration, warm int) ([]time.Duration, error) {
	switch mode {
	case "rr":
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		return measure(dur, warm, func() error { return roundTrip(c) })
	case "crr":
		return measure(dur, warm, func() error {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				return err
			}
			err = roundTrip(c)
			if cerr := c.Close(); err == nil {
				err = cerr
			}
			return err
		})
	}
	return nil, fmt.Errorf("unknown mode %q", mode)
}

// measure calls op until dur has passed after warm uncounted calls and
// returns each counted call's duration.
func measure(dur time.Duration, warm int, op func() error) ([]time.Duration, error) {
	for range warm {
		if err := op(); err != nil {
			return nil, err
		}
	}
	lat := make([]time.Duration, 0, 1<<16)
	for end := time.Now().Add(dur); time.Now().Before(end); {
		t0 := time.Now()
		if err := op(); err != nil {
			return nil, err
		}
		lat = append(lat, time.Since(t0))
	}
	return lat, nil
}

// roundTrip sends one byte and waits for the echo.
func roundTrip(c net.Conn) error {
	var b [1]byte
	b[0] = 'x'
	if _, err := c.Write(b[:]); err != nil {
		return err
	}
	_, err := io.ReadFull(c, b[:])
	return err
}

func summary(mode string, lat []time.Duration) string {
	if len(lat) == 0 {
		return fmt.Sprintf("LAT mode=%s n=0", mode)
	}
	slices.Sort(lat)
	q := func(p float64) int64 { return lat[int(p*float64(len(lat)-1))].Microseconds() }
	return fmt.Sprintf("LAT mode=%s n=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d", mode, len(lat), q(0.5), q(0.9), q(0.99), lat[len(lat)-1].Microseconds())
}
