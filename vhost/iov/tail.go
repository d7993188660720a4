package iov

// Tail is a cursor into a scatter-gather list: the bytes of V starting at
// byte offset Off. Headers are read and written through a Tail so that a
// header straddling two or more segments needs no special case.
type Tail struct {
	V   [][]byte
	Off int
}

// Size returns the number of bytes remaining after the cursor.
func (t *Tail) Size() int {
	return Size(t.V) - t.Off
}

// Skip advances the cursor by n bytes. It reports false, leaving the cursor
// unchanged, if fewer than n bytes remain.
func (t *Tail) Skip(n int) bool {
	if n < 0 || n > t.Size() {
		return false
	}
	t.Off += n
	return true
}

// Peek returns the next n bytes without advancing. When they lie in one
// segment it returns a view into that segment (no copy); otherwise it copies
// them into scratch, which must hold n bytes, and returns scratch[:n]. It
// returns nil if fewer than n bytes remain.
func (t *Tail) Peek(n int, scratch []byte) []byte {
	if n < 0 || n > t.Size() {
		return nil
	}
	i, o := locate(t.V, t.Off)
	if i < len(t.V) && len(t.V[i])-o >= n {
		return t.V[i][o : o+n]
	}
	if len(scratch) < n {
		return nil
	}
	CopyTo(scratch[:n], t.V, t.Off)
	return scratch[:n]
}

// Remove is Peek followed by Skip(n).
func (t *Tail) Remove(n int, scratch []byte) []byte {
	b := t.Peek(n, scratch)
	if b != nil {
		t.Off += n
	}
	return b
}

// Write copies b to the cursor position and advances past it. It reports
// false, writing nothing, if fewer than len(b) bytes remain.
func (t *Tail) Write(b []byte) bool {
	if len(b) > t.Size() {
		return false
	}
	CopyFrom(t.V, t.Off, b)
	t.Off += len(b)
	return true
}

// Read copies the next len(b) bytes into b and advances past them. It
// reports false, reading nothing, if fewer than len(b) bytes remain.
func (t *Tail) Read(b []byte) bool {
	if len(b) > t.Size() {
		return false
	}
	CopyTo(b, t.V, t.Off)
	t.Off += len(b)
	return true
}
