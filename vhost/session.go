package vhost

import (
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/vunet/vunet/vhost/dirtylog"
	"github.com/vunet/vunet/vhost/memory"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// maxQueues bounds the queues a device may expose (32 pairs).
const maxQueues = 64

// protocolFeatures are the vhost-user protocol extensions we offer.
// LOG_SHMFD is live migration's dirty-page log (SET_LOG_BASE with a shared
// memory file, see log.go). GET_CONFIG/SET_CONFIG are answered, but
// CONFIG is not offered: QEMU's virtio-net keeps its own config space and
// warns at every start when a net backend offers it.
const protocolFeatures = 1<<protocol.ProtoMQ | 1<<protocol.ProtoRARP | 1<<protocol.ProtoReplyAck |
	1<<protocol.ProtoNetMTU | 1<<protocol.ProtoResetDevice |
	1<<protocol.ProtoConfigureMemSlots | 1<<protocol.ProtoStatus | 1<<protocol.ProtoLogSHMFD

// transportFeatures are the virtio bits the control plane and virtqueue
// package implement regardless of device.
const transportFeatures = 1<<FeatureVersion1 | 1<<FeatureIndirectDesc | 1<<FeatureEventIdx |
	1<<FeatureProtocolFeatures | 1<<FeatureNotifyOnEmpty | 1<<FeatureAnyLayout | 1<<FeatureRingPacked | 1<<FeatureLogAll

// ErrProtocol marks frontend misbehaviour that ends the session.
var ErrProtocol = errors.New("vhost-user protocol error")

// Stats count control-plane events, including hostile input.
type Stats struct {
	Messages    atomic.Uint64 `metric:"vhost_messages_total" help:"vhost-user messages handled."`
	BadMessages atomic.Uint64 `metric:"vhost_bad_messages_total" help:"vhost-user messages rejected as malformed: size, fd count, values (hostile or buggy frontend)." hostile:"vhost"`
	Sessions    atomic.Uint64 `metric:"vhost_sessions_total" help:"vhost-user frontends served."`
	MapFailures atomic.Uint64 `metric:"vhost_map_failures_total" help:"Guest memory regions that could not be mapped." hostile:"vhost_memory"`
	QueueStarts atomic.Uint64 `metric:"vhost_queue_starts_total" help:"Virtqueues started."`
	// PackedQueueStarts says which ring format the frontend chose.
	PackedQueueStarts atomic.Uint64 `metric:"vhost_packed_queue_starts_total" help:"Virtqueues started in the packed ring format (VIRTIO_F_RING_PACKED negotiated)."`
	// BadFDs counts descriptors refused for their kind: a kick, call or
	// error fd that is not an eventfd, a memory region that is not a
	// regular file or memfd. Also counted in BadMessages (so not in the
	// hostile rollup a second time).
	BadFDs atomic.Uint64 `metric:"vhost_bad_fds_total" help:"Descriptors refused for their kind (a kick/call that is not an eventfd, memory that is not a regular file)."`
	// Queues are each virtqueue's counters, by index; they outlive
	// sessions, so a reconnecting frontend does not reset them. The owner
	// registers each with its queue's labels.
	Queues [maxQueues]virtqueue.Stats `metric:"-"`
	// Session admission (Server.Serve).
	ActiveSessions  atomic.Int64  `metric:"vhost_active_sessions" kind:"gauge" help:"vhost-user frontends being served now."`
	SessionsRefused atomic.Uint64 `metric:"vhost_frontends_refused_total{reason=busy}" help:"vhost-user frontends refused or dropped: busy (already serving the maximum number), peer (its user or group is not allowed), setup_timeout (no SET_OWNER within the set-up timeout)."`
	PeersRefused    atomic.Uint64 `metric:"vhost_frontends_refused_total{reason=peer}"`
	SetupTimeouts   atomic.Uint64 `metric:"vhost_frontends_refused_total{reason=setup_timeout}"`
	AcceptErrors    atomic.Uint64 `metric:"vhost_accept_errors_total" help:"Failed accepts on the vhost-user socket (EMFILE, ENFILE, ...), retried after a backoff."`
	// Memory hotplug (ADD_MEM_REG / REM_MEM_REG).
	// "At run time" is while virtqueues run: QEMU also sends the
	// boot-time memory with ADD_MEM_REG, before it starts them.
	MemRegionsAdded   atomic.Uint64 `metric:"vhost_mem_regions_added_total" help:"Guest memory regions added while the virtqueues run (ADD_MEM_REG, memory hotplug)."`
	MemRegionsRemoved atomic.Uint64 `metric:"vhost_mem_regions_removed_total" help:"Guest memory regions removed while the virtqueues run (REM_MEM_REG, memory unplug)."`
	HotMemBuffers     atomic.Uint64 `metric:"vhost_hotplugged_memory_buffers_total" help:"Descriptor buffers found in guest memory added while the virtqueues run (memory hotplug)."`
	// Live migration: back-end state through DEVICE_STATE (devstate.go).
	DeviceStateSaves  atomic.Uint64 `metric:"vhost_device_state_transfers_total{direction=save}" help:"Device-state transfers (vhost-user DEVICE_STATE) completed, by direction."`
	DeviceStateLoads  atomic.Uint64 `metric:"vhost_device_state_transfers_total{direction=load}"`
	DeviceStateErrors atomic.Uint64 `metric:"vhost_device_state_errors_total" help:"Device-state transfers refused or failed: not negotiated, bad direction, phase or descriptor, pipe error or deadline, size limit, or a state the device refused."`
	// Live migration: the dirty-page log (log.go). DirtyLogsRefused are
	// also counted in BadMessages (so not in the hostile rollup twice).
	DirtyLogs        atomic.Uint64 `metric:"vhost_dirty_logs_total" help:"Dirty-page logs mapped for a live migration (SET_LOG_BASE accepted; the frontend sends another when guest memory grows)."`
	DirtyLogsRefused atomic.Uint64 `metric:"vhost_dirty_logs_refused_total" help:"SET_LOG_BASE requests refused: a range outside the log file, a log too small for guest memory or a ring, a descriptor that is not a memory file, no LOG_SHMFD."`
	DirtyPages       atomic.Uint64 `metric:"vhost_dirty_pages_logged_total" help:"Guest pages vunet marked dirty in the migration log (a page counts again once the frontend has collected it)."`
	DirtyLogOutside  atomic.Uint64 `metric:"vhost_dirty_log_outside_total" help:"Writes to guest memory during a migration that fell outside the dirty log (their pages may reach the destination stale)."`
}

// vring is the control-plane view of one queue.
type vring struct {
	num     uint32
	addr    protocol.VringAddr
	hasAddr bool
	base    uint32 // SET_VRING_BASE / GET_VRING_BASE (packed: avail and used states)
	kick    *virtqueue.EventFD
	call    *virtqueue.EventFD
	errFD   *virtqueue.EventFD
	enabled bool
	started bool // kick received and not stopped by GET_VRING_BASE
	running bool // handed to the backend
	q       *virtqueue.Queue
}

// session is the state of one connected frontend. It is used by one
// goroutine; everything it holds is released by close.
type session struct {
	log        *slog.Logger
	backend    Backend
	stats      *Stats
	onQueueErr func(idx int, err error)

	owner      bool
	features   uint64
	protoAcked uint64
	status     uint8
	mem        *memory.Table
	// memDups counts the extra ADD_MEM_REGs of regions already in mem:
	// QEMU before 8.0 sends every ADD_MEM_REG and REM_MEM_REG once per
	// vhost device, that is once per queue pair, all with the same
	// region. A repeat is a reference, not a new mapping; REM_MEM_REG
	// drops a reference first and unmaps with the last one. At most
	// maxQueues per region (more is refused as an overlap).
	memDups map[memKey]int
	vrings  []*vring
	rarp    [6]byte

	// Device-state transfer (devstate.go); state nil: not offered.
	state        DeviceState
	stateTimeout time.Duration
	xfer         *transfer
	// dirty is the migration's dirty-page log (SET_LOG_BASE), logFD the
	// frontend's eventfd to signal after marking it (SET_LOG_FD); both
	// nil when not migrating. They change only while the queues are
	// stopped.
	dirty *dirtylog.Log
	logFD *virtqueue.EventFD
}

// memKey names a memory region as ADD_MEM_REG and REM_MEM_REG do.
type memKey struct{ guest, user, size uint64 }

func newSession(log *slog.Logger, b Backend, stats *Stats, onQueueErr func(int, error)) *session {
	n := min(b.NumQueues(), maxQueues)
	s := &session{log: log, backend: b, stats: stats, mem: &memory.Table{}, memDups: map[memKey]int{}, vrings: make([]*vring, n), onQueueErr: onQueueErr}
	for i := range s.vrings {
		s.vrings[i] = s.newVring(i)
	}
	return s
}

func (s *session) newVring(i int) *vring {
	q := virtqueue.New(nil, func(err error) { s.onQueueErr(i, err) })
	q.Stats = &s.stats.Queues[i]
	if qs, ok := s.backend.(QueueStatser); ok {
		if st := qs.QueueStats(i); st != nil {
			q.Stats = st
		}
	}
	return &vring{q: q}
}

func (s *session) offered() uint64 { return s.backend.Features() | transportFeatures }

// packed reports whether the rings are in the packed format.
func (s *session) packed() bool { return s.features&(1<<FeatureRingPacked) != 0 }

// update starts or stops queue idx according to its state.
func (s *session) update(idx int) error {
	vr := s.vrings[idx]
	want := vr.started && vr.enabled && vr.hasAddr && vr.num > 0 && vr.kick != nil && s.mem.Len() > 0
	if !want {
		s.stopVring(idx)
		return nil
	}
	if vr.running {
		return nil
	}
	return s.startVring(idx)
}

func (s *session) startVring(idx int) error {
	vr := s.vrings[idx]
	var addrs [3]uint64
	for i, ua := range []uint64{vr.addr.Desc, vr.addr.Avail, vr.addr.Used} {
		ga, err := s.mem.UserToGuest(ua)
		if err != nil {
			return fmt.Errorf("vring %d: %w", idx, err)
		}
		addrs[i] = ga
	}
	cfg := virtqueue.Config{
		Size: uint16(vr.num), DescAddr: addrs[0], AvailAddr: addrs[1], UsedAddr: addrs[2],
		EventIdx:  s.features&(1<<FeatureEventIdx) != 0,
		Indirect:  s.features&(1<<FeatureIndirectDesc) != 0,
		Packed:    s.packed(),
		NextAvail: uint16(vr.base),
		NextUsed:  uint16(vr.base >> 16),
	}
	if s.dirty != nil {
		cfg.Log, cfg.UsedLogAddr = s.dirty, vr.addr.Log
		cfg.LogBuffers = s.features&(1<<FeatureLogAll) != 0
		cfg.LogUsed = vr.addr.Flags&protocol.VringFLog != 0
	}
	var err error
	vr.q.Lock()
	// Setup reads the used index from guest memory: guard it like the
	// data path (a frontend may have truncated the memory file).
	if ferr := vr.q.Guard(func() { err = vr.q.Setup(s.mem, cfg) }); ferr != nil {
		err = ferr
	}
	vr.q.Unlock()
	if err != nil {
		return fmt.Errorf("vring %d: %w", idx, err)
	}
	vr.kick.Resume()
	vr.running = true
	s.stats.QueueStarts.Add(1)
	if cfg.Packed {
		s.stats.PackedQueueStarts.Add(1)
	}
	s.log.Debug("queue started", "queue", idx, "size", vr.num, "next_avail", vr.base, "event_idx", cfg.EventIdx, "packed", cfg.Packed)
	s.backend.StartQueue(idx, vr.q, vr.kick)
	return nil
}

func (s *session) stopVring(idx int) {
	vr := s.vrings[idx]
	if !vr.running {
		return
	}
	s.backend.StopQueue(idx)
	vr.q.Lock()
	vr.base = vr.q.Stop()
	vr.q.Unlock()
	vr.running = false
	s.log.Debug("queue stopped", "queue", idx, "next_avail", vr.base)
}

// pauseAll stops running queues (memory is about to change) and returns
// which ones to restart.
func (s *session) pauseAll() []int {
	var was []int
	for i, vr := range s.vrings {
		if vr.running {
			s.stopVring(i)
			was = append(was, i)
		}
	}
	return was
}

func (s *session) resume(idx []int) error {
	var errs []error
	for _, i := range idx {
		errs = append(errs, s.update(i))
	}
	return errors.Join(errs...)
}

func (s *session) mapRegion(r protocol.MemRegion, fd int) (memory.Region, error) {
	reg, err := memory.MapRegion(fd, r.GuestAddr, r.UserAddr, r.Size, r.MmapOffset)
	if err != nil {
		s.stats.MapFailures.Add(1)
	}
	return reg, err
}

// reset stops every queue and forgets negotiated state (RESET_OWNER,
// RESET_DEVICE, status 0). Memory stays mapped: the frontend may keep
// using it with a new driver.
func (s *session) reset() {
	s.pauseAll()
	for i, vr := range s.vrings {
		vr.close()
		s.vrings[i] = s.newVring(i)
	}
	s.features, s.status = 0, 0
	s.closeLog()
	s.backend.Reset()
}

func (vr *vring) close() {
	for _, f := range []*virtqueue.EventFD{vr.kick, vr.call, vr.errFD} {
		if f != nil {
			f.Close()
		}
	}
	vr.kick, vr.call, vr.errFD = nil, nil, nil
}

// close releases everything the frontend gave us.
func (s *session) close() {
	s.abortTransfer()
	s.pauseAll()
	for _, vr := range s.vrings {
		vr.close()
	}
	s.backend.Reset()
	s.closeLog()
	s.mem.Close()
}
