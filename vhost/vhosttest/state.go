package vhosttest

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vunet/vunet/vhost/protocol"
)

// SetDeviceStateFD sends SET_DEVICE_STATE_FD with fd (not closed here) and
// returns the reply's u64: error code in the low byte, VringNoFD set when
// the back-end attached no descriptor of its own.
func (f *Frontend) SetDeviceStateFD(direction, phase uint32, fd int) (uint64, error) {
	p := protocol.EncodeDeviceStateTransfer(nil, protocol.DeviceStateTransfer{Direction: direction, Phase: phase})
	m, err := f.Request(protocol.SetDeviceStateFD, 0, p, []int{fd}, true)
	if err != nil {
		return 0, err
	}
	protocol.CloseFDs(m.FDs)
	return m.U64()
}

// CheckDeviceState sends CHECK_DEVICE_STATE and returns the back-end's
// answer (0: success).
func (f *Frontend) CheckDeviceState() (uint64, error) {
	m, err := f.Request(protocol.CheckDeviceState, 0, nil, nil, true)
	if err != nil {
		return 0, err
	}
	return m.U64()
}

// SaveState plays a migration source's QEMU: it hands the back-end the
// write end of a pipe, reads the state to EOF (for at most timeout) and
// asks CHECK_DEVICE_STATE.
func (f *Frontend) SaveState(timeout time.Duration) ([]byte, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	v, err := f.SetDeviceStateFD(protocol.DirectionSave, protocol.PhaseStopped, int(w.Fd()))
	w.Close() // the back-end has its own copy now
	if err != nil {
		return nil, err
	}
	if v&0xff != 0 {
		return nil, fmt.Errorf("SET_DEVICE_STATE_FD(save) refused: %#x", v)
	}
	_ = r.SetReadDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	if c, err := f.CheckDeviceState(); err != nil || c != 0 {
		return b, fmt.Errorf("CHECK_DEVICE_STATE after save: %d, %v", c, err)
	}
	return b, nil
}

// LoadState plays a migration destination's QEMU: it hands the back-end
// the read end of a pipe, writes state, closes its end and returns the
// answer of CHECK_DEVICE_STATE (0: the back-end took the state).
func (f *Frontend) LoadState(state []byte) (uint64, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	v, err := f.SetDeviceStateFD(protocol.DirectionLoad, protocol.PhaseStopped, int(r.Fd()))
	r.Close()
	if err != nil {
		w.Close()
		return 0, err
	}
	if v&0xff != 0 {
		w.Close()
		return 0, fmt.Errorf("SET_DEVICE_STATE_FD(load) refused: %#x", v)
	}
	_, werr := w.Write(state)
	w.Close()
	c, err := f.CheckDeviceState()
	if err == nil && werr != nil && c == 0 {
		err = fmt.Errorf("writing the state: %w", werr)
	}
	return c, err
}
