// Package tcprepair moves an established host TCP socket from one process
// to another without the peer noticing, with Linux's TCP repair mode
// (TCP_REPAIR, which needs CAP_NET_ADMIN): Dump reads a socket's sequence
// numbers, both queues, negotiated options and window, and closes it
// silently (no FIN, no RST: in repair mode the kernel forgets the
// connection); Restore builds a socket with the same four-tuple and state,
// which then carries on as if nothing happened.
//
// Between Dump and Restore nothing holds the four-tuple: a segment the peer
// sends in that gap gets a RST from the kernel, if both ends are on one
// host. The caller dumps only when the connection is quiet and restores as
// soon as it can.
package tcprepair

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Queue selectors for TCP_REPAIR_QUEUE (linux/tcp.h; x/sys has no names
// for them).
const (
	queueNone = 0
	queueRecv = 1
	queueSend = 2
)

// tcpi_options bits (linux/tcp.h).
const (
	optTimestamps = 1
	optSACK       = 2
	optWScale     = 4
)

// MaxQueue bounds each queue a dump carries and a restore accepts. A
// connection with more queued is not dumped (ErrQueueTooLarge): the
// device state that carries it has a size limit, and so has the
// destination's memory.
const MaxQueue = 256 << 10

// Errors that say why a socket could not be dumped; the caller counts
// them by reason.
var (
	ErrNotEstablished = errors.New("tcprepair: connection not established")
	ErrQueueTooLarge  = errors.New("tcprepair: queue larger than the limit")
)

// Window is Linux's struct tcp_repair_window.
type Window struct {
	SndWL1, SndWnd, MaxWindow, RcvWnd, RcvWup uint32
}

// State is one dumped connection: enough to rebuild it on another socket.
type State struct {
	Local, Remote netip.AddrPort
	// SndSeq is the sequence number after the last byte in the send
	// queue (write_seq); RcvSeq the next byte expected (rcv_nxt).
	SndSeq, RcvSeq uint32
	// SndQueue holds bytes written but not acknowledged by the peer
	// (sent or not); RcvQueue bytes received but not read.
	SndQueue, RcvQueue []byte
	// MSS is the sending MSS.
	MSS uint32
	// Negotiated options.
	Timestamps, SACK, WScale bool
	SndWScale, RcvWScale     uint8
	// TSVal is the socket's timestamp clock at the dump.
	TSVal  uint32
	Window Window
}

// Dump reads conn's state in repair mode and closes it silently. A queue
// longer than limit (at most MaxQueue; 0 means MaxQueue) refuses the dump
// with ErrQueueTooLarge. On any error conn is left open and out of repair
// mode, as it was.
func Dump(conn *net.TCPConn, limit int) (*State, error) {
	if limit <= 0 || limit > MaxQueue {
		limit = MaxQueue
	}
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	var st *State
	var derr error
	if err := rc.Control(func(fd uintptr) { st, derr = dumpFD(int(fd), limit) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	// Still in repair mode: the close sends nothing and leaves no
	// TIME_WAIT behind.
	if err := conn.Close(); err != nil {
		return nil, fmt.Errorf("tcprepair: close after dump: %w", err)
	}
	return st, nil
}

// Available says whether this process may use repair mode, by trying it
// on a fresh socket.
func Available() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return fmt.Errorf("tcprepair: TCP_REPAIR: %w (needs CAP_NET_ADMIN)", err)
	}
	return nil
}

func dumpFD(fd, limit int) (st *State, err error) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: TCP_INFO: %w", err)
	}
	if info.State != unix.BPF_TCP_ESTABLISHED {
		return nil, ErrNotEstablished
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return nil, fmt.Errorf("tcprepair: TCP_REPAIR on: %w", err)
	}
	defer func() {
		if err != nil {
			// Leave the socket as it was: it goes on (or is reset) normally.
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP)
		}
	}()
	// The queue sizes are read in repair mode, like the queues themselves:
	// read before, a segment still arriving made the peek below disagree
	// with the count ("queue held 147456 bytes, 149504 announced").
	inq, err := unix.IoctlGetInt(fd, unix.SIOCINQ)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: SIOCINQ: %w", err)
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: SIOCOUTQ: %w", err)
	}
	if inq > limit || outq > limit || inq < 0 || outq < 0 {
		return nil, ErrQueueTooLarge
	}
	ws, err := wscales(fd)
	if err != nil {
		return nil, err
	}
	st = &State{
		Timestamps: info.Options&optTimestamps != 0,
		SACK:       info.Options&optSACK != 0,
		WScale:     info.Options&optWScale != 0,
		// tcpi_snd_wscale:4, tcpi_rcv_wscale:4 share one byte.
		SndWScale: ws & 0x0f,
		RcvWScale: ws >> 4,
	}
	if st.Local, err = sockAddr(unix.Getsockname(fd)); err != nil {
		return nil, err
	}
	if st.Remote, err = sockAddr(unix.Getpeername(fd)); err != nil {
		return nil, err
	}
	// Read the queues under repair, where the counts cannot change.
	for _, q := range []struct {
		sel  int
		seq  *uint32
		data *[]byte
		n    int
	}{{queueSend, &st.SndSeq, &st.SndQueue, outq}, {queueRecv, &st.RcvSeq, &st.RcvQueue, inq}} {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, q.sel); err != nil {
			return nil, fmt.Errorf("tcprepair: TCP_REPAIR_QUEUE: %w", err)
		}
		seq, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
		if err != nil {
			return nil, fmt.Errorf("tcprepair: TCP_QUEUE_SEQ: %w", err)
		}
		*q.seq = uint32(seq)
		if *q.data, err = peekQueue(fd, q.n); err != nil {
			return nil, err
		}
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queueNone); err != nil {
		return nil, fmt.Errorf("tcprepair: TCP_REPAIR_QUEUE: %w", err)
	}
	mss, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: TCP_MAXSEG: %w", err)
	}
	st.MSS = uint32(mss)
	if st.Timestamps {
		ts, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
		if err != nil {
			return nil, fmt.Errorf("tcprepair: TCP_TIMESTAMP: %w", err)
		}
		st.TSVal = uint32(ts)
	}
	if err := getWindow(fd, &st.Window); err != nil {
		return nil, err
	}
	return st, nil
}

