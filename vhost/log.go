package vhost

import (
	"fmt"

	"github.com/vunet/vunet/vhost/dirtylog"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// Live migration, the device's half (vhost-user spec, "Migration"): the
// frontend maps a dirty-page log (SET_LOG_BASE, a memory file with
// PROTOCOL_F_LOG_SHMFD), acks VHOST_F_LOG_ALL and sets VHOST_VRING_F_LOG
// on each ring; from then on every write vunet makes to guest memory is
// marked in the log (virtqueue.Config.Log) so that the frontend copies
// those pages to the destination again. QEMU sends these in either order
// (SET_LOG_BASE first when a migration starts, last when a device starts
// during one), so each takes effect whenever it arrives: the running
// queues are stopped (Backend.StopQueue) and restarted with the new
// logging state, and no worker ever sees it change under it.

// logBase is SET_LOG_BASE's payload with its descriptor (still owned by
// the message).
type logBase struct {
	protocol.LogBase
	fd int
}

func logBaseArg(s *session, m *protocol.Message) (lb logBase, err error) {
	defer func() {
		if err != nil {
			s.stats.DirtyLogsRefused.Add(1)
		}
	}()
	if s.protoAcked&(1<<protocol.ProtoLogSHMFD) == 0 {
		return logBase{}, fmt.Errorf("SET_LOG_BASE without PROTOCOL_F_LOG_SHMFD negotiated")
	}
	p, err := m.LogBase()
	if err != nil {
		return logBase{}, err
	}
	if len(m.FDs) != 1 {
		return logBase{}, fmt.Errorf("%w: SET_LOG_BASE with %d descriptors, want the log's", protocol.ErrFDCount, len(m.FDs))
	}
	return logBase{p, m.FDs[0]}, nil
}

// setLogBase maps the log and hands it to the queues. The log must cover
// every page of guest memory and of each logged used ring: a write the
// log cannot record would reach the destination stale, silently. QEMU
// waits for a reply (with no payload) whether or not it asked for one;
// a refusal ends the session, since answering would tell the frontend
// that logging works.
func (s *session) setLogBase(a logBase) ([]byte, error) {
	l, err := s.mapLog(a)
	if err != nil {
		s.stats.DirtyLogsRefused.Add(1)
		return nil, err
	}
	paused := s.pauseAll()
	if s.dirty != nil {
		s.dirty.Close()
	}
	s.dirty = l
	s.dirty.SetNotify(s.logNotify())
	s.stats.DirtyLogs.Add(1)
	s.log.Info("dirty-page log mapped (live migration)", "size", a.Size, "covers_bytes", a.Size*8*dirtylog.PageSize)
	return []byte{}, s.resume(paused)
}

func (s *session) mapLog(a logBase) (*dirtylog.Log, error) {
	l, err := dirtylog.Map(a.fd, a.Size, a.Offset, dirtylog.Counters{Pages: &s.stats.DirtyPages, Outside: &s.stats.DirtyLogOutside})
	if err != nil {
		return nil, err
	}
	for _, r := range s.mem.Regions() {
		if !l.Covers(r.GuestAddr, r.Size()) {
			l.Close()
			return nil, fmt.Errorf("dirty log of %#x bytes does not cover guest memory %#x+%#x", a.Size, r.GuestAddr, r.Size())
		}
	}
	for i, vr := range s.vrings {
		if vr.hasAddr && vr.addr.Flags&protocol.VringFLog != 0 && !l.Covers(vr.addr.Log, usedRingSize(vr.num)) {
			l.Close()
			return nil, fmt.Errorf("dirty log of %#x bytes does not cover vring %d's used ring log at %#x", a.Size, i, vr.addr.Log)
		}
	}
	return l, nil
}

// usedRingSize is the bytes of a split used ring of n entries, with
// avail_event.
func usedRingSize(n uint32) uint64 { return 6 + 8*uint64(n) }

// logFDArg takes SET_LOG_FD's descriptor (exactly one, FDsAllowed) as an
// EventFD.
func logFDArg(_ *session, m *protocol.Message) (*virtqueue.EventFD, error) {
	fd := m.FDs[0]
	m.FDs[0] = -1 // ownership moves to the EventFD
	return virtqueue.NewEventFD(fd)
}

// setLogFD records the eventfd the queues signal after marking the log
// (libvhost-user's backends do so once per used-ring flush; QEMU polls
// the log instead and does not send one).
func (s *session) setLogFD(e *virtqueue.EventFD) error {
	paused := s.pauseAll()
	if s.logFD != nil {
		s.logFD.Close()
	}
	s.logFD = e
	if s.dirty != nil {
		s.dirty.SetNotify(s.logNotify())
	}
	return s.resume(paused)
}

func (s *session) logNotify() func() error {
	if s.logFD == nil {
		return nil
	}
	return s.logFD.Signal
}

// closeLog forgets the log and its eventfd; the queues are stopped.
func (s *session) closeLog() {
	if s.dirty != nil {
		s.dirty.Close()
		s.dirty = nil
	}
	if s.logFD != nil {
		s.logFD.Close()
		s.logFD = nil
	}
}
