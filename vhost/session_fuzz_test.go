package vhost

import (
	"encoding/binary"
	"log/slog"
	"testing"

	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
)

type nopBackend struct{ started map[int]bool }

var _ Backend = (*nopBackend)(nil)

func (b *nopBackend) Features() uint64                                           { return 1<<15 | 1<<5 }
func (b *nopBackend) SetFeatures(uint64) error                                   { return nil }
func (b *nopBackend) NumQueues() int                                             { return 2 }
func (b *nopBackend) Config() []byte                                             { return make([]byte, 12) }
func (b *nopBackend) StartQueue(i int, _ *virtqueue.Queue, _ *virtqueue.EventFD) { b.started[i] = true }
func (b *nopBackend) StopQueue(i int)                                            { delete(b.started, i) }
func (b *nopBackend) Reset()                                                     {}

// FuzzSession drives a session with arbitrary request sequences. File
// descriptors are -1 (the codec's checks run; mapping and eventfds fail
// cleanly). The session must never panic and must leave no queue started
// after close.
func FuzzSession(f *testing.F) {
	seq := func(msgs ...[]byte) []byte {
		var b []byte
		for _, m := range msgs {
			b = append(b, m...)
		}
		return b
	}
	msg := func(r protocol.Request, nfds byte, p []byte) []byte {
		b := []byte{nfds}
		b = protocol.EncodeHeader(b, protocol.Header{Request: r, Flags: protocol.FlagVersion, Size: uint32(len(p))})
		return append(b, p...)
	}
	u := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	f.Add(seq(
		msg(protocol.SetFeatures, 0, u(1<<30|1<<32)),
		msg(protocol.SetProtocolFeatures, 0, u(1<<3)),
		msg(protocol.SetMemTable, 1, protocol.EncodeMemTable(nil, []protocol.MemRegion{{Size: 1 << 20}})),
		msg(protocol.SetVringNum, 0, protocol.EncodeVringState(nil, protocol.VringState{Num: 256})),
		msg(protocol.SetVringAddr, 0, protocol.EncodeVringAddr(nil, protocol.VringAddr{})),
		msg(protocol.SetVringKick, 1, u(0)),
		msg(protocol.SetVringEnable, 0, protocol.EncodeVringState(nil, protocol.VringState{Num: 1})),
		msg(protocol.GetVringBase, 0, protocol.EncodeVringState(nil, protocol.VringState{})),
	))
	f.Fuzz(func(t *testing.T, data []byte) {
		b := &nopBackend{started: map[int]bool{}}
		var st Stats
		s := newSession(slog.New(slog.DiscardHandler), b, &st, func(int, error) {})
		for n := 0; len(data) >= 1+protocol.HeaderSize && n < 64; n++ {
			nfds := int(data[0] % 4)
			h, err := protocol.DecodeHeader(data[1:])
			if err != nil {
				return
			}
			data = data[1+protocol.HeaderSize:]
			if int(h.Size) > len(data) {
				return
			}
			m := protocol.Message{Header: h, Payload: data[:h.Size], FDs: make([]int, nfds)}
			for i := range m.FDs {
				m.FDs[i] = -1
			}
			data = data[h.Size:]
			if m.Validate() != nil {
				continue
			}
			s.handle(&m)
		}
		s.close()
		if len(b.started) != 0 {
			t.Fatalf("queues left started: %v", b.started)
		}
	})
}