// peekQueue reads the n bytes of the queue selected in repair mode.
func peekQueue(fd, n int) ([]byte, error) {
	if n == 0 {
		return nil, nil
	}
	buf := make([]byte, n)
	got, _, err := unix.Recvfrom(fd, buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: read queue: %w", err)
	}
	if got != n {
		return nil, fmt.Errorf("tcprepair: queue held %d bytes, %d announced", got, n)
	}
	return buf, nil
}

// wscales reads the byte of struct tcp_info that holds both window
// scales (offset 6), which x/sys's TCPInfo leaves out as padding.
func wscales(fd int) (uint8, error) {
	var b [8]byte
	l := uint32(len(b))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_INFO,
		uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 || l < 7 {
		return 0, fmt.Errorf("tcprepair: TCP_INFO: %w", e)
	}
	return b[6], nil
}

func getWindow(fd int, w *Window) error {
	l := uint32(unsafe.Sizeof(*w))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW,
		uintptr(unsafe.Pointer(w)), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return fmt.Errorf("tcprepair: get TCP_REPAIR_WINDOW: %w", e)
	}
	return nil
}

func setWindow(fd int, w *Window) error {
	_, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW,
		uintptr(unsafe.Pointer(w)), unsafe.Sizeof(*w), 0)
	if e != 0 {
		return fmt.Errorf("tcprepair: set TCP_REPAIR_WINDOW: %w", e)
	}
	return nil
}

func sockAddr(sa unix.Sockaddr, err error) (netip.AddrPort, error) {
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("tcprepair: socket address: %w", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)), nil
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)), nil
	}
	return netip.AddrPort{}, errors.New("tcprepair: not an IP socket")
}

