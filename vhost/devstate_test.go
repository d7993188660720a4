package vhost_test

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/devstate"
	"github.com/vunet/vunet/vhost"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// memState is a DeviceState in memory.
type memState struct {
	mu     sync.Mutex
	saved  []byte
	loaded [][]byte
	refuse error
}

func (m *memState) SaveState() ([]byte, error) { return m.saved, nil }

// got returns the states loaded so far. The server's goroutine writes
// them; the socket orders that, but the race detector cannot see it.
func (m *memState) got() [][]byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.loaded
}

func (m *memState) setRefuse(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.refuse = err
}

func (m *memState) LoadState(b []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.refuse != nil {
		return m.refuse
	}
	m.loaded = append(m.loaded, append([]byte(nil), b...))
	return nil
}

// stateServer serves a sink device with st as its device state.
func stateServer(t *testing.T, st vhost.DeviceState, timeout time.Duration) (*vhost.Server, *vhosttest.Frontend) {
	t.Helper()
	srv, err := vhost.NewServer(vhost.Options{Backend: newSink(), State: st, StateTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "vhost.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l, false) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("vhost server: %v", err)
		}
	})
	f, err := vhosttest.Dial(path, vhosttest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := f.Setup(^uint64(0)); err != nil {
		t.Fatal(err)
	}
	return srv, f
}

// TestDeviceStateMigration plays both QEMUs of a migration with the mock
// frontend: the source stops its rings and saves the state through a pipe,
// the destination loads it on another session; the bytes arrive whole.
func TestDeviceStateMigration(t *testing.T) {
	blob := bytes.Repeat([]byte("vunet state "), 20000) // 240 KB: more than a pipe holds
	srcState, dstState := &memState{saved: blob}, &memState{}
	srcSrv, src := stateServer(t, srcState, 0)
	dstSrv, dst := stateServer(t, dstState, 0)
	pf, err := src.U64(protocol.GetProtocolFeatures, 0, true)
	if err != nil || pf&(1<<protocol.ProtoDeviceState) == 0 {
		t.Fatalf("protocol features %#x, %v: DEVICE_STATE not offered", pf, err)
	}
	for i := range 2 {
		if _, err := src.GetVringBase(i); err != nil {
			t.Fatal(err)
		}
	}
	got, err := src.SaveState(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatalf("saved %d bytes, want the %d of the state", len(got), len(blob))
	}
	if c, err := dst.LoadState(got); err != nil || c != 0 {
		t.Fatalf("load: CHECK_DEVICE_STATE %d, %v", c, err)
	}
	if l := dstState.got(); len(l) != 1 || !bytes.Equal(l[0], blob) {
		t.Fatalf("destination loaded %d states", len(l))
	}
	if srcSrv.Stats.DeviceStateSaves.Load() != 1 || dstSrv.Stats.DeviceStateLoads.Load() != 1 ||
		srcSrv.Stats.DeviceStateErrors.Load()+dstSrv.Stats.DeviceStateErrors.Load() != 0 {
		t.Errorf("saves %d loads %d errors %d+%d", srcSrv.Stats.DeviceStateSaves.Load(), dstSrv.Stats.DeviceStateLoads.Load(),
			srcSrv.Stats.DeviceStateErrors.Load(), dstSrv.Stats.DeviceStateErrors.Load())
	}
	// The session is still fine.
	if _, err := dst.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatal(err)
	}
}

// TestDeviceStateHostile: what the device refuses, a state over the size
// limit, a frontend that never reads or never closes, bad directions,
// phases and descriptors each fail the transfer with an answer and a
// counter, never a hang or a closed session.
func TestDeviceStateHostile(t *testing.T) {
	st := &memState{saved: make([]byte, 1<<20)}
	srv, f := stateServer(t, st, 300*time.Millisecond)
	errs := func() uint64 { return srv.Stats.DeviceStateErrors.Load() }
	want := uint64(0)
	check := func(what string, c uint64, err error) {
		t.Helper()
		want++
		if err != nil || c == 0 || errs() != want {
			t.Errorf("%s: CHECK_DEVICE_STATE %d, err %v, errors %d (want %d)", what, c, err, errs(), want)
		}
		if _, err := f.U64(protocol.GetFeatures, 0, true); err != nil {
			t.Fatalf("%s: session gone: %v", what, err)
		}
	}

	st.setRefuse(errors.New("bad state"))
	c, err := f.LoadState([]byte("whatever"))
	check("refused by the device", c, err)
	st.setRefuse(nil)

	c, err = f.LoadState(make([]byte, devstate.MaxSize+1))
	check("over the size limit", c, err)

	// A frontend that keeps its end open and sends nothing: the deadline
	// ends the transfer.
	r, w, _ := os.Pipe()
	start := time.Now()
	v, err := f.SetDeviceStateFD(protocol.DirectionLoad, protocol.PhaseStopped, int(r.Fd()))
	r.Close()
	if err != nil || v != protocol.VringNoFD {
		t.Fatalf("SET_DEVICE_STATE_FD(load) = %#x, %v", v, err)
	}
	// The control plane answers during the transfer.
	if _, err := f.U64(protocol.GetFeatures, 0, true); err != nil {
		t.Fatal(err)
	}
	c, err = f.CheckDeviceState()
	if time.Since(start) > 5*time.Second {
		t.Errorf("CHECK_DEVICE_STATE took %v with a 300ms deadline", time.Since(start))
	}
	w.Close()
	check("silent frontend", c, err)

	// A frontend that never reads a state larger than the pipe.
	r, w, _ = os.Pipe()
	v, err = f.SetDeviceStateFD(protocol.DirectionSave, protocol.PhaseStopped, int(w.Fd()))
	w.Close()
	if err != nil || v != protocol.VringNoFD {
		t.Fatalf("SET_DEVICE_STATE_FD(save) = %#x, %v", v, err)
	}
	c, err = f.CheckDeviceState()
	r.Close()
	check("frontend not reading", c, err)

	c, err = f.CheckDeviceState()
	check("CHECK without a transfer", c, err)

	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	r, w, _ = os.Pipe()
	defer r.Close()
	defer w.Close()
	for name, req := range map[string]struct {
		dir, phase uint32
		fd         int
	}{
		"direction 7": {7, 0, int(r.Fd())},
		"phase 1":     {protocol.DirectionLoad, 1, int(r.Fd())},
		"eventfd":     {protocol.DirectionLoad, 0, efd},
	} {
		v, err := f.SetDeviceStateFD(req.dir, req.phase, req.fd)
		want++
		if err != nil || v&0xff == 0 || errs() != want {
			t.Errorf("%s: SET_DEVICE_STATE_FD = %#x, %v, errors %d", name, v, err, errs())
		}
	}
	if l := st.got(); len(l) != 0 {
		t.Errorf("the device loaded %d states", len(l))
	}
}

// Without a DeviceState the feature is not offered, and the request is
// refused with an answer.
func TestDeviceStateNotOffered(t *testing.T) {
	_, f := stateServer(t, nil, 0)
	pf, err := f.U64(protocol.GetProtocolFeatures, 0, true)
	if err != nil || pf&(1<<protocol.ProtoDeviceState) != 0 {
		t.Fatalf("protocol features %#x, %v", pf, err)
	}
	r, w, _ := os.Pipe()
	defer w.Close()
	v, err := f.SetDeviceStateFD(protocol.DirectionLoad, protocol.PhaseStopped, int(r.Fd()))
	r.Close()
	if err != nil || v&0xff == 0 {
		t.Errorf("SET_DEVICE_STATE_FD without the feature = %#x, %v", v, err)
	}
}
