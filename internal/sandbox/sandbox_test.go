package sandbox

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// run evaluates a filter program on one call, as the kernel would.
func run(t *testing.T, prog []unix.SockFilter, arch uint32, nr uintptr, args ...uint64) uint32 {
	t.Helper()
	raw := make([]bpf.RawInstruction, len(prog))
	for i, f := range prog {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}
	}
	insns, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatal("filter does not disassemble")
	}
	vm, err := bpf.NewVM(insns)
	if err != nil {
		t.Fatal(err)
	}
	// struct seccomp_data, in the byte order the kernel hands the filter
	// (native: little endian on amd64 and arm64). The VM loads words big
	// endian, so the buffer is laid out swapped to read back the values.
	data := make([]byte, 64)
	put := func(off int, v uint32) { binary.BigEndian.PutUint32(data[off:], v) }
	put(offNr, uint32(nr))
	put(offArch, arch)
	for i, a := range args {
		put(offArgs+8*i, uint32(a))
		put(offArgs+8*i+4, uint32(a>>32))
	}
	out, err := vm.Run(data)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(out)
}

// TestFilterDecisions runs the policy through a BPF interpreter: every
// listed call passes, unlisted ones and the wrong argument values get the
// deny action, and other architectures and x32 are refused.
func TestFilterDecisions(t *testing.T) {
	pid := 4242
	rules := allowList(pid)
	deny := retErrno(syscall.EPERM)
	prog, err := filterProgram(rules, auditArch, deny)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("policy: %d rules, %d instructions", len(rules), len(prog))
	// Every rule allows its call with arguments that satisfy it.
	for _, r := range rules {
		args := make([]uint64, 6)
		if c := r.cond; c != nil {
			switch {
			case len(c.anyOf) > 0:
				args[c.arg] = uint64(c.anyOf[len(c.anyOf)-1])
			case c.setAll != 0:
				args[c.arg] = uint64(c.setAll) | 0x100
			}
		}
		if got := run(t, prog, auditArch, r.nr, args...); got != retAllow {
			t.Errorf("%s: %#x, want allow", r.name, got)
		}
	}
	cases := []struct {
		name string
		nr   uintptr
		arch uint32
		args []uint64
		want uint32
	}{
		{"execve", unix.SYS_EXECVE, auditArch, nil, deny},
		{"execveat", unix.SYS_EXECVEAT, auditArch, nil, deny},
		{"sysinfo", unix.SYS_SYSINFO, auditArch, nil, deny},
		{"ptrace", unix.SYS_PTRACE, auditArch, nil, deny},
		{"mount", unix.SYS_MOUNT, auditArch, nil, deny},
		{"setuid", unix.SYS_SETUID, auditArch, nil, deny},
		{"unshare", unix.SYS_UNSHARE, auditArch, nil, deny},
		{"seccomp", unix.SYS_SECCOMP, auditArch, nil, deny},
		{"x32 read", unix.SYS_READ | x32SyscallBit, auditArch, nil, deny},
		{"read from another architecture", unix.SYS_READ, unix.AUDIT_ARCH_I386, nil, deny},
		{"fork by clone", unix.SYS_CLONE, auditArch, []uint64{uint64(unix.SIGCHLD) | unix.CLONE_VM | unix.CLONE_VFORK}, deny},
		{"thread by clone", unix.SYS_CLONE, auditArch, []uint64{unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_SYSVSEM | unix.CLONE_THREAD}, retAllow},
		{"executable mmap", unix.SYS_MMAP, auditArch, []uint64{0, 4096, unix.PROT_READ | unix.PROT_EXEC, unix.MAP_PRIVATE | unix.MAP_ANONYMOUS}, deny},
		{"data mmap", unix.SYS_MMAP, auditArch, []uint64{0, 4096, unix.PROT_READ | unix.PROT_WRITE, unix.MAP_SHARED}, retAllow},
		{"mprotect to executable", unix.SYS_MPROTECT, auditArch, []uint64{0x1000, 4096, unix.PROT_EXEC}, deny},
		{"packet socket", unix.SYS_SOCKET, auditArch, []uint64{unix.AF_PACKET, unix.SOCK_RAW}, deny},
		{"TCP socket", unix.SYS_SOCKET, auditArch, []uint64{unix.AF_INET6, unix.SOCK_STREAM}, retAllow},
		{"kill another process", unix.SYS_KILL, auditArch, []uint64{1, uint64(unix.SIGKILL)}, deny},
		{"kill self", unix.SYS_KILL, auditArch, []uint64{uint64(pid), uint64(unix.SIGQUIT)}, retAllow},
		{"tgkill another process", unix.SYS_TGKILL, auditArch, []uint64{1, 1, uint64(unix.SIGURG)}, deny},
		{"TIOCSTI", unix.SYS_IOCTL, auditArch, []uint64{0, unix.TIOCSTI}, deny},
		{"prctl set dumpable", unix.SYS_PRCTL, auditArch, []uint64{unix.PR_SET_DUMPABLE, 1}, deny},
		// clone3 is allowed by the policy; the quiet filter answers it.
		{"clone3", unix.SYS_CLONE3, auditArch, nil, retAllow},
	}
	for _, c := range cases {
		if got := run(t, prog, c.arch, c.nr, c.args...); got != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
		}
	}

	// Log mode: the same decisions, with logging instead of EPERM.
	logProg, err := filterProgram(rules, auditArch, retLog)
	if err != nil {
		t.Fatal(err)
	}
	if got := run(t, logProg, auditArch, unix.SYS_SYSINFO); got != retLog {
		t.Errorf("log mode sysinfo: %#x, want log", got)
	}
	if got := run(t, logProg, auditArch, unix.SYS_READ); got != retAllow {
		t.Errorf("log mode read: %#x, want allow", got)
	}

	quiet := quietProgram(rules, auditArch)
	if got := run(t, quiet, auditArch, unix.SYS_CLONE3); got != retErrno(syscall.ENOSYS) {
		t.Errorf("quiet clone3: %#x, want ENOSYS", got)
	}
	if got := run(t, quiet, auditArch, unix.SYS_SYSINFO); got != retAllow {
		t.Errorf("quiet sysinfo: %#x, want allow (the policy decides)", got)
	}
}

