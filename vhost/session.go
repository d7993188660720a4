package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/vunet/vunet/vhost/memory"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// maxQueues bounds the queues a device may expose (32 pairs).
const maxQueues = 64

// protocolFeatures are the vhost-user protocol extensions we offer.
// LOG_SHMFD (live migration dirty logging) is not offered, so SET_LOG_BASE
// and SET_LOG_FD are refused. GET_CONFIG/SET_CONFIG are answered, but
// CONFIG is not offered: QEMU's virtio-net keeps its own config space and
// warns at every start when a net backend offers it.
const protocolFeatures = 1<<protocol.ProtoMQ | 1<<protocol.ProtoRARP | 1<<protocol.ProtoReplyAck |
	1<<protocol.ProtoNetMTU | 1<<protocol.ProtoResetDevice |
	1<<protocol.ProtoConfigureMemSlots | 1<<protocol.ProtoStatus

// transportFeatures are the virtio bits the control plane and virtqueue
// package implement regardless of device.
const transportFeatures = 1<<FeatureVersion1 | 1<<FeatureIndirectDesc | 1<<FeatureEventIdx |
	1<<FeatureProtocolFeatures | 1<<FeatureNotifyOnEmpty | 1<<FeatureAnyLayout

// ErrProtocol marks frontend misbehaviour that ends the session.
var ErrProtocol = errors.New("vhost-user protocol error")

// Stats count control-plane events, including hostile input.
type Stats struct {
	Messages    atomic.Uint64
	BadMessages atomic.Uint64 // rejected: size, fd count, values
	Sessions    atomic.Uint64
	MapFailures atomic.Uint64
	QueueStarts atomic.Uint64
}

// vring is the control-plane view of one queue.
type vring struct {
	num     uint32
	addr    protocol.VringAddr
	hasAddr bool
	base    uint16
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
	vrings     []*vring
	rarp       [6]byte
}

func newSession(log *slog.Logger, b Backend, stats *Stats, onQueueErr func(int, error)) *session {
	n := min(b.NumQueues(), maxQueues)
	s := &session{log: log, backend: b, stats: stats, mem: &memory.Table{}, vrings: make([]*vring, n), onQueueErr: onQueueErr}
	for i := range s.vrings {
		s.vrings[i] = s.newVring(i)
	}
	return s
}

func (s *session) newVring(i int) *vring {
	return &vring{q: virtqueue.New(nil, func(err error) { s.onQueueErr(i, err) })}
}

func (s *session) offered() uint64 { return s.backend.Features() | transportFeatures }

