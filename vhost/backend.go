package vhost

import "github.com/vunet/vunet/vhost/virtqueue"

// Backend is the virtio device behind the vhost-user control plane (for us,
// virtio-net). The control plane owns the queues' lifecycle and calls these
// methods from one goroutine.
type Backend interface {
	// Features returns the virtio feature bits the device offers. The
	// control plane adds the transport bits it implements itself.
	Features() uint64
	// SetFeatures tells the device which bits the driver acknowledged.
	// It is called before any queue starts.
	SetFeatures(acked uint64) error
	// NumQueues returns the number of virtqueues the device uses.
	NumQueues() int
	// Config returns the device's virtio config space.
	Config() []byte
	// StartQueue hands queue idx, set up and enabled, to the device. kick
	// is signalled by the guest when it adds buffers; the device waits on
	// it in its own goroutine.
	StartQueue(idx int, q *virtqueue.Queue, kick *virtqueue.EventFD)
	// StopQueue returns once the device no longer uses queue idx. The
	// device interrupts its worker through the kick's Interrupt method.
	StopQueue(idx int)
	// Reset returns the device to its initial state (frontend gone or
	// RESET_DEVICE): all queues are already stopped.
	Reset()
}

// QueueNumReporter is implemented by a Backend whose answer to
// GET_QUEUE_NUM is not its number of virtqueues. The request is device
// specific: QEMU reads a virtio-net backend's answer as queue *pairs* (and
// accepts `-netdev vhost-user,queues=N` up to it), a block backend's as
// queues. Without it, the session answers NumQueues.
type QueueNumReporter interface {
	QueueNum() uint64
}

// BackendPool gives each frontend a device of its own: several guests on
// one network, each on its own port of the appliance's switch. Set it in
// Options.Backends; Options.Backend is then the template whose NumQueues
// and features every device of the pool shares.
type BackendPool interface {
	// AcquireBackend returns the device for a newly admitted frontend, or
	// an error (the frontend is refused). hangUp ends that frontend's
	// session; the device may call it from any goroutine (its guest
	// turned out to be unacceptable, e.g. its MAC is in use).
	AcquireBackend(hangUp func()) (Backend, error)
	// ReleaseBackend returns b once its session no longer uses it (every
	// queue stopped, Reset called), before the frontend's socket closes,
	// so a frontend that reconnects at once finds the device free.
	ReleaseBackend(b Backend)
}

// QueueStatser is implemented by a Backend that keeps its own virtqueue
// counters (one set per guest); the session counts in those instead of
// Stats.Queues.
type QueueStatser interface {
	QueueStats(idx int) *virtqueue.Stats
}
