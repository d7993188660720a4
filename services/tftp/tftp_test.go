package tftp

import (
	"bytes"
	"encoding/binary"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/vunet/vunet/internal/ratelimit"
	"github.com/vunet/vunet/services/internal/gnet"
	"github.com/vunet/vunet/services/internal/testnet"
)

type env struct {
	t    *testing.T
	p    *testnet.Pair
	srv  *Server
	root string
	// outside is a file next to (not inside) the root.
	outside string
}

func setup(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(filepath.Join(root, "sub"), 0o755)
	outside := filepath.Join(dir, "secret")
	os.WriteFile(outside, []byte("top secret"), 0o644)
	// A symlink pointing out of the root must not be followed.
	os.Symlink(outside, filepath.Join(root, "link"))

	p := testnet.New(t, testnet.GuestOptions{})
	p.ConfigureGuest(t, netip.MustParsePrefix("10.0.2.15/24"))
	opts := Options{Stack: p.Server, NIC: testnet.NIC, Logger: testnet.Logger(t), Root: root}
	if mod != nil {
		mod(&opts)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	testnet.Serve(t, s)
	return &env{t: t, p: p, srv: s, root: root, outside: outside}
}

// client is a minimal TFTP client on the guest stack.
type client struct {
	t    *testing.T
	conn *gnet.UDP
}

func (e *env) client() *client {
	c, err := gnet.ListenUDP(e.p.Guest, testnet.NIC, ipv4.ProtocolNumber, netip.MustParseAddrPort("10.0.2.15:0"), gnet.UDPOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Conn.Close() })
	return &client{t: e.t, conn: c}
}

func rrq(name, mode string, opts ...string) []byte {
	b := []byte{0, opRRQ}
	for _, s := range append([]string{name, mode}, opts...) {
		b = append(b, s...)
		b = append(b, 0)
	}
	return b
}

func (c *client) recv() ([]byte, *net.UDPAddr) {
	c.t.Helper()
	buf := make([]byte, 70000)
	c.conn.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, from, err := c.conn.Conn.ReadFrom(buf)
	if err != nil {
		c.t.Fatalf("recv: %v", err)
	}
	return buf[:n], from.(*net.UDPAddr)
}

func (c *client) send(b []byte, to net.Addr) {
	c.t.Helper()
	if _, err := c.conn.Conn.WriteTo(b, to); err != nil {
		c.t.Fatal(err)
	}
}

var server = net.UDPAddrFromAddrPort(netip.MustParseAddrPort("10.0.2.2:69"))

func ack(block uint16) []byte { return []byte{0, opACK, byte(block >> 8), byte(block)} }

// get fetches name with options; it returns the OACK options (if any), the
// data and the block sizes seen.
func (c *client) get(name, mode string, opts ...string) (map[string]string, []byte, []int) {
	c.t.Helper()
	c.send(rrq(name, mode, opts...), server)
	var (
		data  []byte
		sizes []int
		oack  map[string]string
		want  = uint16(1)
	)
	for {
		pkt, from := c.recv()
		if from.Port == Port {
			c.t.Fatalf("reply from port 69, want a transfer port")
		}
		switch binary.BigEndian.Uint16(pkt) {
		case opOACK:
			oack = map[string]string{}
			f := bytes.Split(pkt[2:len(pkt)-1], []byte{0})
			for i := 0; i+1 < len(f); i += 2 {
				oack[string(f[i])] = string(f[i+1])
			}
			c.send(ack(0), from)
		case opDATA:
			block := binary.BigEndian.Uint16(pkt[2:])
			if block != want {
				c.t.Fatalf("block %d, want %d", block, want)
			}
			data = append(data, pkt[4:]...)
			sizes = append(sizes, len(pkt)-4)
			c.send(ack(block), from)
			want++
			blk := 512
			if oack["blksize"] != "" {
				blk = atoi(oack["blksize"])
			}
			if len(pkt)-4 < blk {
				return oack, data, sizes
			}
		case opERROR:
			c.t.Fatalf("error %d: %s", binary.BigEndian.Uint16(pkt[2:]), pkt[4:len(pkt)-1])
		}
	}
}

