package endpoint_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/vunet/vunet/endpoint"
	"github.com/vunet/vunet/endpoint/endpointtest"
	"github.com/vunet/vunet/netstack"
	"github.com/vunet/vunet/netstack/netstacktest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestTwoStacks runs TCP between a gVisor "guest" stack, attached to the
// mock frontend as a virtio driver, and a gVisor "host" stack behind the
// real vhost-user server and endpoint: socket protocol, memfd, rings,
// split headers, mergeable buffers and all.
func TestTwoStacks(t *testing.T) {
	for _, tc := range []struct {
		name     string
		features uint64
		bufSize  int
		split    []int
	}{
		{"mergeable 1526-byte buffers, header split 5+7", ^uint64(0), 1526, []int{5, 7}},
		{"mergeable 256-byte buffers (frames span elements)", ^uint64(0), 256, []int{12, 20}},
		// Without mergeable buffers a guest that takes TSO must post 64 KiB
		// buffers (virtio 5.1.6.3.1); one that posts small ones does not ack it.
		{"no mergeable, 2 KiB buffers, no guest TSO, one-byte header pieces", ^uint64(0) &^ (1<<endpoint.FeatureMrgRxbuf | 1<<endpoint.FeatureGuestTSO4 | 1<<endpoint.FeatureGuestTSO6), 2048, []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
		{"no mergeable, 64 KiB buffers, guest TSO", ^uint64(0) &^ (1 << endpoint.FeatureMrgRxbuf), 65562, []int{12}},
		{"offloads off (guest acks no CSUM/TSO): checksums finished by the stack", ^uint64(0) &^ (1<<endpoint.FeatureGuestCsum | 1<<endpoint.FeatureGuestTSO4 | 1<<endpoint.FeatureGuestTSO6 | 1<<endpoint.FeatureCsum | 1<<endpoint.FeatureHostTSO4 | 1<<endpoint.FeatureHostTSO6), 1526, []int{12}},
		{"legacy (no VERSION_1), event_idx off", ^uint64(0) &^ (1<<32 | 1<<29), 1526, []int{12}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runTwoStacks(t, tc.features, tc.bufSize, tc.split)
		})
	}
}

func runTwoStacks(t *testing.T, features uint64, bufSize int, split []int) {
	ep, err := endpoint.New(endpoint.Options{LinkAddress: netstacktest.HostMAC, GuestMAC: netstacktest.GuestMAC})
	if err != nil {
		t.Fatal(err)
	}
	host, err := netstack.New(netstack.Options{Endpoint: ep, Gateway4: netstacktest.Gateway4, DNS4: netstacktest.DNS4})
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	_, sock := vhosttest.StartServer(t, ep)

	f, err := vhosttest.Dial(sock, vhosttest.Options{MemSize: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Setup(features); err != nil {
		t.Fatal(err)
	}
	gl := endpointtest.New(f, netstacktest.GuestMAC, 1500, bufSize)
	gl.TXSplit = split
	defer gl.Stop()
	guest, err := netstacktest.NewGuest(gl)
	if err != nil {
		t.Fatal(err)
	}
	defer guest.Destroy()

	// The host side listens on the gateway address inside its stack.
	ln, err := netstacktest.ListenTCP(host.Stack(), netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 80))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	up := make([]byte, 3<<20)
	down := make([]byte, 4<<20)
	for i := range up {
		up[i] = byte(i * 13)
	}
	for i := range down {
		down[i] = byte(i*7 + 3)
	}
	got := make(chan [32]byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			c.Write(down)
			c.(interface{ CloseWrite() error }).CloseWrite()
		}()
		h := sha256.New()
		io.Copy(h, c)
		<-wrote // closing before the download is written would cut it short
		var s [32]byte
		copy(s[:], h.Sum(nil))
		got <- s
	}()
	dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer dcancel()
	c, err := netstacktest.DialTCP(dctx, guest, netip.AddrPortFrom(netstacktest.Gateway4.Addr(), 80))
	if err != nil {
		t.Fatalf("dial through the endpoint: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	go func() { c.Write(up); c.CloseWrite() }()
	recv, err := io.ReadAll(c)
	if err != nil {
		st := &ep.Stats
		t.Fatalf("guest read: %v (got %d bytes); endpoint tx %d rx %d backlogged %d full %d toobig %d notconn %d; guest: tcp csum errs %d, ip malformed %d, valid segs %d, tcp invalid %d; host: csum errs %d malformed %d valid %d; guestlink delivered %d posted %d ringfull %d rxused %d",
			err, len(recv), st.Queues[1].Frames.Load(), st.Queues[0].Frames.Load(), st.RXBacklogged.Load(), st.RXBacklogFull.Load(), st.RXTooBig.Load(), st.RXNotConnected.Load(), guest.Stats().TCP.ChecksumErrors.Value(), guest.Stats().IP.MalformedPacketsReceived.Value(), guest.Stats().TCP.ValidSegmentsReceived.Value(), guest.Stats().TCP.InvalidSegmentsReceived.Value(),
			host.Stack().Stats().TCP.ChecksumErrors.Value(), host.Stack().Stats().IP.MalformedPacketsReceived.Value(), host.Stack().Stats().TCP.ValidSegmentsReceived.Value(), gl.Delivered.Load(), gl.Posted.Load(), gl.RingFull.Load(), gl.RXUsed.Load())
	}
	if !bytes.Equal(recv, down) {
		t.Fatalf("guest received %d bytes, want %d (content differs: %v)", len(recv), len(down), len(recv) == len(down))
	}
	select {
	case s := <-got:
		if s != sha256.Sum256(up) {
			t.Fatal("host received different bytes")
		}
	case <-time.After(60 * time.Second):
		t.Fatal("host side never finished")
	}
	if ep.Stats.Queues[1].Frames.Load() == 0 || ep.Stats.Queues[0].Frames.Load() == 0 {
		t.Fatal("no frames counted")
	}
	_ = tcpip.LinkAddress("")
}
