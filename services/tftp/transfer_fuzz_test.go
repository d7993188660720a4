package tftp

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/vunet/vunet/services/internal/gnet"
	"github.com/vunet/vunet/services/internal/testnet"
)

// fuzzFile is what FuzzTransfer downloads: 2 full 512-byte blocks and a bit
// (or 1..many blocks at other negotiated sizes), content derived from the
// offset so a block sent from the wrong place shows.
var fuzzFile = func() []byte {
	b := make([]byte, 1100)
	for i := range b {
		b[i] = byte(i*7 + i/256)
	}
	return b
}()

// Client actions, one per 3 bytes of the fuzz script: an opcode byte and a
// 16-bit argument.
const (
	actAckLast  = iota // ACK the last DATA (or OACK as 0) received
	actAck             // ACK block arg
	actDupAck          // repeat the previous ACK
	actError           // send an ERROR packet
	actForeign         // ACK the last block from another port (foreign TID)
	actGarbage         // arg bytes of junk
	actWait            // wait for a retransmission
	actShortAck        // a 3-byte ACK
	numActs
)

// FuzzTransfer drives the server's transfer state machine from a hostile
// client: an RRQ for a file (name, mode and options chosen by the fuzzer),
// then a scripted mix of in-order, wrong, duplicate, short, foreign-TID ACKs,
// ERRORs, junk and silence. The server must never send a block before the
// previous one was acknowledged, must send every block from the right place
// in the file, must not answer on port 69, and every transfer must end (no
// transfer left active) once the client falls silent.
func FuzzTransfer(f *testing.F) {
	f.Add(uint8(0), uint16(0), false, []byte{actAckLast, 0, 0, actAckLast, 0, 0, actAckLast, 0, 0})
	f.Add(uint8(0), uint16(512), true, []byte{actAckLast, 0, 0, actDupAck, 0, 0, actAckLast, 0, 0, actAckLast, 0, 0, actAckLast, 0, 0})
	f.Add(uint8(1), uint16(8), false, []byte{actAckLast, 0, 0, actForeign, 0, 0, actAck, 0, 7, actAckLast, 0, 0, actWait, 0, 0, actAckLast, 0, 0})
	f.Add(uint8(0), uint16(0), false, []byte{actAckLast, 0, 0, actError, 0, 0, actAckLast, 0, 0})
	f.Add(uint8(2), uint16(0), false, []byte{actAckLast, 0, 0})
	f.Add(uint8(3), uint16(0), false, []byte{actAckLast, 0, 0})
	f.Add(uint8(0), uint16(1100), true, []byte{actShortAck, 0, 0, actGarbage, 0, 9, actAck, 0xff, 0xff, actAckLast, 0, 0})

	dir := f.TempDir()
	root := filepath.Join(dir, "root")
	os.MkdirAll(root, 0o755)
	os.WriteFile(filepath.Join(root, "f"), fuzzFile, 0o644)
	os.WriteFile(filepath.Join(dir, "secret"), []byte("top secret"), 0o644)
	p := testnet.New(f, testnet.GuestOptions{})
	p.ConfigureGuest(f, netip.MustParsePrefix("10.0.2.15/24"))
	s, err := New(Options{Stack: p.Server, NIC: testnet.NIC, Logger: slog.New(slog.DiscardHandler), Root: root,
		Timeout: 50 * time.Millisecond, Retries: 1})
	if err != nil {
		f.Fatal(err)
	}
	testnet.Serve(f, s)
	listen := func(t *testing.T) *gnet.UDP {
		c, err := gnet.ListenUDP(p.Guest, testnet.NIC, ipv4.ProtocolNumber, netip.MustParseAddrPort("10.0.2.15:0"), gnet.UDPOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Conn.Close() })
		return c
	}
	names := []string{"f", "missing", "../secret", "/f"}

	f.Fuzz(func(t *testing.T, name uint8, blksize uint16, tsize bool, script []byte) {
		c, other := listen(t), listen(t)
		var opts []string
		blk := 512
		if blksize != 0 {
			opts = append(opts, "blksize", strconv.Itoa(int(blksize)))
			if blksize >= minBlockSize && int(blksize) <= maxBlockSize {
				blk = min(int(blksize), DefaultMaxBlockSize)
			}
		}
		if tsize {
			opts = append(opts, "tsize", "0")
		}
		mode := "octet"
		if name&4 != 0 {
			mode = "netascii" // content checks below only hold for octet
		}
		if _, err := c.Conn.WriteTo(rrq(names[int(name)%len(names)], mode, opts...), server); err != nil {
			t.Fatal(err)
		}
		var (
			peer    net.Addr
			lastGot = -1 // last block received (0 = OACK)
			acked   = -1 // highest block acknowledged in order
			lastAck []byte
			ended   bool
			buf     = make([]byte, 70000)
		)
		// drain reads what the server sends: the first packet within
		// wait, then whatever follows at once.
		drain := func(wait time.Duration) {
			for {
				c.Conn.SetReadDeadline(time.Now().Add(wait))
				wait = time.Millisecond
				n, from, err := c.Conn.ReadFrom(buf)
				if err != nil {
					return
				}
				pkt := buf[:n]
				if from.(*net.UDPAddr).Port == Port {
					t.Fatalf("reply from port 69")
				}
				if len(pkt) < 4 {
					t.Fatalf("runt packet %x", pkt)
				}
				peer = from
				switch op := binary.BigEndian.Uint16(pkt); op {
				case opOACK:
					if lastGot > 0 {
						t.Fatalf("OACK after DATA")
					}
					lastGot = 0
				case opDATA:
					b := int(binary.BigEndian.Uint16(pkt[2:]))
					if ended {
						t.Fatalf("DATA %d after the transfer ended", b)
					}
					if acked < 0 && b == 1 && lastGot < 0 {
						acked = 0 // no OACK: block 1 needs no acknowledgement
					}
					if b > acked+1 {
						t.Fatalf("DATA %d sent before block %d was acknowledged (acked %d)", b, b-1, acked)
					}
					if mode == "octet" {
						off := (b - 1) * blk
						want := fuzzFile[min(off, len(fuzzFile)):min(off+blk, len(fuzzFile))]
						if !bytes.Equal(pkt[4:], want) {
							t.Fatalf("DATA %d: %d bytes that are not the file's bytes %d..%d", b, n-4, off, off+len(want))
						}
					}
					lastGot = b
				case opERROR:
					ended = true
				default:
					t.Fatalf("server sent opcode %d", op)
				}
			}
		}
		sendAck := func(to net.Addr, block int) {
			if to == nil {
				return
			}
			lastAck = ack(uint16(block))
			c.Conn.WriteTo(lastAck, to)
			if block == acked+1 || (acked < 0 && block == 0) {
				acked = block
			}
		}
		drain(30 * time.Millisecond)
		for i := 0; i+2 < len(script) && i < 3*12; i += 3 {
			arg := int(binary.BigEndian.Uint16(script[i+1:]))
			switch script[i] % numActs {
			case actAckLast:
				if lastGot >= 0 {
					sendAck(peer, lastGot)
				}
			case actAck:
				// A wrong ACK (not the block just sent) moves nothing.
				if peer != nil {
					c.Conn.WriteTo(ack(uint16(arg)), peer)
					lastAck = ack(uint16(arg))
					if arg == lastGot && arg == acked+1 {
						acked = arg
					}
				}
			case actDupAck:
				if peer != nil && lastAck != nil {
					c.Conn.WriteTo(lastAck, peer)
				}
			case actError:
				if peer != nil {
					c.Conn.WriteTo(errorPacket(0, "client gives up"), peer)
					ended = true
				}
			case actForeign:
				if peer != nil && lastGot >= 0 {
					other.Conn.WriteTo(ack(uint16(lastGot)), peer)
				}
			case actGarbage:
				if peer != nil {
					c.Conn.WriteTo(bytes.Repeat([]byte{byte(arg)}, arg%600), peer)
				}
			case actWait:
				drain(60 * time.Millisecond) // a retransmission
				continue
			case actShortAck:
				if peer != nil {
					c.Conn.WriteTo([]byte{0, opACK, 0}, peer)
				}
			}
			drain(20 * time.Millisecond)
			if ended {
				break
			}
		}
		// The client goes silent: the server must give up (50 ms timeout,
		// one retry) or have finished, and free the transfer.
		deadline := time.Now().Add(5 * time.Second)
		for s.Stats().Active.Load() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("transfer still active 5 s after the client fell silent: %+v", s.Stats())
			}
			time.Sleep(time.Millisecond)
		}
	})
}
