package api

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/vunet/vunet/devstate"
)

// stateBackend adds device-state transfer to fakeBackend.
type stateBackend struct {
	fakeBackend
	state  []byte
	loaded []byte
}

func (b *stateBackend) SaveState() ([]byte, error) { return b.state, nil }

func (b *stateBackend) LoadState(s []byte) (StateSummary, error) {
	if !bytes.HasPrefix(s, []byte("VUNETST")) {
		return StateSummary{}, Errorf(ErrInvalid, "not a state")
	}
	b.loaded = append([]byte(nil), s...)
	return StateSummary{Leases: 1, Problems: []string{}}, nil
}

// GET /v1/state returns the bytes as they are; POST /v1/state hands the
// body over whole, refuses what the backend refuses with 400, and refuses
// a body over devstate.MaxSize without buffering it.
func TestStateRoutes(t *testing.T) {
	b := &stateBackend{state: append([]byte("VUNETST\x00"), 0, 0xff, '\n', 1)}
	c, _ := serve(t, b)
	ctx := context.Background()
	got, err := c.SaveState(ctx)
	if err != nil || !bytes.Equal(got, b.state) {
		t.Fatalf("SaveState = %q, %v", got, err)
	}
	sum, err := c.LoadState(ctx, b.state)
	if err != nil || sum.Leases != 1 || !bytes.Equal(b.loaded, b.state) {
		t.Fatalf("LoadState = %+v, %v (backend got %q)", sum, err, b.loaded)
	}
	var se *StatusError
	if _, err := c.LoadState(ctx, []byte("garbage")); !errors.As(err, &se) || se.Status != http.StatusBadRequest {
		t.Errorf("bad state: %v", err)
	}
	big := append([]byte("VUNETST\x00"), make([]byte, devstate.MaxSize)...)
	b.loaded = nil
	if _, err := c.LoadState(ctx, big); !errors.As(err, &se) || se.Status != http.StatusBadRequest || !strings.Contains(se.Message, "too large") {
		t.Errorf("oversized state: %v", err)
	}
	if b.loaded != nil {
		t.Error("the backend saw an oversized state")
	}

	// Without a StateBackend the route does not exist.
	plain, _ := serve(t, &fakeBackend{})
	if _, err := plain.SaveState(ctx); !errors.As(err, &se) || se.Status != http.StatusNotFound {
		t.Errorf("GET /v1/state without state support: %v", err)
	}
}
