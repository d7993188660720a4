package forward

import (
	"bufio"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// inboundEcho adds a TCP port forward to a guest echo server and checks one
// connection through it; it returns the error instead of failing.
func inboundEcho(t *testing.T, e *env, pf PortForward) error {
	t.Helper()
	c, err := net.DialTimeout("tcp", pf.Host.String(), 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	if _, err := br.ReadString('\n'); err != nil { // the guest's greeting
		return err
	}
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	got, err := br.ReadString('\n')
	if err == nil && got != "ping\n" {
		t.Fatalf("echo %q", got)
	}
	return err
}

// TestInboundConnsOwnLimit: a guest holding every outbound connection it
// may have does not lock out a TCP port forward, and the forward has a
// limit of its own.
func TestInboundConnsOwnLimit(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxConns = 2; o.MaxInboundConns = 1 })
	srv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	dst := netip.AddrPortFrom(gw4, srv.Port())
	for i := 0; i < 2; i++ {
		c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	if _, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, dst); err == nil {
		t.Fatal("a third outbound connection was accepted with MaxConns 2")
	}
	guest := netip.AddrPortFrom(netstacktest.Guest4, 22)
	guestPeerServer(t, e, guest)
	pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), Guest: guest})
	if err != nil {
		t.Fatal(err)
	}
	if err := inboundEcho(t, e, pf); err != nil {
		t.Fatalf("inbound forward locked out by outbound connections: %v", err)
	}
	eventually(t, "inbound connection closed", func() bool { return e.f.Stats().InboundTCPOpen.Load() == 0 })

	// Its own limit: hold one inbound connection, the next is reset.
	held, err := net.Dial("tcp", pf.Host.String())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	eventually(t, "inbound connection spliced", func() bool { return e.f.Stats().InboundTCPOpen.Load() == 1 })
	if err := inboundEcho(t, e, pf); err == nil {
		t.Fatal("second inbound connection served with MaxInboundConns 1")
	}
	s := e.f.Stats()
	if s.TCPRejectedInbound.Load() != 1 || s.TCPRejectedConns.Load() != 1 || s.TCPConns.Load() != 2 {
		t.Errorf("rejected inbound %d outbound %d, conns %d; want 1, 1, 2", s.TCPRejectedInbound.Load(), s.TCPRejectedConns.Load(), s.TCPConns.Load())
	}
}

// TestUDPForwardPerSource: one remote address flooding a UDP forward from
// many ports gets MaxUDPFlowsPerSource flows; another address still gets
// one, and the guest's own outbound flows are untouched by inbound ones.
func TestUDPForwardPerSource(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxUDPFlowsPerSource = 3; o.MaxInboundUDPFlows = 4; o.MaxUDPFlows = 1 })
	guest := netip.AddrPortFrom(netstacktest.Guest4, 5353)
	gc, err := netstacktest.ListenUDP(e.p.Guest, guest)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = gc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := gc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = gc.WriteTo(buf[:n], from)
		}
	}()
	pf, err := e.f.AddPortForward(PortForward{Proto: "udp", Host: netip.MustParseAddrPort("127.0.0.1:0"), Guest: guest})
	if err != nil {
		t.Fatal(err)
	}
	// ask sends one datagram from the address and reports whether the
	// guest's echo came back: an expected reply is waited for long (CI is
	// loaded), an expected silence briefly.
	ask := func(from string, wait time.Duration) bool {
		laddr := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(from), 0))
		c, err := net.DialUDP("udp", laddr, net.UDPAddrFromAddrPort(pf.Host))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() }) // keep the source port, and so the flow
		_, _ = c.Write([]byte("hi"))
		_ = c.SetReadDeadline(time.Now().Add(wait))
		buf := make([]byte, 16)
		n, err := c.Read(buf)
		return err == nil && string(buf[:n]) == "hi"
	}
	for i := 0; i < 3; i++ {
		if !ask("127.0.0.1", 10*time.Second) {
			t.Fatalf("flow %d of 127.0.0.1 not served", i)
		}
	}
	for i := 0; i < 3; i++ {
		if ask("127.0.0.1", time.Second) {
			t.Fatal("127.0.0.1 got more than MaxUDPFlowsPerSource flows")
		}
	}
	if !ask("127.0.0.2", 10*time.Second) {
		t.Fatal("a second source got no flow while the first flooded")
	}
	if ask("127.0.0.3", time.Second) {
		t.Fatal("more than MaxInboundUDPFlows inbound flows")
	}
	s := e.f.Stats()
	if s.DropUDPSourceLimit.Load() != 3 || s.DropUDPInboundLimit.Load() != 1 || s.InboundUDPOpen.Load() != 4 {
		t.Errorf("source limit drops %d, inbound limit drops %d, inbound flows %d; want 3, 1, 4",
			s.DropUDPSourceLimit.Load(), s.DropUDPInboundLimit.Load(), s.InboundUDPOpen.Load())
	}
	// The guest's one outbound flow is still there for it.
	srv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	udpRoundTrip(t, e, netip.AddrPortFrom(gw4, srv.Port()), []byte("out"))
}

// flakyListener fails its first n accepts with errno, as a listener does
// when the process is out of file descriptors.
type flakyListener struct {
	net.Listener
	n     atomic.Int32
	errno syscall.Errno
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.n.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", l.errno)}
	}
	return l.Listener.Accept()
}

// TestAcceptBackoff: EMFILE and ENFILE on accept pause the forward and
// retry; the connections that waited meanwhile are served. Before, the
// first such error stopped the forward for good.
func TestAcceptBackoff(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE} {
		var fl *flakyListener
		e := newEnv(t, func(o *Options) {
			o.listenTCP = func(a netip.AddrPort) (net.Listener, error) {
				l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(a))
				if err != nil {
					return nil, err
				}
				fl = &flakyListener{Listener: l, errno: errno}
				fl.n.Store(6)
				return fl, nil
			}
		})
		guest := netip.AddrPortFrom(netstacktest.Guest4, 22)
		guestPeerServer(t, e, guest)
		pf, err := e.f.AddPortForward(PortForward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), Guest: guest})
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := inboundEcho(t, e, pf); err != nil {
			t.Fatalf("%v: forward not served after accept errors: %v", errno, err)
		}
		// 5+10+20+40+80+160 ms of backoff, doubling.
		if d := time.Since(start); d < 300*time.Millisecond {
			t.Errorf("%v: served after %v; the retries did not back off", errno, d)
		}
		if n := e.f.Stats().AcceptErrors.Load(); n != 6 {
			t.Errorf("%v: AcceptErrors = %d, want 6", errno, n)
		}
	}
}
