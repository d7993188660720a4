package sandbox

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A rule allows one system call, optionally only for some argument values.
// Rules are data, not code, so the list in syscalls.go reads as a policy and
// the filter program below is the only place that knows BPF.
type rule struct {
	name string
	nr   uintptr
	// cond, if set, must hold for the call to be allowed; otherwise the
	// call is denied like an unlisted one.
	cond *argCond
	// errno, if nonzero, fails the call with this error without running
	// it, in every mode and without a log entry: an expected refusal, not
	// a denial (clone3: ENOSYS makes glibc fall back to clone, whose flags
	// the filter can inspect). Such rules live in a filter of their own;
	// see installFilters.
	errno syscall.Errno
}

// argCond tests the low 32 bits of one argument. Every argument the filter
// inspects (flags, protection bits, address families, process ids) fits in
// 32 bits; the high half is ignored, which can only allow more values with
// the same low bits, never a different call.
type argCond struct {
	arg int // 0..5
	// Exactly one of the following is used.
	anyOf    []uint32 // the argument equals one of these
	setAll   uint32   // every one of these bits is set
	clearAll uint32   // none of these bits is set
}

// Filter actions. The deny action depends on the mode; see denyAction.
const (
	retAllow = unix.SECCOMP_RET_ALLOW
	retLog   = unix.SECCOMP_RET_LOG
)

func retErrno(e syscall.Errno) uint32 {
	return unix.SECCOMP_RET_ERRNO | uint32(e)&unix.SECCOMP_RET_DATA
}

// Offsets into struct seccomp_data.
const (
	offNr   = 0
	offArch = 4
	offArgs = 16
)

// x32 system calls on amd64 have this bit set in their number. They need
// no check of their own: the filter only allows exact numbers, all below
// this bit, so an x32 call never matches one (the tests make sure).
const x32SyscallBit = 0x40000000

// filterProgram builds the BPF program: check the architecture, then one
// block per rule, each ending in a return, and the deny action for all
// else. The program is straight-line code: every jump skips forward over at
// most one block, so no offset comes near BPF's 255-instruction jump limit.
func filterProgram(rules []rule, arch uint32, deny uint32) ([]unix.SockFilter, error) {
	var p []unix.SockFilter
	stmt := func(code uint16, k uint32) { p = append(p, unix.SockFilter{Code: code, K: k}) }
	jump := func(code uint16, k uint32, jt, jf uint8) {
		p = append(p, unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k})
	}
	const (
		ldAbs = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeqK  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jsetK = unix.BPF_JMP | unix.BPF_JSET | unix.BPF_K
		retK  = unix.BPF_RET | unix.BPF_K
		andK  = unix.BPF_ALU | unix.BPF_AND | unix.BPF_K
	)

	// A call made through another architecture's entry (int 0x80 on
	// amd64) has other numbers: deny it before looking at the number.
	stmt(ldAbs, offArch)
	jump(jeqK, arch, 1, 0)
	stmt(retK, deny)
	stmt(ldAbs, offNr)

	for _, r := range rules {
		var block []unix.SockFilter
		bstmt := func(code uint16, k uint32) { block = append(block, unix.SockFilter{Code: code, K: k}) }
		bjump := func(code uint16, k uint32, jt, jf uint8) {
			block = append(block, unix.SockFilter{Code: code, Jt: jt, Jf: jf, K: k})
		}
		switch c := r.cond; {
		case r.errno != 0:
			// Answered by the quiet filter; allowed here so that its
			// error is the result.
			bstmt(retK, retAllow)
		case c == nil:
			bstmt(retK, retAllow)
		default:
			if c.arg < 0 || c.arg > 5 {
				return nil, fmt.Errorf("seccomp rule %s: argument %d out of range", r.name, c.arg)
			}
			bstmt(ldAbs, uint32(offArgs+8*c.arg)) // low half, little endian
			switch {
			case len(c.anyOf) > 0:
				if len(c.anyOf) > 100 {
					return nil, fmt.Errorf("seccomp rule %s: too many values", r.name)
				}
				for i, v := range c.anyOf {
					// Match: jump to the allow after the remaining compares
					// and the deny.
					rest := len(c.anyOf) - 1 - i
					bjump(jeqK, v, uint8(rest+1), 0)
				}
				bstmt(retK, deny)
				bstmt(retK, retAllow)
			case c.setAll != 0:
				bstmt(andK, c.setAll)
				bjump(jeqK, c.setAll, 1, 0)
				bstmt(retK, deny)
				bstmt(retK, retAllow)
			case c.clearAll != 0:
				bjump(jsetK, c.clearAll, 0, 1)
				bstmt(retK, deny)
				bstmt(retK, retAllow)
			default:
				return nil, fmt.Errorf("seccomp rule %s: empty condition", r.name)
			}
		}
		if len(block) > 250 {
			return nil, fmt.Errorf("seccomp rule %s: block too long", r.name)
		}
		// Every block ends in a return, so the next compare is reached
		// only by jumping over the block, with the number still loaded.
		jump(jeqK, uint32(r.nr), 0, uint8(len(block)))
		p = append(p, block...)
	}
	stmt(retK, deny)
	if len(p) > 4096 { // BPF_MAXINSNS
		return nil, fmt.Errorf("seccomp filter has %d instructions, more than the kernel's 4096", len(p))
	}
	return p, nil
}

