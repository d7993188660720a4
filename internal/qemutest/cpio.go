package qemutest

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"sort"
	"strings"
)

// Unix file type bits as stored in a cpio header's mode field.
const (
	modeTypeDir  = 0o040000
	modeTypeChar = 0o020000
	modeTypeReg  = 0o100000
	modeTypeLink = 0o120000
)

// cpioTrailer names the entry that ends an archive.
const cpioTrailer = "TRAILER!!!"

// CPIOWriter writes a "newc" (magic 070701) cpio archive, the format the
// Linux kernel unpacks as an initramfs. Only what an initramfs overlay needs
// is supported: directories, regular files, symlinks and character devices,
// all owned by root with a zero mtime so archives are reproducible.
//
// The kernel does not create missing parent directories while unpacking, so
// the writer emits a 0755 directory entry for every parent it has not written
// yet. Names are stored without a leading slash.
type CPIOWriter struct {
	w      io.Writer
	ino    uint32
	dirs   map[string]bool
	closed bool
	err    error // first write error; later calls return it
}

// NewCPIOWriter returns a writer that writes an archive to w. Call Close to
// write the trailer; Close does not close w.
func NewCPIOWriter(w io.Writer) *CPIOWriter {
	// Inode numbers only matter to the kernel for entries with nlink > 1
	// (hard links), which this writer never produces; starting high keeps
	// them visually distinct from those in the base archive when debugging.
	return &CPIOWriter{w: w, ino: 0x10000, dirs: map[string]bool{".": true}}
}

// Dir adds a directory.
func (c *CPIOWriter) Dir(name string, perm fs.FileMode) error {
	clean, err := c.prepare(name)
	if err != nil {
		return err
	}
	if c.dirs[clean] {
		return nil
	}
	c.dirs[clean] = true
	return c.entry(clean, modeTypeDir|unixPerm(perm), 2, 0, 0, nil)
}

// File adds a regular file with the given permission bits.
func (c *CPIOWriter) File(name string, perm fs.FileMode, data []byte) error {
	clean, err := c.prepare(name)
	if err != nil {
		return err
	}
	return c.entry(clean, modeTypeReg|unixPerm(perm), 1, 0, 0, data)
}

// Symlink adds a symbolic link name pointing at target.
func (c *CPIOWriter) Symlink(name, target string) error {
	clean, err := c.prepare(name)
	if err != nil {
		return err
	}
	if target == "" {
		return fmt.Errorf("cpio: symlink %q has an empty target", name)
	}
	return c.entry(clean, modeTypeLink|0o777, 1, 0, 0, []byte(target))
}

// CharDev adds a character device node (e.g. /dev/console is 5,1). Unlike
// mknod on the host this needs no privileges.
func (c *CPIOWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) error {
	clean, err := c.prepare(name)
	if err != nil {
		return err
	}
	return c.entry(clean, modeTypeChar|unixPerm(perm), 1, major, minor, nil)
}

// Close writes the trailer entry. It does not close the underlying writer.
func (c *CPIOWriter) Close() error {
	if c.closed {
		return c.err
	}
	if c.err == nil {
		c.err = c.header(cpioTrailer, 0, 1, 0, 0, 0)
	}
	c.closed = true
	return c.err
}

// prepare validates and normalises name and writes any missing parents.
func (c *CPIOWriter) prepare(name string) (string, error) {
	if c.err != nil {
		return "", c.err
	}
	if c.closed {
		return "", errors.New("cpio: write after Close")
	}
	// ".." is rejected rather than resolved: in an overlay it is always a
	// mistake, and resolving it could silently hit an unintended path.
	if slices.Contains(strings.Split(name, "/"), "..") {
		return "", fmt.Errorf("cpio: invalid name %q", name)
	}
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	if clean == "" {
		return "", fmt.Errorf("cpio: invalid name %q", name)
	}
	if clean == cpioTrailer {
		return "", fmt.Errorf("cpio: name %q is reserved", name)
	}
	if parent := path.Dir(clean); !c.dirs[parent] {
		if err := c.Dir(parent, 0o755); err != nil {
			return "", err
		}
	}
	return clean, nil
}

func (c *CPIOWriter) entry(name string, mode, nlink, rmajor, rminor uint32, data []byte) error {
	if uint64(len(data)) > 0xffffffff {
		return fmt.Errorf("cpio: %s is too large for newc (%d bytes)", name, len(data))
	}
	c.ino++
	if err := c.header(name, mode, nlink, uint32(len(data)), rmajor, rminor); err != nil {
		return err
	}
	if _, err := c.w.Write(data); err != nil {
		c.err = err
		return err
	}
	return c.pad(len(data))
}

// header writes a newc header: the magic, 13 eight-digit hex fields, then the
// NUL-terminated name padded so the data starts on a 4-byte boundary.
func (c *CPIOWriter) header(name string, mode, nlink, size, rmajor, rminor uint32) error {
	ino := c.ino
	if name == cpioTrailer {
		ino = 0
	}
	h := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%s\x00",
		ino, mode, 0 /* uid */, 0 /* gid */, nlink, 0 /* mtime */, size,
		0 /* devmajor */, 0 /* devminor */, rmajor, rminor, len(name)+1, 0 /* check */, name)
	if _, err := io.WriteString(c.w, h); err != nil {
		c.err = err
		return err
	}
	return c.pad(len(h))
}

func (c *CPIOWriter) pad(n int) error {
	if r := n % 4; r != 0 {
		if _, err := c.w.Write(make([]byte, 4-r)); err != nil {
			c.err = err
			return err
		}
	}
	return nil
}

// unixPerm converts the permission and special bits of an fs.FileMode to
// their Unix values (fs.FileMode keeps setuid/setgid/sticky elsewhere).
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}

// writeTestInitrd writes to dst a copy of the base initramfs followed by a
// gzip cpio holding files (all mode 0755, so scripts and helper binaries are
// executable) and, if script is not empty, /test/run.sh. The kernel unpacks
// concatenated gzip archives in order, later entries replacing earlier ones.
// (A plain cpio appended to a gzip one is not unpacked, hence gzip here too.)
func writeTestInitrd(dst, base, script string, files map[string][]byte) (err error) {
	in, err := os.Open(base)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	if _, err := io.Copy(out, in); err != nil {
		return fmt.Errorf("copying base initrd: %w", err)
	}

	bw := bufio.NewWriterSize(out, 1<<16)
	// BestSpeed: tests may inject multi-megabyte helper binaries and the
	// archive is used once, so compression time matters more than size.
	zw, err := gzip.NewWriterLevel(bw, gzip.BestSpeed)
	if err != nil {
		return err
	}
	cw := NewCPIOWriter(zw)
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if err := cw.File(name, 0o755, files[name]); err != nil {
			return err
		}
	}
	if script != "" {
		if err := cw.File("test/run.sh", 0o755, []byte(script)); err != nil {
			return err
		}
	}
	if err := cw.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

// WriteInitrd writes to dst the base initramfs plus script as
// /test/run.sh and files, as Guest.Start does, for guests another program
// boots (libvirt).
func WriteInitrd(dst, base, script string, files map[string][]byte) error {
	return writeTestInitrd(dst, base, script, files)
}
