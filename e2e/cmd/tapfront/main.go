// Command tapfront is a VM-less vhost-user frontend with offloads: it
// connects to a virtio-net backend's socket (vunet's --socket), creates the
// tap device --tap with a virtio-net header and CSUM/TSO offloads, and
// bridges it to the backend's virtqueues until interrupted, so that the
// Linux stack behind the tap is a full-speed guest. Run it in a network
// namespace and configure the tap there like a guest NIC, for example:
//
//	ip netns add g; ip netns exec g tapfront --socket /run/vunet.sock --tap vtf0 &
//	ip netns exec g sh -c 'ip link set lo up; ip link set vtf0 address 52:54:00:12:34:56;
//	  ip addr add 10.0.2.15/24 dev vtf0; ip link set vtf0 up; ip route add default via 10.0.2.2'
//
// On exit it prints its counters (frames, TSO frames and bytes each way).
// See package e2e/tapfront.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vunet/vunet/e2e/tapfront"
)

func main() {
	socket := flag.String("socket", "", "vhost-user socket of the backend (required)")
	tapName := flag.String("tap", "vtf0", "tap device to create or attach to")
	ring := flag.Uint("ring-size", tapfront.DefaultRingSize, "size of both virtqueues (power of two)")
	rxBuf := flag.Int("rx-buf", tapfront.SlotSize, "bytes per receive buffer (smaller ones make the backend merge)")
	noEventIdx := flag.Bool("no-event-idx", false, "do not negotiate VIRTIO_RING_F_EVENT_IDX")
	noOffloads := flag.Bool("no-offloads", false, "negotiate no checksum or TSO offloads")
	flag.Parse()
	if *socket == "" || *ring > 32768 {
		flag.Usage()
		os.Exit(2)
	}
	tap, err := tapfront.OpenTap(*tapName)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	b, err := tapfront.Dial(*socket, tap, tapfront.Options{RingSize: uint16(*ring), RXBufSize: *rxBuf, NoEventIdx: *noEventIdx, NoOffloads: *noOffloads})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := b.SetTapOffload(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "tapfront: %s bridged to %s (features %#x)\n", *tapName, *socket, b.Features())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = b.Run(ctx)
	s := &b.Stats
	fmt.Printf("to backend: %d frames %d bytes, %d GSO, %d over 1514 bytes, %d NEEDS_CSUM, %d dropped\n",
		s.TXFrames.Load(), s.TXBytes.Load(), s.TXGSO.Load(), s.TXBig.Load(), s.TXNeedsCsum.Load(), s.TXDropped.Load())
	fmt.Printf("from backend: %d frames %d bytes, %d GSO, %d over 1514 bytes, %d NEEDS_CSUM, %d merged, %d bad, %d tap errors\n",
		s.RXFrames.Load(), s.RXBytes.Load(), s.RXGSO.Load(), s.RXBig.Load(), s.RXNeedsCsum.Load(), s.RXMerged.Load(), s.RXBad.Load(), s.RXTapErrors.Load())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
