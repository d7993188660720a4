// Package protocol is the vhost-user wire codec: framing, file-descriptor
// passing and the payload layouts of each request, with validation. It says
// nothing about what a request means; the vhost package does that.
//
// Every message comes from the frontend and is untrusted: sizes, counts and
// file descriptors are checked before anything is decoded, and descriptors
// that arrive with a message that should not carry them are closed.
package protocol

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Request is a vhost-user front-end request type.
type Request uint32

// Front-end requests (vhost-user specification, "Front-end message types").
const (
	GetFeatures         Request = 1
	SetFeatures         Request = 2
	SetOwner            Request = 3
	ResetOwner          Request = 4
	SetMemTable         Request = 5
	SetLogBase          Request = 6
	SetLogFD            Request = 7
	SetVringNum         Request = 8
	SetVringAddr        Request = 9
	SetVringBase        Request = 10
	GetVringBase        Request = 11
	SetVringKick        Request = 12
	SetVringCall        Request = 13
	SetVringErr         Request = 14
	GetProtocolFeatures Request = 15
	SetProtocolFeatures Request = 16
	GetQueueNum         Request = 17
	SetVringEnable      Request = 18
	SendRARP            Request = 19
	NetSetMTU           Request = 20
	SetBackendReqFD     Request = 21
	IOTLBMsg            Request = 22
	SetVringEndian      Request = 23
	GetConfig           Request = 24
	SetConfig           Request = 25
	GetInflightFD       Request = 31
	SetInflightFD       Request = 32
	ResetDevice         Request = 34
	VringKick           Request = 35
	GetMaxMemSlots      Request = 36
	AddMemReg           Request = 37
	RemMemReg           Request = 38
	SetStatus           Request = 39
	GetStatus           Request = 40
	SetDeviceStateFD    Request = 42
	CheckDeviceState    Request = 43
)

var requestNames = map[Request]string{
	GetFeatures: "GET_FEATURES", SetFeatures: "SET_FEATURES", SetOwner: "SET_OWNER", ResetOwner: "RESET_OWNER",
	SetMemTable: "SET_MEM_TABLE", SetLogBase: "SET_LOG_BASE", SetLogFD: "SET_LOG_FD", SetVringNum: "SET_VRING_NUM",
	SetVringAddr: "SET_VRING_ADDR", SetVringBase: "SET_VRING_BASE", GetVringBase: "GET_VRING_BASE",
	SetVringKick: "SET_VRING_KICK", SetVringCall: "SET_VRING_CALL", SetVringErr: "SET_VRING_ERR",
	GetProtocolFeatures: "GET_PROTOCOL_FEATURES", SetProtocolFeatures: "SET_PROTOCOL_FEATURES",
	GetQueueNum: "GET_QUEUE_NUM", SetVringEnable: "SET_VRING_ENABLE", SendRARP: "SEND_RARP", NetSetMTU: "NET_SET_MTU",
	SetBackendReqFD: "SET_BACKEND_REQ_FD", IOTLBMsg: "IOTLB_MSG", SetVringEndian: "SET_VRING_ENDIAN",
	GetConfig: "GET_CONFIG", SetConfig: "SET_CONFIG", GetInflightFD: "GET_INFLIGHT_FD", SetInflightFD: "SET_INFLIGHT_FD",
	ResetDevice: "RESET_DEVICE", VringKick: "VRING_KICK", GetMaxMemSlots: "GET_MAX_MEM_SLOTS", AddMemReg: "ADD_MEM_REG",
	RemMemReg: "REM_MEM_REG", SetStatus: "SET_STATUS", GetStatus: "GET_STATUS",
	SetDeviceStateFD: "SET_DEVICE_STATE_FD", CheckDeviceState: "CHECK_DEVICE_STATE",
}

// String returns the specification's name for r.
func (r Request) String() string {
	if n, ok := requestNames[r]; ok {
		return n
	}
	return fmt.Sprintf("REQUEST_%d", uint32(r))
}

// Protocol feature bits (VHOST_USER_PROTOCOL_F_*).
const (
	ProtoMQ                = 0
	ProtoLogSHMFD          = 1
	ProtoRARP              = 2
	ProtoReplyAck          = 3
	ProtoNetMTU            = 4
	ProtoBackendReq        = 5
	ProtoConfig            = 9
	ProtoResetDevice       = 13
	ProtoConfigureMemSlots = 15
	ProtoStatus            = 16
	ProtoDeviceState       = 18
)