// handle executes one request and returns the reply payload, if the request
// has one. Errors are reported to the frontend through REPLY_ACK when it
// asked; errors wrapping ErrProtocol end the session.
func (s *session) handle(m *protocol.Message) (reply []byte, err error) {
	switch m.Request {
	case protocol.GetFeatures:
		return u64(s.offered()), nil
	case protocol.SetFeatures:
		v, err := m.U64()
		if err != nil {
			return nil, err
		}
		if v&^s.offered() != 0 {
			return nil, fmt.Errorf("features %#x not offered (offered %#x)", v, s.offered())
		}
		s.features = v
		return nil, s.backend.SetFeatures(v)
	case protocol.GetProtocolFeatures:
		return u64(protocolFeatures), nil
	case protocol.SetProtocolFeatures:
		v, err := m.U64()
		if err != nil {
			return nil, err
		}
		s.protoAcked = v & protocolFeatures
		return nil, nil
	case protocol.SetOwner:
		s.owner = true
		return nil, nil
	case protocol.ResetOwner, protocol.ResetDevice:
		s.reset()
		return nil, nil
	case protocol.GetQueueNum:
		if r, ok := s.backend.(QueueNumReporter); ok {
			return u64(r.QueueNum()), nil
		}
		return u64(uint64(len(s.vrings))), nil
	case protocol.GetMaxMemSlots:
		return u64(memory.MaxRegions), nil
	case protocol.SetMemTable:
		return nil, s.setMemTable(m)
	case protocol.AddMemReg:
		return nil, s.addMemReg(m)
	case protocol.RemMemReg:
		return nil, s.remMemReg(m)
	case protocol.SetVringNum:
		st, err := m.VringState()
		if err != nil {
			return nil, err
		}
		vr, err := s.vring(st.Index)
		if err != nil {
			return nil, err
		}
		if st.Num == 0 || st.Num > virtqueue.MaxSize || st.Num&(st.Num-1) != 0 {
			return nil, fmt.Errorf("vring %d: size %d is not a power of two in 1..%d", st.Index, st.Num, virtqueue.MaxSize)
		}
		vr.num = st.Num
		return nil, nil
	case protocol.SetVringAddr:
		a, err := m.VringAddr()
		if err != nil {
			return nil, err
		}
		vr, err := s.vring(a.Index)
		if err != nil {
			return nil, err
		}
		vr.addr, vr.hasAddr = a, true
		return nil, s.update(int(a.Index))
	case protocol.SetVringBase:
		st, err := m.VringState()
		if err != nil {
			return nil, err
		}
		vr, err := s.vring(st.Index)
		if err != nil {
			return nil, err
		}
		if st.Num > 0xffff {
			return nil, fmt.Errorf("vring %d: base %d out of range", st.Index, st.Num)
		}
		vr.base = uint16(st.Num)
		return nil, nil
	case protocol.GetVringBase:
		st, err := m.VringState()
		if err != nil {
			return nil, err
		}
		vr, err := s.vring(st.Index)
		if err != nil {
			return nil, err
		}
		s.stopVring(int(st.Index))
		vr.started = false
		if vr.kick != nil {
			vr.kick.Close()
			vr.kick = nil
		}
		return protocol.EncodeVringState(nil, protocol.VringState{Index: st.Index, Num: uint32(vr.base)}), nil
	case protocol.SetVringKick, protocol.SetVringCall, protocol.SetVringErr:
		return nil, s.setVringFD(m)
	case protocol.SetVringEnable:
		st, err := m.VringState()
		if err != nil {
			return nil, err
		}
		vr, err := s.vring(st.Index)
		if err != nil {
			return nil, err
		}
		if st.Num > 1 {
			return nil, fmt.Errorf("vring %d: enable value %d", st.Index, st.Num)
		}
		vr.enabled = st.Num == 1
		return nil, s.update(int(st.Index))
	case protocol.GetConfig:
		c, err := m.Config()
		if err != nil {
			return nil, err
		}
		cfg := s.backend.Config()
		out := make([]byte, len(c.Data))
		if int(c.Offset) < len(cfg) {
			copy(out, cfg[c.Offset:])
		}
		return protocol.EncodeConfig(nil, protocol.ConfigPayload{Offset: c.Offset, Flags: c.Flags, Data: out}), nil
	case protocol.SetConfig:
		// virtio-net's config space is read-only for the driver (the MAC
		// is set through the control queue, which we do not offer).
		if _, err := m.Config(); err != nil {
			return nil, err
		}
		return nil, errors.New("config space is read-only")
	case protocol.SendRARP:
		v, err := m.U64()
		if err != nil {
			return nil, err
		}
		// The guest moved (migration): the MAC to announce is in the low
		// six bytes. We have no upstream L2 to announce it on; keep it
		// for diagnostics.
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], v)
		copy(s.rarp[:], b[:6])
		return nil, nil
	case protocol.NetSetMTU:
		v, err := m.U64()
		if err != nil {
			return nil, err
		}
		if v < 68 || v > 65535 {
			return nil, fmt.Errorf("mtu %d out of range", v)
		}
		return nil, nil
	case protocol.SetStatus:
		v, err := m.U64()
		if err != nil {
			return nil, err
		}
		if v > 0xff {
			return nil, fmt.Errorf("status %#x out of range", v)
		}
		s.status = uint8(v)
		if v == 0 {
			s.reset()
		}
		return nil, nil
	case protocol.GetStatus:
		st := uint64(s.status)
		for _, vr := range s.vrings {
			if vr.q.Broken() {
				st |= StatusNeedsReset
			}
		}
		return u64(st), nil
	}
	return nil, fmt.Errorf("request %s not supported", m.Request)
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// expectsReply says which requests always answer, NEED_REPLY or not.
func expectsReply(r protocol.Request) bool {
	switch r {
	case protocol.GetFeatures, protocol.GetProtocolFeatures, protocol.GetVringBase, protocol.GetQueueNum,
		protocol.GetConfig, protocol.GetMaxMemSlots, protocol.GetStatus:
		return true
	}
	return false
}

