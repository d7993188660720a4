package forward

import (
	"bufio"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestUnixForward: a unix port forward creates its socket 0600, each
// connection reaches the guest's TCP port from the gateway address, data
// moves both ways and a half-close passes through in both directions;
// removing the forward unlinks the socket. (Mutation run: splice.go's
// half-close accepting only *net.TCPConn: the guest's CloseWrite aborts
// the connection and the guest never reads the client's data.)
func TestUnixForward(t *testing.T) {
	e := newEnv(t, nil)
	guest := netip.AddrPortFrom(netstacktest.Guest4, 8080)
	l, err := netstacktest.ListenTCP(e.p.Guest, guest)
	if err != nil {
		t.Fatal(err)
	}
	// The guest half-closes first, then reads what the host client
	// sends after seeing that EOF.
	got := make(chan string, 2)
	done := make(chan struct{})
	t.Cleanup(func() { _ = l.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.WriteString(c, addrPortOf(c.RemoteAddr()).Addr().String()+"\n")
				_ = c.(*gonet.TCPConn).CloseWrite()
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				b, err := io.ReadAll(c) // until the host client's FIN
				if err != nil {
					b = append(b, " err "+err.Error()...)
				}
				got <- string(b)
			}()
		}
	}()

	path := filepath.Join(t.TempDir(), "app.sock")
	pf, err := e.f.AddPortForward(PortForward{Proto: "unix", Path: path, Guest: guest})
	if err != nil {
		t.Fatal(err)
	}
	if pf.String() != "unix "+path+"->"+guest.String() {
		t.Errorf("forward %s", pf)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v, %v; want a 0600 socket", fi, err)
	}
	if _, err := e.f.AddPortForward(PortForward{Proto: "unix", Path: path, Guest: guest}); err == nil {
		t.Error("second forward on the same path accepted")
	}

	for i := 0; i < 2; i++ {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read peer line: %v", err)
		}
		if got := strings.TrimSpace(line); got != gw4.String() {
			t.Errorf("guest saw peer %s, want the gateway %s", got, gw4)
		}
		if b, err := io.ReadAll(r); err != nil || len(b) != 0 {
			t.Fatalf("after the peer line: %q, %v; want the guest's EOF", b, err)
		}
		_, _ = io.WriteString(c, "request-after-EOF")
		if err := c.(*net.UnixConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-got:
			if s != "request-after-EOF" {
				t.Fatalf("guest read %q, want request-after-EOF then EOF", s)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("guest read nothing")
		}
		_ = c.Close()
	}
	if n := e.f.c.InboundUnixConns.Load(); n != 2 {
		t.Errorf("InboundUnixConns = %d, want 2", n)
	}
	if got := e.f.ListPortForwards(); len(got) != 1 || got[0].Path != path {
		t.Errorf("ListPortForwards = %v", got)
	}
	if err := e.f.RemovePortForward(PortForward{Proto: "unix", Path: path}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket file after remove: %v", err)
	}
	for _, bad := range []PortForward{
		{Proto: "unix", Path: "relative.sock", Guest: guest},
		{Proto: "unix", Guest: guest},
		{Proto: "tcp", Path: path, Guest: guest},
		{Proto: "unix", Path: "/" + strings.Repeat("x", 120), Guest: guest},
	} {
		if _, err := e.f.AddPortForward(bad); err == nil {
			t.Errorf("AddPortForward(%+v) accepted", bad)
		}
	}
}

// unixServer runs handle for every connection on a Unix socket in a
// temporary directory and returns its path.
func unixServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { _ = l.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return path
}

// TestExpose: a guest connection to an exposed gateway port reaches the
// host Unix socket, over IPv4 and IPv6, with data both ways and the
// guest's half-close passed on, even though the gateway is not mapped to
// loopback; an unexposed gateway port stays refused, and a socket nobody
// serves gives the guest a RST and a failure count. (Mutation run:
// handleTCP without the exposed() check: the connect is refused.)
func TestExpose(t *testing.T) {
	path := unixServer(t, func(c net.Conn) {
		_, _ = io.WriteString(c, "hello\n")
		b, _ := io.ReadAll(c) // until the guest's FIN
		_, _ = c.Write(append(b, "-after-EOF"...))
	})
	dead := filepath.Join(t.TempDir(), "nobody.sock")
	e := newEnv(t, func(o *Options) {
		o.MapHostLoopback = false
		o.Expose = map[uint16]string{2375: path, 2376: dead}
	})
	for i, gw := range []netip.Addr{gw4, gw6} {
		c, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw, 2375))
		if err != nil {
			t.Fatalf("dial %s: %v", gw, err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		r := bufio.NewReader(c)
		if line, err := r.ReadString('\n'); err != nil || line != "hello\n" {
			t.Fatalf("%s: greeting %q, %v", gw, line, err)
		}
		_, _ = c.Write([]byte("request"))
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(r)
		if err != nil || string(b) != "request-after-EOF" {
			t.Fatalf("%s: read %q, %v", gw, b, err)
		}
		_ = c.Close()
		if n := e.f.c.ExposeConns.Load(); n != uint64(i+1) {
			t.Errorf("ExposeConns = %d, want %d", n, i+1)
		}
	}
	if _, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, 2377)); err == nil {
		t.Error("unexposed gateway port connected without MapHostLoopback")
	}
	if _, err := netstacktest.DialTCP(ctxT(t, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, 2376)); err == nil {
		t.Error("exposed port whose socket nobody serves connected")
	}
	if n := e.f.c.ExposeFailures.Load(); n != 1 {
		t.Errorf("ExposeFailures = %d, want 1", n)
	}
}

func TestExposeOptionsChecked(t *testing.T) {
	p := netstacktest.NewPair(t, 0)
	for _, ex := range []map[uint16]string{{0: "/run/x.sock"}, {80: "x.sock"}} {
		if _, err := New(Options{Stack: p.Host.Stack(), NIC: p.Host.NIC(), Expose: ex}); err == nil {
			t.Errorf("New accepted Expose %v", ex)
		}
	}
}
