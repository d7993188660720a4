package netstacktest

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/netstack"
)

// Wire carries IP packets between a simulated guest and whichever vunet
// stack it is plugged into, as QEMU moves a guest between hosts in a live
// migration. It has no Ethernet (the channel links need no address
// resolution).
type Wire struct {
	ctx   context.Context
	guest *channel.Endpoint
	mu    sync.Mutex
	host  *channel.Endpoint // nil: unplugged (the guest is paused)
	// SYNsToGuest counts IPv4 TCP SYNs a stack sent the guest.
	SYNsToGuest atomic.Int32
}

// NewWire returns an unplugged wire; its goroutines end with the test.
func NewWire(tb testing.TB) *Wire {
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	w := &Wire{ctx: ctx, guest: channel.New(1024, 1500, "")}
	go w.pump(w.guest, func() *channel.Endpoint {
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.host
	}, nil)
	return w
}

// Guest is the guest's link endpoint (for NewGuest).
func (w *Wire) Guest() stack.LinkEndpoint { return w.guest }

// NewHost builds a vunet stack on a link for this wire, not plugged in.
func (w *Wire) NewHost(tb testing.TB) (*netstack.Stack, *channel.Endpoint) {
	tb.Helper()
	link := channel.New(1024, 1500, "")
	ns, err := netstack.New(netstack.Options{Endpoint: link, Gateway4: Gateway4, DNS4: DNS4})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(ns.Close)
	return ns, link
}

// Plug connects host (a link from NewHost) to the guest; frames of a
// host plugged in before are lost from then on.
func (w *Wire) Plug(host *channel.Endpoint) {
	w.mu.Lock()
	w.host = host
	w.mu.Unlock()
	go w.pump(host, func() *channel.Endpoint {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.host != host {
			return nil
		}
		return w.guest
	}, &w.SYNsToGuest)
}

// Unplug disconnects the guest: what either side sends is lost.
func (w *Wire) Unplug() {
	w.mu.Lock()
	w.host = nil
	w.mu.Unlock()
}

func (w *Wire) pump(from *channel.Endpoint, to func() *channel.Endpoint, syns *atomic.Int32) {
	for {
		pkt := from.ReadContext(w.ctx)
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		proto := pkt.NetworkProtocolNumber
		pkt.DecRef()
		if b := v.AsSlice(); syns != nil && proto == ipv4.ProtocolNumber && len(b) > 20+13 && b[9] == 6 {
			if ihl := int(b[0]&0xf) * 4; len(b) > ihl+13 && b[ihl+13]&0x02 != 0 {
				syns.Add(1)
			}
		}
		dst := to()
		if dst == nil {
			v.Release()
			continue
		}
		np := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithView(v)})
		dst.InjectInbound(proto, np)
		np.DecRef()
	}
}
