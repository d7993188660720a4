package endpoint_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestTwoQueuePairs runs TCP between a gVisor "guest" stack, driving two
// queue pairs of the mock frontend the way a multiqueue driver does (each
// connection transmits on one pair), and vunet's stack behind the real
// vhost-user server: MQ is negotiated, GET_QUEUE_NUM says 2, connections
// use both pairs in both directions, every connection's frames to the guest
// come on one receive queue only, and when the guest stops pair 1
// (GET_VRING_BASE on rings 2 and 3, as QEMU does when the driver goes down
// to one pair) new and old connections carry on over pair 0 while pair 1's
// counters stand still.
//
// Mutations checked by hand: steer always choosing the first receive queue
// fails "queue 2 carried no frames"; a hash that includes the IP ID (a
// per-packet field, so one connection's segments spread over both queues)
// stalls round 1's connections; StopQueue not steering around the stopped
// queue (no updateActiveRX) fails round 2 (frames dropped as
// rx_not_connected).
func TestTwoQueuePairs(t *testing.T) {
	ep, err := endpoint.New(endpoint.Options{LinkAddress: netstacktest.HostMAC, GuestMAC: netstacktest.GuestMAC, QueuePairs: 2})
	if err != nil {
		t.Fatal(err)
	}
	host, err := netstack.New(netstack.Options{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS4: netstacktest.DNS4})
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	_, sock := vhosttest.StartServer(t, ep)
	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 64 << 20, Queues: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := f.U64(protocol.GetQueueNum, 0, true); err != nil || n != 2 {
		t.Fatalf("GET_QUEUE_NUM = %d, %v; want 2 pairs", n, err)
	}
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	if f.Features&(1<<endpoint.FeatureMQ) == 0 {
		t.Fatalf("MQ not offered (acked %#x)", f.Features)
	}
	gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, 1526)
	defer gl.Stop()
	guest, err := netstacktest.NewGuest(gl)
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Destroy()

	// Which receive pairs each connection's frames came on, by the
	// guest's port (the destination of frames to the guest).
	var mu sync.Mutex
	seen := map[uint16]uint8{}
	gl.SetOnRX(func(pair int, frame []byte) {
		if port, ok := tcpDstPort(frame); ok {
			mu.Lock()
			seen[port] |= 1 << pair
			mu.Unlock()
		}
	})

	ln, err := netstacktest.ListenTCP(host.Stack(), netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 80))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go echoServer(ln)

	frames := func() (out [4]uint64) {
		for i := range out {
			out[i] = ep.Stats.Queues[i].Frames.Load()
		}
		return out
	}
	// 16 connections: the chance that all pick one pair is 2^-15 for
	// each direction.
	if err := parallelEcho(guest, 16, 128<<10); err != nil {
		t.Fatalf("round 1: %v (rx_not_connected %d)", err, ep.Stats.RXNotConnected.Load())
	}
	got := frames()
	for i, n := range got {
		if n == 0 {
			t.Errorf("queue %d carried no frames (frames by queue %v)", i, got)
		}
	}
	mu.Lock()
	both := 0
	for port, pairs := range seen {
		if pairs == 3 {
			t.Errorf("connection from guest port %d got frames on both receive pairs", port)
			both++
		}
	}
	mu.Unlock()
	if both > 0 {
		t.Fatalf("%d connections not steered to one queue", both)
	}

	// The guest goes down to one pair: QEMU stops rings 2 and 3.
	gl.SetActivePairs(1)
	for _, q := range []int{2, 3} {
		if _, err := f.GetVringBase(q); err != nil {
			t.Fatal(err)
		}
	}
	if ep.RingState(2).Ready || ep.RingState(3).Ready || !ep.RingState(0).Ready {
		t.Fatal("ring states after stopping pair 1")
	}
	before := frames()
	if err := parallelEcho(guest, 8, 64<<10); err != nil {
		t.Fatalf("round 2, pair 1 stopped: %v (rx_not_connected %d)", err, ep.Stats.RXNotConnected.Load())
	}
	after := frames()
	if after[2] != before[2] || after[3] != before[3] {
		t.Errorf("pair 1 moved while stopped: frames by queue %v, then %v", before, after)
	}
	if after[0] == before[0] || after[1] == before[1] {
		t.Errorf("pair 0 idle in round 2: frames by queue %v, then %v", before, after)
	}
	t.Logf("frames by queue after round 1 %v, round 2 %v; backlog %d", got, after, ep.RXBacklog())
}

// echoServer returns whatever each connection sends, until it half-closes.
func echoServer(ln *gonet.TCPListener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			io.Copy(c, c)
			c.(*gonet.TCPConn).CloseWrite()
		}()
	}
}

// tcpDstPort returns the TCP destination port of an Ethernet/IPv4 frame.
func tcpDstPort(frame []byte) (uint16, bool) {
	if len(frame) < 14+20 || binary.BigEndian.Uint16(frame[12:]) != 0x0800 {
		return 0, false
	}
	ip := frame[14:]
	ihl := int(ip[0]&0xf) * 4
	if ip[9] != 6 || len(ip) < ihl+4 {
		return 0, false
	}
	return binary.BigEndian.Uint16(ip[ihl+2:]), true
}

