package endpoint_test

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestGuestMemoryTruncated: a frontend that shrinks the shared memory file
// under our mapping makes our next access fault (SIGBUS). vunet must mark
// the ring broken and count it, not crash, and serve the next frontend.
func TestGuestMemoryTruncated(t *testing.T) {
	ep, sock, f := serveEndpoint(t)
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 12+60)
	if _, err := f.Drivers[1].Post(frame, []int{12}, nil, false); err != nil {
		t.Fatal(err)
	}
	// From here on nobody in this process may touch f.Mem.
	if err := unix.Ftruncate(f.MemFD, 0); err != nil {
		t.Fatal(err)
	}
	f.Kick(1)
	deadline := time.Now().Add(30 * time.Second)
	for ep.Stats.TXFaults.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("fault not counted")
		}
		time.Sleep(5 * time.Millisecond)
	}
	f.Close()

	// The next frontend is served normally.
	g, err := vhosttest.Dial(sock, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := g.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	before := ep.Stats.Queues[1].Frames.Load()
	g.Drivers[1].Post(append(make([]byte, 12), make([]byte, 60)...), []int{12}, nil, false)
	g.Kick(1)
	for ep.Stats.Queues[1].Frames.Load() == before {
		if time.Now().After(deadline) {
			t.Fatal("second frontend not served")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestQueueNumIsPairs: QEMU reads a virtio-net backend's GET_QUEUE_NUM as
// queue pairs, so the endpoint (one pair) must answer 1, not its two
// virtqueues, or QEMU accepts `queues=2` and fails later on vring 2.
func TestQueueNumIsPairs(t *testing.T) {
	_, _, f := serveEndpoint(t)
	defer f.Close()
	if n, err := f.U64(protocol.GetQueueNum, 0, true); err != nil || n != 1 {
		t.Fatalf("GET_QUEUE_NUM = %d, %v; want 1 (queue pair)", n, err)
	}
}

// serveEndpoint serves a new endpoint on a vhost-user socket and connects
// a mock frontend to it.
func serveEndpoint(t *testing.T) (*endpoint.Endpoint, string, *vhosttest.Frontend) {
	t.Helper()
	ep, err := endpoint.New(endpoint.Options{LinkAddress: netstacktest.HostMAC, GuestMAC: netstacktest.GuestMAC})
	if err != nil {
		t.Fatal(err)
	}
	_, sock := vhosttest.StartServer(t, ep)
	f, err := vhosttest.Dial(sock, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return ep, sock, f
}