func toSockaddr(ap netip.AddrPort, v6 bool) unix.Sockaddr {
	if !v6 {
		return &unix.SockaddrInet4{Addr: ap.Addr().Unmap().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// Restore rebuilds st on a new socket bound to st.Local and connected to
// st.Remote, and takes it out of repair mode; the connection then goes on
// where Dump left it. The local address and port must be free (the
// dumping process closed its socket).
func Restore(st *State) (*net.TCPConn, error) {
	if !st.Local.IsValid() || !st.Remote.IsValid() || st.Local.Addr().Unmap().Is4() != st.Remote.Addr().Unmap().Is4() {
		return nil, errors.New("tcprepair: restore: bad addresses")
	}
	if len(st.SndQueue) > MaxQueue || len(st.RcvQueue) > MaxQueue {
		return nil, ErrQueueTooLarge
	}
	v6 := !st.Local.Addr().Unmap().Is4()
	fam := unix.AF_INET
	if v6 {
		fam = unix.AF_INET6
	}
	fd, err := unix.Socket(fam, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("tcprepair: socket: %w", err)
	}
	if err := restoreFD(fd, st, v6); err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "tcprepair")
	c, err := net.FileConn(f) // dups fd
	_ = f.Close()
	if err != nil {
		return nil, fmt.Errorf("tcprepair: %w", err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		_ = c.Close()
		return nil, errors.New("tcprepair: restored socket is not TCP")
	}
	return tc, nil
}

func restoreFD(fd int, st *State, v6 bool) error {
	set := func(name string, opt, v int) error {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, opt, v); err != nil {
			return fmt.Errorf("tcprepair: %s: %w", name, err)
		}
		return nil
	}
	// SO_REUSEADDR before repair mode: turning repair mode on lets the
	// bind share its address with any socket (the kernel's
	// SK_FORCE_REUSE), and SO_REUSEADDR after it would take that back. A
	// connection that came in through a port forward is bound to the
	// forward's port, where this vunet's listener already is.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("tcprepair: SO_REUSEADDR: %w", err)
	}
	if err := set("TCP_REPAIR on", unix.TCP_REPAIR, unix.TCP_REPAIR_ON); err != nil {
		return err
	}
	if v6 {
		_ = unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
	}
	// Room for the queues: the socket is non-blocking, and writing a queue
	// beyond its buffer fails. The forcing options need CAP_NET_ADMIN,
	// which repair mode needs anyway.
	for _, b := range []struct{ force, opt, n int }{
		{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF, len(st.SndQueue)},
		{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF, len(st.RcvQueue)},
	} {
		if b.n == 0 {
			continue
		}
		// The kernel doubles the value for its bookkeeping; skbs cost
		// more than their payload, so ask for twice again.
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, b.force, 2*b.n+64<<10); err != nil {
			_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, b.opt, 2*b.n+64<<10)
		}
	}
	if err := bindRetry(fd, toSockaddr(st.Local, v6)); err != nil {
		return fmt.Errorf("tcprepair: bind %s: %w", st.Local, err)
	}
	// The sequence numbers before the queues' contents: writing a queue
	// in repair mode advances them.
	if err := set("TCP_REPAIR_QUEUE", unix.TCP_REPAIR_QUEUE, queueSend); err != nil {
		return err
	}
	if err := set("TCP_QUEUE_SEQ send", unix.TCP_QUEUE_SEQ, int(int32(st.SndSeq-uint32(len(st.SndQueue))))); err != nil {
		return err
	}
	if err := set("TCP_REPAIR_QUEUE", unix.TCP_REPAIR_QUEUE, queueRecv); err != nil {
		return err
	}
	if err := set("TCP_QUEUE_SEQ recv", unix.TCP_QUEUE_SEQ, int(int32(st.RcvSeq-uint32(len(st.RcvQueue))))); err != nil {
		return err
	}
	if st.Timestamps {
		if err := set("TCP_TIMESTAMP", unix.TCP_TIMESTAMP, int(int32(st.TSVal))); err != nil {
			return err
		}
	}
	// In repair mode connect sends no SYN: the socket is established.
	if err := connectRetry(fd, toSockaddr(st.Remote, v6)); err != nil {
		return fmt.Errorf("tcprepair: connect %s: %w", st.Remote, err)
	}
	opts := []unix.TCPRepairOpt{{Code: unix.TCPOPT_MAXSEG, Val: st.MSS}}
	if st.WScale {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_WINDOW,
			Val: uint32(st.SndWScale) | uint32(st.RcvWScale)<<16})
	}
	if st.SACK {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_SACK_PERMITTED})
	}
	if st.Timestamps {
		opts = append(opts, unix.TCPRepairOpt{Code: unix.TCPOPT_TIMESTAMP})
	}
	if err := unix.SetsockoptTCPRepairOpt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS, opts); err != nil {
		return fmt.Errorf("tcprepair: TCP_REPAIR_OPTIONS: %w", err)
	}
	// Queue contents: what goes to the send queue counts as sent (the
	// retransmission timer resends what the peer has not acknowledged).
	for _, q := range []struct {
		sel  int
		data []byte
	}{{queueSend, st.SndQueue}, {queueRecv, st.RcvQueue}} {
		if len(q.data) == 0 {
			continue
		}
		if err := set("TCP_REPAIR_QUEUE", unix.TCP_REPAIR_QUEUE, q.sel); err != nil {
			return err
		}
		if err := writeQueue(fd, q.data, st.MSS); err != nil {
			return err
		}
	}
	if err := set("TCP_REPAIR_QUEUE", unix.TCP_REPAIR_QUEUE, queueNone); err != nil {
		return err
	}
	if err := setWindow(fd, &st.Window); err != nil {
		return err
	}
	// Leaving repair mode sends a window probe: the peer learns at once
	// that the connection is alive.
	return set("TCP_REPAIR off", unix.TCP_REPAIR, unix.TCP_REPAIR_OFF)
}

