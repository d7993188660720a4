package vhost

// Virtio feature bits used by the vhost-user layer itself. Device-specific
// bits (offloads and so on) come from the Backend.
const (
	FeatureNotifyOnEmpty = 24
	// FeatureLogAll is VHOST_F_LOG_ALL: while acked (a live migration),
	// every write to guest memory is marked in the dirty log.
	FeatureLogAll           = 26
	FeatureAnyLayout        = 27
	FeatureIndirectDesc     = 28
	FeatureEventIdx         = 29
	FeatureProtocolFeatures = 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         = 32
	FeatureRingPacked       = 34 // VIRTIO_F_RING_PACKED (virtqueue/packed.go)
)

// Virtio device status bits (SET_STATUS / GET_STATUS).
const (
	StatusAcknowledge = 1
	StatusDriver      = 2
	StatusDriverOK    = 4
	StatusFeaturesOK  = 8
	StatusNeedsReset  = 64
	StatusFailed      = 128
)

// Bit returns the mask for feature bit n.
func Bit(n uint) uint64 { return 1 << n }