// quietProgram fails the rules that carry an errno with it, and allows
// everything else (the policy filter decides). Loaded without
// SECCOMP_FILTER_FLAG_LOG, so these expected refusals stay out of the
// kernel log, where only real denials should appear.
func quietProgram(rules []rule, arch uint32) []unix.SockFilter {
	const (
		ldAbs = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeqK  = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		retK  = unix.BPF_RET | unix.BPF_K
	)
	p := []unix.SockFilter{
		{Code: ldAbs, K: offArch},
		{Code: jeqK, K: arch, Jt: 1},
		{Code: retK, K: retAllow}, // other architectures: the policy denies them
		{Code: ldAbs, K: offNr},
	}
	for _, r := range rules {
		if r.errno != 0 {
			p = append(p, unix.SockFilter{Code: jeqK, K: uint32(r.nr), Jf: 1},
				unix.SockFilter{Code: retK, K: retErrno(r.errno)})
		}
	}
	return append(p, unix.SockFilter{Code: retK, K: retAllow})
}

// installFilters loads the quiet filter and then the policy, each for
// every thread of the process (SECCOMP_FILTER_FLAG_TSYNC); the policy with
// SECCOMP_FILTER_FLAG_LOG, so that its denials reach the kernel's audit
// log. The kernel runs both on every call and takes the strictest answer.
// The calling thread must have no_new_privs.
func installFilters(quiet, policy []unix.SockFilter) error {
	if err := installFilter(quiet, 0); err != nil {
		return err
	}
	return installFilter(policy, unix.SECCOMP_FILTER_FLAG_LOG)
}

// installFilter loads prog for every thread with extra flags.
func installFilter(prog []unix.SockFilter, extra uintptr) error {
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	flags := unix.SECCOMP_FILTER_FLAG_TSYNC | extra
	r, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, flags, uintptr(unsafe.Pointer(&fprog)))
	runtime.KeepAlive(prog)
	switch {
	case e == unix.EINVAL && extra != 0:
		// Kernels before 4.14 have no FLAG_LOG: load without it.
		r, _, e = unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
		runtime.KeepAlive(prog)
	}
	if e != 0 {
		if e == unix.ENOSYS {
			return errors.New("seccomp: not supported by this kernel")
		}
		return fmt.Errorf("seccomp: %w", e)
	}
	if r != 0 {
		// TSYNC reports the id of a thread it could not synchronise.
		return fmt.Errorf("seccomp: thread %d could not be synchronised", r)
	}
	return nil
}
