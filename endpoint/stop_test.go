package endpoint_test

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestStopWhileGuestFloods: stopping the TX queue (GET_VRING_BASE) while
// the guest keeps the ring full and keeps kicking finishes within a second.
// The worker checks for the stop after every batch; before, it went on
// popping as long as a full batch was waiting, and StopQueue (and with it
// the session, and SIGTERM) waited for the guest to pause.
func TestStopWhileGuestFloods(t *testing.T) {
	ep, _, f := serveEndpoint(t)
	defer f.Close()
	// A stack that takes its time over each frame: the guest always stays
	// a full batch ahead, as a fast guest on its own vCPU does.
	ep.Attach(slowStack{})
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	d := f.Drivers[1]
	// One good chain in every available slot; then the guest keeps its
	// index a full ring ahead of what we popped, as fast as it can: the
	// worker always finds a full batch waiting.
	h, err := d.Post(make([]byte, 12+60), []int{12}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < int(d.Size); i++ {
		d.PublishRaw(h)
	}
	usedIdx := d.Config().UsedAddr - d.Base + 2
	avail := d.Size
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			// Every chain we popped is used (TX returns them at once):
			// the used index is where we are.
			// The guest's index only moves forward.
			used := binary.LittleEndian.Uint16(d.Mem[usedIdx:])
			if next := used + d.Size - 1; int16(next-avail) > 0 {
				avail = next
				d.SetAvailIdx(avail)
			}
			f.Kick(1)
		}
	}()
	time.Sleep(300 * time.Millisecond)
	start := time.Now()
	_, err = f.GetVringBase(1)
	took := time.Since(start)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if took > time.Second {
		t.Fatalf("GET_VRING_BASE took %v while the guest flooded the ring, want < 1s", took)
	}
	t.Logf("queue stopped in %v under a flood; %d TX frames, %d bad header, ring %+v", took, ep.Stats.Queues[1].Frames.Load(), ep.Stats.TXBadHeader.Load(), ep.RingState(1))
	if ep.Stats.TXFaults.Load() != 0 {
		t.Fatal("ring faulted")
	}
}

type slowStack struct{}

func (slowStack) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {
	time.Sleep(50 * time.Microsecond)
}

func (slowStack) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
