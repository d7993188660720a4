package sandbox

import "golang.org/x/sys/unix"

// auditArch is the architecture the filter accepts calls from.
const auditArch = unix.AUDIT_ARCH_X86_64

// archSupported: this architecture has a policy.
const archSupported = true

// archRules are the calls amd64 has beside the generic table: none is
// needed (Go uses the *at calls of the generic table there too).
func archRules() []rule { return nil }
