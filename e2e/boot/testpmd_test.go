package boot

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/vunettest"
)

// TestTestpmdIperf3 uses DPDK's testpmd as a VM-less vhost-user frontend:
// its virtio-user port connects to vunet's socket and io-forwards every
// frame to and from a tap device in a network namespace the test creates.
// The tap gets the guest's static configuration (10.0.2.15/24 via
// 10.0.2.2), and iperf3 in that namespace measures TCP through vunet's NAT
// to an iperf3 server on this namespace's 127.0.0.1, in both directions.
func TestTestpmdIperf3(t *testing.T) {
	setup(t, "dpdk-testpmd\tdpdk-dev", "iperf3\tiperf3", "ip\tiproute2")
	began := time.Now()
	in := vunettest.Start(t)

	ns := fmt.Sprintf("vunetboot%d", os.Getpid())
	run(t, "ip", "netns", "add", ns)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	nsRun := func(args ...string) string { return run(t, append([]string{"ip", "netns", "exec", ns}, args...)...) }
	nsRun("ip", "link", "set", "lo", "up")

	// --no-huge: anonymous memory that DPDK shares with vunet through a
	// memfd. --file-prefix keeps the runtime directory private.
	prefix := ns
	t.Cleanup(func() { os.RemoveAll("/var/run/dpdk/" + prefix) })
	tp := startLogged(t, "testpmd", "ip", "netns", "exec", ns,
		"dpdk-testpmd", "-l", "0,1", "--no-huge", "--no-pci", "-m", "1024", "--file-prefix", prefix,
		"--vdev=net_virtio_user0,path="+in.Socket, "--vdev=net_tap0,iface=vtap0",
		"--", "--total-num-mbufs=16384", "--forward-mode=io", "--auto-start")
	// Non-interactive testpmd forwards until Enter (stdin stays open) or a
	// signal. Enter is the way to stop it: testpmd's SIGINT handler stops the
	// ports from whichever thread took the signal, and when that is the
	// forwarding lcore it waits for itself (seen in CI as a 15 s hang).
	t.Cleanup(func() { tp.quit() })
	// testpmd's stdout is block-buffered in a pipe, so readiness is seen
	// from the outside: vunet started both queues and the tap exists.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for !regexp.MustCompile(`queue started.* queue=1 `).MatchString(in.Log()) ||
		exec.Command("ip", "netns", "exec", ns, "ip", "link", "show", "vtap0").Run() != nil {
		select {
		case <-tp.done:
			t.Fatalf("testpmd exited:\n%s", tp.output())
		case <-ctx.Done():
			t.Fatalf("testpmd did not start forwarding within a minute")
		case <-time.After(100 * time.Millisecond):
		}
	}
	connected := time.Since(began)

	nsRun("ip", "link", "set", "vtap0", "address", "52:54:00:12:34:56")
	nsRun("ip", "addr", "add", "10.0.2.15/24", "dev", "vtap0")
	nsRun("ip", "link", "set", "vtap0", "up")
	nsRun("ip", "route", "add", "default", "via", "10.0.2.2")

	port := vunettest.FreePort(t)
	srv := startLogged(t, "iperf3 server", "iperf3", "-s", "--forceflush", "-B", "127.0.0.1", "-p", strconv.Itoa(port))
	t.Cleanup(func() { srv.stop(syscall.SIGTERM) })
	if err := srv.waitFor("Server listening", 30*time.Second); err != nil {
		t.Fatalf("iperf3 server: %v\n%s", err, srv.output())
	}

	for _, dir := range []struct{ name, flag string }{{"upload (namespace to host)", ""}, {"download (host to namespace, -R)", "-R"}} {
		args := []string{"iperf3", "-c", "10.0.2.2", "-p", strconv.Itoa(port), "-t", "5", "-J"}
		if dir.flag != "" {
			args = append(args, dir.flag)
		}
		start := time.Now()
		out := nsRun(args...)
		var res struct {
			End struct {
				SumSent struct {
					Bytes         int64   `json:"bytes"`
					BitsPerSecond float64 `json:"bits_per_second"`
					Retransmits   int     `json:"retransmits"`
				} `json:"sum_sent"`
				SumReceived struct {
					Bytes         int64   `json:"bytes"`
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal([]byte(out), &res); err != nil {
			t.Fatalf("iperf3 %s: %v\n%s", dir.name, err, out)
		}
		if res.Error != "" {
			t.Fatalf("iperf3 %s: %s", dir.name, res.Error)
		}
		e := res.End
		t.Logf("iperf3 %s: %.0f Mbit/s received (%d bytes; sender %.0f Mbit/s, %d retransmits) in %v",
			dir.name, e.SumReceived.BitsPerSecond/1e6, e.SumReceived.Bytes, e.SumSent.BitsPerSecond/1e6,
			e.SumSent.Retransmits, time.Since(start).Round(time.Millisecond))
		// A floor far below what any machine reaches, to catch a stall.
		if e.SumReceived.Bytes < 10<<20 {
			t.Errorf("iperf3 %s: only %d bytes received", dir.name, e.SumReceived.Bytes)
		}
	}

	tp.quit()
	if !strings.Contains(tp.output(), "Bye...") {
		t.Errorf("testpmd did not shut down cleanly:\n%s", lastLines(tp.output(), 30))
	}
	// Port 0 is virtio-user (vunet), port 1 the tap: TX-dropped on port 0
	// are frames vunet's TX queue had no room for.
	if st := forwardStats(tp.output()); st != "" {
		t.Logf("testpmd statistics:\n%s", st)
	}
	select {
	case <-in.Done():
		t.Errorf("vunet exited while testpmd ran")
	default:
	}
	t.Logf("testpmd: connected and forwarding %v after vunet start; whole test %v", connected.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
}

// run runs a command and returns its stdout, failing the test on error.
func run(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// forwardStats returns testpmd's final per-port and total statistics.
func forwardStats(out string) string {
	i := strings.LastIndex(out, "---------------------- Forward statistics for port 0")
	if i < 0 {
		return ""
	}
	rest := out[i:]
	if j := strings.Index(rest, "Done."); j >= 0 {
		rest = rest[:j]
	}
	return strings.TrimSpace(rest)
}

// logged is a background process whose combined output is collected.
type logged struct {
	name  string
	cmd   *exec.Cmd
	stdin io.WriteCloser
	mu    sync.Mutex
	buf   strings.Builder
	more  chan struct{}
	done  chan struct{}
}

func startLogged(t *testing.T, name string, args ...string) *logged {
	t.Helper()
	p := &logged{name: name, more: make(chan struct{}), done: make(chan struct{})}
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	r, w := io.Pipe()
	p.cmd.Stdout, p.cmd.Stderr = w, w
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	go func() {
		s := bufio.NewScanner(r)
		s.Buffer(make([]byte, 64<<10), 1<<20)
		for s.Scan() {
			p.mu.Lock()
			p.buf.WriteString(s.Text() + "\n")
			close(p.more)
			p.more = make(chan struct{})
			p.mu.Unlock()
		}
		io.Copy(io.Discard, r)
	}()
	go func() {
		p.cmd.Wait()
		w.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop(syscall.SIGKILL)
		if t.Failed() {
			t.Logf("%s output (last 40 lines):\n%s", name, lastLines(p.output(), 40))
		}
	})
	return p
}

func (p *logged) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.buf.String()
}

func (p *logged) waitFor(s string, d time.Duration) error {
	deadline := time.After(d)
	for {
		p.mu.Lock()
		ok, more := strings.Contains(p.buf.String(), s), p.more
		p.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-more:
		case <-p.done:
			if strings.Contains(p.output(), s) {
				return nil
			}
			return fmt.Errorf("%s exited before printing %q", p.name, s)
		case <-deadline:
			return fmt.Errorf("%s did not print %q within %v", p.name, s, d)
		}
	}
}

// quit presses Enter on testpmd's stdin, which makes it stop forwarding,
// close its ports (vunet sees GET_VRING_BASE and the disconnect) and print
// its statistics; a signal follows only if that does not end it.
func (p *logged) quit() {
	select {
	case <-p.done:
		return
	default:
	}
	p.stdin.Write([]byte("\n"))
	select {
	case <-p.done:
		time.Sleep(100 * time.Millisecond)
	case <-time.After(30 * time.Second):
		p.stop(syscall.SIGINT)
	}
}

// stop sends sig (then SIGKILL after 15 s) and waits for the exit and the
// last of the output.
func (p *logged) stop(sig syscall.Signal) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	// Let the reader drain what the process wrote last.
	time.Sleep(100 * time.Millisecond)
}
