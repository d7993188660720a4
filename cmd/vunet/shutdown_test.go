package main

import (
	"encoding/binary"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/vunettest"
	"github.com/vunet/vunet/vhost/vhosttest"
)

// TestSignalEndsVunetPromptly runs the real binary with a frontend in
// each hostile state we know and checks that SIGTERM and SIGINT end it
// within 2 s with status 0, leaving a socket file the next vunet replaces. A frontend that handed
// over /dev/zero as its kick used to make vunet spin and ignore SIGTERM.
func TestSignalEndsVunetPromptly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the vunet binary")
	}
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	defer zero.Close()
	for _, tc := range []struct {
		name  string
		sig   syscall.Signal
		setup func(t *testing.T, f *vhosttest.Frontend) func()
	}{
		{"dev-zero kick", syscall.SIGTERM, func(t *testing.T, f *vhosttest.Frontend) func() {
			f.KickFDs[1] = int(zero.Fd())
			f.Setup(^uint64(0)) // refused; the session stays up
			return nil
		}},
		{"mid set-up", syscall.SIGINT, func(t *testing.T, f *vhosttest.Frontend) func() {
			if _, err := f.U64(1, 0, true); err != nil { // GET_FEATURES, then nothing
				t.Fatal(err)
			}
			return nil
		}},
		{"flooding the TX ring", syscall.SIGTERM, func(t *testing.T, f *vhosttest.Frontend) func() {
			if err := f.Setup(^uint64(0)); err != nil {
				t.Fatal(err)
			}
			return flood(t, f)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := vunettest.Start(t)
			f, err := vhosttest.Dial(in.Socket, vhosttest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			stopGuest := tc.setup(t, f)
			time.Sleep(200 * time.Millisecond)
			start := time.Now()
			in.Signal(tc.sig)
			select {
			case <-in.Done():
			case <-time.After(2 * time.Second):
				t.Fatalf("vunet still running 2s after %v", tc.sig)
			}
			t.Logf("exited %v after %v", time.Since(start), tc.sig)
			if stopGuest != nil {
				stopGuest()
			}
			if err := in.ExitErr(); err != nil {
				t.Errorf("exit: %v", err)
			}
			// Sandboxed (the default), vunet may not remove its socket
			// file; the next vunet on the path replaces the stale one.
			if _, err := os.Stat(in.Socket); err != nil {
				t.Errorf("socket file: %v (a sandboxed vunet leaves it)", err)
			}
			vunettest.StartAt(t, in.Socket).Stop()
		})
	}
}

// flood keeps the TX ring a full ring ahead of the device, republishing
// one good chain, until the returned function is called.
func flood(t *testing.T, f *vhosttest.Frontend) func() {
	d := f.Drivers[1]
	h, err := d.Post(make([]byte, 12+60), []int{12}, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < int(d.Size); i++ {
		d.PublishRaw(h)
	}
	usedIdx := d.Config().UsedAddr - d.Base + 2
	avail := d.Size
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			used := binary.LittleEndian.Uint16(d.Mem[usedIdx:])
			if next := used + d.Size - 1; int16(next-avail) > 0 {
				avail = next
				d.SetAvailIdx(avail)
			}
			f.Kick(1)
		}
	}()
	return func() { close(stop); <-done }
}
