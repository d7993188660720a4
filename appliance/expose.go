package appliance

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vunet/vunet/api"
	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/forward"
)

// Gateway ports exposed at run time (POST /v1/exposes, vunet expose add,
// a loaded device state): the same mapping as --expose, shared by every
// guest, and carried to the destination of a live migration.

// exposeToAPI converts a running expose, with the addresses guests
// connect to.
func (a *Appliance) exposeToAPI(e forward.Expose) api.Expose {
	gw := []netip.AddrPort{netip.AddrPortFrom(a.cfg.IPv4.Gateway, e.Port)}
	if a.cfg.IPv6.Enable {
		gw = append(gw, netip.AddrPortFrom(a.cfg.IPv6.Gateway, e.Port))
	}
	return api.Expose{Proto: "tcp", GatewayPort: e.Port, Path: e.Path, Gateway: gw}
}

// Exposes implements api.ExposeBackend: the exposes given at start-up and
// at run time, by port.
func (a *Appliance) Exposes() []api.Expose {
	var out []api.Expose
	for _, e := range a.Forward.Exposes() {
		out = append(out, a.exposeToAPI(e))
	}
	return out
}

// AddExpose implements api.ExposeBackend.
func (a *Appliance) AddExpose(e api.Expose) (api.Expose, error) {
	fe := forward.Expose{Port: e.GatewayPort, Path: filepath.Clean(e.Path)}
	if err := a.runtimeExposePath(fe); err != nil {
		return api.Expose{}, err
	}
	if err := a.checkExposeSocket(fe.Path); err != nil {
		return api.Expose{}, err
	}
	if err := a.Forward.AddExpose(fe); err != nil {
		return api.Expose{}, exposeError(fe, err)
	}
	a.runtime.setExpose(fe, true)
	return a.exposeToAPI(fe), nil
}

// exposeError gives forward.AddExpose's refusals their API kind and a way
// out.
func exposeError(e forward.Expose, err error) error {
	switch {
	case errors.Is(err, forward.ErrExposed):
		return api.Errorf(api.ErrConflict, "%w; remove it first (vunet expose remove tcp:%d)", err, e.Port)
	case errors.Is(err, forward.ErrGatewayPortInUse):
		return api.Errorf(api.ErrConflict, "%w; choose another gateway port", err)
	}
	return api.Errorf(api.ErrInvalid, "%w", err)
}

// RemoveExpose implements api.ExposeBackend: an expose given at start-up
// may be removed too (like a --forward). Connections already relayed to
// the socket stay open.
func (a *Appliance) RemoveExpose(e api.Expose) error {
	var cur forward.Expose
	ok := false
	for _, x := range a.Forward.Exposes() {
		if x.Port == e.GatewayPort {
			cur, ok = x, true
		}
	}
	switch {
	case !ok:
		return api.Errorf(api.ErrNotFound, "gateway port %d is not exposed", e.GatewayPort)
	case e.Path != "" && filepath.Clean(e.Path) != cur.Path:
		return api.Errorf(api.ErrNotFound, "gateway port %d is exposed to %s, not %s", e.GatewayPort, cur.Path, e.Path)
	}
	if _, err := a.Forward.RemoveExpose(e.GatewayPort); err != nil {
		return api.Errorf(api.ErrNotFound, "%w", err) // lost a race with another remove
	}
	a.runtime.setExpose(cur, false)
	return nil
}

// runtimeExposePath says whether vunet may connect to the socket path of
// an expose added at run time. Under the sandbox, Landlock (ABI 9 and
// later) lets vunet connect only to sockets in --unix-forward-dir and in
// the directories of the --expose and --connect sockets it was started
// with; the rule here is the same on every kernel, and leaves out
// --connect's directory, which is the VMM's: a socket directly in
// --unix-forward-dir, or directly in the directory of an --expose socket
// given at start-up. With --sandbox=off, anywhere.
func (a *Appliance) runtimeExposePath(e forward.Expose) error {
	path := e.Path
	if a.cfg.Sandbox == config.SandboxOff {
		return nil
	}
	if a.sockDir != nil && a.sockDir.Holds(path) {
		return nil
	}
	var dirs []string
	for _, e := range a.cfg.Expose {
		d := filepath.Dir(e.Path)
		if d == filepath.Dir(path) {
			return nil
		}
		if !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	var where []string
	if a.sockDir != nil {
		where = append(where, "--unix-forward-dir "+a.sockDir.Path())
	}
	if len(dirs) > 0 {
		where = append(where, "the directory of an --expose socket given at start-up ("+strings.Join(dirs, ", ")+")")
	}
	if len(where) == 0 {
		return api.Errorf(api.ErrInvalid, "an expose at run time needs a directory the sandbox lets vunet connect in, and vunet was started without --unix-forward-dir or --expose: restart it with --unix-forward-dir DIR and have the service listen on a socket directly in DIR, or give --expose %s at start-up (or run with --sandbox=off)", e)
	}
	return api.Errorf(api.ErrInvalid, "%s is not directly in %s: under the sandbox a runtime expose may only connect to a socket there (Landlock allows connecting nowhere else); have the service listen there, or give --expose %s at start-up (or run with --sandbox=off)", path, strings.Join(where, " or in "), e)
}

// checkExposeSocket refuses an expose that could never connect: PATH is
// something other than a socket, or vunet's user (after --runas) may not
// write to it. A socket that does not exist yet is fine: it is connected
// to per guest connection.
func (a *Appliance) checkExposeSocket(path string) error {
	stat := os.Stat
	if a.cfg.Sandbox != config.SandboxOff {
		// Landlock checks the socket a link points to, which is
		// outside the allowed directories as often as not.
		stat = os.Lstat
	}
	fi, err := stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return api.Errorf(api.ErrInvalid, "expose socket %s: %w", path, err)
	case fi.Mode()&fs.ModeSymlink != 0:
		return api.Errorf(api.ErrInvalid, "expose socket %s is a symbolic link: give the socket's own path (under the sandbox, the socket it points to must itself be in an allowed directory)", path)
	case fi.Mode()&fs.ModeSocket == 0:
		return api.Errorf(api.ErrInvalid, "expose socket %s is a %s, not a Unix socket", path, fileKind(fi.Mode()))
	}
	if err := unix.Access(path, unix.W_OK); err != nil {
		return api.Errorf(api.ErrInvalid, "expose socket %s: vunet (uid %d) may not connect to it (%v): give that user write permission on the socket", path, os.Getuid(), err)
	}
	return nil
}

// fileKind names a file's type for a message.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	}
	return fmt.Sprintf("file of type %v", m.Type())
}
