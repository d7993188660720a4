package qemutest

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cpioEntry is one entry decoded by readCPIO.
type cpioEntry struct {
	name         string
	mode         uint32
	nlink        uint32
	rmajor       uint32
	rminor       uint32
	data         []byte
	headerOffset int
}

// readCPIO is a strict newc reader for the tests: it checks the magic,
// alignment and trailer, which the kernel's unpacker also relies on.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off%4 != 0 {
			t.Fatalf("header at offset %d is not 4-byte aligned", off)
		}
		if len(b)-off < 110 {
			t.Fatalf("truncated header at offset %d", off)
		}
		h := b[off : off+110]
		if string(h[:6]) != "070701" {
			t.Fatalf("bad magic %q at offset %d", h[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("bad header field %d at offset %d: %v", i, off, err)
			}
			return uint32(v)
		}
		e := cpioEntry{mode: field(1), nlink: field(4), rmajor: field(9), rminor: field(10), headerOffset: off}
		if uid, gid := field(2), field(3); uid != 0 || gid != 0 {
			t.Errorf("entry at %d owned by %d:%d, want root", off, uid, gid)
		}
		size, namesize := int(field(6)), int(field(11))
		nameEnd := off + 110 + namesize
		if namesize == 0 || nameEnd > len(b) || b[nameEnd-1] != 0 {
			t.Fatalf("bad name at offset %d", off)
		}
		e.name = string(b[off+110 : nameEnd-1])
		dataOff := align(nameEnd)
		if dataOff+size > len(b) {
			t.Fatalf("truncated data for %q", e.name)
		}
		e.data = b[dataOff : dataOff+size]
		off = align(dataOff + size)
		if e.name == cpioTrailer {
			if rest := b[off:]; len(bytes.Trim(rest, "\x00")) != 0 {
				t.Fatalf("%d bytes of garbage after the trailer", len(rest))
			}
			return out
		}
		out = append(out, e)
	}
}

func TestCPIOWriterRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	// Names of every length mod 4 exercise the header padding; the data
	// lengths 0..3 exercise the data padding.
	steps := []func() error{
		func() error { return w.File("/test/run.sh", 0o755, []byte("echo hi\n")) },
		func() error { return w.File("a/b/c/x", 0o644, []byte("1")) },
		func() error { return w.File("a/b/c/xy", 0o600, []byte("12")) },
		func() error { return w.File("a/b/c/xyz", 0o644, []byte("123")) },
		func() error { return w.File("./a/empty", 0o644, nil) },
		func() error { return w.Dir("/a/b", 0o700) }, // already implied: no duplicate
		func() error { return w.Dir("opt", 0o1777) },
		func() error { return w.Symlink("usr/bin/tool", "/test/run.sh") },
		func() error { return w.CharDev("dev/console", 0o600, 5, 1) },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := w.File("late", 0o644, nil); err == nil {
		t.Fatal("File after Close succeeded")
	}

	var got []string
	for _, e := range readCPIO(t, buf.Bytes()) {
		s := fmt.Sprintf("%s %06o", e.name, e.mode)
		switch e.mode &^ 0o7777 {
		case modeTypeReg, modeTypeLink:
			s += " " + strconv.Quote(string(e.data))
		case modeTypeChar:
			s += fmt.Sprintf(" %d,%d", e.rmajor, e.rminor)
		}
		got = append(got, s)
	}
	want := []string{
		"test 040755",
		`test/run.sh 100755 "echo hi\n"`,
		"a 040755",
		"a/b 040755",
		"a/b/c 040755",
		`a/b/c/x 100644 "1"`,
		`a/b/c/xy 100600 "12"`,
		`a/b/c/xyz 100644 "123"`,
		`a/empty 100644 ""`,
		"opt 040777",
		"usr 040755",
		"usr/bin 040755",
		`usr/bin/tool 120777 "/test/run.sh"`,
		"dev 040755",
		"dev/console 020600 5,1",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// Cross-check with GNU cpio when present: it is an independent parser.
	if cpio, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command(cpio, "-t", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("cpio -t: %v\n%s", err, out)
		}
		var names []string
		for _, line := range want {
			names = append(names, strings.Fields(line)[0])
		}
		if strings.TrimSpace(string(out)) != strings.Join(names, "\n") {
			t.Errorf("cpio -t listed:\n%s\nwant:\n%s", out, strings.Join(names, "\n"))
		}
	} else {
		t.Log("cpio not installed; skipped the cross-check")
	}
}

func TestCPIOWriterSpecialModes(t *testing.T) {
	var buf bytes.Buffer
	w := NewCPIOWriter(&buf)
	if err := w.Dir("tmp", 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if err := w.File("bin/su", 0o755|os.ModeSetuid, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	e := readCPIO(t, buf.Bytes())
	if e[0].mode != 0o041777 || e[2].mode != 0o104755 {
		t.Errorf("modes %06o %06o, want 041777 104755", e[0].mode, e[2].mode)
	}
}

func TestCPIOWriterRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "/", ".", "../etc/passwd", "a/../../b", "TRAILER!!!"} {
		w := NewCPIOWriter(io.Discard)
		if err := w.File(name, 0o644, nil); err == nil {
			t.Errorf("File(%q) succeeded", name)
		}
	}
}

func TestCPIOWriterPropagatesWriteErrors(t *testing.T) {
	w := NewCPIOWriter(failingWriter{})
	if err := w.File("x", 0o644, []byte("data")); err == nil {
		t.Fatal("write error not reported")
	}
	if err := w.Close(); err == nil {
		t.Fatal("Close after a write error succeeded")
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, io.ErrShortWrite }

// TestWriteTestInitrd checks the concatenation the kernel sees: the base
// archive byte for byte, then a gzip cpio with the files and /test/run.sh.
func TestWriteTestInitrd(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.gz")
	baseBytes := []byte("\x1f\x8b pretend this is the base initramfs")
	if err := os.WriteFile(base, baseBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "out.gz")
	files := map[string][]byte{"/usr/bin/helper": []byte("\x7fELF..."), "/etc/extra.conf": []byte("k=v\n")}
	if err := writeTestInitrd(dst, base, "exit 7\n", files); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, baseBytes) {
		t.Fatal("output does not start with the base archive")
	}
	zr, err := gzip.NewReader(bytes.NewReader(b[len(baseBytes):]))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range readCPIO(t, raw) {
		if e.mode&^0o7777 == modeTypeReg {
			if e.mode&0o777 != 0o755 {
				t.Errorf("%s has mode %o, want 0755", e.name, e.mode&0o777)
			}
			got[e.name] = string(e.data)
		}
	}
	want := map[string]string{"usr/bin/helper": "\x7fELF...", "etc/extra.conf": "k=v\n", "test/run.sh": "exit 7\n"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("files %q, want %q", got, want)
	}
}
