package perf

import "testing"

func TestQdiscDrops(t *testing.T) {
	out := `qdisc noqueue 0: dev lo root refcnt 2 
 Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) 
 backlog 0b 0p requeues 0
qdisc fq_codel 0: dev vpf0 root refcnt 2 limit 10240p flows 1024 quantum 1514 target 5ms interval 100ms memory_limit 32Mb ecn drop_batch 64 
 Sent 583154230 bytes 401812 pkt (dropped 31012, overlimits 0 requeues 7) 
 backlog 0b 0p requeues 7
qdisc pfifo_fast 0: dev x root refcnt 2 bands 3 priomap 1 2 2 2 1 2 0 0 1 1 1 1 1 1 1 1
 Sent 10 bytes 1 pkt (dropped 5, overlimits 0 requeues 0) 
`
	if got := qdiscDrops(out); got != 31017 {
		t.Fatalf("qdiscDrops = %d, want 31017", got)
	}
	if got := qdiscDrops(""); got != 0 {
		t.Fatalf("empty: %d", got)
	}
}

func TestDevTxDrops(t *testing.T) {
	out := `Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  vpf0: 583154230 401812 0 7 0 0 0 0 1234 56 0 4242 0 0 0 0
`
	if got := devTxDrops(out); got != 4242 {
		t.Fatalf("devTxDrops = %d, want 4242", got)
	}
}

func TestTapTxQueueLen(t *testing.T) {
	for _, c := range []struct{ front, env, want string }{
		{frontTestpmd, "", testpmdTxQueueLen},
		{frontTestpmd, "0", ""},
		{frontTestpmd, "2000", "2000"},
		{frontTapfront, "", ""},
		{frontTapfront, "5000", "5000"},
	} {
		if got := tapTxQueueLen(c.front, c.env); got != c.want {
			t.Errorf("tapTxQueueLen(%q, %q) = %q, want %q", c.front, c.env, got, c.want)
		}
	}
}
