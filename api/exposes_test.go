package api

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// exposeBackend adds an in-memory ExposeBackend to fakeBackend.
type exposeBackend struct {
	fakeBackend
	emu     sync.Mutex
	exposes []Expose
}

var gatewayAddr = netip.MustParseAddr("10.0.2.2")

func (b *exposeBackend) Exposes() []Expose {
	b.emu.Lock()
	defer b.emu.Unlock()
	return append([]Expose(nil), b.exposes...)
}

func (b *exposeBackend) AddExpose(e Expose) (Expose, error) {
	b.emu.Lock()
	defer b.emu.Unlock()
	for _, o := range b.exposes {
		if o.GatewayPort == e.GatewayPort {
			return Expose{}, Errorf(ErrConflict, "gateway port %d is already exposed", e.GatewayPort)
		}
	}
	e.Gateway = []netip.AddrPort{netip.AddrPortFrom(gatewayAddr, e.GatewayPort)}
	b.exposes = append(b.exposes, e)
	return e, nil
}

func (b *exposeBackend) RemoveExpose(e Expose) error {
	b.emu.Lock()
	defer b.emu.Unlock()
	for i, o := range b.exposes {
		if o.GatewayPort == e.GatewayPort && (e.Path == "" || e.Path == o.Path) {
			b.exposes = append(b.exposes[:i], b.exposes[i+1:]...)
			return nil
		}
	}
	return Errorf(ErrNotFound, "gateway port %d is not exposed", e.GatewayPort)
}

// TestExposesRoute: the client's add, list and remove round-trip every
// field; an empty list is [] (not null); the routes are absent (404)
// from a backend that cannot expose.
func TestExposesRoute(t *testing.T) {
	b := &exposeBackend{}
	c, _ := serve(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if es, err := c.Exposes(ctx); err != nil || es == nil || len(es) != 0 {
		t.Fatalf("Exposes = %#v, %v; want an empty list", es, err)
	}
	e := Expose{GatewayPort: 2375, Path: "/run/vunet/podman.sock"}
	got, err := c.AddExpose(ctx, e)
	want := Expose{Proto: "tcp", GatewayPort: 2375, Path: e.Path, Gateway: []netip.AddrPort{netip.MustParseAddrPort("10.0.2.2:2375")}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("AddExpose = %+v, %v; want %+v", got, err, want)
	}
	if got.String() != "tcp:2375:unix:/run/vunet/podman.sock" {
		t.Errorf("String() = %q", got.String())
	}
	if _, err := c.AddExpose(ctx, e); !errors.Is(err, ErrConflict) {
		t.Errorf("second AddExpose = %v, want ErrConflict", err)
	}
	if es, err := c.Exposes(ctx); err != nil || len(es) != 1 || !reflect.DeepEqual(es[0], want) {
		t.Errorf("Exposes = %+v, %v", es, err)
	}
	if err := c.RemoveExpose(ctx, Expose{GatewayPort: 2375, Path: "/run/other.sock"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("RemoveExpose with another path = %v, want ErrNotFound", err)
	}
	if err := c.RemoveExpose(ctx, Expose{GatewayPort: 2375}); err != nil {
		t.Errorf("RemoveExpose(any path): %v", err)
	}
	if err := c.RemoveExpose(ctx, Expose{GatewayPort: 2375}); !errors.Is(err, ErrNotFound) {
		t.Errorf("second RemoveExpose = %v, want ErrNotFound", err)
	}

	plain, _ := serve(t, &fakeBackend{})
	if _, err := plain.Exposes(ctx); !errors.Is(err, ErrNotFound) {
		t.Errorf("backend without exposes: %v, want ErrNotFound", err)
	}
}

// TestExposeBadRequests: the form of a request is checked before the
// backend sees it, with a message that names the field and its range.
func TestExposeBadRequests(t *testing.T) {
	_, path := serve(t, &exposeBackend{})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	defer hc.CloseIdleConnections()
	long := "/" + strings.Repeat("x", 108)
	tests := []struct {
		method, path, body string
		status             int
		msg                string
	}{
		{"POST", PathExposes, `{"gateway_port":0,"path":"/a.sock"}`, 400, "gateway_port 0: expected 1..65535"},
		{"POST", PathExposes, `{"gateway_port":70000,"path":"/a.sock"}`, 400, "gateway_port 70000: expected 1..65535"},
		{"POST", PathExposes, `{"gateway_port":-1,"path":"/a.sock"}`, 400, "gateway_port -1"},
		{"POST", PathExposes, `{"path":"/a.sock"}`, 400, "gateway_port 0"},
		{"POST", PathExposes, `{"proto":"udp","gateway_port":53,"path":"/a.sock"}`, 400, "only tcp"},
		{"POST", PathExposes, `{"gateway_port":1,"path":"a.sock"}`, 400, "absolute socket path"},
		{"POST", PathExposes, `{"gateway_port":1}`, 400, "absolute socket path"},
		{"POST", PathExposes, `{"gateway_port":1,"path":"` + long + `"}`, 400, "shorter than 108"},
		{"POST", PathExposes, `{"gateway_port":1,"path":"/a\u0000b"}`, 400, "absolute socket path"},
		{"POST", PathExposes, `{"gateway_port":1,"path":"/a","gateway":["10.0.2.2:1"]}`, 400, "unknown field"},
		{"POST", PathExposes, `not json`, 400, "request body"},
		{"POST", PathExposes, `{"proto":"tcp","gateway_port":2375,"path":"/a.sock"}`, 201, ""},
		{"POST", PathExposes, `{"gateway_port":2375,"path":"/b.sock"}`, 409, "already exposed"},
		{"DELETE", PathExposes, "", 400, `gateway_port \"\": expected 1..65535`},
		{"DELETE", PathExposes + "?gateway_port=x", "", 400, "expected 1..65535"},
		{"DELETE", PathExposes + "?gateway_port=65536", "", 400, "expected 1..65535"},
		{"DELETE", PathExposes + "?gateway_port=2375&proto=udp", "", 400, "only tcp"},
		{"DELETE", PathExposes + "?gateway_port=2375&path=rel", "", 400, "absolute"},
		{"DELETE", PathExposes + "?gateway_port=2376", "", 404, "not exposed"},
		{"DELETE", PathExposes + "?gateway_port=2375&path=/a.sock", "", 204, ""},
		{"PUT", PathExposes, "", 405, "allowed: GET, POST, DELETE"},
	}
	for _, tt := range tests {
		req, _ := http.NewRequest(tt.method, "http://vunet"+tt.path, strings.NewReader(tt.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.status || !strings.Contains(string(body), tt.msg) {
			t.Errorf("%s %s %s: %d %s; want %d with %q", tt.method, tt.path, tt.body, resp.StatusCode, body, tt.status, tt.msg)
		}
	}
}
