//go:build !amd64 && !arm64

package sandbox

// No policy for this architecture: Apply refuses to start rather than run
// with a list nobody checked.
const (
	auditArch     = 0
	archSupported = false
)

func archRules() []rule { return nil }
