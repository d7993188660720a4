package harness

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vunet/vunet/internal/testutil"
)

// Proc is a child process whose combined output is collected.
type Proc struct {
	cmd  *exec.Cmd
	out  *testutil.Buffer
	done chan struct{}
	err  error
}

// StartProc starts name with args; it is killed if this process dies.
func StartProc(name string, args ...string) (*Proc, error) {
	p := &Proc{out: &testutil.Buffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(name, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Output returns what the process printed so far.
func (p *Proc) Output() string { return p.out.String() }

// Pid is the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the exit error; valid after Done.
func (p *Proc) Err() error { return p.err }

// CPUTime is the user plus system CPU time the process used over its
// whole life (from wait4's rusage); valid after Done, 0 before.
func (p *Proc) CPUTime() time.Duration {
	select {
	case <-p.done:
	default:
		return 0
	}
	if st := p.cmd.ProcessState; st != nil {
		return st.UserTime() + st.SystemTime()
	}
	return 0
}

// WaitOutput polls until the output contains s, the process exits or ctx ends.
func (p *Proc) WaitOutput(ctx context.Context, s string) error {
	for !strings.Contains(p.Output(), s) {
		select {
		case <-p.done:
			if strings.Contains(p.Output(), s) {
				return nil
			}
			return fmt.Errorf("%s exited (%v) before printing %q:\n%s", p.cmd.Path, p.err, s, p.Output())
		case <-ctx.Done():
			return fmt.Errorf("%s never printed %q: %w\n%s", p.cmd.Path, s, ctx.Err(), p.Output())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// Stop sends SIGTERM, then SIGKILL after grace, and waits for the exit.
func (p *Proc) Stop(grace time.Duration) error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
	}
	return p.err
}

// StartIperf3 runs a one-shot iperf3 server on 127.0.0.1:port (TCP control
// and UDP data) and returns once it listens.
func StartIperf3(ctx context.Context, port int) (*Proc, error) {
	p, err := StartProc("iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", strconv.Itoa(port), "--forceflush")
	if err != nil {
		return nil, err
	}
	if err := p.WaitOutput(ctx, "Server listening"); err != nil {
		p.Stop(time.Second)
		return nil, err
	}
	return p, nil
}

// StartVunet runs the vunet binary bin on sock with args and returns once it
// logs "vunet ready". (The tests use internal/vunettest, which builds its
// own binary; the demo runs the bin/vunet that `make demo` just built.)
func StartVunet(ctx context.Context, bin, sock string, args ...string) (*Proc, error) {
	p, err := StartProc(bin, append([]string{"--socket", sock}, args...)...)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := p.WaitOutput(ctx, "vunet ready"); err != nil {
		p.Stop(5 * time.Second)
		return nil, err
	}
	if _, err := os.Stat(sock); err != nil {
		p.Stop(5 * time.Second)
		return nil, fmt.Errorf("vunet ready but %w", err)
	}
	return p, nil
}
