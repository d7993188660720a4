package forward

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// echoLine answers each line read from c with prefix and the line.
func echoLine(c net.Conn, prefix string) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(c, "%s%s", prefix, line); err != nil {
			return
		}
	}
}

// ask sends line on c and returns the answer line.
func ask(t *testing.T, r *bufio.Reader, c net.Conn, line string) string {
	t.Helper()
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("read after %q: %q, %v", line, got, err)
	}
	return got
}

// TestRuntimeExpose: an expose added to a running Forwarder takes the
// gateway port from the next guest connection on, ahead of the host
// loopback mapping of the same port; removing it sends new connections
// back to that mapping while a connection already spliced to the socket
// goes on. A port exposed twice, a port a stack listener holds and an
// unknown port are refused with their own errors.
func TestRuntimeExpose(t *testing.T) {
	sock := unixServer(t, func(c net.Conn) { echoLine(c, "unix:") })
	// A host loopback server on the port number the expose takes.
	tl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); echoLine(c, "loopback:") }()
		}
	}()
	port := uint16(tl.Addr().(*net.TCPAddr).Port)
	e := newEnv(t, nil)
	dial := func() (*bufio.Reader, net.Conn) {
		t.Helper()
		c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, port))
		if err != nil {
			t.Fatalf("dial gateway port %d: %v", port, err)
		}
		t.Cleanup(func() { c.Close() })
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return bufio.NewReader(c), c
	}
	if r, c := dial(); ask(t, r, c, "a") != "loopback:a\n" {
		t.Fatal("before the expose: not the loopback server")
	}

	if err := e.f.AddExpose(Expose{Port: port, Path: sock + "/../" + "api.sock"}); err != nil {
		t.Fatalf("AddExpose: %v", err)
	}
	if got, want := e.f.Exposes(), []Expose{{Port: port, Path: sock}}; !reflect.DeepEqual(got, want) {
		t.Errorf("Exposes = %v, want %v (the path cleaned)", got, want)
	}
	r, held := dial()
	if got := ask(t, r, held, "b"); got != "unix:b\n" {
		t.Fatalf("through the expose: %q", got)
	}
	if err := e.f.AddExpose(Expose{Port: port, Path: "/run/other.sock"}); !errors.Is(err, ErrExposed) || !strings.Contains(err.Error(), sock) {
		t.Errorf("second AddExpose on port %d = %v; want ErrExposed naming %s", port, err, sock)
	}

	got, err := e.f.RemoveExpose(port)
	if err != nil || got != (Expose{Port: port, Path: sock}) {
		t.Fatalf("RemoveExpose = %v, %v", got, err)
	}
	if r, c := dial(); ask(t, r, c, "c") != "loopback:c\n" {
		t.Error("after the removal: not the loopback server")
	}
	if got := ask(t, r, held, "d"); got != "unix:d\n" {
		t.Errorf("the connection spliced before the removal: %q", got)
	}
	if _, err := e.f.RemoveExpose(port); !errors.Is(err, ErrNotExposed) {
		t.Errorf("second RemoveExpose = %v, want ErrNotExposed", err)
	}
	if n := e.f.c.ExposeConns.Load(); n != 1 {
		t.Errorf("ExposeConns = %d, want 1", n)
	}

	// A listener of the stack itself on the gateway would see the SYNs
	// first.
	l, err := netstacktest.ListenTCP(e.p.Host.Stack(), netip.AddrPortFrom(gw6, 2375))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := e.f.AddExpose(Expose{Port: 2375, Path: sock}); !errors.Is(err, ErrGatewayPortInUse) || !strings.Contains(err.Error(), "[fd00::2]:2375") {
		t.Errorf("AddExpose on a port the stack listens on = %v; want ErrGatewayPortInUse naming [fd00::2]:2375", err)
	}
	for _, bad := range []Expose{{Port: 0, Path: sock}, {Port: 1, Path: "rel.sock"}, {Port: 1, Path: "/" + strings.Repeat("x", 120)}} {
		if err := e.f.AddExpose(bad); err == nil {
			t.Errorf("AddExpose(%v) accepted", bad)
		}
	}
	if len(e.f.Exposes()) != 0 {
		t.Errorf("Exposes = %v after the refusals", e.f.Exposes())
	}
}
