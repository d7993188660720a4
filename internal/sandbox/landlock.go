package sandbox

import (
	"fmt"
	"path/filepath"

	"github.com/landlock-lsm/go-landlock/landlock"
	ll "github.com/landlock-lsm/go-landlock/landlock/syscall"
)

// Landlock access rights per kind of path.
const (
	readDirRights landlock.AccessFSSet = ll.AccessFSReadFile | ll.AccessFSReadDir
	// connect(2) to a pathname socket (ABI 9). The rule goes on the
	// socket's directory: the frontend may re-create the socket (a new
	// inode) between two connects.
	connectRights landlock.AccessFSSet = ll.AccessFSResolveUnix
	// A socket directory (Options.SocketDirs): sockets are created (bind),
	// removed and connected to there; no other kind of file.
	socketDirRights landlock.AccessFSSet = ll.AccessFSMakeSock | ll.AccessFSRemoveFile | ll.AccessFSResolveUnix
)

// restrictFS enters a Landlock domain that handles every filesystem right
// the kernel knows, with rules only for opts' paths, and the IPC scopes:
// no signals to, and no abstract Unix sockets of, processes outside the
// domain. Network rights are not handled: the NAT connects anywhere and
// binds the ports forwards ask for at run time. Best effort: on a kernel
// without Landlock it returns abi 0 and enforced false, without error.
func restrictFS(opts Options) (abi int, enforced bool, err error) {
	abi, err = ll.LandlockGetABIVersion()
	if err != nil || abi < 1 {
		return 0, false, nil
	}
	var rules []landlock.Rule
	if len(opts.ReadDirs) > 0 {
		rules = append(rules, landlock.PathAccess(readDirRights, opts.ReadDirs...))
	}
	var sockDirs []string
	for _, p := range opts.ConnectSockets {
		sockDirs = append(sockDirs, filepath.Dir(p))
	}
	if len(sockDirs) > 0 {
		rules = append(rules, landlock.PathAccess(connectRights, sockDirs...))
	}
	if len(opts.SocketDirs) > 0 {
		rules = append(rules, landlock.PathAccess(socketDirRights, opts.SocketDirs...))
	}
	cfg := landlock.Config{
		HandledAccessFS: landlock.V11.HandledAccessFS,
		Scoped:          landlock.V11.Scoped,
	}
	if err := cfg.BestEffort().Restrict(rules...); err != nil {
		return abi, false, fmt.Errorf("sandbox: landlock: %w", err)
	}
	return abi, true, nil
}
