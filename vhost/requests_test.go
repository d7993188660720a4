package vhost

import (
	"testing"

	"github.com/vunet/vunet/vhost/protocol"
)

// TestRequestTable pins which requests the table serves and which of them
// always answer: the frontend's wire contract. A request that answers
// without being asked (or fails to) desynchronises the stream.
func TestRequestTable(t *testing.T) {
	replying := map[protocol.Request]bool{
		protocol.GetFeatures: true, protocol.GetProtocolFeatures: true, protocol.GetVringBase: true,
		protocol.GetQueueNum: true, protocol.GetConfig: true, protocol.GetMaxMemSlots: true, protocol.GetStatus: true,
		protocol.SetDeviceStateFD: true, protocol.CheckDeviceState: true,
		// QEMU reads a reply to SET_LOG_BASE (empty) whether or not it
		// asked for one.
		protocol.SetLogBase: true,
	}
	unsupported := map[protocol.Request]bool{
		protocol.SetBackendReqFD: true, protocol.IOTLBMsg: true,
		protocol.SetVringEndian: true, protocol.GetInflightFD: true, protocol.SetInflightFD: true, protocol.VringKick: true,
	}
	for r := protocol.Request(0); r <= protocol.CheckDeviceState+1; r++ {
		h, ok := handlers[r]
		switch {
		case unsupported[r] && ok:
			t.Errorf("%s is served but not offered", r)
		case ok && h.replies != replying[r]:
			t.Errorf("%s: replies %v, want %v", r, h.replies, replying[r])
		case replying[r] && !ok:
			t.Errorf("%s missing from the table", r)
		}
	}
	if len(handlers) != 30 {
		t.Errorf("%d handlers, want 30 (update this test with the table)", len(handlers))
	}
}