// TestAllowListShape: one rule per call, and none of the calls that would
// undo the sandbox.
func TestAllowListShape(t *testing.T) {
	seen := map[uintptr]string{}
	for _, r := range allowList(1) {
		if prev, dup := seen[r.nr]; dup {
			t.Errorf("%s and %s: the same call %d twice", prev, r.name, r.nr)
		}
		seen[r.nr] = r.name
	}
	for _, nr := range []uintptr{unix.SYS_EXECVE, unix.SYS_EXECVEAT, unix.SYS_PTRACE, unix.SYS_SETUID, unix.SYS_SETGID,
		unix.SYS_SETRESUID, unix.SYS_CAPSET, unix.SYS_UNSHARE, unix.SYS_SETNS, unix.SYS_MOUNT, unix.SYS_CHROOT,
		unix.SYS_PIVOT_ROOT, unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN, unix.SYS_KEYCTL, unix.SYS_USERFAULTFD,
		unix.SYS_IO_URING_SETUP, unix.SYS_PROCESS_VM_WRITEV, unix.SYS_OPEN_BY_HANDLE_AT, unix.SYS_MEMFD_CREATE,
		unix.SYS_SECCOMP, unix.SYS_LANDLOCK_CREATE_RULESET, unix.SYS_WAIT4,
		unix.SYS_UNLINKAT, unix.SYS_RENAMEAT2, unix.SYS_MKDIRAT, unix.SYS_FCHMODAT, unix.SYS_FCHOWNAT, unix.SYS_LINKAT, unix.SYS_SYMLINKAT} {
		if name, ok := seen[nr]; ok {
			t.Errorf("%s (%d) is on the allow-list", name, nr)
		}
	}
}

// childEnv makes the test binary, re-executed, run one sandbox scenario
// instead of the tests (the sandbox cannot be undone in a process).
const childEnv = "VUNET_SANDBOX_TEST_CHILD"

// report is what the child found; the parent judges it.
type report struct {
	Status             Status
	ApplyErr           string
	TCPRepair          string // turning TCP repair mode on
	ReadAllowed        string // "" when reading the allowed directory worked
	ReadlinkFD         string
	ReadOutside        string
	WriteAllowed       string // writing into the read-only directory
	Exec               string
	ForkExec           string
	Sysinfo            string
	SysinfoOldThread   string // on a thread that existed before Apply
	PacketSocket       string
	Setuid0            string
	ProcStatus         string
	Confined           bool
	UTSNamespace       string
	HostUTSNamespace   string
	TCPListen          string
	ExecMmap           string
	OtherProcessSignal string
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		child(mode)
		return
	}
	os.Exit(m.Run())
}