// parallelEcho opens n connections from the guest to the gateway's port
// 80 at once; each sends size bytes and must get them back unchanged.
func parallelEcho(guest *stack.Stack, n, size int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, n)
	for i := range n {
		go func() { errs <- echoOnce(ctx, guest, i, size) }()
	}
	var first error
	for range n {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// echoOnce is one connection of parallelEcho.
func echoOnce(ctx context.Context, guest *stack.Stack, i, size int) error {
	c, err := netstacktest.DialTCP(ctx, guest, netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 80))
	if err != nil {
		return fmt.Errorf("connection %d: dial: %w", i, err)
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	up := make([]byte, size)
	for j := range up {
		up[j] = byte(i*31 + j*7)
	}
	go func() { c.Write(up); c.CloseWrite() }()
	back, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(back, up) {
		return fmt.Errorf("connection %d: got %d of %d bytes back (equal %v): %v", i, len(back), size, bytes.Equal(back, up), err)
	}
	return nil
}

// startPairs is a vunet stack behind a 2-pair endpoint, served on a fresh
// socket, with a mock frontend of queues queues dialled (not yet set up).
func startPairs(t *testing.T, queues int) (*endpoint.Endpoint, *vhost.Server, *netstack.Stack, *vhosttest.Frontend) {
	t.Helper()
	ep, err := endpoint.New(endpoint.Options{LinkAddress: netstacktest.HostMAC, GuestMAC: netstacktest.GuestMAC, QueuePairs: 2})
	if err != nil {
		t.Fatal(err)
	}
	host, err := netstack.New(netstack.Options{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS4: netstacktest.DNS4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(host.Close)
	srv, sock := vhosttest.StartServer(t, ep)
	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 64 << 20, Queues: queues})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	ln, err := netstacktest.ListenTCP(host.Stack(), netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 80))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go echoServer(ln)
	return ep, srv, host, f
}

// guestOn attaches a gVisor guest stack to f's pairs.
func guestOn(t *testing.T, f *vhosttest.Frontend) (*endpointtest.GuestLink, *stack.Stack) {
	t.Helper()
	gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, 1526)
	t.Cleanup(gl.Stop)
	guest, err := netstacktest.NewGuest(gl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(guest.Destroy)
	return gl, guest
}

// TestPairsEnabledOutOfOrder: a frontend that enables only receive queue 2
// and transmit queue 1 (one ring of each pair, so neither pair is whole)
// still gets a working link: every frame to the guest goes to queue 2,
// every frame from it comes on queue 1, nothing is dropped as
// rx_not_connected. Mutation checked by hand: steering over every pair's
// receive queue instead of the running ones (updateActiveRX keeping
// stopped queues) fails the transfers.
func TestPairsEnabledOutOfOrder(t *testing.T) {
	ep, _, _, f := startPairs(t, 4)
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	for _, q := range []uint32{3, 0} { // odd order: pair 1's TX first
		if err := f.Ack(protocol.SetVringEnable, protocol.EncodeVringState(nil, protocol.VringState{Index: q, Num: 0}), nil); err != nil {
			t.Fatal(err)
		}
	}
	for q, want := range []bool{false, true, true, false} {
		if got := ep.RingState(q).Ready; got != want {
			t.Fatalf("queue %d running %v, want %v", q, got, want)
		}
	}
	gl, guest := guestOn(t, f)
	gl.SetActivePairs(1)
	before := [4]uint64{}
	for i := range before {
		before[i] = ep.Stats.Queues[i].Frames.Load()
	}
	if err := parallelEcho(guest, 4, 64<<10); err != nil {
		t.Fatalf("%v (rx_not_connected %d)", err, ep.Stats.RXNotConnected.Load())
	}
	for q, moved := range []bool{false, true, true, false} {
		if got := ep.Stats.Queues[q].Frames.Load() != before[q]; got != moved {
			t.Errorf("queue %d carried frames: %v, want %v", q, got, moved)
		}
	}
	if n := ep.Stats.RXNotConnected.Load(); n != 0 {
		t.Errorf("%d frames dropped as rx_not_connected with queue 2 running", n)
	}
}

// TestFrontendMoreQueuesThanOffered: a frontend that sets up six rings on a
// device of two pairs is refused ring 4 (REPLY_ACK failure, counted as a
// bad message), and the four rings the device has work.
func TestFrontendMoreQueuesThanOffered(t *testing.T) {
	ep, srv, _, f := startPairs(t, 6)
	err := f.Setup(^uint64(0))
	if err == nil || !strings.Contains(err.Error(), "queue 4") {
		t.Fatalf("Setup of 6 rings on 2 pairs: %v, want ring 4 refused", err)
	}
	if n := srv.Stats.BadMessages.Load(); n == 0 {
		t.Error("the refused ring was not counted as a bad message")
	}
	f.Drivers, f.Kicks, f.Calls = f.Drivers[:4], f.Kicks[:4], f.Calls[:4]
	_, guest := guestOn(t, f)
	if err := parallelEcho(guest, 8, 32<<10); err != nil {
		t.Fatal(err)
	}
	for q := range 4 {
		if ep.Stats.Queues[q].Frames.Load() == 0 {
			t.Errorf("queue %d idle", q)
		}
	}
}
