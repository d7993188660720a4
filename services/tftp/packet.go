package tftp

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Opcodes (RFC 1350, RFC 2347).
const (
	opRRQ   = 1
	opWRQ   = 2
	opDATA  = 3
	opACK   = 4
	opERROR = 5
	opOACK  = 6
)

// Error codes (RFC 1350, RFC 2347).
const (
	errUndefined    = 0
	errNotFound     = 1
	errAccess       = 2
	errIllegalOp    = 4
	errUnknownTID   = 5
	errOptionDenied = 8
)

// Limits from RFC 2348 and RFC 2349.
const (
	defaultBlockSize = 512
	minBlockSize     = 8
	maxBlockSize     = 65464
	minTimeout       = 1
	maxTimeout       = 255
	// maxRequest bounds a request datagram; filenames and options are short
	// and a PXE ROM never sends more than a few hundred bytes.
	maxRequest = 1024
)

// request is a parsed RRQ or WRQ.
type request struct {
	op       uint16
	filename string
	mode     string // lower case: "octet" or "netascii" ("mail" is rejected)
	// Options as sent (names lower-cased). Unknown options are kept so the
	// parser is total, but only blksize, tsize and timeout are answered.
	blksize int // 0 if absent or unusable
	tsize   bool
	timeout int // seconds, 0 if absent or unusable
}

var errMalformed = errors.New("malformed request")

// parseRequest parses an RRQ/WRQ datagram. It never panics on any input.
func parseRequest(b []byte) (*request, error) {
	if len(b) < 4 || len(b) > maxRequest {
		return nil, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	}
	r := &request{op: binary.BigEndian.Uint16(b)}
	if r.op != opRRQ && r.op != opWRQ {
		return nil, fmt.Errorf("%w: opcode %d", errMalformed, r.op)
	}
	fields := bytes.Split(b[2:], []byte{0})
	// A well-formed request ends in NUL, so the last field is empty.
	if len(fields) < 3 || len(fields[len(fields)-1]) != 0 {
		return nil, fmt.Errorf("%w: missing NUL terminator", errMalformed)
	}
	fields = fields[:len(fields)-1]
	r.filename = string(fields[0])
	r.mode = strings.ToLower(string(fields[1]))
	if r.filename == "" {
		return nil, fmt.Errorf("%w: empty filename", errMalformed)
	}
	if r.mode != "octet" && r.mode != "netascii" {
		return nil, fmt.Errorf("%w: unsupported mode %q", errMalformed, r.mode)
	}
	opts := fields[2:]
	// Options come in name/value pairs; a dangling name is ignored, as a
	// lenient reading of RFC 2347.
	for i := 0; i+1 < len(opts); i += 2 {
		name, val := strings.ToLower(string(opts[i])), string(opts[i+1])
		switch name {
		case "blksize":
			if n, err := strconv.Atoi(val); err == nil && n >= minBlockSize && n <= maxBlockSize {
				r.blksize = n
			}
		case "tsize":
			if _, err := strconv.ParseUint(val, 10, 63); err == nil {
				r.tsize = true
			}
		case "timeout":
			if n, err := strconv.Atoi(val); err == nil && n >= minTimeout && n <= maxTimeout {
				r.timeout = n
			}
		}
	}
	return r, nil
}

func dataPacket(block uint16, payload []byte) []byte {
	b := make([]byte, 4+len(payload))
	binary.BigEndian.PutUint16(b, opDATA)
	binary.BigEndian.PutUint16(b[2:], block)
	copy(b[4:], payload)
	return b
}

func errorPacket(code uint16, msg string) []byte {
	b := make([]byte, 4, 5+len(msg))
	binary.BigEndian.PutUint16(b, opERROR)
	binary.BigEndian.PutUint16(b[2:], code)
	b = append(b, msg...)
	return append(b, 0)
}

// oackPacket builds an OACK for the given name/value pairs, in order.
func oackPacket(kv ...string) []byte {
	b := []byte{0, opOACK}
	for _, s := range kv {
		b = append(b, s...)
		b = append(b, 0)
	}
	return b
}

// parseAck returns the block number of an ACK, or ok=false for anything
// else. An ERROR from the client is reported with isErr.
func parseAck(b []byte) (block uint16, ok, isErr bool) {
	if len(b) < 4 {
		return 0, false, false
	}
	switch binary.BigEndian.Uint16(b) {
	case opACK:
		return binary.BigEndian.Uint16(b[2:]), true, false
	case opERROR:
		return 0, false, true
	}
	return 0, false, false
}
