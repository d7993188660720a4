package boot

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/qemutest"
)

// firmwareVM describes a QEMU run that boots firmware rather than the
// qemutest Linux guest. qemutest.Guest always boots a Linux kernel with a
// fixed command line and no console input; these runs need other machine
// options, typed console input (iPXE's Ctrl-B shell) and QMP.
type firmwareVM struct {
	Socket string // vunet's vhost-user socket
	// Machine is the -machine type ("pc", "q35").
	Machine string
	// Firmware args, e.g. -kernel/-initrd or -bios.
	Firmware []string
	// DeviceOpts is appended to the virtio-net-pci options.
	DeviceOpts string
	MemMB      int
	Timeout    time.Duration
}

// vm is a running firmwareVM.
type vm struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	console *consoleBuf
	qmpPath string
	start   time.Time
	done    chan struct{}
	waitErr error
}

func (f *firmwareVM) start(t *testing.T) *vm {
	t.Helper()
	mem := f.MemMB
	if mem == 0 {
		mem = 256
	}
	timeout := f.Timeout
	if timeout == 0 {
		timeout = 5 * time.Minute
	}
	qmp := filepath.Join(t.TempDir(), "qmp.sock")
	// graphics=off makes SeaBIOS mirror the text console (int 10h) to the
	// serial port (its "sercon"), the only way to see what a BIOS iPXE
	// prints; OVMF uses the serial console anyway. id=net0 names the NIC
	// for QMP.
	devOpts := "id=net0"
	if f.DeviceOpts != "" {
		devOpts += "," + f.DeviceOpts
	}
	args := append(qemutest.MachineArgs(mem, f.Machine, "graphics=off"), qemutest.NetArgs(f.Socket, "", devOpts)...)
	args = append(args, "-qmp", "unix:"+qmp+",server=on,wait=off")
	args = append(args, f.Firmware...)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	v := &vm{console: newConsoleBuf(), qmpPath: qmp, done: make(chan struct{})}
	v.cmd = exec.CommandContext(ctx, qemutest.QEMUBinary, args...)
	v.cmd.Stdout, v.cmd.Stderr = v.console, v.console
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	v.cmd.WaitDelay = 5 * time.Second
	var err error
	if v.stdin, err = v.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	t.Logf("qemu %s", strings.Join(args, " "))
	v.start = time.Now()
	if err := v.cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", qemutest.QEMUBinary, err)
	}
	go func() {
		v.waitErr = v.cmd.Wait()
		cancel()
		close(v.done)
	}()
	t.Cleanup(func() {
		v.kill()
		if t.Failed() {
			t.Logf("console (last 60 lines):\n%s", lastLines(v.text(), 60))
		}
	})
	return v
}

func (v *vm) kill() {
	select {
	case <-v.done:
		return
	default:
	}
	v.cmd.Process.Kill()
	<-v.done
}

// text is the console so far, without carriage returns and ANSI escapes.
func (v *vm) text() string { return cleanConsole(v.console.String()) }

// waitFor waits until re matches the console text after offset from, and
// returns the match's submatches and the offset just past it. It fails the
// test if QEMU exits or the deadline passes.
func (v *vm) waitFor(t *testing.T, from int, re *regexp.Regexp, d time.Duration) ([]string, int) {
	t.Helper()
	deadline := time.After(d)
	for {
		changed := v.console.changed()
		s := v.text()
		if from > len(s) {
			from = len(s)
		}
		if loc := re.FindStringSubmatchIndex(s[from:]); loc != nil {
			var subs []string
			for i := 0; i < len(loc); i += 2 {
				if loc[i] < 0 {
					subs = append(subs, "")
					continue
				}
				subs = append(subs, s[from+loc[i]:from+loc[i+1]])
			}
			return subs, from + loc[1]
		}
		select {
		case <-changed:
		case <-v.done:
			if re.MatchString(v.text()[from:]) {
				continue
			}
			t.Fatalf("QEMU exited (%v) before the console matched %q", v.waitErr, re)
		case <-deadline:
			t.Fatalf("console did not match %q within %v", re, d)
		}
	}
}

// send types s on the serial console.
func (v *vm) send(t *testing.T, s string) {
	t.Helper()
	if _, err := io.WriteString(v.stdin, s); err != nil {
		t.Fatalf("typing on the console: %v", err)
	}
}

// qmp runs one QMP command and returns its "return" value.
func (v *vm) qmp(t *testing.T, command string, args any) json.RawMessage {
	t.Helper()
	c, err := net.Dial("unix", v.qmpPath)
	if err != nil {
		t.Fatalf("qmp: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	read := func() json.RawMessage {
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				t.Fatalf("qmp read: %v", err)
			}
			var m struct {
				Return json.RawMessage `json:"return"`
				Error  *struct{ Desc string }
				Event  string `json:"event"`
			}
			if err := json.Unmarshal(line, &m); err != nil {
				t.Fatalf("qmp: %v: %s", err, line)
			}
			switch {
			case m.Error != nil:
				t.Fatalf("qmp %s: %s", command, m.Error.Desc)
			case m.Return != nil:
				return m.Return
			}
			// greeting or asynchronous event: keep reading
		}
	}
	send := func(cmd string, a any) {
		b, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": a})
		if a == nil {
			b, _ = json.Marshal(map[string]any{"execute": cmd})
		}
		if _, err := c.Write(append(b, '\n')); err != nil {
			t.Fatalf("qmp write: %v", err)
		}
	}
	// The greeting has no "return"; read it through the capabilities reply.
	send("qmp_capabilities", nil)
	read()
	send(command, args)
	return read()
}

// guestFeatures returns the virtio feature names the guest driver of net0
// acknowledged (QEMU's x-query-virtio-status).
func (v *vm) guestFeatures(t *testing.T) []string {
	t.Helper()
	raw := v.qmp(t, "x-query-virtio-status", map[string]string{"path": "/machine/peripheral/net0/virtio-backend"})
	var st struct {
		GuestFeatures struct {
			Transports  []string `json:"transports"`
			DevFeatures []string `json:"dev-features"`
		} `json:"guest-features"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		t.Fatalf("x-query-virtio-status: %v: %s", err, raw)
	}
	return append(st.GuestFeatures.Transports, st.GuestFeatures.DevFeatures...)
}

// consoleBuf collects QEMU's output and lets readers wait for more.
type consoleBuf struct {
	mu  sync.Mutex
	buf bytes.Buffer
	ch  chan struct{}
}

func newConsoleBuf() *consoleBuf { return &consoleBuf{ch: make(chan struct{})} }

func (c *consoleBuf) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	close(c.ch)
	c.ch = make(chan struct{})
	return len(p), nil
}

func (c *consoleBuf) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func (c *consoleBuf) changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ch
}

// ansiEscape matches the CSI sequences (colours, cursor and mode changes)
// and the few two-byte escapes firmware consoles print.
var ansiEscape = regexp.MustCompile(`\x1b(\[[0-9;?=]*[ -/]*[@-~]|[@-Z\\-_c])`)

// cleanConsole removes ANSI escapes and carriage returns. It is applied to
// the whole buffer each time; an offset just past a match stays valid as the
// console grows, because only an escape still incomplete at the end of the
// buffer (so after any match) can change when more output arrives.
func cleanConsole(s string) string {
	return strings.ReplaceAll(ansiEscape.ReplaceAllString(s, ""), "\r", "")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