// Header flags.
const (
	FlagVersion   = 0x1 // the only protocol version
	FlagReply     = 0x4
	FlagNeedReply = 0x8
	versionMask   = 0x3
)

// Sizes and limits.
const (
	HeaderSize = 12
	// MaxPayload bounds a message body. The largest legitimate payload is
	// SET_MEM_TABLE with 8 regions (8+8*32) or a config message (12+256).
	MaxPayload = 4096
	// MaxFDs is the most descriptors one message may carry (SET_MEM_TABLE's
	// 8 regions).
	MaxFDs = 8
	// MaxConfigSize bounds GET/SET_CONFIG data.
	MaxConfigSize = 256
	// VringNoFD in a KICK/CALL/ERR payload says no descriptor is attached.
	VringNoFD  = 1 << 8
	vringIndex = 0xff
)

// Errors.
var (
	ErrVersion   = errors.New("vhost-user: unsupported protocol version")
	ErrSize      = errors.New("vhost-user: payload size does not match the request")
	ErrTooLarge  = errors.New("vhost-user: payload too large")
	ErrFDCount   = errors.New("vhost-user: wrong number of file descriptors")
	ErrBadRegion = errors.New("vhost-user: bad memory region")
)

// Header is the fixed part of every message.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32
}

// Message is a decoded frame: header, payload and any passed descriptors.
// The receiver owns FDs and must close the ones it does not keep.
type Message struct {
	Header
	Payload []byte
	FDs     []int
}

// NeedReply reports whether the frontend asked for a REPLY_ACK answer.
func (m *Message) NeedReply() bool { return m.Flags&FlagNeedReply != 0 }

// DecodeHeader parses and validates a message header.
func DecodeHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, ErrSize
	}
	h := Header{
		Request: Request(binary.LittleEndian.Uint32(b[0:])),
		Flags:   binary.LittleEndian.Uint32(b[4:]),
		Size:    binary.LittleEndian.Uint32(b[8:]),
	}
	if h.Flags&versionMask != FlagVersion {
		return h, fmt.Errorf("%w: flags %#x", ErrVersion, h.Flags)
	}
	if h.Size > MaxPayload {
		return h, fmt.Errorf("%w: %s with %d bytes", ErrTooLarge, h.Request, h.Size)
	}
	return h, nil
}

// EncodeHeader appends the header to b.
func EncodeHeader(b []byte, h Header) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(h.Request))
	b = binary.LittleEndian.AppendUint32(b, h.Flags)
	return binary.LittleEndian.AppendUint32(b, h.Size)
}

// FDsAllowed returns the accepted range of descriptor counts for r, before
// the payload is looked at (SET_MEM_TABLE is checked against its region
// count in MemTable; the vring messages against their NOFD bit in VringFD).
func FDsAllowed(r Request) (lo, hi int) {
	switch r {
	case SetMemTable:
		return 1, MaxFDs
	case AddMemReg, SetLogFD, SetBackendReqFD, SetInflightFD, SetDeviceStateFD:
		return 1, 1
	case SetVringKick, SetVringCall, SetVringErr, RemMemReg, SetLogBase:
		return 0, 1
	}
	return 0, 0
}

// Validate checks the descriptor count of m against its request type.
func (m *Message) Validate() error {
	lo, hi := FDsAllowed(m.Request)
	if len(m.FDs) < lo || len(m.FDs) > hi {
		return fmt.Errorf("%w: %s with %d (want %d..%d)", ErrFDCount, m.Request, len(m.FDs), lo, hi)
	}
	return nil
}

func (m *Message) want(n int) error {
	if len(m.Payload) != n {
		return fmt.Errorf("%w: %s with %d bytes, want %d", ErrSize, m.Request, len(m.Payload), n)
	}
	return nil
}

// U64 decodes a payload that is a single little-endian u64.
func (m *Message) U64() (uint64, error) {
	if err := m.want(8); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

// VringState is the payload of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE.
type VringState struct {
	Index uint32
	Num   uint32
}

// VringState decodes a vring state payload.
func (m *Message) VringState() (VringState, error) {
	if err := m.want(8); err != nil {
		return VringState{}, err
	}
	return VringState{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:])}, nil
}

