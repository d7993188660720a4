package sandbox

import "golang.org/x/sys/unix"

// auditArch is the architecture the filter accepts calls from.
const auditArch = unix.AUDIT_ARCH_AARCH64

// archSupported: this architecture has a policy.
const archSupported = true

// archRules are the calls arm64 has beside the generic table: none, its
// table is the generic one.
func archRules() []rule { return nil }
