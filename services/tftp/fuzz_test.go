package tftp

import (
	"strings"
	"testing"
)

// FuzzParseRequest checks that request parsing never panics and that what it
// accepts is within the protocol's limits.
func FuzzParseRequest(f *testing.F) {
	f.Add(rrq("pxelinux.0", "octet", "blksize", "1468", "tsize", "0", "timeout", "2"))
	f.Add(rrq(`boot\x64.efi`, "netascii"))
	f.Add([]byte{0, 2, 'a', 0, 'o', 'c', 't', 'e', 't', 0})
	f.Add([]byte{0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRequest(b)
		if err != nil {
			return
		}
		if r.op != opRRQ && r.op != opWRQ {
			t.Fatalf("opcode %d accepted", r.op)
		}
		if r.filename == "" || strings.ContainsRune(r.filename, 0) {
			t.Fatalf("bad filename %q accepted", r.filename)
		}
		if r.blksize != 0 && (r.blksize < minBlockSize || r.blksize > maxBlockSize) {
			t.Fatalf("blksize %d accepted", r.blksize)
		}
		if r.timeout != 0 && (r.timeout < minTimeout || r.timeout > maxTimeout) {
			t.Fatalf("timeout %d accepted", r.timeout)
		}
		_ = cleanName(r.filename)
	})
}
