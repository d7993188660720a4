package forward

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// TestTCPRoomPollReadsHostEarly: a guest that reads slowly, freeing less
// than half of vunet's full send buffer at a time, still gets the host
// socket read by the splice's own polls, not only when gVisor reports
// half the buffer free. (Host data left unread makes the host kernel hold
// back its ACKs, and its sender's loss probes retransmit: see roomPoll.)
func TestTCPRoomPollReadsHostEarly(t *testing.T) {
	e := newEnv(t, nil)
	srv := streamServer(t)
	ep := zeroWindowConn(t, e, netip.AddrPortFrom(gw4, srv.Port()))
	defer ep.Abort()
	eventually(t, "the splice", func() bool {
		e.f.mu.Lock()
		defer e.f.mu.Unlock()
		return len(e.f.conns) == 1
	})
	// The guest reads its 4 KiB window every 2 ms: each read frees a
	// quarter of vunet's 16 KiB send buffer (or less of a grown one).
	var buf bytes.Buffer
	moved := 0
	for start := time.Now(); time.Since(start) < 10*time.Second && e.f.Stats().TCPRoomPolls.Load() == 0; {
		buf.Reset()
		if _, err := ep.Read(&buf, tcpip.ReadOptions{}); err == nil {
			moved += buf.Len()
		} else if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			t.Fatalf("guest read: %s", err)
		}
		time.Sleep(2 * roomPoll)
	}
	if n := e.f.Stats().TCPRoomPolls.Load(); n == 0 {
		t.Errorf("%d host reads started by a poll for room while the guest read %d bytes, want at least 1", n, moved)
	}
}

// TestTCPRoomPollStopsForStalledGuest: a guest that acknowledges nothing
// costs no wakeups: the poll that finds no room is the last one.
func TestTCPRoomPollStopsForStalledGuest(t *testing.T) {
	e := newEnv(t, nil)
	srv := streamServer(t)
	ep := zeroWindowConn(t, e, netip.AddrPortFrom(gw4, srv.Port()))
	defer ep.Abort()
	eventually(t, "the splice", func() bool { return e.f.Stats().TCPConns.Load() == 1 })
	// Polling every roomPoll would be about 200 wakeups by now; the
	// fill-up takes a handful (a poll, the host socket).
	time.Sleep(200 * roomPoll)
	if w := e.f.Stats().TCPWakeups.Load(); w > 10 {
		t.Errorf("%d wakeups in %v with a zero window, want at most 10", w, 200*roomPoll)
	}
}