func (s *session) vring(idx uint32) (*vring, error) {
	if int(idx) >= len(s.vrings) {
		return nil, fmt.Errorf("vring index %d out of range (%d queues)", idx, len(s.vrings))
	}
	return s.vrings[idx], nil
}

func (s *session) setVringFD(m *protocol.Message) error {
	idx, hasFD, err := m.VringFD()
	if err != nil {
		return err
	}
	vr, err := s.vring(idx)
	if err != nil {
		return err
	}
	var efd *virtqueue.EventFD
	if hasFD {
		fd := m.FDs[0]
		m.FDs[0] = -1 // ownership moves to the EventFD
		if efd, err = virtqueue.NewEventFD(fd); err != nil {
			return err
		}
	}
	switch m.Request {
	case protocol.SetVringKick:
		s.stopVring(int(idx))
		if vr.kick != nil {
			vr.kick.Close()
		}
		vr.kick = efd
		if efd == nil {
			// Polling mode (no kick fd) is not implemented: the queue
			// stays stopped rather than spinning.
			return fmt.Errorf("vring %d: kick without a descriptor is not supported", idx)
		}
		vr.started = true
		// Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings
		// start enabled (vhost-user spec, "Ring states").
		if s.features&(1<<FeatureProtocolFeatures) == 0 {
			vr.enabled = true
		}
		return s.update(int(idx))
	case protocol.SetVringCall:
		vr.q.Lock()
		old := vr.call
		vr.call = efd
		if efd != nil {
			vr.q.SetNotify(efd.Signal)
		} else {
			vr.q.SetNotify(nil)
		}
		vr.q.Unlock()
		if old != nil {
			old.Close()
		}
	case protocol.SetVringErr:
		if vr.errFD != nil {
			vr.errFD.Close()
		}
		vr.errFD = efd
	}
	return nil
}

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
		NextAvail: vr.base,
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
	s.log.Debug("queue started", "queue", idx, "size", vr.num, "next_avail", vr.base, "event_idx", cfg.EventIdx)
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

func (s *session) setMemTable(m *protocol.Message) error {
	regions, err := m.MemTable()
	if err != nil {
		return err
	}
	t := &memory.Table{}
	for i, r := range regions {
		reg, err := s.mapRegion(r, m.FDs[i])
		if err == nil {
			err = t.Add(reg)
			if err != nil {
				reg.Release()
			}
		}
		if err != nil {
			t.Close()
			return fmt.Errorf("SET_MEM_TABLE region %d: %w", i, err)
		}
	}
	paused := s.pauseAll()
	s.mem.Close()
	s.mem = t
	s.log.Debug("memory table set", "regions", len(regions))
	for i := range s.vrings {
		paused = append(paused, i) // queues waiting for memory may start now
	}
	return s.resume(paused)
}

func (s *session) addMemReg(m *protocol.Message) error {
	r, err := m.MemRegion()
	if err != nil {
		return err
	}
	reg, err := s.mapRegion(r, m.FDs[0])
	if err != nil {
		return err
	}
	paused := s.pauseAll()
	if err := s.mem.Add(reg); err != nil {
		reg.Release()
		return errors.Join(err, s.resume(paused))
	}
	for i := range s.vrings {
		paused = append(paused, i)
	}
	return s.resume(paused)
}

func (s *session) remMemReg(m *protocol.Message) error {
	r, err := m.MemRegion()
	if err != nil {
		return err
	}
	paused := s.pauseAll()
	err = s.mem.Remove(r.GuestAddr, r.UserAddr, r.Size)
	return errors.Join(err, s.resume(paused))
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
	s.pauseAll()
	for _, vr := range s.vrings {
		vr.close()
	}
	s.backend.Reset()
	s.mem.Close()
}
