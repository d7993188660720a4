// Package tftp is vunet's read-only TFTP server (RFC 1350 with the option
// extension of RFC 2347 and the blksize, tsize and timeout options of RFC
// 2348/2349), serving network-boot files to PXE firmware from one host
// directory. Files are opened through os.Root, so a request can never reach
// outside that directory, whether by "..", an absolute path or a symlink.
package tftp

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/vunet/vunet/services/internal/gnet"
)

// Port is the TFTP server port.
const Port = 69

// DefaultAddr is the gateway address, where slirp serves TFTP.
var DefaultAddr = netip.MustParseAddr("10.0.2.2")

// Default limits and timeouts.
const (
	DefaultMaxTransfers = 16
	DefaultTimeout      = time.Second
	DefaultRetries      = 5
	// DefaultMaxBlockSize keeps DATA packets within a 1500-byte MTU
	// (1500 - 20 IPv4 - 8 UDP - 4 TFTP).
	DefaultMaxBlockSize = 1468
)

// Options configures a Server. Zero fields take the defaults noted.
type Options struct {
	// Stack and NIC are the gVisor stack and the guest-facing NIC; Addr
	// must be assigned on it (the caller does that).
	Stack *stack.Stack
	NIC   tcpip.NICID
	// Logger receives service logs; per-packet logs are at debug level.
	Logger *slog.Logger
	// Addr is the address served on port 69 (default 10.0.2.2).
	Addr netip.Addr
	// Root is the directory files are served from (required).
	Root string
	// MaxTransfers bounds concurrent transfers (default 16); requests
	// beyond it get an error packet.
	MaxTransfers int
	// Timeout is the retransmission timeout unless the client negotiates
	// one (default 1s).
	Timeout time.Duration
	// Retries is the number of retransmissions of a packet before the
	// transfer is abandoned (default 5).
	Retries int
	// MaxBlockSize caps the negotiated blksize (default 1468, at most
	// 65464).
	MaxBlockSize int
}

// Stats are the server's counters, declared for the metrics registry
// (internal/metrics).
type Stats struct {
	Requests        atomic.Uint64 `metric:"tftp_requests_total" help:"TFTP read and write requests received."`
	Malformed       atomic.Uint64 `metric:"tftp_malformed_total" help:"Malformed TFTP packets." hostile:"tftp"`
	Completed       atomic.Uint64 `metric:"tftp_transfers_total{result=completed}" help:"TFTP transfers by outcome."`
	Failed          atomic.Uint64 `metric:"tftp_transfers_total{result=failed}"`    // abandoned: timeout, client error
	NotFound        atomic.Uint64 `metric:"tftp_transfers_total{result=not_found}"` // no such file
	Denied          atomic.Uint64 `metric:"tftp_transfers_total{result=denied}"`    // WRQ, path escapes, non-regular files
	Busy            atomic.Uint64 `metric:"tftp_transfers_total{result=busy}"`      // MaxTransfers were running
	Retransmissions atomic.Uint64 `metric:"tftp_retransmissions_total" help:"TFTP packets retransmitted."`
	BytesSent       atomic.Uint64 `metric:"tftp_sent_bytes_total" help:"File bytes acknowledged by TFTP clients."`
	Active          atomic.Int64  `metric:"tftp_active_transfers" kind:"gauge" help:"TFTP transfers under way."`
}

// Server is a read-only TFTP server. Create it with New, run it with Serve.
type Server struct {
	opts  Options
	log   *slog.Logger
	root  *os.Root
	conn  *gnet.UDP
	sem   chan struct{}
	stats Stats

	mu    sync.Mutex
	conns map[*gnet.UDP]struct{} // per-transfer endpoints, closed by Close
	wg    sync.WaitGroup

	closeOnce sync.Once
	closed    chan struct{}
}