// EncodeVringState appends s to b.
func EncodeVringState(b []byte, s VringState) []byte {
	b = binary.LittleEndian.AppendUint32(b, s.Index)
	return binary.LittleEndian.AppendUint32(b, s.Num)
}

// VringFLog in VringAddr.Flags (VHOST_VRING_F_LOG) asks for the used
// ring's writes to be logged at VringAddr.Log during a migration.
const VringFLog = 1 << 0

// VringAddr is the payload of SET_VRING_ADDR. Addresses are frontend
// virtual addresses, except Log, the guest-physical address at which the
// used ring's writes are logged.
type VringAddr struct {
	Index uint32
	Flags uint32
	Desc  uint64
	Used  uint64
	Avail uint64
	Log   uint64
}

// VringAddr decodes a SET_VRING_ADDR payload.
func (m *Message) VringAddr() (VringAddr, error) {
	if err := m.want(40); err != nil {
		return VringAddr{}, err
	}
	p := m.Payload
	return VringAddr{
		Index: binary.LittleEndian.Uint32(p), Flags: binary.LittleEndian.Uint32(p[4:]),
		Desc: binary.LittleEndian.Uint64(p[8:]), Used: binary.LittleEndian.Uint64(p[16:]),
		Avail: binary.LittleEndian.Uint64(p[24:]), Log: binary.LittleEndian.Uint64(p[32:]),
	}, nil
}

