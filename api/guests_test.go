package api

import (
	"context"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

type guestsBackend struct {
	fakeBackend
	guests []Guest
}

func (b *guestsBackend) GuestList() []Guest { return b.guests }

// TestGuestsRoute checks GET /v1/guests round-trips every field of a guest,
// lists none as [] (not null), and is absent (404) from a backend that
// does not list guests.
func TestGuestsRoute(t *testing.T) {
	since := time.Date(2026, 12, 1, 18, 0, 0, 0, time.UTC)
	g := Guest{Port: 1, Session: 3, Since: since, MAC: "52:54:00:00:00:02", Name: "vm2",
		IPv4:    []netip.Addr{netip.MustParseAddr("10.0.2.16")},
		IPv6:    []netip.Addr{netip.MustParseAddr("fd00::5054:ff:fe00:2")},
		Leases:  []Lease{{MAC: "52:54:00:00:00:02", Addr: netip.MustParseAddr("10.0.2.16"), Expiry: since.Add(time.Hour)}},
		Rings:   []RingState{{Guest: 1, Queue: 0, Direction: ToGuest, Size: 256, AvailIdx: 3, NextAvail: 2, UsedIdx: 2}},
		Metrics: []Metric{{Layer: "link", Name: "vunet_link_frames_total", Kind: "counter", Labels: map[string]string{"guest": "1"}, Value: 7}},
	}
	b := &guestsBackend{guests: []Guest{g}}
	c, _ := serve(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := c.Guests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || !reflect.DeepEqual(got[0], g) {
		t.Errorf("Guests() = %+v\nwant %+v", got, g)
	}
	b.guests = nil
	if got, err := c.Guests(ctx); err != nil || got == nil || len(got) != 0 {
		t.Errorf("no guests: %#v, %v; want an empty list", got, err)
	}

	plain, _ := serve(t, &fakeBackend{})
	if _, err := plain.Guests(ctx); !errors.Is(err, ErrNotFound) {
		t.Errorf("backend without guests: %v, want ErrNotFound", err)
	}
}
