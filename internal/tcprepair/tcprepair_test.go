package tcprepair

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

func needRepair(t *testing.T) {
	t.Helper()
	if err := Available(); err != nil {
		t.Skipf("no TCP repair here: %v", err)
	}
}

// pattern is n bytes of a sequence that shows any lost, doubled or
// reordered byte.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i/251) ^ seed
	}
	return b
}

// pair returns a connected client and the server's end; the server's
// receive buffer is small so that the client's writes queue up on its side.
func pair(t *testing.T, rcvbuf int) (client, server *net.TCPConn) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if rcvbuf > 0 {
			_ = c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf)
			})
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func readFull(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// writeQueued writes until the kernel refuses more (the peer's window is
// shut), at most max bytes; it returns what was written.
func writeQueued(t *testing.T, c *net.TCPConn, data []byte) int {
	t.Helper()
	_ = c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	n, err := c.Write(data)
	_ = c.SetWriteDeadline(time.Time{})
	if err != nil && !errors.Is(err, syscall.EAGAIN) && !isTimeout(err) {
		t.Fatal(err)
	}
	return n
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestDumpRestore moves a connection with bytes in both queues: the peer
// must receive every byte once, in order, and the restored socket must
// read what the peer had sent before the dump.
func TestDumpRestore(t *testing.T) {
	needRepair(t)
	client, server := pair(t, 4096)

	// Traffic before the move, both ways.
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if got := readFull(t, server, 5); string(got) != "hello" {
		t.Fatalf("server got %q", got)
	}
	// Unread by the client: its receive queue.
	toClient := pattern(3000, 0x5a)
	if _, err := server.Write(toClient); err != nil {
		t.Fatal(err)
	}
	// Not taken by the server: the client's send queue, mostly unsent.
	toServer := pattern(150<<10, 0xa5)
	n := writeQueued(t, client, toServer)
	if n < 20<<10 {
		t.Fatalf("only %d bytes queued; the test needs a full send queue", n)
	}
	toServer = toServer[:n]
	time.Sleep(50 * time.Millisecond) // let the receive queue fill

	st, err := Dump(client, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.RcvQueue) != len(toClient) || !bytes.Equal(st.RcvQueue, toClient) {
		t.Fatalf("dumped receive queue has %d bytes, want %d", len(st.RcvQueue), len(toClient))
	}
	if len(st.SndQueue) == 0 {
		t.Fatal("dumped send queue is empty")
	}
	if !st.Timestamps || !st.SACK || !st.WScale || st.MSS == 0 {
		t.Fatalf("options not dumped: %+v", st)
	}

	// The peer must see nothing of the dump: no EOF, no RST.
	_ = server.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	probe := make([]byte, 1)
	if _, err := server.Read(probe); err != nil && !isTimeout(err) {
		// The server may read the first queued byte; anything else but a
		// timeout is the connection ending.
		t.Fatalf("peer saw the dump: %v", err)
	} else if err == nil {
		toServer = toServer[1:]
		if probe[0] != pattern(1, 0xa5)[0] {
			t.Fatal("peer read a wrong byte")
		}
	}

	rc, err := Restore(st)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if got := readFull(t, rc, len(toClient)); !bytes.Equal(got, toClient) {
		t.Fatal("restored socket read different bytes from its receive queue")
	}
	if got := readFull(t, server, len(toServer)); !bytes.Equal(got, toServer) {
		t.Fatal("peer read a different stream after the restore")
	}
	// And on, both ways.
	if _, err := rc.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	if got := readFull(t, server, 5); string(got) != "after" {
		t.Fatalf("server got %q after the restore", got)
	}
	if _, err := server.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	if got := readFull(t, rc, 5); string(got) != "reply" {
		t.Fatalf("restored socket got %q", got)
	}
	// A clean end: the peer sees EOF.
	if err := rc.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := server.Read(probe); n != 0 || err != io.EOF {
		t.Fatalf("peer read %d, %v; want EOF", n, err)
	}
}

// TestDumpRefusesLargeQueue leaves a connection with more queued than
// MaxQueue alone: it is not dumped and keeps working.
func TestDumpRefusesLargeQueue(t *testing.T) {
	needRepair(t)
	client, server := pair(t, 0)
	// The client does not read yet: its receive queue fills.
	big := pattern(64<<10, 1)
	if _, err := server.Write(big); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := Dump(client, 16<<10); !errors.Is(err, ErrQueueTooLarge) {
		t.Fatalf("dump of a connection with %d bytes queued, limit 16 KiB: %v, want ErrQueueTooLarge", len(big), err)
	}
	if got := readFull(t, client, len(big)); !bytes.Equal(got, big) {
		t.Fatal("the refused connection lost data")
	}
}

func TestRestoreRejectsBadState(t *testing.T) {
	if _, err := Restore(&State{}); err == nil {
		t.Fatal("restored a state without addresses")
	}
	st := &State{SndQueue: make([]byte, MaxQueue+1)}
	if _, err := Restore(st); err == nil {
		t.Fatal("restored an oversized queue")
	}
}

// TestRestoreWaitsForTheSource: a restore on the host where the dumped
// socket still exists (its last descriptor not closed yet) waits for it
// to go, then carries on; and it binds beside a listener on its own
// address (a connection accepted through a port forward, restored where
// the forward listens too).
func TestRestoreWaitsForTheSource(t *testing.T) {
	needRepair(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	server := sc.(*net.TCPConn)
	// A second descriptor keeps the dumped socket, and its four-tuple.
	held, err := server.File()
	if err != nil {
		t.Fatal(err)
	}
	st, err := Dump(server, 0)
	if err != nil {
		t.Fatal(err)
	}
	released := make(chan struct{})
	go func() {
		time.Sleep(100 * time.Millisecond)
		_ = held.Close()
		close(released)
	}()
	restored, err := Restore(st)
	if err != nil {
		t.Fatal(err)
	}
	defer restored.Close()
	select {
	case <-released:
	default:
		t.Fatal("restored while the source socket still held the connection")
	}
	if _, err := restored.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if got := readFull(t, client, 4); string(got) != "ping" {
		t.Fatalf("client got %q", got)
	}
	if _, err := client.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if got := readFull(t, restored, 4); string(got) != "pong" {
		t.Fatalf("restored socket got %q", got)
	}
}
