package vhost

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/vhost/internal/fdkind"
	"github.com/vunet/vunet/vhost/protocol"
)

// logSeq is startSeq with LOG_SHMFD negotiated too.
func logSeq(regions []protocol.MemRegion, idx uint32, ringUser uint64) []byte {
	return seqOf(
		fuzzMsg(protocol.SetFeatures, 0, fuzzU64(1<<30|1<<32|1<<28|1<<29)),
		fuzzMsg(protocol.SetProtocolFeatures, 0, fuzzU64(1<<protocol.ProtoReplyAck|1<<protocol.ProtoLogSHMFD)),
		fuzzMsg(protocol.SetMemTable, byte(len(regions))|fdRight, protocol.EncodeMemTable(nil, regions)),
		vringMsgs(idx, ringUser),
	)
}

func logBaseMsg(size, offset uint64, fds []int) protocol.Message {
	p := protocol.EncodeLogBase(nil, protocol.LogBase{Size: size, Offset: offset})
	return protocol.Message{Header: protocol.Header{Request: protocol.SetLogBase, Flags: protocol.FlagVersion, Size: uint32(len(p))},
		Payload: p, FDs: fds}
}

// TestSetLogBaseRefused: the log is frontend input. A log too small for
// guest memory or for a logged used ring, a range past the end of the
// file, a descriptor that is not a memory file, a missing descriptor and a
// log without LOG_SHMFD are refused (the session then ends: SET_LOG_BASE
// always answers, see TestRequestTable) and counted; a good one is mapped
// and answered with an empty payload. Mutations checked: dropping the
// memory-coverage loop from mapLog fails "too small for memory"; dropping
// the file-size check from dirtylog.Map fails both "past the file" cases
// (that check is what keeps the first mark from faulting with SIGBUS).
func TestSetLogBaseRefused(t *testing.T) {
	// One region: guest 0..1 MiB, 256 pages, 32 bytes of log.
	eventfd := func() int {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	for _, tc := range []struct {
		name         string
		size, offset uint64
		fd           func(e *fuzzEnv) []int
		seq          func() []byte
		wrongKind    bool
	}{
		{name: "too small for memory", size: 16, fd: memFD},
		{name: "offset past the file", size: 32, offset: fuzzMemSize, fd: memFD},
		{name: "size past the file", size: 32, offset: fuzzMemSize - 16, fd: memFD},
		{name: "too large", size: 1 << 40, fd: memFD},
		{name: "eventfd", size: 32, fd: func(*fuzzEnv) []int { return []int{eventfd()} }, wrongKind: true},
		{name: "no descriptor", size: 32, fd: func(*fuzzEnv) []int { return nil }},
		{name: "no LOG_SHMFD", size: 32, fd: memFD, seq: func() []byte { return startSeq(oneRegion(), 0, fuzzUser) }},
		{name: "used ring log outside", size: 32, fd: memFD, seq: func() []byte {
			return seqOf(logSeq(oneRegion(), 0, fuzzUser),
				fuzzMsg(protocol.SetVringAddr, 0, protocol.EncodeVringAddr(nil, protocol.VringAddr{Index: 0, Flags: protocol.VringFLog,
					Desc: fuzzUser, Avail: fuzzUser + 0x1000, Used: fuzzUser + 0x2000, Log: fuzzMemSize})))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newFuzzEnv(t)
			defer e.close()
			seq := logSeq(oneRegion(), 0, fuzzUser)
			if tc.seq != nil {
				seq = tc.seq()
			}
			e.play(seq)
			if !e.s.vrings[0].running {
				t.Fatal("queue 0 not running before SET_LOG_BASE")
			}
			m := logBaseMsg(tc.size, tc.offset, tc.fd(e))
			defer protocol.CloseFDs(m.FDs)
			_, err := e.s.handle(&m)
			if err == nil {
				t.Fatal("accepted")
			}
			t.Log(err)
			if e.s.dirty != nil {
				t.Fatal("refused, but a log is in place")
			}
			if tc.wrongKind != errors.Is(err, fdkind.ErrWrongKind) {
				t.Errorf("wrong kind %v, err %v", tc.wrongKind, err)
			}
			if e.st.DirtyLogsRefused.Load() != 1 {
				t.Errorf("refusals counted %d, want 1", e.st.DirtyLogsRefused.Load())
			}
			if !e.s.vrings[0].running {
				t.Error("a refused log stopped the queue")
			}
		})
	}
	t.Run("accepted", func(t *testing.T) {
		e := newFuzzEnv(t)
		defer e.close()
		e.play(logSeq(oneRegion(), 0, fuzzUser))
		m := logBaseMsg(32, 4096, memFD(e))
		defer protocol.CloseFDs(m.FDs)
		reply, err := e.s.handle(&m)
		if err != nil || reply == nil || len(reply) != 0 {
			t.Fatalf("reply %v, err %v; want an empty payload", reply, err)
		}
		if e.s.dirty == nil || e.st.DirtyLogs.Load() != 1 || !e.s.vrings[0].running {
			t.Fatalf("log %v, mapped %d, queue running %v", e.s.dirty, e.st.DirtyLogs.Load(), e.s.vrings[0].running)
		}
	})
}

func memFD(e *fuzzEnv) []int {
	fd, err := unix.Dup(e.memfd)
	if err != nil {
		e.t.Fatal(err)
	}
	return []int{fd}
}

// TestStatusZeroKeepsRingBase: QEMU 7.2 stops a device with SET_STATUS 0
// and only then asks GET_VRING_BASE, whose answer it migrates (or uses
// on `cont`). The answer must be where the ring was, not 0. Mutation
// checked: not restoring the bases after the reset fails it (base 0), as
// the first real migration did (the destination refused it: "VQ 0 ...
// Guest index 0x142 inconsistent with Host index 0x0").
func TestStatusZeroKeepsRingBase(t *testing.T) {
	e := newFuzzEnv(t)
	defer e.close()
	e.play(seqOf(
		fuzzMsg(protocol.SetFeatures, 0, fuzzU64(1<<30|1<<32|1<<28|1<<29)),
		fuzzMsg(protocol.SetProtocolFeatures, 0, fuzzU64(1<<3|1<<protocol.ProtoStatus)),
		fuzzMsg(protocol.SetMemTable, 1|fdRight, protocol.EncodeMemTable(nil, oneRegion())),
		fuzzMsg(protocol.SetVringBase, 0, protocol.EncodeVringState(nil, protocol.VringState{Index: 0, Num: 0x142})),
		vringMsgs(0, fuzzUser),
	))
	if !e.s.vrings[0].running {
		t.Fatal("queue 0 not running")
	}
	e.play(fuzzMsg(protocol.SetStatus, 0, fuzzU64(0)))
	if e.b.started[0] {
		t.Fatal("status 0 left the queue running")
	}
	m := protocol.Message{Header: protocol.Header{Request: protocol.GetVringBase, Flags: protocol.FlagVersion, Size: 8},
		Payload: protocol.EncodeVringState(nil, protocol.VringState{Index: 0})}
	reply, err := e.s.handle(&m)
	if err != nil {
		t.Fatal(err)
	}
	r := protocol.Message{Header: protocol.Header{Size: uint32(len(reply))}, Payload: reply}
	if st, _ := r.VringState(); st.Num != 0x142 {
		t.Fatalf("GET_VRING_BASE after SET_STATUS 0 = %#x, want 0x142", st.Num)
	}
}
