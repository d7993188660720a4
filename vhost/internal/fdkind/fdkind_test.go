package fdkind

import (
	"errors"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestKinds(t *testing.T) {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	tfd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(tfd)
	mfd, err := unix.MemfdCreate("fdkind", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(mfd)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	defer zero.Close()
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	l, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	lf, _ := l.(*net.UnixListener).File()
	defer lf.Close()

	for _, tc := range []struct {
		name      string
		fd        int
		event, mm bool
	}{
		{"eventfd", efd, true, false},
		{"timerfd", tfd, false, false},
		{"memfd", mfd, false, true},
		{"pipe", p[0], false, false},
		{"/dev/zero", int(zero.Fd()), false, false},
		{"directory", int(dir.Fd()), false, false},
		{"socket", int(lf.Fd()), false, false},
		{"closed", 1 << 20, false, false},
	} {
		if err := EventFD(tc.fd); (err == nil) != tc.event || (err != nil && !errors.Is(err, ErrWrongKind)) {
			t.Errorf("%s: EventFD: %v", tc.name, err)
		}
		if _, err := RegularFile(tc.fd); (err == nil) != tc.mm || (err != nil && !errors.Is(err, ErrWrongKind)) {
			t.Errorf("%s: RegularFile: %v", tc.name, err)
		}
	}
}
