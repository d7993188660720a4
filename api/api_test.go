package api

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vunet/vunet/internal/unixsock"
)

// fakeBackend is an in-memory Backend.
type fakeBackend struct {
	mu       sync.Mutex
	forwards []Forward
	stats    Stats
	nextPort uint16
}

var guestAddr = netip.MustParseAddr("10.0.2.15")

func (b *fakeBackend) Health() Health {
	return Health{Status: "ok", Version: "test", Started: b.stats.Started, UptimeSeconds: 1.5}
}

func (b *fakeBackend) Stats() Stats { return b.stats }

func (b *fakeBackend) Forwards() []Forward {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]Forward(nil), b.forwards...)
}

func (b *fakeBackend) AddForward(f Forward) (Forward, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if f.Host.Port() == 0 {
		b.nextPort++
		f.Host = netip.AddrPortFrom(f.Host.Addr(), 40000+b.nextPort)
	}
	for _, g := range b.forwards {
		if g.Proto == f.Proto && g.Host == f.Host {
			return Forward{}, Errorf(ErrConflict, "a %s port forward already listens on %s", f.Proto, f.Host)
		}
	}
	f.Guest = netip.AddrPortFrom(guestAddr, f.GuestPort)
	b.forwards = append(b.forwards, f)
	return f, nil
}

func (b *fakeBackend) RemoveForward(f Forward) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, g := range b.forwards {
		if g.Proto == f.Proto && g.Host == f.Host && (f.GuestPort == 0 || f.GuestPort == g.GuestPort) {
			b.forwards = append(b.forwards[:i], b.forwards[i+1:]...)
			return nil
		}
	}
	return Errorf(ErrNotFound, "no %s port forward on %s", f.Proto, f.Host)
}

// sampleStats has every field non-zero, so a field lost in JSON shows up
// as a difference.
func sampleStats() Stats {
	m := func(layer, name, kind string, v int64, kv ...string) Metric {
		labels := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			labels[kv[i]] = kv[i+1]
		}
		if len(labels) == 0 {
			labels = nil
		}
		return Metric{Layer: layer, Name: name, Kind: kind, Help: "Help for " + name + ` with \ and
a newline.`, Labels: labels, Value: v}
	}
	hostile := func(src string, m Metric) Metric { m.Hostile = src; return m }
	return Stats{
		Version: `v1.0 "quoted" \ back`, Started: time.Date(2026, 1, 2, 3, 4, 5, 5e8, time.UTC), UptimeSeconds: 12.5,
		Metrics: []Metric{
			m("link", "vunet_link_frames_total", Counter, 1<<60, "queue", "1", "direction", "from_guest"),
			m("link", "vunet_link_frames_total", Counter, 10, "queue", "0", "direction", "to_guest"),
			hostile("link", m("link", "vunet_link_drops_total", Counter, 3, "reason", "tx_short")),
			hostile("link", m("link", "vunet_link_drops_total", Counter, 5, "reason", "tx_bad_header")),
			m("link", "vunet_link_rx_backlog", Gauge, 6),
			hostile("virtqueue", m("virtqueue", "vunet_virtqueue_bad_chains_total", Counter, 1, "queue", "0", "direction", "to_guest")),
			hostile("virtqueue", m("virtqueue", "vunet_virtqueue_bad_chains_total", Counter, 2, "queue", "1", "direction", "from_guest")),
			m("forward", "vunet_flows", Gauge, 14, "proto", "icmp"),
			m("dns", "vunet_dns_queries_total", Counter, 1<<63-1, "transport", "udp"),
			// A family declared in two places is still written once.
			m("link", "vunet_link_frames_total", Counter, 7, "queue", "2", "direction", "to_guest"),
		},
		Rings:  []RingState{{Queue: 1, Direction: FromGuest, Size: 256, AvailIdx: 3, NextAvail: 2, UsedIdx: 1, EventIdx: true, AvailEvent: 4, UsedEvent: 5}},
		Leases: []Lease{{MAC: "52:54:00:12:34:56", Addr: guestAddr, Expiry: time.Date(2026, 1, 2, 4, 0, 0, 0, time.UTC)}},
	}
}

