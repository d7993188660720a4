package boot

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// payloadSize is the file the firmware downloads: several megabytes and
// deliberately not a multiple of any segment or block size.
const payloadSize = 5<<20 + 1234

// The markers the payload script prints.
const (
	payloadOK      = "VUNET-PAYLOAD-OK"
	payloadCorrupt = "VUNET-PAYLOAD-CORRUPT"
)

// payload returns payloadSize deterministic bytes that check themselves:
// an iPXE script (Debian's iPXE has no digest command) of lines
// "iseq T T || goto bad" with T a pseudo-random 64-digit hex token, then
// the OK marker. A changed byte in a token fails its iseq; one in the
// syntax makes the script fail; either way iPXE does not print the OK
// marker (only the unexecuted "goto bad" tails, about 9 % of the bytes,
// and the final comment are not covered).
func payload() []byte {
	var seed [32]byte
	copy(seed[:], "vunet boot-client payload seed!")
	r := rand.NewChaCha8(seed)
	tail := "echo " + payloadOK + "\ngoto end\n:bad\necho " + payloadCorrupt + "\niseq corrupt payload\n:end\n"
	var b bytes.Buffer
	b.Grow(payloadSize)
	b.WriteString("#!ipxe\n")
	tok := make([]byte, 32)
	const lineLen = len("iseq  || goto bad\n") + 2*64
	for b.Len()+lineLen+2+len(tail) <= payloadSize {
		r.Read(tok)
		h := hex.EncodeToString(tok)
		b.WriteString("iseq " + h + " " + h + " || goto bad\n")
	}
	// A comment pads the script to the exact size.
	pad := payloadSize - b.Len() - len(tail)
	b.WriteString("#" + strings.Repeat("-", pad-2) + "\n")
	b.WriteString(tail)
	return b.Bytes()
}

// fileServer serves one file at /NAME on 127.0.0.1 (reached by the guest as
// 10.0.2.2:Port) and records what each GET delivered.
type fileServer struct {
	Port int
	mu   sync.Mutex
	gets []getRecord
}

type getRecord struct {
	Path    string
	Written int64
	Err     error
}

func startFileServer(t *testing.T, name string, data []byte) *fileServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fs := &fileServer{Port: l.Addr().(*net.TCPAddr).Port}
	mux := http.NewServeMux()
	mux.HandleFunc("/"+name, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		var n int64
		var err error
		if r.Method != http.MethodHead {
			var k int
			k, err = w.Write(data)
			n = int64(k)
		}
		fs.mu.Lock()
		fs.gets = append(fs.gets, getRecord{r.URL.Path, n, err})
		fs.mu.Unlock()
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: time.Minute}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("http server: %v", err)
		}
	}()
	t.Cleanup(func() { srv.Close() })
	return fs
}

func (fs *fileServer) requests() []getRecord {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return append([]getRecord(nil), fs.gets...)
}

// checkDelivered checks that exactly one GET of path delivered all of data.
func (fs *fileServer) checkDelivered(t *testing.T, path string, size int) {
	t.Helper()
	var n int
	for _, g := range fs.requests() {
		if g.Path != path {
			continue
		}
		n++
		if g.Err != nil || g.Written != int64(size) {
			t.Errorf("GET %s: server wrote %d of %d bytes (%v)", path, g.Written, size, g.Err)
		}
	}
	if n != 1 {
		t.Errorf("GET %s: %d requests, want 1", path, n)
	}
}
