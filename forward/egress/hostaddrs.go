package egress

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// PollInterval is how often the host's addresses are re-read when the
// kernel's change notifications are unavailable (no netlink, e.g. under a
// sandbox that forbids it).
const PollInterval = 2 * time.Second

// HostAddrSet is the set of addresses the host's interfaces own, kept
// current: it subscribes to the kernel's address notifications (netlink
// RTM_NEWADDR and RTM_DELADDR) and re-reads the whole list on each, so a
// VPN or container bridge coming up is covered milliseconds after the
// kernel reports it. Create it with WatchHostAddrs, stop it with Close.
type HostAddrSet struct {
	log   *slog.Logger
	addrs atomic.Pointer[map[netip.Addr]struct{}]
	read  func() ([]net.Addr, error) // net.InterfaceAddrs, replaced by tests

	stats HostAddrStats

	stop     chan struct{}
	wg       sync.WaitGroup
	closeSub func() error
	once     sync.Once
}

// WatchHostAddrs reads the host's addresses and keeps them current until
// Close.
func WatchHostAddrs(log *slog.Logger) (*HostAddrSet, error) {
	return watchHostAddrs(log, net.InterfaceAddrs, subscribeAddrChanges, PollInterval)
}

// subscription delivers a value on changes; close stops it. A nil
// subscription means "poll".
type subscribeFunc func() (changes <-chan struct{}, close func() error, err error)

func watchHostAddrs(log *slog.Logger, read func() ([]net.Addr, error), subscribe subscribeFunc, poll time.Duration) (*HostAddrSet, error) {
	if log == nil {
		log = slog.Default()
	}
	s := &HostAddrSet{log: log, read: read, stop: make(chan struct{})}
	s.stats.Addresses = func() int64 { return int64(s.Len()) }
	// Subscribe before the first read, so a change between the two is not
	// missed.
	changes, closeSub, subErr := subscribe()
	if err := s.Refresh(); err != nil {
		if closeSub != nil {
			_ = closeSub()
		}
		return nil, err
	}
	if subErr != nil {
		log.Warn("host address changes are polled: no netlink notifications", "interval", poll, "err", subErr)
		changes = nil
	}
	s.closeSub = closeSub
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		// Polling replaces the subscription when there is none, and when
		// it ends while vunet still runs (the socket failed): the set must
		// not go stale silently.
		var tick <-chan time.Time
		if changes == nil {
			t := time.NewTicker(poll)
			defer t.Stop()
			tick = t.C
		}
		for {
			select {
			case <-s.stop:
				return
			case _, ok := <-changes:
				if !ok {
					select {
					case <-s.stop:
						return // closed by Close
					default:
					}
					changes = nil
					s.log.Warn("host address notifications stopped; polling instead", "interval", poll)
					t := time.NewTicker(poll)
					defer t.Stop()
					tick = t.C
				}
			case <-tick:
			}
			if err := s.Refresh(); err != nil {
				s.log.Warn("host addresses not re-read; keeping the previous set", "err", err)
			}
		}
	}()
	return s, nil
}

// Refresh re-reads the host's addresses now.
func (s *HostAddrSet) Refresh() error {
	as, err := s.read()
	if err != nil {
		s.stats.Failures.Add(1)
		return err
	}
	m := make(map[netip.Addr]struct{}, len(as))
	for _, a := range as {
		var ip net.IP
		switch a := a.(type) {
		case *net.IPNet:
			ip = a.IP
		case *net.IPAddr:
			ip = a.IP
		}
		if na, ok := netip.AddrFromSlice(ip); ok {
			m[na.Unmap()] = struct{}{}
		}
	}
	if len(m) == 0 {
		s.stats.Failures.Add(1)
		return errors.New("the host reports no addresses")
	}
	s.addrs.Store(&m)
	s.stats.Refreshes.Add(1)
	return nil
}

// Contains reports whether a is one of the host's addresses.
func (s *HostAddrSet) Contains(a netip.Addr) bool {
	m := s.addrs.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[a.Unmap()]
	return ok
}

// Len is the number of addresses in the set.
func (s *HostAddrSet) Len() int {
	if m := s.addrs.Load(); m != nil {
		return len(*m)
	}
	return 0
}

// HostAddrStats are the host address set's counters, declared for the
// metrics registry (internal/metrics).
type HostAddrStats struct {
	// Addresses is set by WatchHostAddrs: the set's size now.
	Addresses func() int64  `metric:"egress_host_addresses" kind:"gauge" help:"Addresses the host owns, denied by --no-host-addresses."`
	Refreshes atomic.Uint64 `metric:"egress_host_address_refreshes_total" help:"Times the host's address set was re-read."`
	// Failures are re-reads that failed; the previous set was kept.
	Failures atomic.Uint64 `metric:"egress_host_address_refresh_failures_total" help:"Re-reads of the host's addresses that failed (the previous set was kept)."`
}

// Stats returns the live counters.
func (s *HostAddrSet) Stats() *HostAddrStats { return &s.stats }

// Close stops watching. The set keeps its last contents.
func (s *HostAddrSet) Close() {
	s.once.Do(func() {
		close(s.stop)
		if s.closeSub != nil {
			_ = s.closeSub()
		}
		s.wg.Wait()
	})
}
