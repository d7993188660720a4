package forward

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vunet/vunet/netstack/netstacktest"
)

const benchChunk = 64 << 10

func benchEnv(b testing.TB) *env {
	return newEnv(b, func(o *Options) { o.Logger = slog.New(slog.DiscardHandler) })
}

// BenchmarkTCPGuestToHost measures bulk throughput from a guest socket,
// through the Ethernet pipe, gVisor and the splice, to a host socket.
func BenchmarkTCPGuestToHost(b *testing.B) {
	e := benchEnv(b)
	srv := tcpServer(b, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		_, _ = io.Copy(io.Discard, c)
		_, _ = c.Write([]byte{1}) // everything arrived
	})
	c, err := netstacktest.DialTCP(ctxT(b, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	_ = c.CloseWrite()
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkTCPHostToGuest measures the opposite direction.
func BenchmarkTCPHostToGuest(b *testing.B) {
	e := benchEnv(b)
	srv := tcpServer(b, netip.MustParseAddr("127.0.0.1"), func(c net.Conn) {
		var n [8]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		buf := make([]byte, benchChunk)
		for i := uint64(0); i < binary.BigEndian.Uint64(n[:]); i++ {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	c, err := netstacktest.DialTCP(ctxT(b, 10*time.Second), e.p.Guest, netip.AddrPortFrom(gw4, srv.Port()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.SetBytes(benchChunk)
	b.ResetTimer()
	_, _ = c.Write(binary.BigEndian.AppendUint64(nil, uint64(b.N)))
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != int64(b.N)*benchChunk {
		b.Fatalf("received %d bytes, %v", n, err)
	}
}

// BenchmarkUDPEcho measures one 1400-byte datagram from a guest socket to
// a host echo server and back: both relay loops of a UDP flow, per
// datagram.
func BenchmarkUDPEcho(b *testing.B) {
	e := benchEnv(b)
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	c, err := netstacktest.DialUDP(e.p.Guest, netip.AddrPortFrom(gw4, pc.LocalAddr().(*net.UDPAddr).AddrPort().Port()))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg, buf := make([]byte, 1400), make([]byte, 2048)
	b.SetBytes(int64(len(msg)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}
