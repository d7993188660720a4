package netstacktest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// DialTCP connects from the guest stack to dst.
func DialTCP(ctx context.Context, g *stack.Stack, dst netip.AddrPort) (*gonet.TCPConn, error) {
	return gonet.DialContextTCP(ctx, g, FullAddr(dst), Proto(dst.Addr()))
}

// ListenTCP listens on the guest stack.
func ListenTCP(g *stack.Stack, at netip.AddrPort) (*gonet.TCPListener, error) {
	return gonet.ListenTCP(g, FullAddr(at), Proto(at.Addr()))
}

// DialUDP creates a connected UDP socket on the guest stack.
func DialUDP(g *stack.Stack, dst netip.AddrPort) (*gonet.UDPConn, error) {
	raddr := FullAddr(dst)
	return gonet.DialUDP(g, nil, &raddr, Proto(dst.Addr()))
}

// ListenUDP binds a UDP socket on the guest stack.
func ListenUDP(g *stack.Stack, at netip.AddrPort) (*gonet.UDPConn, error) {
	laddr := FullAddr(at)
	return gonet.DialUDP(g, &laddr, nil, Proto(at.Addr()))
}

// Ping sends one echo request with payload from the guest to dst and waits
// for the matching reply or ctx's end. It returns the source address of the
// reply.
func Ping(ctx context.Context, g *stack.Stack, dst netip.Addr, payload []byte) (netip.Addr, error) {
	dst = dst.Unmap()
	proto, netProto := icmp.ProtocolNumber4, Proto(dst)
	typ := byte(header.ICMPv4Echo)
	if dst.Is6() {
		proto, typ = icmp.ProtocolNumber6, byte(header.ICMPv6EchoRequest)
	}
	var wq waiter.Queue
	ep, terr := g.NewEndpoint(proto, netProto, &wq)
	if terr != nil {
		return netip.Addr{}, fmt.Errorf("icmp endpoint: %s", terr)
	}
	defer ep.Close()
	we, ch := waiter.NewChannelEntry(waiter.ReadableEvents)
	wq.EventRegister(&we)
	defer wq.EventUnregister(&we)

	msg := make([]byte, 8+len(payload))
	msg[0] = typ
	copy(msg[8:], payload)
	to := FullAddr(netip.AddrPortFrom(dst, 0))
	if _, terr := ep.Write(bytes.NewReader(msg), tcpip.WriteOptions{To: &to}); terr != nil {
		return netip.Addr{}, fmt.Errorf("icmp write: %s", terr)
	}
	for {
		var buf bytes.Buffer
		res, terr := ep.Read(&buf, tcpip.ReadOptions{NeedRemoteAddr: true})
		if _, ok := terr.(*tcpip.ErrWouldBlock); ok {
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return netip.Addr{}, ctx.Err()
			}
		}
		if terr != nil {
			return netip.Addr{}, fmt.Errorf("icmp read: %s", terr)
		}
		b := buf.Bytes()
		if len(b) < 8 || !bytes.Equal(b[8:], payload) {
			continue // not our reply
		}
		from, _ := netip.AddrFromSlice(res.RemoteAddr.Addr.AsSlice())
		return from, nil
	}
}

// AddrOf returns a TCP or UDP net.Addr as a netip.AddrPort, or the zero value.
func AddrOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	}
	return netip.AddrPort{}
}