// New validates opts, opens the root directory and binds port 69.
func New(opts Options) (*Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if !opts.Addr.IsValid() {
		opts.Addr = DefaultAddr
	}
	if opts.MaxTransfers == 0 {
		opts.MaxTransfers = DefaultMaxTransfers
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Retries == 0 {
		opts.Retries = DefaultRetries
	}
	if opts.MaxBlockSize == 0 {
		opts.MaxBlockSize = DefaultMaxBlockSize
	}
	switch {
	case opts.Root == "":
		return nil, errors.New("tftp: no root directory")
	case opts.Addr.IsUnspecified():
		return nil, fmt.Errorf("tftp: address %s: want a specific address", opts.Addr)
	case opts.MaxTransfers < 1:
		return nil, fmt.Errorf("tftp: max transfers %d: want at least 1", opts.MaxTransfers)
	case opts.Timeout < 10*time.Millisecond || opts.Timeout > maxTimeout*time.Second:
		return nil, fmt.Errorf("tftp: timeout %s: want 10ms..255s", opts.Timeout)
	case opts.Retries < 1 || opts.Retries > 100:
		return nil, fmt.Errorf("tftp: retries %d: want 1..100", opts.Retries)
	case opts.MaxBlockSize < defaultBlockSize || opts.MaxBlockSize > maxBlockSize:
		return nil, fmt.Errorf("tftp: max block size %d: want %d..%d", opts.MaxBlockSize, defaultBlockSize, maxBlockSize)
	}
	root, err := os.OpenRoot(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("tftp: open root: %w", err)
	}
	s := &Server{
		opts:   opts,
		log:    opts.Logger.With("service", "tftp"),
		root:   root,
		sem:    make(chan struct{}, opts.MaxTransfers),
		conns:  make(map[*gnet.UDP]struct{}),
		closed: make(chan struct{}),
	}
	if opts.Stack == nil {
		return s, nil
	}
	s.conn, err = gnet.ListenUDP(opts.Stack, opts.NIC, gnet.Proto(opts.Addr), netip.AddrPortFrom(opts.Addr, Port), gnet.UDPOptions{})
	if err != nil {
		root.Close()
		return nil, fmt.Errorf("tftp: %w", err)
	}
	return s, nil
}

// CheckAccess reports whether the process, with its current credentials,
// can still search the root directory and read the named files in it. A
// vunet that switched from root to an unprivileged user calls it at
// start-up, so that a root only root may read fails there, with the reason,
// instead of every transfer failing later. Files that do not exist are not
// an error (they may be created later).
func (s *Server) CheckAccess(names ...string) error {
	if _, err := s.root.Stat("."); err != nil {
		return fmt.Errorf("tftp: root %s: %w", s.opts.Root, err)
	}
	for _, name := range names {
		f, err := s.root.Open(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("tftp: %s in root %s: %w", name, s.opts.Root, err)
		}
		f.Close()
	}
	return nil
}

// Serve answers requests until ctx is done or Close is called; it returns
// nil on such a shutdown, after the running transfers stopped.
func (s *Server) Serve(ctx context.Context) error {
	if s.conn == nil {
		return errors.New("tftp: server has no stack")
	}
	s.log.Info("tftp server listening", "addr", s.opts.Addr, "root", s.opts.Root)
	go func() {
		select {
		case <-ctx.Done():
			s.Close()
		case <-s.closed:
		}
	}()
	defer s.wg.Wait()
	if err := s.conn.ReadLoop(maxRequest+1, s.closed, s.request); err != nil {
		return fmt.Errorf("tftp: read: %w", err)
	}
	return nil
}

// request answers one datagram to port 69: an error packet, or a transfer
// started from its own endpoint.
func (s *Server) request(b []byte, from *net.UDPAddr) {
	client := from.AddrPort()
	s.stats.Requests.Add(1)
	req, err := parseRequest(b)
	if err != nil {
		s.stats.Malformed.Add(1)
		s.log.Debug("tftp: bad request", "from", client, "err", err)
		s.conn.Conn.WriteTo(errorPacket(errIllegalOp, "malformed request"), from)
		return
	}
	if req.op == opWRQ {
		s.stats.Denied.Add(1)
		s.conn.Conn.WriteTo(errorPacket(errAccess, "read-only server"), from)
		return
	}
	select {
	case s.sem <- struct{}{}:
	default:
		s.stats.Busy.Add(1)
		s.conn.Conn.WriteTo(errorPacket(errUndefined, "server busy, try again"), from)
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer func() { <-s.sem }()
		s.transfer(req, client)
	}()
}

// Close stops the server and aborts running transfers; it is safe to call
// more than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		close(s.closed)
		if s.conn != nil {
			s.conn.Conn.Close()
		}
		s.mu.Lock()
		for c := range s.conns {
			c.Conn.Close()
		}
		s.mu.Unlock()
		// Transfers may still hold files of the root; os.Root stays valid
		// for them after Close of the Root itself.
		s.root.Close()
	})
}

