package vhosttest

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/vunet/vunet/vhost"
)

// StartServer serves backend on a fresh socket for the rest of the test and
// returns the server and the socket path. The server is stopped, and its
// error checked, at cleanup.
func StartServer(tb testing.TB, backend vhost.Backend) (*vhost.Server, string) {
	tb.Helper()
	srv, err := vhost.NewServer(vhost.Options{Backend: backend})
	if err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(tb.TempDir(), "vhost.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l, false) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("vhost server: %v", err)
		}
	})
	return srv, path
}