// writeQueue fills the selected queue. The kernel takes at most a
// segment's worth per send on the send queue in repair mode, so the data
// goes in MSS-sized pieces.
func writeQueue(fd int, data []byte, mss uint32) error {
	chunk := int(max(mss, 536))
	for len(data) > 0 {
		n := min(chunk, len(data))
		got, err := unix.Write(fd, data[:n])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("tcprepair: write queue: %w", err)
		}
		if got <= 0 {
			return errors.New("tcprepair: write queue: no progress")
		}
		data = data[got:]
	}
	return nil
}

// IsPermission says whether err is the kernel refusing repair mode for
// want of CAP_NET_ADMIN.
func IsPermission(err error) bool {
	return errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES)
}

// bindWait bounds how long Restore waits for the source's socket to let go
// of the 4-tuple.
const bindWait = time.Second

// connectRetry connects fd in repair mode, retrying while another socket
// still has the four-tuple (EADDRNOTAVAIL): the bind shares the address
// with anything (repair mode), so a source socket that has not let go yet
// (see bindRetry) shows here.
func connectRetry(fd int, sa unix.Sockaddr) error {
	deadline := time.Now().Add(bindWait)
	for {
		err := unix.Connect(fd, sa)
		if err != unix.EADDRNOTAVAIL || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// bindRetry binds fd, retrying while the address is in use: the source's
// socket, closed in repair mode, releases its port only when its last file
// reference goes, which in a Go process can trail Close (a poller
// goroutine still holding the descriptor); the source may also be another
// process that is still exiting. TestMoveTCPConnection failed once in CI
// with EADDRINUSE for exactly that reason.
func bindRetry(fd int, sa unix.Sockaddr) error {
	deadline := time.Now().Add(bindWait)
	for {
		err := unix.Bind(fd, sa)
		if err != unix.EADDRINUSE || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}