// Stats returns the live counters.
func (s *Server) Stats() *Stats { return &s.stats }

// cleanName maps a client's file name to a path relative to the root:
// PXE ROMs variously send "/pxelinux.0" or DOS-style "boot\x64.efi".
// Escapes are left for os.Root to refuse.
func cleanName(name string) string {
	name = strings.ReplaceAll(name, `\`, "/")
	return strings.TrimLeft(name, "/")
}

// open opens name under the root, mapping failures to TFTP error codes.
func (s *Server) open(name string) (*os.File, int64, uint16, error) {
	f, err := s.root.Open(cleanName(name))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, 0, errNotFound, err
		}
		return nil, 0, errAccess, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, errAccess, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, 0, errNotFound, fmt.Errorf("%s is not a regular file", name)
	}
	return f, st.Size(), 0, nil
}

// transfer sends one file to client from a fresh port (the server's
// transfer identifier, RFC 1350).
func (s *Server) transfer(req *request, client netip.AddrPort) {
	s.stats.Active.Add(1)
	defer s.stats.Active.Add(-1)
	log := s.log.With("client", client, "file", req.filename)

	conn, err := gnet.ListenUDP(s.opts.Stack, s.opts.NIC, gnet.Proto(s.opts.Addr), netip.AddrPortFrom(s.opts.Addr, 0), gnet.UDPOptions{})
	if err != nil {
		s.stats.Failed.Add(1)
		log.Warn("tftp: open transfer endpoint", "err", err)
		return
	}
	s.mu.Lock()
	select {
	case <-s.closed:
		s.mu.Unlock()
		conn.Conn.Close()
		return
	default:
	}
	s.conns[conn] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, conn)
		s.mu.Unlock()
		conn.Conn.Close()
	}()
	t := &xfer{s: s, conn: conn, client: client, to: net.UDPAddrFromAddrPort(client), timeout: s.opts.Timeout}

	f, size, code, err := s.open(req.filename)
	if err != nil {
		if code == errNotFound {
			s.stats.NotFound.Add(1)
			t.send(errorPacket(errNotFound, "file not found"))
		} else {
			s.stats.Denied.Add(1)
			t.send(errorPacket(errAccess, "access violation"))
		}
		log.Info("tftp: request refused", "err", err)
		return
	}
	defer f.Close()

	blksize := defaultBlockSize
	var oack []string
	if req.blksize > 0 {
		blksize = min(req.blksize, s.opts.MaxBlockSize)
		oack = append(oack, "blksize", strconv.Itoa(blksize))
	}
	if req.tsize && req.mode == "octet" {
		// The netascii size is unknown until converted, so tsize is only
		// answered for octet transfers.
		oack = append(oack, "tsize", strconv.FormatInt(size, 10))
	}
	if req.timeout > 0 {
		t.timeout = time.Duration(req.timeout) * time.Second
		oack = append(oack, "timeout", strconv.Itoa(req.timeout))
	}
	var r io.Reader = f
	if req.mode == "netascii" {
		r = newNetASCIIReader(f)
	}
	if len(oack) > 0 {
		if err := t.sendAndWait(oackPacket(oack...), 0); err != nil {
			s.stats.Failed.Add(1)
			log.Info("tftp: transfer failed at option acknowledgement", "err", err)
			return
		}
	}
	buf := make([]byte, blksize)
	var sent uint64
	for block := uint16(1); ; block++ { // wraps to 0 after 65535, as most clients expect
		n, err := io.ReadFull(r, buf)
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			s.stats.Failed.Add(1)
			t.send(errorPacket(errUndefined, "read error"))
			log.Warn("tftp: read file", "err", err)
			return
		}
		if err := t.sendAndWait(dataPacket(block, buf[:n]), block); err != nil {
			s.stats.Failed.Add(1)
			log.Info("tftp: transfer failed", "block", block, "err", err)
			return
		}
		sent += uint64(n)
		s.stats.BytesSent.Add(uint64(n))
		if n < blksize {
			break
		}
	}
	s.stats.Completed.Add(1)
	log.Info("tftp: transfer complete", "bytes", sent, "blksize", blksize)
}

// xfer is one transfer's connection state.
type xfer struct {
	s       *Server
	conn    *gnet.UDP
	client  netip.AddrPort
	to      *net.UDPAddr
	timeout time.Duration
	buf     [maxRequest]byte
}

func (t *xfer) send(pkt []byte) error {
	_, err := t.conn.Conn.WriteTo(pkt, t.to)
	return err
}

var errClientAbort = errors.New("client sent an error")

// sendAndWait sends pkt and waits for the ACK of block, retransmitting on
// timeout. Duplicate ACKs of earlier blocks are ignored rather than answered
// with a retransmission, which avoids the Sorcerer's Apprentice syndrome.
func (t *xfer) sendAndWait(pkt []byte, block uint16) error {
	for try := 0; try <= t.s.opts.Retries; try++ {
		if try > 0 {
			t.s.stats.Retransmissions.Add(1)
		}
		if err := t.send(pkt); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		deadline := time.Now().Add(t.timeout)
		for {
			t.conn.Conn.SetReadDeadline(deadline)
			n, from, err := t.conn.Conn.ReadFrom(t.buf[:])
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err) {
					break // retransmit
				}
				return fmt.Errorf("receive: %w", err)
			}
			if ua, ok := from.(*net.UDPAddr); !ok || ua.AddrPort() != t.client {
				// RFC 1350: a packet from a foreign TID gets an error and
				// does not disturb the transfer.
				t.conn.Conn.WriteTo(errorPacket(errUnknownTID, "unknown transfer id"), from)
				continue
			}
			got, ok, isErr := parseAck(t.buf[:n])
			if isErr {
				return errClientAbort
			}
			if ok && got == block {
				return nil
			}
		}
	}
	return fmt.Errorf("no acknowledgement of block %d after %d tries", block, t.s.opts.Retries+1)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// netASCIIReader converts a file to netascii on the fly: LF becomes CR LF
// and a bare CR becomes CR NUL (RFC 764).
type netASCIIReader struct {
	r       *bufio.Reader
	pending []byte
}

func newNetASCIIReader(r io.Reader) *netASCIIReader {
	return &netASCIIReader{r: bufio.NewReader(r)}
}

func (n *netASCIIReader) Read(p []byte) (int, error) {
	i := 0
	for i < len(p) {
		if len(n.pending) > 0 {
			p[i] = n.pending[0]
			n.pending = n.pending[1:]
			i++
			continue
		}
		c, err := n.r.ReadByte()
		if err != nil {
			if i > 0 {
				return i, nil
			}
			return 0, err
		}
		switch c {
		case '\n':
			p[i] = '\r'
			n.pending = []byte{'\n'}
		case '\r':
			p[i] = '\r'
			n.pending = []byte{0}
		default:
			p[i] = c
		}
		i++
	}
	return i, nil
}