// child applies the sandbox in mode and probes each layer.
func child(modeName string) {
	mode := Mode(-1)
	for _, m := range []Mode{On, Log, Off} {
		if m.String() == modeName {
			mode = m
		}
	}
	if mode < 0 {
		fmt.Fprintln(os.Stderr, "unknown mode", modeName)
		os.Exit(2)
	}
	dir := os.Getenv(childEnv + "_DIR")
	var r report
	// Like vunet's TFTP root: opened before the sandbox, used after it.
	// The parent of the test's directories is not reachable for nobody,
	// so paths are only resolved from these.
	allowed, err := os.OpenRoot(filepath.Join(dir, "allowed"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	top, err := os.OpenRoot(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	r.HostUTSNamespace, _ = os.Readlink("/proc/self/ns/uts")

	// A thread that exists before Apply: TSYNC must confine it too.
	probe := make(chan chan string)
	go func() {
		runtime.LockOSThread()
		for reply := range probe {
			var si unix.Sysinfo_t
			reply <- errString(unix.Sysinfo(&si))
		}
	}()
	warm := make(chan string)
	probe <- warm
	<-warm

	runAs := ""
	if os.Geteuid() == 0 {
		runAs = "nobody"
	}
	r.Status, err = Apply(Options{Mode: mode, RunAs: runAs, ReadDirs: []string{filepath.Join(dir, "allowed")},
		KeepNetAdmin: os.Getenv(childEnv+"_NETADMIN") != ""})
	r.ApplyErr = errString(err)
	if err != nil {
		json.NewEncoder(os.Stdout).Encode(&r)
		os.Exit(0)
	}

	_, err = allowed.ReadFile("file")
	r.ReadAllowed = errString(err)
	_, err = top.ReadFile("outside")
	r.ReadOutside = errString(err)
	r.WriteAllowed = errString(allowed.WriteFile("new", []byte("x"), 0o644))
	_, err = os.Readlink("/proc/self/fd/0") // how fd kinds are checked
	r.ReadlinkFD = errString(err)
	// Standard streams given, so that exec does not open /dev/null first
	// (which Landlock refuses) and reaches the fork.
	fork := exec.Command("/bin/true")
	fork.Stdin, fork.Stdout, fork.Stderr = os.Stdin, os.Stderr, os.Stderr
	r.ForkExec = errString(fork.Run())
	var si unix.Sysinfo_t
	r.Sysinfo = errString(unix.Sysinfo(&si))
	reply := make(chan string)
	probe <- reply
	r.SysinfoOldThread = <-reply
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err == nil {
		unix.Close(fd)
	}
	r.PacketSocket = errString(err)
	r.Setuid0 = errString(syscall.Setuid(0))
	r.Confined = Confined()
	r.UTSNamespace, _ = os.Readlink("/proc/self/ns/uts")
	if l, err := unixListenTCP(); err != nil {
		r.TCPListen = err.Error()
	} else {
		unix.Close(l)
	}
	r.TCPRepair = errString(tcpRepair())
	_, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_EXEC, unix.MAP_PRIVATE|unix.MAP_ANON)
	r.ExecMmap = errString(err)
	r.OtherProcessSignal = errString(unix.Kill(os.Getppid(), 0))
	// Last: a successful exec ends the child without a report, which
	// the parent takes as a failure.
	if mode != Off {
		r.Exec = errString(unix.Exec("/bin/true", []string{"true"}, nil))
	}

	if err := json.NewEncoder(os.Stdout).Encode(&r); err != nil {
		os.Exit(3)
	}
	// The parent reads /proc/PID/status (Landlock keeps this process out
	// of /proc) and then closes stdin.
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// tcpRepair turns repair mode on on a TCP socket (CAP_NET_ADMIN), as
// --migrate-tcp does.
func tcpRepair() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_ON)
}

// unixListenTCP binds a loopback TCP socket, as the NAT does.
func unixListenTCP() (int, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, unix.Listen(fd, 1)
}

// runChild re-executes the test binary in scenario mode.
func runChild(t *testing.T, mode Mode) report {
	t.Helper()
	return runChildBin(t, os.Args[0], mode)
}

// runChildBin runs scenario mode in the test binary bin.
func runChildBin(t *testing.T, bin string, mode Mode, env ...string) report {
	t.Helper()
	dir := t.TempDir()
	// The sandbox may switch to nobody: the files must be reachable for
	// it, the way docs/security.md asks of a TFTP root.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "allowed"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{filepath.Join(dir, "allowed", "file"), filepath.Join(dir, "outside")} {
		if err := os.WriteFile(f, []byte("data"), 0o666); err != nil {
			t.Fatal(err)
		}
		os.Chmod(f, 0o666)
	}
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(append(os.Environ(), childEnv+"="+mode.String(), childEnv+"_DIR="+dir), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	var r report
	if err := json.NewDecoder(stdout).Decode(&r); err != nil {
		t.Fatalf("child report: %v (a child that exec'd /bin/true reports nothing)", err)
	}
	if r.ApplyErr != "" {
		t.Fatalf("Apply: %s", r.ApplyErr)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	r.ProcStatus = string(b)
	return r
}

func statusField(status, key string) string {
	for _, line := range strings.Split(status, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

func landlockABI() int {
	v, _, e := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, 1) // LANDLOCK_CREATE_RULESET_VERSION
	if e != 0 {
		return 0
	}
	return int(v)
}

// TestSandboxOn proves each layer in a re-executed child.
func TestSandboxOn(t *testing.T) {
	r := runChild(t, On)
	t.Logf("status: %+v", r.Status)
	eperm := unix.EPERM.Error()

	if got := statusField(r.ProcStatus, "NoNewPrivs"); got != "1" {
		t.Errorf("NoNewPrivs: %q, want 1", got)
	}
	if got := statusField(r.ProcStatus, "Seccomp"); got != "2" {
		t.Errorf("Seccomp: %q, want 2 (filter)", got)
	}
	if !r.Confined {
		t.Error("Confined() is false under the sandbox")
	}
	if !r.Status.Seccomp || r.Status.Syscalls < 50 {
		t.Errorf("seccomp status %+v", r.Status)
	}
	// seccomp: unlisted calls fail with EPERM, on old threads too.
	for what, got := range map[string]string{"sysinfo": r.Sysinfo, "sysinfo on a thread from before": r.SysinfoOldThread,
		"AF_PACKET socket": r.PacketSocket, "execve": r.Exec, "executable mmap": r.ExecMmap,
		"signal to the parent": r.OtherProcessSignal} {
		if got != eperm {
			t.Errorf("%s: %q, want %q", what, got, eperm)
		}
	}
	if !strings.Contains(r.ForkExec, eperm) {
		t.Errorf("fork+exec of /bin/true: %q, want %q", r.ForkExec, eperm)
	}
	if r.ReadlinkFD != "" {
		t.Errorf("readlink /proc/self/fd/0 under the sandbox: %s", r.ReadlinkFD)
	}
	if r.TCPListen != "" {
		t.Errorf("TCP listen on loopback under the sandbox: %s", r.TCPListen)
	}

	// Landlock.
	if abi := landlockABI(); abi > 0 {
		if !r.Status.Landlock || r.Status.LandlockABI != abi {
			t.Errorf("landlock status %+v, kernel ABI %d", r.Status, abi)
		}
		if r.ReadAllowed != "" {
			t.Errorf("reading the allowed directory: %s", r.ReadAllowed)
		}
		if !strings.Contains(r.ReadOutside, "permission denied") {
			t.Errorf("reading outside the allowed set: %q, want permission denied", r.ReadOutside)
		}
		if !strings.Contains(r.WriteAllowed, "permission denied") {
			t.Errorf("writing into the read-only directory: %q, want permission denied", r.WriteAllowed)
		}
	} else {
		t.Log("no Landlock on this kernel: filesystem checks skipped")
	}

	// Started as root: switched to nobody, no way back, own namespaces.
	if os.Geteuid() == 0 {
		if r.Status.DroppedTo != "nobody" || r.Status.UID == 0 {
			t.Errorf("started as root, status %+v", r.Status)
		}
		if got := statusField(r.ProcStatus, "Uid"); got != "65534\t65534\t65534\t65534" {
			t.Errorf("Uid: %q", got)
		}
		if got := statusField(r.ProcStatus, "CapEff"); got != "0000000000000000" {
			t.Errorf("CapEff: %q, want none", got)
		}
		if r.TCPRepair != eperm || r.Status.NetAdmin {
			t.Errorf("TCP repair mode without KeepNetAdmin: %q (status %+v), want %q", r.TCPRepair, r.Status, eperm)
		}
		if r.Setuid0 == "" {
			t.Error("setuid(0) succeeded after the switch")
		}
		if r.UTSNamespace == r.HostUTSNamespace || r.UTSNamespace == "" {
			t.Errorf("UTS namespace %q, host's %q: want a new one", r.UTSNamespace, r.HostUTSNamespace)
		}
	}
}

// TestSandboxKeepNetAdmin: --migrate-tcp keeps CAP_NET_ADMIN, and only
// it, across the switch to nobody; TCP repair mode then works under the
// filter.
func TestSandboxKeepNetAdmin(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (the switch to nobody)")
	}
	r := runChildBin(t, os.Args[0], On, childEnv+"_NETADMIN=1")
	if !r.Status.NetAdmin || r.Status.DroppedTo != "nobody" {
		t.Errorf("status %+v", r.Status)
	}
	for _, f := range []string{"CapEff", "CapPrm"} {
		if got := statusField(r.ProcStatus, f); got != "0000000000001000" {
			t.Errorf("%s: %q, want CAP_NET_ADMIN alone (0000000000001000)", f, got)
		}
	}
	if got := statusField(r.ProcStatus, "CapInh"); got != "0000000000000000" {
		t.Errorf("CapInh: %q, want none", got)
	}
	if r.TCPRepair != "" {
		t.Errorf("TCP repair mode with CAP_NET_ADMIN kept: %s", r.TCPRepair)
	}
	if r.Setuid0 == "" {
		t.Error("setuid(0) succeeded after the switch")
	}
}

// TestSandboxLog: in log mode the layers are in place but unlisted calls
// are allowed.
func TestSandboxLog(t *testing.T) {
	r := runChild(t, Log)
	if got := statusField(r.ProcStatus, "Seccomp"); got != "2" {
		t.Errorf("Seccomp: %q, want 2", got)
	}
	if r.Sysinfo != "" || r.SysinfoOldThread != "" {
		t.Errorf("sysinfo in log mode: %q / %q, want success", r.Sysinfo, r.SysinfoOldThread)
	}
	if landlockABI() > 0 && !strings.Contains(r.ReadOutside, "permission denied") {
		t.Errorf("reading outside in log mode: %q, want Landlock's permission denied", r.ReadOutside)
	}
}

// TestSandboxOff: nothing is applied.
func TestSandboxOff(t *testing.T) {
	r := runChild(t, Off)
	if got := statusField(r.ProcStatus, "Seccomp"); got != "0" {
		t.Errorf("Seccomp: %q, want 0", got)
	}
	if r.Sysinfo != "" || r.ReadOutside != "" || r.Confined {
		t.Errorf("sandbox off still confines: %+v", r)
	}
}

func TestLookupRunAs(t *testing.T) {
	if os.Geteuid() != 0 {
		if c, err := lookupRunAs("nobody"); c != nil || err != nil {
			t.Errorf("not root: %+v %v, want nothing to switch to", c, err)
		}
		return
	}
	for spec, want := range map[string]cred{
		"nobody":       {name: "nobody", uid: 65534, gid: 65534},
		"65534":        {name: "65534", uid: 65534, gid: 65534},
		"12345:54321":  {name: "12345:54321", uid: 12345, gid: 54321},
		"nobody:65533": {name: "nobody:65533", uid: 65534, gid: 65533},
	} {
		c, err := lookupRunAs(spec)
		if err != nil || *c != want {
			t.Errorf("lookupRunAs(%q) = %+v, %v; want %+v", spec, c, err, want)
		}
	}
	if _, err := lookupRunAs("no-such-user-vunet"); err == nil {
		t.Error("unknown user accepted")
	}
	if _, err := lookupRunAs(""); !errors.Is(err, errNoRunAs) {
		t.Errorf("empty --runas as root: %v", err)
	}
}

// TestSandboxOnWithoutCgo: a static build (CGO_ENABLED=0) reaches every
// thread through the runtime's AllThreadsSyscall instead of libpsx, and
// its threads start with clone directly; it is confined the same way.
func TestSandboxOnWithoutCgo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the test binary again")
	}
	bin := filepath.Join(t.TempDir(), "sandbox.test")
	build := exec.Command("go", "test", "-c", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go test -c: %v\n%s", err, out)
	}
	if err := os.Chmod(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	r := runChildBin(t, bin, On)
	eperm := unix.EPERM.Error()
	if statusField(r.ProcStatus, "Seccomp") != "2" || statusField(r.ProcStatus, "NoNewPrivs") != "1" {
		t.Errorf("status:\n%s", r.ProcStatus)
	}
	if r.Sysinfo != eperm || r.SysinfoOldThread != eperm || r.Exec != eperm {
		t.Errorf("sysinfo %q, on an old thread %q, execve %q; want %q", r.Sysinfo, r.SysinfoOldThread, r.Exec, eperm)
	}
	if landlockABI() > 0 && (r.ReadAllowed != "" || !strings.Contains(r.ReadOutside, "permission denied")) {
		t.Errorf("Landlock: allowed %q, outside %q", r.ReadAllowed, r.ReadOutside)
	}
	if os.Geteuid() == 0 && statusField(r.ProcStatus, "Uid") != "65534\t65534\t65534\t65534" {
		t.Errorf("Uid %q", statusField(r.ProcStatus, "Uid"))
	}
}
