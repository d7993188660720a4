package forward

import (
	"io"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

// TestNoGoroutineLeak opens and closes connections and flows and checks
// that the goroutine count returns to where it was: each splice's two copy
// goroutines and each flow's loops must end.
func TestNoGoroutineLeak(t *testing.T) {
	e := newEnv(t, func(o *Options) {
		o.UDPIdleTimeout = 100 * time.Millisecond
		o.UDPStreamIdleTimeout = 100 * time.Millisecond
	})
	tcpSrv := tcpServer(t, netip.MustParseAddr("127.0.0.1"), echoHandler)
	udpSrv := udpEchoServer(t, netip.MustParseAddr("127.0.0.1"))
	// Warm up: the first connection starts gVisor's lazily created workers.
	udpRoundTrip(t, e, netip.AddrPortFrom(gw4, udpSrv.Port()), []byte("warm"))
	exchange := func() {
		c, err := netstacktest.DialTCP(ctxT(t, 5*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, tcpSrv.Port()))
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write([]byte("x"))
		_, _ = io.ReadFull(c, make([]byte, 1))
		_ = c.Close()
	}
	exchange()
	settle := func() int {
		eventually(t, "idle forwarder", func() bool {
			s := e.f.Stats()
			return s.TCPConns.Load() == 0 && s.UDPFlows.Load() == 0
		})
		time.Sleep(50 * time.Millisecond)
		return runtime.NumGoroutine()
	}
	base := settle()
	for i := 0; i < 20; i++ {
		exchange()
		udpRoundTrip(t, e, netip.AddrPortFrom(gw4, udpSrv.Port()), []byte("x"))
	}
	eventually(t, "goroutines to return", func() bool {
		settle()
		return runtime.NumGoroutine() <= base+2
	})
}
