package vhost

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vunet/vunet/vhost/memory"
	"github.com/vunet/vunet/vhost/protocol"
	"github.com/vunet/vunet/vhost/virtqueue"
)

// The control plane is a table: one entry per front-end request, each
// pairing a decoder (payload bytes → a typed, validated argument, with the
// vring looked up for the per-queue requests) with a handler that only
// says what the request means. A request missing from the table is refused
// as unsupported (IOTLB_MSG, SET_INFLIGHT_FD, ... are not offered).

// handler executes one request.
type handler struct {
	// replies says the request always answers (the GET_* requests),
	// NEED_REPLY or not.
	replies bool
	// run decodes m and executes it, returning the reply payload of a
	// replying request. Errors are reported to the frontend through
	// REPLY_ACK when it asked.
	run func(s *session, m *protocol.Message) ([]byte, error)
}

// decoder turns a message whose descriptor count has been validated into a
// handler's argument, or refuses it.
type decoder[T any] func(s *session, m *protocol.Message) (T, error)

// get makes a replying request from a decoder and a handler.
func get[T any](dec decoder[T], h func(*session, T) ([]byte, error)) handler {
	return handler{replies: true, run: func(s *session, m *protocol.Message) ([]byte, error) {
		a, err := dec(s, m)
		if err != nil {
			return nil, err
		}
		return h(s, a)
	}}
}

// set makes a request that answers only with REPLY_ACK.
func set[T any](dec decoder[T], h func(*session, T) error) handler {
	return handler{run: func(s *session, m *protocol.Message) ([]byte, error) {
		a, err := dec(s, m)
		if err != nil {
			return nil, err
		}
		return nil, h(s, a)
	}}
}

// handlers is the request table. It is never modified.
var handlers = map[protocol.Request]handler{
	protocol.GetFeatures:         get(noArgs, (*session).getFeatures),
	protocol.SetFeatures:         set(u64Arg, (*session).setFeatures),
	protocol.GetProtocolFeatures: get(noArgs, (*session).getProtocolFeatures),
	protocol.SetProtocolFeatures: set(u64Arg, (*session).setProtocolFeatures),
	protocol.SetOwner:            set(noArgs, (*session).setOwner),
	protocol.ResetOwner:          set(noArgs, (*session).resetDevice),
	protocol.ResetDevice:         set(noArgs, (*session).resetDevice),
	protocol.GetQueueNum:         get(noArgs, (*session).getQueueNum),
	protocol.GetMaxMemSlots:      get(noArgs, (*session).getMaxMemSlots),
	protocol.SetMemTable:         set(memTableArg, (*session).setMemTable),
	protocol.AddMemReg:           set(memRegionArg, (*session).addMemReg),
	protocol.RemMemReg:           set(memRegionArg, (*session).remMemReg),
	protocol.SetVringNum:         set(vringStateArg, (*session).setVringNum),
	protocol.SetVringAddr:        set(vringAddrArg, (*session).setVringAddr),
	protocol.SetVringBase:        set(vringStateArg, (*session).setVringBase),
	protocol.GetVringBase:        get(vringStateArg, (*session).getVringBase),
	protocol.SetVringKick:        set(vringFDArg, (*session).setVringKick),
	protocol.SetVringCall:        set(vringFDArg, (*session).setVringCall),
	protocol.SetVringErr:         set(vringFDArg, (*session).setVringErr),
	protocol.SetVringEnable:      set(vringStateArg, (*session).setVringEnable),
	protocol.GetConfig:           get(configArg, (*session).getConfig),
	protocol.SetConfig:           set(configArg, (*session).setConfig),
	protocol.SendRARP:            set(u64Arg, (*session).sendRARP),
	protocol.NetSetMTU:           set(u64Arg, (*session).netSetMTU),
	protocol.SetStatus:           set(u64Arg, (*session).setStatus),
	protocol.GetStatus:           get(noArgs, (*session).getStatus),
	protocol.SetDeviceStateFD:    get(deviceStateArg, (*session).setDeviceStateFD),
	protocol.CheckDeviceState:    get(noArgs, (*session).checkDeviceState),
	protocol.SetLogBase:          get(logBaseArg, (*session).setLogBase),
	protocol.SetLogFD:            set(logFDArg, (*session).setLogFD),
}

