package pcap_test

import (
	"testing"

	"github.com/vunet/vunet/pcap"
)

// flushWriter makes sure everything written so far has reached the file
// before a test reads it back. Writer is synchronous today; a buffered or
// asynchronous one is flushed (or closed) here, whichever it offers.
func flushWriter(t *testing.T, w *pcap.Writer) {
	t.Helper()
	switch f := any(w).(type) {
	case interface{ Flush() error }:
		_ = f.Flush()
	case interface{ Close() error }:
		_ = f.Close()
	}
}
