package main

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/sandbox"
)

// confine returns the appliance's Confine hook (not used with the sandbox
// off): apply the sandbox cfg asks for, then check that what vunet still needs from the filesystem is
// reachable with the credentials it now has, so that a TFTP root or a
// --connect socket only root may reach fails at start-up with the reason
// rather than at the first transfer or dial.
func confine(a *appliance.Appliance, cfg *config.Config, log *slog.Logger) func() error {
	return func() error {
		mode := sandbox.On
		if cfg.Sandbox == config.SandboxLog {
			mode = sandbox.Log
		}
		opts := sandbox.Options{Mode: mode, RunAs: cfg.RunAs, KeepNetAdmin: cfg.MigrateTCP}
		if cfg.Boot.TFTPRoot != "" {
			opts.ReadDirs = append(opts.ReadDirs, cfg.Boot.TFTPRoot)
		}
		if cfg.Connect != "" {
			opts.ConnectSockets = append(opts.ConnectSockets, cfg.Connect)
		}
		// Exposed sockets are dialed for every guest connection.
		for _, e := range cfg.Expose {
			opts.ConnectSockets = append(opts.ConnectSockets, e.Path)
		}
		if cfg.UnixForwardDir != "" {
			// Runtime unix forwards and exposes (appliance.New has
			// made the directory).
			opts.SocketDirs = append(opts.SocketDirs, cfg.UnixForwardDir)
		}
		st, err := sandbox.Apply(opts)
		a.Sandbox.Set(st)
		if err != nil {
			return err
		}
		logSandbox(log, st)
		if a.TFTP != nil {
			if err := a.TFTP.CheckAccess(bootFiles(cfg)...); err != nil {
				return fmt.Errorf("%w: %s", err, unreachable(st, "--tftp-root"))
			}
		}
		if cfg.Connect != "" {
			if err := checkConnectable(cfg.Connect); err != nil {
				return fmt.Errorf("--connect %s: %w: %s", cfg.Connect, err, unreachable(st, "--connect"))
			}
		}
		return nil
	}
}

// logSandbox reports what the sandbox enforces, once, at start-up.
func logSandbox(log *slog.Logger, st sandbox.Status) {
	attrs := []any{"mode", st.Mode.String(), "no_new_privs", st.NoNewPrivs,
		"seccomp_syscalls", st.Syscalls, "landlock_abi", st.LandlockABI, "uid", st.UID, "gid", st.GID}
	if st.DroppedTo != "" {
		attrs = append(attrs, "runas", st.DroppedTo)
	}
	if len(st.Namespaces) > 0 {
		attrs = append(attrs, "namespaces", st.Namespaces)
	}
	log.Info("sandbox applied", attrs...)
	if !st.Landlock {
		log.Warn("Landlock is not available on this kernel: the filesystem is not restricted (the seccomp filter and the other layers are in force)")
	}
	if st.Mode == sandbox.Log {
		log.Warn("sandbox in log mode: system calls outside the allow-list are allowed and logged by the kernel (dmesg or the audit log, type=1326)")
	}
}

// bootFiles are the TFTP files DHCP names, which must be readable.
func bootFiles(cfg *config.Config) []string {
	var names []string
	for _, n := range []string{cfg.Boot.BootFile, cfg.Boot.BootFileEFI} {
		if n != "" {
			names = append(names, n)
		}
	}
	return names
}

// checkConnectable checks, with the current credentials, what connect(2)
// to a Unix socket path needs: search permission on its directory and,
// once the socket exists, write permission on it. access(2) is not subject
// to Landlock, so this is the permission check alone.
func checkConnectable(path string) error {
	if err := unix.Access(filepath.Dir(path), unix.X_OK); err != nil {
		return &fs.PathError{Op: "search", Path: filepath.Dir(path), Err: err}
	}
	err := unix.Access(path, unix.W_OK)
	if errors.Is(err, unix.ENOENT) {
		return nil // the frontend has not created it yet
	}
	if err != nil {
		return &fs.PathError{Op: "connect", Path: path, Err: err}
	}
	return nil
}

// unreachable explains a permission failure after the sandbox.
func unreachable(st sandbox.Status, flag string) string {
	if st.DroppedTo != "" {
		return fmt.Sprintf("vunet switched from root to %s (uid %d), which may not reach it; make it readable for that user, choose another one with --runas, or use --sandbox=off", st.DroppedTo, st.UID)
	}
	return fmt.Sprintf("vunet (uid %d) may not reach it; check the permissions of %s", os.Getuid(), flag)
}
