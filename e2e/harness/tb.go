package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"testing"
)

// TB lets a program outside `go test` (the demo) use helpers written for
// tests, such as qemutest.Guest.Start, which take a testing.TB. It
// implements the methods those helpers call; the embedded (nil) testing.TB
// only supplies testing.TB's unexported method, so calling anything not
// implemented here panics rather than misbehaving silently.
//
// Fatal, FailNow and Skip end the calling goroutine (runtime.Goexit), so
// the code must run under RunTB.
type TB struct {
	testing.TB

	name     string
	log      io.Writer
	ctx      context.Context
	cancel   context.CancelFunc
	mu       sync.Mutex
	failed   bool
	skipped  bool
	cleanups []func()
}

// RunTB runs fn in a new goroutine with a TB named name that logs to log,
// waits for it (including a Fatal or Skip), runs the registered cleanups in
// reverse order and reports how it ended.
func RunTB(name string, log io.Writer, fn func(tb *TB)) (failed, skipped bool) {
	tb := &TB{name: name, log: log}
	tb.ctx, tb.cancel = context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(tb)
	}()
	<-done
	tb.cancel()
	for {
		tb.mu.Lock()
		n := len(tb.cleanups)
		if n == 0 {
			tb.mu.Unlock()
			break
		}
		f := tb.cleanups[n-1]
		tb.cleanups = tb.cleanups[:n-1]
		tb.mu.Unlock()
		f()
	}
	return tb.Failed(), tb.Skipped()
}

func (tb *TB) Helper()      {}
func (tb *TB) Name() string { return tb.name }

func (tb *TB) Context() context.Context { return tb.ctx }

func (tb *TB) Log(args ...any) { fmt.Fprintln(tb.log, args...) }
func (tb *TB) Logf(format string, args ...any) {
	fmt.Fprintf(tb.log, format+"\n", args...)
}

func (tb *TB) Fail() {
	tb.mu.Lock()
	tb.failed = true
	tb.mu.Unlock()
}

func (tb *TB) Failed() bool {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return tb.failed
}

func (tb *TB) FailNow() {
	tb.Fail()
	runtime.Goexit()
}

func (tb *TB) Error(args ...any)                 { tb.Log(args...); tb.Fail() }
func (tb *TB) Errorf(format string, args ...any) { tb.Logf(format, args...); tb.Fail() }
func (tb *TB) Fatal(args ...any)                 { tb.Log(args...); tb.FailNow() }
func (tb *TB) Fatalf(format string, args ...any) { tb.Logf(format, args...); tb.FailNow() }

func (tb *TB) SkipNow() {
	tb.mu.Lock()
	tb.skipped = true
	tb.mu.Unlock()
	runtime.Goexit()
}

func (tb *TB) Skip(args ...any)                 { tb.Log(args...); tb.SkipNow() }
func (tb *TB) Skipf(format string, args ...any) { tb.Logf(format, args...); tb.SkipNow() }

func (tb *TB) Skipped() bool {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return tb.skipped
}

func (tb *TB) Cleanup(f func()) {
	tb.mu.Lock()
	tb.cleanups = append(tb.cleanups, f)
	tb.mu.Unlock()
}

func (tb *TB) TempDir() string {
	dir, err := os.MkdirTemp("", "vunet-demo")
	if err != nil {
		tb.Fatalf("TempDir: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (tb *TB) Setenv(key, value string) {
	old, had := os.LookupEnv(key)
	os.Setenv(key, value)
	tb.Cleanup(func() {
		if had {
			os.Setenv(key, old)
		} else {
			os.Unsetenv(key)
		}
	})
}