// serve starts a Server for b on a unix socket and returns a client; the
// server is stopped when the test ends.
func serve(t *testing.T, b Backend) (*Client, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "api.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- NewServer(b, nil).Serve(ctx, l) }()
	c := NewClient(path)
	t.Cleanup(func() {
		c.Close()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return c, path
}

func TestRoundTrip(t *testing.T) {
	b := &fakeBackend{stats: sampleStats()}
	c, _ := serve(t, b)
	ctx := context.Background()

	h, err := c.Health(ctx)
	if err != nil || h.Status != "ok" || h.Version != "test" || !h.Started.Equal(b.stats.Started) {
		t.Fatalf("Health = %+v, %v", h, err)
	}
	st, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(st, b.stats) {
		t.Errorf("Stats round trip:\n got %+v\nwant %+v", st, b.stats)
	}

	fs, err := c.Forwards(ctx)
	if err != nil || len(fs) != 0 {
		t.Fatalf("Forwards = %v, %v; want none", fs, err)
	}
	v4 := Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:2222"), GuestPort: 22}
	v6 := Forward{Proto: "udp", Host: netip.MustParseAddrPort("[::1]:5353"), GuestPort: 53}
	for _, f := range []Forward{v4, v6} {
		got, err := c.AddForward(ctx, f)
		if err != nil {
			t.Fatalf("AddForward(%v): %v", f, err)
		}
		want := f
		want.Guest = netip.AddrPortFrom(guestAddr, f.GuestPort)
		if got != want {
			t.Errorf("AddForward(%v) = %+v, want %+v", f, got, want)
		}
	}
	// Port 0: the backend's choice comes back.
	got, err := c.AddForward(ctx, Forward{Proto: "tcp", Host: netip.MustParseAddrPort("127.0.0.1:0"), GuestPort: 80})
	if err != nil || got.Host.Port() == 0 {
		t.Fatalf("AddForward(port 0) = %v, %v", got, err)
	}
	fs, err = c.Forwards(ctx)
	if err != nil || len(fs) != 3 || fs[1].Host != v6.Host || fs[1].Guest.Port() != 53 {
		t.Fatalf("Forwards = %v, %v", fs, err)
	}

	_, err = c.AddForward(ctx, v4)
	if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "already listens") {
		t.Errorf("duplicate AddForward: %v, want ErrConflict", err)
	}
	if err := c.RemoveForward(ctx, Forward{Proto: "tcp", Host: v4.Host, GuestPort: 23}); !errors.Is(err, ErrNotFound) {
		t.Errorf("RemoveForward(wrong guest port) = %v, want ErrNotFound", err)
	}
	if err := c.RemoveForward(ctx, v4); err != nil {
		t.Errorf("RemoveForward(v4): %v", err)
	}
	if err := c.RemoveForward(ctx, Forward{Proto: "udp", Host: v6.Host}); err != nil {
		t.Errorf("RemoveForward(v6, any guest port): %v", err)
	}
	if err := c.RemoveForward(ctx, v4); !errors.Is(err, ErrNotFound) {
		t.Errorf("second RemoveForward = %v, want ErrNotFound", err)
	}
	if fs, _ := c.Forwards(ctx); len(fs) != 1 {
		t.Errorf("after removal Forwards = %v, want one left", fs)
	}

	m, err := c.Metrics(ctx)
	if err != nil || !strings.Contains(m, "vunet_flows{proto=\"icmp\"} 14\n") {
		t.Errorf("Metrics = %q, %v", m, err)
	}
}

func TestBadRequests(t *testing.T) {
	_, path := serve(t, &fakeBackend{})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	defer hc.CloseIdleConnections()
	tests := []struct {
		method, path, body string
		status             int
	}{
		{"POST", PathForwards, `{"proto":"sctp","host":"127.0.0.1:1","guest_port":1}`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"localhost:1","guest_port":1}`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:1"}`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:1","guest_port":1,"extra":1}`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:1","guest_port":70000}`, 400},
		{"POST", PathForwards, `not json`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:3","guest_port":1,"guest_selector":"` + strings.Repeat("v", 65) + `"}`, 400},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:3","guest_port":1,"guest_selector":"vm1"}`, 201},
		{"POST", PathForwards, `{"proto":"tcp","host":"127.0.0.1:1","guest_port":1}`, 201},
		{"DELETE", PathForwards + "?proto=tcp&host=127.0.0.1", "", 400},
		{"DELETE", PathForwards + "?proto=tcp&host=127.0.0.1:1&guest_port=x", "", 400},
		{"DELETE", PathForwards + "?proto=icmp&host=127.0.0.1:1", "", 400},
		{"DELETE", PathForwards + "?proto=tcp&host=127.0.0.1:2", "", 404},
		{"DELETE", PathForwards + "?proto=tcp&host=127.0.0.1:1&guest_port=1", "", 204},
		{"GET", "/v1/nope", "", 404},
		{"PUT", PathStats, "", 405},
		{"PATCH", PathForwards, "", 405},
		{"GET", PathHealth, "", 200},
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(tt.method, "http://vunet"+tt.path, strings.NewReader(tt.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.status {
			t.Errorf("%s %s %s: status %d (%s), want %d", tt.method, tt.path, tt.body, resp.StatusCode, body, tt.status)
		}
		if resp.StatusCode >= 400 && !strings.HasPrefix(string(body), `{"error":`) {
			t.Errorf("%s %s: error body %q is not an ErrorBody", tt.method, tt.path, body)
		}
	}
}

func TestUnreachable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	_, err := NewClient(missing).Stats(context.Background())
	var ue *UnreachableError
	if !errors.As(err, &ue) || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("Stats on a missing socket: %v, want UnreachableError(ENOENT)", err)
	}
	if msg := err.Error(); strings.Contains(msg, "\n") || !strings.Contains(msg, "is vunet running with --api "+missing) {
		t.Errorf("message %q: want one line with a hint", msg)
	}

	// A dead socket file (nobody listening) is refused, not missing.
	dead := filepath.Join(dir, "dead.sock")
	l, err := Listen(dead)
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	_, err = NewClient(dead).Health(context.Background())
	if !errors.As(err, &ue) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("Health on a dead socket: %v, want UnreachableError(ECONNREFUSED)", err)
	}
}