// EncodeVringAddr appends a to b.
func EncodeVringAddr(b []byte, a VringAddr) []byte {
	b = binary.LittleEndian.AppendUint32(b, a.Index)
	b = binary.LittleEndian.AppendUint32(b, a.Flags)
	for _, v := range []uint64{a.Desc, a.Used, a.Avail, a.Log} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// VringFD decodes SET_VRING_KICK/CALL/ERR: the queue index and whether a
// descriptor is attached. It checks the descriptor count matches.
func (m *Message) VringFD() (index uint32, hasFD bool, err error) {
	v, err := m.U64()
	if err != nil {
		return 0, false, err
	}
	hasFD = v&VringNoFD == 0
	if hasFD != (len(m.FDs) == 1) {
		return 0, false, fmt.Errorf("%w: %s nofd=%v with %d", ErrFDCount, m.Request, !hasFD, len(m.FDs))
	}
	return uint32(v & vringIndex), hasFD, nil
}

// MemRegion is one guest memory region as the frontend describes it.
type MemRegion struct {
	GuestAddr  uint64
	Size       uint64
	UserAddr   uint64
	MmapOffset uint64
}

const memRegionSize = 32

func decodeRegion(p []byte) (MemRegion, error) {
	r := MemRegion{
		GuestAddr: binary.LittleEndian.Uint64(p), Size: binary.LittleEndian.Uint64(p[8:]),
		UserAddr: binary.LittleEndian.Uint64(p[16:]), MmapOffset: binary.LittleEndian.Uint64(p[24:]),
	}
	if r.Size == 0 || r.GuestAddr+r.Size < r.GuestAddr || r.UserAddr+r.Size < r.UserAddr || r.MmapOffset+r.Size < r.MmapOffset {
		return r, fmt.Errorf("%w: guest %#x size %#x user %#x offset %#x", ErrBadRegion, r.GuestAddr, r.Size, r.UserAddr, r.MmapOffset)
	}
	return r, nil
}

// EncodeRegion appends r to b.
func EncodeRegion(b []byte, r MemRegion) []byte {
	for _, v := range []uint64{r.GuestAddr, r.Size, r.UserAddr, r.MmapOffset} {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// MemTable decodes SET_MEM_TABLE: one region per attached descriptor.
func (m *Message) MemTable() ([]MemRegion, error) {
	if len(m.Payload) < 8 {
		return nil, fmt.Errorf("%w: %s with %d bytes", ErrSize, m.Request, len(m.Payload))
	}
	n := binary.LittleEndian.Uint32(m.Payload)
	if n == 0 || n > MaxFDs {
		return nil, fmt.Errorf("%w: %d regions", ErrBadRegion, n)
	}
	// QEMU sends exactly n regions; some frontends send the whole 8-slot
	// array. Accept both, never less than n.
	if len(m.Payload) != 8+memRegionSize*int(n) && len(m.Payload) != 8+memRegionSize*MaxFDs {
		return nil, fmt.Errorf("%w: %s with %d bytes for %d regions", ErrSize, m.Request, len(m.Payload), n)
	}
	if len(m.FDs) != int(n) {
		return nil, fmt.Errorf("%w: %d regions, %d descriptors", ErrFDCount, n, len(m.FDs))
	}
	regions := make([]MemRegion, n)
	for i := range regions {
		r, err := decodeRegion(m.Payload[8+memRegionSize*i:])
		if err != nil {
			return nil, err
		}
		regions[i] = r
	}
	return regions, nil
}

// EncodeMemTable appends a SET_MEM_TABLE payload for regions to b.
func EncodeMemTable(b []byte, regions []MemRegion) []byte {
	b = binary.LittleEndian.AppendUint32(b, uint32(len(regions)))
	b = binary.LittleEndian.AppendUint32(b, 0)
	for _, r := range regions {
		b = EncodeRegion(b, r)
	}
	return b
}

// MemRegion decodes the payload of ADD_MEM_REG and REM_MEM_REG.
func (m *Message) MemRegion() (MemRegion, error) {
	if err := m.want(8 + memRegionSize); err != nil {
		return MemRegion{}, err
	}
	return decodeRegion(m.Payload[8:])
}

// LogBase is the payload of SET_LOG_BASE: where the dirty log lies in the
// descriptor sent with it.
type LogBase struct {
	Size   uint64
	Offset uint64
}

// LogBase decodes a SET_LOG_BASE payload.
func (m *Message) LogBase() (LogBase, error) {
	if err := m.want(16); err != nil {
		return LogBase{}, err
	}
	return LogBase{binary.LittleEndian.Uint64(m.Payload), binary.LittleEndian.Uint64(m.Payload[8:])}, nil
}

// EncodeLogBase appends l to b.
func EncodeLogBase(b []byte, l LogBase) []byte {
	b = binary.LittleEndian.AppendUint64(b, l.Size)
	return binary.LittleEndian.AppendUint64(b, l.Offset)
}

// ConfigPayload is the payload of GET_CONFIG and SET_CONFIG.
type ConfigPayload struct {
	Offset uint32
	Flags  uint32
	Data   []byte
}

// Config decodes a GET/SET_CONFIG payload.
func (m *Message) Config() (ConfigPayload, error) {
	if len(m.Payload) < 12 {
		return ConfigPayload{}, fmt.Errorf("%w: %s with %d bytes", ErrSize, m.Request, len(m.Payload))
	}
	size := binary.LittleEndian.Uint32(m.Payload[4:])
	if size > MaxConfigSize || int(size) != len(m.Payload)-12 {
		return ConfigPayload{}, fmt.Errorf("%w: %s size %d with %d bytes", ErrSize, m.Request, size, len(m.Payload))
	}
	return ConfigPayload{
		Offset: binary.LittleEndian.Uint32(m.Payload),
		Flags:  binary.LittleEndian.Uint32(m.Payload[8:]),
		Data:   m.Payload[12:],
	}, nil
}

// EncodeConfig appends a config payload to b.
func EncodeConfig(b []byte, c ConfigPayload) []byte {
	b = binary.LittleEndian.AppendUint32(b, c.Offset)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(c.Data)))
	b = binary.LittleEndian.AppendUint32(b, c.Flags)
	return append(b, c.Data...)
}

// Device-state transfer directions and phases (SET_DEVICE_STATE_FD).
const (
	DirectionSave = 0 // back-end to front-end (the migration source)
	DirectionLoad = 1 // front-end to back-end (the destination)
	PhaseStopped  = 0 // the device and all its rings are stopped
)

// DeviceStateTransfer is the payload of SET_DEVICE_STATE_FD.
type DeviceStateTransfer struct {
	Direction uint32
	Phase     uint32
}

// DeviceStateTransfer decodes a SET_DEVICE_STATE_FD payload.
func (m *Message) DeviceStateTransfer() (DeviceStateTransfer, error) {
	if err := m.want(8); err != nil {
		return DeviceStateTransfer{}, err
	}
	return DeviceStateTransfer{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:])}, nil
}

// EncodeDeviceStateTransfer appends t to b.
func EncodeDeviceStateTransfer(b []byte, t DeviceStateTransfer) []byte {
	b = binary.LittleEndian.AppendUint32(b, t.Direction)
	return binary.LittleEndian.AppendUint32(b, t.Phase)
}
