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
	"net/netip"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
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
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().Is4() {
		return nil, fmt.Errorf("-addr %q: want IPv4:port", addr)
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	switch mode {
	case "rr":
		fd, err := dial(sa)
		if err != nil {
			return nil, err
		}
		defer unix.Close(fd)
		return measure(dur, warm, func() error { return roundTrip(fd) })
	case "crr":
		return measure(dur, warm, func() error {
			fd, err := dial(sa)
			if err != nil {
				return err
			}
			err = roundTrip(fd)
			if cerr := unix.Close(fd); err == nil {
				err = cerr
			}
			return err
		})
	}
	return nil, fmt.Errorf("unknown mode %q", mode)
}

// dial connects a blocking TCP socket with Nagle off. Plain blocking
// system calls, not the net package: under an emulated CPU every trip
// through Go's network poller and scheduler would add tens of µs of the
// client's own to each round trip, and this measures the backend.
func dial(sa *unix.SockaddrInet4) (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1); err != nil {
		unix.Close(fd)
		return -1, err
	}
	for {
		err = unix.Connect(fd, sa)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
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
func roundTrip(fd int) error {
	b := []byte{'x'}
	for {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 1 {
			break
		}
	}
	for {
		n, err := unix.Read(fd, b)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case n == 0:
			return io.ErrUnexpectedEOF
		}
		return nil
	}
}

func summary(mode string, lat []time.Duration) string {
	if len(lat) == 0 {
		return fmt.Sprintf("LAT mode=%s n=0", mode)
	}
	slices.Sort(lat)
	q := func(p float64) int64 { return lat[int(p*float64(len(lat)-1))].Microseconds() }
	return fmt.Sprintf("LAT mode=%s n=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d", mode, len(lat), q(0.5), q(0.9), q(0.99), lat[len(lat)-1].Microseconds())
}
