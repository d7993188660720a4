package forward

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/waiter"
)

// spliceBufSize is the copy buffer per direction. 128 KiB amortises the
// per-call cost of gVisor reads and writes without pinning much memory.
const spliceBufSize = 128 << 10

// Keepalive settings for both halves of a splice: a guest or host peer that
// vanishes without FIN/RST is detected after about two minutes of silence.
const (
	keepIdle     = 60 * time.Second
	keepInterval = 15 * time.Second
	keepCount    = 4
)

func hostKeepAlive() net.KeepAliveConfig {
	return net.KeepAliveConfig{Enable: true, Idle: keepIdle, Interval: keepInterval, Count: keepCount}
}

// setGuestKeepalive enables TCP keepalive on a gVisor endpoint. Errors are
// ignored: keepalive is an optimisation for reaping dead peers, and gVisor
// TCP endpoints support all three options.
func setGuestKeepalive(ep tcpip.Endpoint) {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepIdle)
	_ = ep.SetSockOpt(&idle)
	intvl := tcpip.KeepaliveIntervalOption(keepInterval)
	_ = ep.SetSockOpt(&intvl)
	_ = ep.SetSockOptInt(tcpip.KeepaliveCountOption, keepCount)
}

// tcpSplice joins a guest TCP endpoint (inside gVisor) to a host socket.
type tcpSplice struct {
	f     *Forwarder
	gep   tcpip.Endpoint
	guest *gonet.TCPConn
	host  net.Conn
	desc  string       // for logs
	owner *portForward // inbound forward it came through, or nil

	abortOnce sync.Once
}

func (f *Forwarder) newSplice(gep tcpip.Endpoint, wq *waiter.Queue, host net.Conn, desc string) *tcpSplice {
	return &tcpSplice{f: f, gep: gep, guest: gonet.NewTCPConn(wq, gep), host: host, desc: desc}
}

// run copies both directions until both have finished, then closes both
// sides. The caller's goroutine (already counted in f.wg) copies host to
// guest and one more goroutine copies guest to host: exactly two
// goroutines per connection, and both end when either side goes away or
// abort is called.
func (c *tcpSplice) run() {
	f := c.f
	if !f.addConn(c) {
		c.abort()
		c.closeBoth()
		return
	}
	defer f.removeConn(c)
	if !f.enter() {
		c.abort()
		c.closeBoth()
		return
	}
	done := make(chan struct{})
	go func() {
		defer f.wg.Done()
		defer close(done)
		c.pipe(c.host, c.guest)
	}()
	c.pipe(c.guest, c.host)
	<-done
	c.closeBoth()
	f.log.Debug("tcp connection closed", "conn", c.desc)
}

// pipe copies src to dst. A clean EOF is passed on as a half-close, so the
// other direction keeps flowing; any other error aborts the whole splice.
func (c *tcpSplice) pipe(dst, src net.Conn) {
	bp := c.f.bufs.Get().(*[]byte)
	defer c.f.bufs.Put(bp)
	buf := *bp
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				c.abort()
				return
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if cw, ok := dst.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
					return
				}
			}
			c.abort()
			return
		}
	}
}

// abort resets both sides: the guest gets a RST from gVisor and the host
// peer gets one too (zero linger), mirroring what a real router would make
// visible. It unblocks both copy goroutines.
func (c *tcpSplice) abort() {
	c.abortOnce.Do(func() {
		c.gep.Abort()
		if tc, ok := c.host.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		_ = c.host.Close()
	})
}

func (c *tcpSplice) closeBoth() {
	_ = c.guest.Close()
	_ = c.host.Close()
}

// addConn records a live splice so Close can abort it. It returns false if
// the Forwarder is closing.
func (f *Forwarder) addConn(c *tcpSplice) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed || c.owner != nil && c.owner.isClosed() {
		return false
	}
	f.conns[c] = struct{}{}
	f.c.TCPConnsTotal.Add(1)
	return true
}

func (f *Forwarder) removeConn(c *tcpSplice) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}
