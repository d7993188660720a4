package vhost

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/vhost/internal/fdkind"
	"github.com/vunet/vunet/vhost/protocol"
)

// Device-state transfer (PROTOCOL_F_DEVICE_STATE, vhost-user spec
// "Migrating back-end state"): on the source, SET_DEVICE_STATE_FD(save)
// hands vunet the write end of a pipe; vunet writes its state and closes
// it; CHECK_DEVICE_STATE then says whether that worked. On the destination,
// SET_DEVICE_STATE_FD(load) hands over the read end; vunet reads to EOF and
// CHECK_DEVICE_STATE applies the state and reports the result. QEMU asks
// for this with virtio-net from 10.0 on (the requests exist since 8.2);
// older frontends use the control API instead (docs/migration.md).
//
// The pipe is served by a goroutine with a deadline and a size limit, so a
// frontend that never reads or never closes cannot hold the control plane
// or make vunet buffer without bound; CHECK_DEVICE_STATE waits for that
// goroutine, which ends by the deadline.

// DeviceState is what a back-end hands the next one when its VM migrates.
type DeviceState interface {
	// SaveState returns the state to transfer (at most
	// devstate.MaxSize bytes).
	SaveState() ([]byte, error)
	// LoadState applies a state from the previous back-end; it is called
	// from the control plane's goroutine.
	LoadState([]byte) error
}

// DefaultStateTimeout bounds one device-state transfer.
const DefaultStateTimeout = 10 * time.Second

// Reply bits of SET_DEVICE_STATE_FD: the low byte is an error code (0:
// accepted); VringNoFD says no back-end descriptor is attached, and the
// frontend keeps using its pipe.
const stateRefused = 1

// transfer is one device-state transfer in progress.
type transfer struct {
	dir  uint32
	f    *os.File
	done chan struct{} // closed when the goroutine is finished with f
	data []byte        // load: what was read
	err  error         // set before done is closed
}

// deviceStateFD is SET_DEVICE_STATE_FD's decoded payload and descriptor.
type deviceStateFD struct {
	protocol.DeviceStateTransfer
	fd   int
	slot *int // the message's entry for fd: -1 once the session owns it
}

func deviceStateArg(_ *session, m *protocol.Message) (deviceStateFD, error) {
	t, err := m.DeviceStateTransfer()
	return deviceStateFD{t, m.FDs[0], &m.FDs[0]}, err // FDsAllowed: exactly one
}

// protocolOffered is the protocol features this session offers.
func (s *session) protocolOffered() uint64 {
	f := uint64(protocolFeatures)
	if s.state != nil {
		f |= 1 << protocol.ProtoDeviceState
	}
	return f
}

// refuseState answers SET_DEVICE_STATE_FD with an error code: the
// frontend fails the migration with a message; the session goes on.
func (s *session) refuseState(err error) []byte {
	s.stats.DeviceStateErrors.Add(1)
	s.log.Warn("device state transfer refused", "err", err)
	return u64(stateRefused | protocol.VringNoFD)
}

func (s *session) setDeviceStateFD(a deviceStateFD) ([]byte, error) {
	s.abortTransfer()
	if s.state == nil || s.protoAcked&(1<<protocol.ProtoDeviceState) == 0 {
		return s.refuseState(errors.New("DEVICE_STATE was not negotiated")), nil
	}
	if a.Phase != protocol.PhaseStopped || (a.Direction != protocol.DirectionSave && a.Direction != protocol.DirectionLoad) {
		return s.refuseState(fmt.Errorf("direction %d phase %d (only save/load while stopped)", a.Direction, a.Phase)), nil
	}
	if err := fdkind.Stream(a.fd); err != nil {
		return s.refuseState(err), nil
	}
	var blob []byte
	if a.Direction == protocol.DirectionSave {
		var err error
		if blob, err = s.state.SaveState(); err != nil {
			return s.refuseState(fmt.Errorf("saving: %w", err)), nil
		}
	}
	// Non-blocking, so that os.File goes through the netpoller and
	// deadlines work.
	if err := unix.SetNonblock(a.fd, true); err != nil {
		return s.refuseState(err), nil
	}
	t := &transfer{dir: a.Direction, f: os.NewFile(uintptr(a.fd), "device-state"), done: make(chan struct{})}
	*a.slot = -1 // ownership moves to t.f
	deadline := time.Now().Add(s.stateTimeout)
	if a.Direction == protocol.DirectionSave {
		go t.save(blob, deadline)
	} else {
		go t.load(deadline)
	}
	s.xfer = t
	s.log.Info("device state transfer started", "direction", dirName(a.Direction), "bytes", len(blob))
	return u64(protocol.VringNoFD), nil
}

func (t *transfer) save(blob []byte, deadline time.Time) {
	defer close(t.done)
	err := t.f.SetWriteDeadline(deadline)
	if err == nil {
		_, err = t.f.Write(blob)
	}
	t.err = errors.Join(err, t.f.Close())
}

func (t *transfer) load(deadline time.Time) {
	defer close(t.done)
	err := t.f.SetReadDeadline(deadline)
	if err == nil {
		t.data, err = io.ReadAll(io.LimitReader(t.f, devstate.MaxSize+1))
		if err == nil && len(t.data) > devstate.MaxSize {
			err = fmt.Errorf("device state over %d bytes", devstate.MaxSize)
		}
	}
	t.err = errors.Join(err, t.f.Close())
}

// checkDeviceState waits for the transfer (its deadline bounds the wait),
// applies a loaded state, and answers 0 for success.
func (s *session) checkDeviceState(struct{}) ([]byte, error) {
	t := s.xfer
	s.xfer = nil
	if t == nil {
		s.stats.DeviceStateErrors.Add(1)
		s.log.Warn("CHECK_DEVICE_STATE without a transfer")
		return u64(1), nil
	}
	<-t.done
	err := t.err
	if err == nil && t.dir == protocol.DirectionLoad {
		err = s.state.LoadState(t.data)
	}
	if err != nil {
		s.stats.DeviceStateErrors.Add(1)
		s.log.Warn("device state transfer failed", "direction", dirName(t.dir), "err", err)
		return u64(1), nil
	}
	if t.dir == protocol.DirectionSave {
		s.stats.DeviceStateSaves.Add(1)
	} else {
		s.stats.DeviceStateLoads.Add(1)
	}
	s.log.Info("device state transfer done", "direction", dirName(t.dir), "bytes", len(t.data))
	return u64(0), nil
}

// abortTransfer ends a transfer still in progress (a new one, a reset, the
// frontend gone): closing the file wakes the goroutine.
func (s *session) abortTransfer() {
	t := s.xfer
	if t == nil {
		return
	}
	s.xfer = nil
	t.f.Close()
	<-t.done
}

func dirName(d uint32) string {
	if d == protocol.DirectionSave {
		return "save"
	}
	return "load"
}