// getError expects an ERROR packet in answer to a request.
func (c *client) getError(req []byte) (uint16, string) {
	c.t.Helper()
	c.send(req, server)
	pkt, _ := c.recv()
	if binary.BigEndian.Uint16(pkt) != opERROR {
		c.t.Fatalf("got opcode %d, want ERROR", binary.BigEndian.Uint16(pkt))
	}
	return binary.BigEndian.Uint16(pkt[2:]), string(pkt[4 : len(pkt)-1])
}

func atoi(s string) int {
	n := 0
	for _, c := range s {
		n = n*10 + int(c-'0')
	}
	return n
}

func TestTransfer(t *testing.T) {
	e := setup(t, nil)
	content := make([]byte, 5000)
	for i := range content {
		content[i] = byte(rand.IntN(256))
	}
	os.WriteFile(filepath.Join(e.root, "sub", "boot.img"), content, 0o644)
	c := e.client()

	// blksize and tsize negotiated.
	oack, data, sizes := c.get("/sub/boot.img", "octet", "blksize", "1024", "tsize", "0", "timeout", "3")
	if oack["blksize"] != "1024" || oack["tsize"] != "5000" || oack["timeout"] != "3" {
		t.Errorf("OACK = %v", oack)
	}
	if !bytes.Equal(data, content) {
		t.Errorf("got %d bytes, content mismatch", len(data))
	}
	if len(sizes) != 5 || sizes[4] != 5000-4*1024 {
		t.Errorf("block sizes %v", sizes)
	}

	// blksize above the cap is lowered; DOS separators are accepted.
	oack, data, _ = c.get(`sub\boot.img`, "OCTET", "blksize", "9000")
	if oack["blksize"] != "1468" || !bytes.Equal(data, content) {
		t.Errorf("capped blksize: OACK %v, %d bytes", oack, len(data))
	}

	// No options: plain RFC 1350, no OACK, 512-byte blocks, and a final
	// empty block for an exact multiple.
	os.WriteFile(filepath.Join(e.root, "exact"), content[:1024], 0o644)
	oack, data, sizes = c.get("exact", "octet")
	if oack != nil || !bytes.Equal(data, content[:1024]) || len(sizes) != 3 || sizes[2] != 0 {
		t.Errorf("plain transfer: oack %v, %d bytes, sizes %v", oack, len(data), sizes)
	}

	// netascii converts line ends.
	os.WriteFile(filepath.Join(e.root, "text"), []byte("a\nb\rc"), 0o644)
	if _, data, _ = c.get("text", "netascii"); string(data) != "a\r\nb\r\x00c" {
		t.Errorf("netascii = %q", data)
	}

	testnet.WaitFor(t, func() bool { return e.srv.Stats().Completed.Load() == 4 && e.srv.Stats().Active.Load() == 0 })
	if st := e.srv.Stats(); st.BytesSent.Load() != 5000*2+1024+7 {
		t.Errorf("stats = %+v", st)
	}
}

func TestRefusals(t *testing.T) {
	e := setup(t, nil)
	c := e.client()
	cases := []struct {
		name string
		req  []byte
		code uint16
	}{
		{"missing", rrq("nope.bin", "octet", "tsize", "0"), errNotFound},
		{"directory", rrq("sub", "octet"), errNotFound},
		{"dotdot", rrq("../secret", "octet"), errAccess},
		{"deep dotdot", rrq("sub/../../secret", "octet"), errAccess},
		{"absolute", rrq(e.outside, "octet"), errNotFound}, // taken relative to the root
		{"symlink out", rrq("link", "octet"), errAccess},
		{"write", append([]byte{0, opWRQ}, []byte("x\x00octet\x00")...), errAccess},
		{"mail mode", rrq("x", "mail"), errIllegalOp},
		{"garbage", []byte{0, 9, 1, 2}, errIllegalOp},
	}
	for _, tc := range cases {
		code, msg := c.getError(tc.req)
		if code != tc.code {
			t.Errorf("%s: error %d (%s), want %d", tc.name, code, msg, tc.code)
		}
	}
	if st := e.srv.Stats(); st.Completed.Load() != 0 || st.NotFound.Load() != 3 || st.Denied.Load() != 4 || st.Malformed.Load() != 2 {
		t.Errorf("stats = %+v", st)
	}
}