// TestClientTimeout checks that a server that accepts but never answers
// does not hang the client.
func TestClientTimeout(t *testing.T) {
	path := filepath.Join(t.TempDir(), "slow.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		var held []net.Conn // accepted, never answered
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = NewClient(path).Health(ctx)
	if err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("Health against a mute server: %v after %v", err, time.Since(start))
	}
}

func TestListenPermissions(t *testing.T) {
	old := syscall.Umask(0) // the most permissive umask must not matter
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "api.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode = %v, %v; want a 0600 socket", fi.Mode(), err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("directory holds %d entries, want just the socket (temporary directory left behind?)", len(ents))
	}
	// The renamed socket still accepts connections.
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dial after rename: %v", err)
	}
	c.Close()

	// A live socket is refused; a stale one is replaced.
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Errorf("Listen on a live socket: %v", err)
	}
	l.Close()
	l2, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l2.Close()

	// A regular file is never removed.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o600)
	if _, err := Listen(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen on a regular file: %v", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("regular file removed: %v", err)
	}
}

func TestListenLongPath(t *testing.T) {
	// A path that fits sockaddr_un but not with the temporary directory.
	dir := t.TempDir()
	name := strings.Repeat("x", unixsock.MaxPath-len(dir)-2-1)
	path := filepath.Join(dir, name)
	if len(path) >= unixsock.MaxPath {
		t.Skip("temporary directory too long")
	}
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, %v", fi.Mode(), err)
	}
}

func TestErrorf(t *testing.T) {
	inner := syscall.EADDRINUSE
	err := Errorf(ErrConflict, "listen: %w", inner)
	if err.Error() != "listen: address already in use" {
		t.Errorf("message %q carries the kind", err)
	}
	if !errors.Is(err, ErrConflict) || !errors.Is(err, syscall.EADDRINUSE) || errors.Is(err, ErrNotFound) {
		t.Errorf("errors.Is mismatch for %v", err)
	}
	if StatusOf(err) != 409 || StatusOf(errors.New("x")) != 500 {
		t.Error("StatusOf")
	}
}
