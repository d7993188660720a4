package protocol

import (
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// Conn reads and writes vhost-user messages on a Unix stream socket.
type Conn struct {
	c   *net.UnixConn
	hdr [HeaderSize]byte
	oob []byte
	buf []byte
}

// NewConn wraps c.
func NewConn(c *net.UnixConn) *Conn {
	return &Conn{c: c, oob: make([]byte, unix.CmsgSpace(MaxFDs*4)), buf: make([]byte, MaxPayload)}
}

// Close closes the socket.
func (c *Conn) Close() error { return c.c.Close() }

// Read reads one message. The payload aliases an internal buffer that is
// reused by the next Read. Descriptors are returned even with an error
// (the caller closes them); a short or oversized message is an error.
func (c *Conn) Read() (Message, error) {
	var m Message
	// Descriptors travel with the first bytes of a sendmsg, so they arrive
	// with the header.
	n, oobn, flags, _, err := c.c.ReadMsgUnix(c.hdr[:], c.oob)
	if oobn > 0 {
		m.FDs = parseFDs(c.oob[:oobn])
	}
	if err != nil {
		return m, err
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return m, fmt.Errorf("%w: control message truncated", ErrFDCount)
	}
	if n == 0 {
		return m, io.EOF
	}
	if n < HeaderSize {
		if _, err := io.ReadFull(c.c, c.hdr[n:]); err != nil {
			return m, fmt.Errorf("vhost-user: short header: %w", err)
		}
	}
	m.Header, err = DecodeHeader(c.hdr[:])
	if err != nil {
		return m, err
	}
	m.Payload = c.buf[:m.Size]
	if _, err := io.ReadFull(c.c, m.Payload); err != nil {
		return m, fmt.Errorf("vhost-user: short payload for %s: %w", m.Request, err)
	}
	return m, nil
}

func parseFDs(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		if f, err := unix.ParseUnixRights(&msgs[i]); err == nil {
			fds = append(fds, f...)
		}
	}
	return fds
}

// Write sends a message with optional descriptors.
func (c *Conn) Write(h Header, payload []byte, fds []int) error {
	h.Size = uint32(len(payload))
	b := EncodeHeader(make([]byte, 0, HeaderSize+len(payload)), h)
	b = append(b, payload...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.c.WriteMsgUnix(b, oob, nil)
	if err != nil {
		return err
	}
	if n != len(b) {
		return io.ErrShortWrite
	}
	return nil
}

// Reply sends the answer to request m with payload.
func (c *Conn) Reply(m *Message, payload []byte) error {
	return c.Write(Header{Request: m.Request, Flags: FlagVersion | FlagReply}, payload, nil)
}

// CloseFDs closes descriptors the receiver did not keep.
func CloseFDs(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}
