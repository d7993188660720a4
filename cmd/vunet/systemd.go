package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/vunet/vunet/appliance"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/internal/systemd"
	"github.com/vunet/vunet/internal/unixsock"
)

// runAppliance is the production runFunc: appliance.Run plus the systemd
// integration, which tests of the command line must not pick up from
// their environment.
func runAppliance(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	if limit, ok := setMemoryLimit(cfg.MaxMemory); ok {
		log.Debug("go runtime soft memory limit", "bytes", limit)
	}
	a, err := appliance.New(cfg, log)
	if err != nil {
		return err
	}
	defer a.Close()
	if err := adoptSystemd(a, cfg, log); err != nil {
		return err
	}
	if cfg.Connect == "" && a.VHostListener == nil && cfg.Socket == unixsock.DefaultPath() {
		a.OnReady = func() { writeStartupHint(os.Stderr, cfg) }
	}
	if cfg.Sandbox == config.SandboxOff {
		log.Warn("sandbox off: vunet runs with the full authority of its user (--sandbox=off)")
		a.Sandbox.UID.Store(int64(os.Getuid()))
	} else {
		a.Confine = confine(a, cfg, log)
	}
	return a.Run(ctx)
}

// adoptSystemd hands a the socket systemd passed (socket activation) and a
// readiness notifier when NOTIFY_SOCKET is set. Both are no-ops outside
// systemd.
func adoptSystemd(a *appliance.Appliance, cfg *config.Config, log *slog.Logger) error {
	if systemd.Activated() {
		l, err := systemd.UnixListener()
		if err != nil {
			return err
		}
		addr := l.Addr().String()
		switch {
		case cfg.Connect != "":
			// In connect mode QEMU listens; a passed socket has no use.
			l.Close()
			log.Warn("ignoring the socket passed by systemd: --connect dials QEMU's socket", "passed", addr)
		default:
			if !samePath(addr, cfg.Socket) {
				log.Warn("the socket passed by systemd differs from --socket; using the passed one",
					"passed", addr, "socket", cfg.Socket)
			}
			log.Info("using the vhost-user socket passed by systemd", "socket", addr)
			a.VHostListener = l
		}
	}
	n, err := systemd.NewNotifier()
	if err != nil {
		log.Warn("not notifying systemd", "err", err)
		return nil
	}
	if n != nil {
		a.Notify = func(state string) {
			if err := n.Notify(state); err != nil {
				log.Warn("notifying systemd", "state", state, "err", err)
			}
		}
	}
	return nil
}

// samePath reports whether two socket paths name the same file, ignoring
// relative/absolute spelling.
func samePath(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == bb
}