// expectsReply says which requests always answer, NEED_REPLY or not.
func expectsReply(r protocol.Request) bool { return handlers[r].replies }

// handle executes one request and returns the reply payload, if the
// request has one. Errors wrapping ErrProtocol end the session.
func (s *session) handle(m *protocol.Message) ([]byte, error) {
	h, ok := handlers[m.Request]
	if !ok {
		return nil, fmt.Errorf("request %s not supported", m.Request)
	}
	return h.run(s, m)
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// --- decoders ---

// noArgs accepts any payload: the requests without one carry none from
// every frontend we know, and a stray byte is harmless.
func noArgs(*session, *protocol.Message) (struct{}, error) { return struct{}{}, nil }

func u64Arg(_ *session, m *protocol.Message) (uint64, error) { return m.U64() }

func configArg(_ *session, m *protocol.Message) (protocol.ConfigPayload, error) { return m.Config() }

// vringArg is a per-queue request's payload with its vring looked up.
type vringArg[T any] struct {
	idx int
	vr  *vring
	v   T
}

// onVring decodes a per-queue payload and looks up the vring it names: the
// one place where a queue index from the frontend is checked.
func onVring[T any](decode func(*protocol.Message) (T, error), index func(T) uint32) decoder[vringArg[T]] {
	return func(s *session, m *protocol.Message) (vringArg[T], error) {
		v, err := decode(m)
		if err != nil {
			return vringArg[T]{}, err
		}
		idx := index(v)
		if int(idx) >= len(s.vrings) {
			return vringArg[T]{}, fmt.Errorf("vring index %d out of range (%d queues)", idx, len(s.vrings))
		}
		return vringArg[T]{idx: int(idx), vr: s.vrings[idx], v: v}, nil
	}
}

var (
	vringStateArg = onVring((*protocol.Message).VringState, func(v protocol.VringState) uint32 { return v.Index })
	vringAddrArg  = onVring((*protocol.Message).VringAddr, func(v protocol.VringAddr) uint32 { return v.Index })
	vringFDIndex  = onVring(decodeVringFD, func(v vringFD) uint32 { return v.index })
)

// vringFD is the decoded payload of SET_VRING_KICK/CALL/ERR.
type vringFD struct {
	index uint32
	hasFD bool
}

func decodeVringFD(m *protocol.Message) (vringFD, error) {
	idx, hasFD, err := m.VringFD()
	return vringFD{idx, hasFD}, err
}

// vringFDArg decodes SET_VRING_KICK/CALL/ERR and takes the attached
// descriptor, if any, as an EventFD (nil: "no descriptor").
func vringFDArg(s *session, m *protocol.Message) (vringArg[*virtqueue.EventFD], error) {
	a, err := vringFDIndex(s, m)
	if err != nil {
		return vringArg[*virtqueue.EventFD]{}, err
	}
	out := vringArg[*virtqueue.EventFD]{idx: a.idx, vr: a.vr}
	if a.v.hasFD {
		fd := m.FDs[0]
		m.FDs[0] = -1 // ownership moves to the EventFD
		if out.v, err = virtqueue.NewEventFD(fd); err != nil {
			return vringArg[*virtqueue.EventFD]{}, err
		}
	}
	return out, nil
}

// memTable is SET_MEM_TABLE's regions with one descriptor each (still
// owned by the message).
type memTable struct {
	regions []protocol.MemRegion
	fds     []int
}

func memTableArg(_ *session, m *protocol.Message) (memTable, error) {
	r, err := m.MemTable()
	return memTable{r, m.FDs}, err
}

// memRegion is the payload of ADD_MEM_REG (with its descriptor) and
// REM_MEM_REG (fd -1: a descriptor sent with it is ignored).
type memRegion struct {
	r  protocol.MemRegion
	fd int
}

func memRegionArg(_ *session, m *protocol.Message) (memRegion, error) {
	r, err := m.MemRegion()
	fd := -1
	if m.Request == protocol.AddMemReg {
		fd = m.FDs[0] // FDsAllowed: exactly one
	}
	return memRegion{r, fd}, err
}

// --- features, ownership, status ---

func (s *session) getFeatures(struct{}) ([]byte, error) { return u64(s.offered()), nil }

// setFeatures records the acked bits. VHOST_F_LOG_ALL is the control
// plane's own: the backend never sees it, and turning it on or off (at the
// start or end of a migration, while the queues run) restarts the running
// queues with buffer logging on or off.
func (s *session) setFeatures(v uint64) error {
	if v&^s.offered() != 0 {
		return fmt.Errorf("features %#x not offered (offered %#x)", v, s.offered())
	}
	var paused []int
	if (v^s.features)&(1<<FeatureLogAll) != 0 {
		paused = s.pauseAll()
		s.log.Info("dirty-page logging", "on", v&(1<<FeatureLogAll) != 0)
	}
	s.features = v
	return errors.Join(s.backend.SetFeatures(v&^(1<<FeatureLogAll)), s.resume(paused))
}

func (s *session) getProtocolFeatures(struct{}) ([]byte, error) { return u64(s.protocolOffered()), nil }

func (s *session) setProtocolFeatures(v uint64) error {
	s.protoAcked = v & s.protocolOffered()
	return nil
}

func (s *session) setOwner(struct{}) error {
	s.owner = true
	return nil
}

func (s *session) resetDevice(struct{}) error {
	s.abortTransfer()
	s.reset()
	return nil
}

func (s *session) getQueueNum(struct{}) ([]byte, error) {
	if r, ok := s.backend.(QueueNumReporter); ok {
		return u64(r.QueueNum()), nil
	}
	return u64(uint64(len(s.vrings))), nil
}

func (s *session) setStatus(v uint64) error {
	if v > 0xff {
		return fmt.Errorf("status %#x out of range", v)
	}
	s.status = uint8(v)
	if v == 0 {
		// QEMU 7.2 stops a device by sending status 0 *before* it asks
		// each ring's position with GET_VRING_BASE (vhost_dev_stop),
		// and hands those positions to the destination of a migration
		// or back to the rings after `stop`/`cont`. So the reset keeps
		// them: a ring reset to 0 would make the destination refuse the
		// migration ("Guest index inconsistent with Host index") and a
		// resumed guest's rings start over.
		bases := make([]uint32, len(s.vrings))
		s.pauseAll()
		for i, vr := range s.vrings {
			bases[i] = vr.base
		}
		s.reset()
		for i, vr := range s.vrings {
			vr.base = bases[i]
		}
	}
	return nil
}

func (s *session) getStatus(struct{}) ([]byte, error) {
	st := uint64(s.status)
	for _, vr := range s.vrings {
		if vr.q.Broken() {
			st |= StatusNeedsReset
		}
	}
	return u64(st), nil
}

// --- device config and net requests ---

func (s *session) getConfig(c protocol.ConfigPayload) ([]byte, error) {
	cfg := s.backend.Config()
	out := make([]byte, len(c.Data))
	if int(c.Offset) < len(cfg) {
		copy(out, cfg[c.Offset:])
	}
	return protocol.EncodeConfig(nil, protocol.ConfigPayload{Offset: c.Offset, Flags: c.Flags, Data: out}), nil
}

// setConfig refuses: virtio-net's config space is read-only for the driver
// (the MAC is set through the control queue, which we do not offer).
func (s *session) setConfig(protocol.ConfigPayload) error {
	return errors.New("config space is read-only")
}

// sendRARP records the MAC to announce after a migration (the low six
// bytes). We have no upstream L2 to announce it on; it is kept for
// diagnostics.
func (s *session) sendRARP(v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	copy(s.rarp[:], b[:6])
	return nil
}

func (s *session) netSetMTU(v uint64) error {
	if v < 68 || v > 65535 {
		return fmt.Errorf("mtu %d out of range", v)
	}
	return nil
}

// --- memory ---

func (s *session) getMaxMemSlots(struct{}) ([]byte, error) { return u64(memory.MaxRegions), nil }

func (s *session) setMemTable(a memTable) error {
	t := &memory.Table{}
	for i, r := range a.regions {
		reg, err := s.mapRegion(r, a.fds[i])
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
	clear(s.memDups)
	s.log.Debug("memory table set", "regions", len(a.regions))
	for i := range s.vrings {
		paused = append(paused, i) // queues waiting for memory may start now
	}
	return s.resume(paused)
}

func (s *session) addMemReg(a memRegion) error {
	if k := (memKey{a.r.GuestAddr, a.r.UserAddr, a.r.Size}); s.mem.Has(k.guest, k.user, k.size) {
		// The same region again: another queue pair's vhost device
		// (QEMU < 8.0). Nothing to map; the queues keep running.
		if s.memDups[k] >= maxQueues {
			return fmt.Errorf("ADD_MEM_REG: region guest %#x+%#x added %d times", k.guest, k.size, s.memDups[k]+1)
		}
		s.memDups[k]++
		s.log.Debug("memory region added again", "guest_addr", fmt.Sprintf("%#x", k.guest), "size", k.size, "references", s.memDups[k]+1)
		return nil
	}
	reg, err := s.mapRegion(a.r, a.fd)
	if err != nil {
		return err
	}
	paused := s.pauseAll()
	// QEMU sends the boot-time memory with ADD_MEM_REG too, before it
	// starts the rings; a region added while queues run is hot-plugged.
	hot := len(paused) > 0
	if hot {
		reg.CountHits(&s.stats.HotMemBuffers)
	}
	if err := s.mem.Add(reg); err != nil {
		reg.Release()
		return errors.Join(err, s.resume(paused))
	}
	if hot {
		s.stats.MemRegionsAdded.Add(1)
		s.log.Info("guest memory region added (hotplug)", "guest_addr", fmt.Sprintf("%#x", a.r.GuestAddr),
			"size", a.r.Size, "regions", s.mem.Len())
	} else {
		s.log.Debug("memory region added", "guest_addr", fmt.Sprintf("%#x", a.r.GuestAddr), "size", a.r.Size, "regions", s.mem.Len())
	}
	for i := range s.vrings {
		paused = append(paused, i)
	}
	return s.resume(paused)
}

func (s *session) remMemReg(a memRegion) error {
	if k := (memKey{a.r.GuestAddr, a.r.UserAddr, a.r.Size}); s.memDups[k] > 0 {
		s.memDups[k]-- // another queue pair's device still has it
		if s.memDups[k] == 0 {
			delete(s.memDups, k)
		}
		return nil
	}
	paused := s.pauseAll()
	err := s.mem.Remove(a.r.GuestAddr, a.r.UserAddr, a.r.Size)
	if err == nil && len(paused) > 0 {
		s.stats.MemRegionsRemoved.Add(1)
		s.log.Info("guest memory region removed (unplug)", "guest_addr", fmt.Sprintf("%#x", a.r.GuestAddr),
			"size", a.r.Size, "regions", s.mem.Len())
	}
	return errors.Join(err, s.resume(paused))
}

// --- vrings ---

func (s *session) setVringNum(a vringArg[protocol.VringState]) error {
	n := a.v.Num
	if s.packed() {
		// A packed ring's size need not be a power of two (virtio 1.2, 2.8.10.1).
		if n == 0 || n > virtqueue.MaxSize {
			return fmt.Errorf("vring %d: packed ring size %d not in 1..%d", a.idx, n, virtqueue.MaxSize)
		}
	} else if n == 0 || n > virtqueue.MaxSize || n&(n-1) != 0 {
		return fmt.Errorf("vring %d: size %d is not a power of two in 1..%d", a.idx, n, virtqueue.MaxSize)
	}
	a.vr.num = n
	return nil
}

// setVringAddr records where the rings are. Split rings must be aligned
// as virtio 1.2 (2.7) requires: descriptor table 16, available ring 2,
// used ring 4; packed rings (2.8.10.1): descriptor ring 16, the driver and
// device event suppression areas (sent in the avail and used fields) 4.
// The check is made here on the frontend's addresses, so the frontend
// hears about it at once, and again on the guest-physical ones when the
// queue starts (virtqueue.Setup).
func (s *session) setVringAddr(a vringArg[protocol.VringAddr]) error {
	availAlign := uint64(2)
	if s.packed() {
		availAlign = 4
	}
	if a.v.Desc%16 != 0 || a.v.Avail%availAlign != 0 || a.v.Used%4 != 0 {
		return fmt.Errorf("vring %d: misaligned rings: desc %#x (align 16) avail %#x (%d) used %#x (4)", a.idx, a.v.Desc, a.v.Avail, availAlign, a.v.Used)
	}
	if a.v.Flags&^protocol.VringFLog != 0 {
		return fmt.Errorf("vring %d: unknown address flags %#x", a.idx, a.v.Flags)
	}
	if a.v.Flags&protocol.VringFLog != 0 && s.dirty != nil && !s.dirty.Covers(a.v.Log, usedRingSize(a.vr.num)) {
		return fmt.Errorf("vring %d: used ring log at %#x outside the dirty log (%#x bytes)", a.idx, a.v.Log, s.dirty.Size())
	}
	// A running queue is restarted so that a change of its logging
	// (VHOST_VRING_F_LOG, sent while it runs when a migration starts or
	// ends) takes effect; the ring itself continues where it was.
	s.stopVring(a.idx)
	a.vr.addr, a.vr.hasAddr = a.v, true
	return s.update(a.idx)
}

// setVringBase records where the ring continues: a split ring's next
// available index (16 bits), or a packed ring's next available and next
// used slot with their wrap counters (bits 0-15 and 16-31, vhost-user
// "Ring states"). Slots past the ring size are refused when the queue
// starts (virtqueue.Setup), when the size is sure to be known.
func (s *session) setVringBase(a vringArg[protocol.VringState]) error {
	if a.v.Num > 0xffff && !s.packed() {
		return fmt.Errorf("vring %d: base %d out of range", a.idx, a.v.Num)
	}
	a.vr.base = a.v.Num
	return nil
}

// getVringBase stops the queue and reports where the next Pop would have
// started; the kick goes with it (a new SET_VRING_KICK restarts it).
func (s *session) getVringBase(a vringArg[protocol.VringState]) ([]byte, error) {
	s.stopVring(a.idx)
	a.vr.started = false
	if a.vr.kick != nil {
		a.vr.kick.Close()
		a.vr.kick = nil
	}
	return protocol.EncodeVringState(nil, protocol.VringState{Index: a.v.Index, Num: a.vr.base}), nil
}

func (s *session) setVringEnable(a vringArg[protocol.VringState]) error {
	if a.v.Num > 1 {
		return fmt.Errorf("vring %d: enable value %d", a.idx, a.v.Num)
	}
	a.vr.enabled = a.v.Num == 1
	return s.update(a.idx)
}

func (s *session) setVringKick(a vringArg[*virtqueue.EventFD]) error {
	vr := a.vr
	s.stopVring(a.idx)
	if vr.kick != nil {
		vr.kick.Close()
	}
	vr.kick = a.v
	if a.v == nil {
		// Polling mode (no kick fd) is not implemented: the queue stays
		// stopped rather than spinning.
		return fmt.Errorf("vring %d: kick without a descriptor is not supported", a.idx)
	}
	vr.started = true
	// Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings start
	// enabled (vhost-user spec, "Ring states").
	if s.features&(1<<FeatureProtocolFeatures) == 0 {
		vr.enabled = true
	}
	return s.update(a.idx)
}

// setVringCall swaps the interrupt eventfd under the queue's lock, so that
// a worker never signals a closed descriptor.
func (s *session) setVringCall(a vringArg[*virtqueue.EventFD]) error {
	vr := a.vr
	vr.q.Lock()
	old := vr.call
	vr.call = a.v
	if a.v != nil {
		vr.q.SetNotify(a.v.Signal)
	} else {
		vr.q.SetNotify(nil)
	}
	vr.q.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

func (s *session) setVringErr(a vringArg[*virtqueue.EventFD]) error {
	if a.vr.errFD != nil {
		a.vr.errFD.Close()
	}
	a.vr.errFD = a.v
	return nil
}
