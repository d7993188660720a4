package api

import (
	"net"

	"github.com/vunet/vunet/internal/unixsock"
)

// Listen creates the API socket at path with mode 0600, whatever the
// umask, replacing a stale socket file left by a crashed run but never a
// live socket, another kind of file or another user's socket (see
// unixsock.Listen). Closing the listener does not unlink the file; the
// caller removes it when done.
func Listen(path string) (*net.UnixListener, error) {
	return unixsock.Listen(path, unixsock.Options{Name: "api socket", GID: -1})
}