func TestRetransmission(t *testing.T) {
	e := setup(t, func(o *Options) { o.Timeout = 100 * time.Millisecond; o.Retries = 2 })
	os.WriteFile(filepath.Join(e.root, "f"), bytes.Repeat([]byte("x"), 600), 0o644)
	c := e.client()
	c.send(rrq("f", "octet"), server)
	first, from := c.recv()
	again, _ := c.recv() // not acknowledged: sent again
	if !bytes.Equal(first, again) || binary.BigEndian.Uint16(first[2:]) != 1 {
		t.Fatalf("retransmission differs")
	}
	// A stranger's packet gets "unknown transfer id" and does not disturb.
	stranger := e.client()
	stranger.send(ack(1), from)
	if pkt, _ := stranger.recv(); binary.BigEndian.Uint16(pkt) != opERROR || binary.BigEndian.Uint16(pkt[2:]) != errUnknownTID {
		t.Errorf("stranger got %v", pkt)
	}
	c.send(ack(1), from)
	for {
		pkt, _ := c.recv()
		if binary.BigEndian.Uint16(pkt[2:]) == 2 {
			if len(pkt)-4 != 88 {
				t.Errorf("block 2 has %d bytes", len(pkt)-4)
			}
			break
		}
	}
	// Never acknowledge block 2: the server gives up after its retries.
	testnet.WaitFor(t, func() bool { return e.srv.Stats().Failed.Load() == 1 })
	if st := e.srv.Stats(); st.Retransmissions.Load() < 3 || st.Active.Load() != 0 {
		t.Errorf("stats = %+v", st)
	}
}

func TestBusy(t *testing.T) {
	e := setup(t, func(o *Options) { o.MaxTransfers = 1; o.Timeout = time.Second })
	os.WriteFile(filepath.Join(e.root, "f"), bytes.Repeat([]byte("x"), 600), 0o644)
	a, b := e.client(), e.client()
	a.send(rrq("f", "octet"), server)
	a.recv() // transfer running, not acknowledged
	code, _ := b.getError(rrq("f", "octet"))
	if code != errUndefined || e.srv.Stats().Busy.Load() != 1 {
		t.Errorf("second transfer: error %d, stats %+v", code, e.srv.Stats())
	}
}

func TestOptionsValidation(t *testing.T) {
	dir := t.TempDir()
	bad := []Options{
		{},
		{Root: filepath.Join(dir, "missing")},
		{Root: dir, MaxBlockSize: 100},
		{Root: dir, Timeout: time.Hour},
		{Root: dir, Addr: netip.IPv4Unspecified()},
	}
	for i, o := range bad {
		if _, err := New(o); err == nil {
			t.Errorf("case %d: New succeeded", i)
		} else {
			t.Logf("case %d: %v", i, err)
		}
	}
}

// TestRefusalLogIsBounded floods the server with requests for a missing
// file, each of which logs a refusal: through the appliance's log limiter
// the lines stay bounded while the refusals are all counted.
func TestRefusalLogIsBounded(t *testing.T) {
	var mu sync.Mutex
	var buf bytes.Buffer
	lim := ratelimit.NewHandler(slog.NewTextHandler(lockedWriter{&mu, &buf}, nil), ratelimit.LogBurst, time.Hour)
	e := setup(t, func(o *Options) { o.Logger = slog.New(lim) })
	c := e.client()
	const flood = 300
	for range flood {
		if code, _ := c.getError(rrq("nope.bin", "octet")); code != errNotFound {
			t.Fatalf("error %d, want not found", code)
		}
	}
	// The counter moves before the refusal is logged, so wait for the log
	// handler to have seen the last request too.
	testnet.WaitFor(t, func() bool {
		return e.srv.Stats().NotFound.Load() == flood && lim.Suppressed() >= flood-ratelimit.LogBurst
	})
	mu.Lock()
	refused := strings.Count(buf.String(), "tftp: request refused")
	mu.Unlock()
	// LogBurst lines, plus the one announcing the suppression (which names
	// the message).
	if refused != ratelimit.LogBurst+1 || lim.Suppressed() < flood-ratelimit.LogBurst {
		t.Fatalf("%d refusal lines, %d suppressed for %d requests", refused, lim.Suppressed(), flood)
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}
