package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strconv"
	"time"
)

// Client timeouts. The server is a local process, so anything slower than
// this means it is wedged, and a CLI should say so rather than hang.
const (
	DialTimeout    = 2 * time.Second
	RequestTimeout = 10 * time.Second
)

// baseURL is a placeholder host: the transport always dials the socket.
const baseURL = "http://vunet"

// Client talks to a running vunet over its API socket. It is safe for
// concurrent use.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the API socket at path. Nothing is dialed
// until the first request.
func NewClient(path string) *Client {
	d := &net.Dialer{Timeout: DialTimeout}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns:          2,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: RequestTimeout,
	}
	return &Client{path: path, hc: &http.Client{Transport: tr, Timeout: RequestTimeout}}
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// UnreachableError means the API socket could not be reached at all (as
// opposed to the server refusing a request).
type UnreachableError struct {
	Path string
	Err  error
}

func (e *UnreachableError) Error() string {
	hint := "is vunet running with --api " + e.Path + "?"
	if errors.Is(e.Err, os.ErrPermission) {
		hint = "the API socket is only accessible to the user running vunet"
	}
	return fmt.Sprintf("cannot reach the vunet API at %s: %v (%s)", e.Path, e.Err, hint)
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// Health calls GET /v1/health.
func (c *Client) Health(ctx context.Context) (Health, error) {
	var h Health
	err := c.do(ctx, http.MethodGet, PathHealth, nil, &h)
	return h, err
}

// Stats calls GET /v1/stats.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := c.do(ctx, http.MethodGet, PathStats, nil, &st)
	return st, err
}

// Metrics calls GET /metrics and returns the exposition text.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	var b bytes.Buffer
	err := c.do(ctx, http.MethodGet, PathMetrics, nil, &b)
	return b.String(), err
}

// Forwards calls GET /v1/forwards.
func (c *Client) Forwards(ctx context.Context) ([]Forward, error) {
	var fs Forwards
	err := c.do(ctx, http.MethodGet, PathForwards, nil, &fs)
	return fs.Forwards, err
}

// Guests calls GET /v1/guests.
func (c *Client) Guests(ctx context.Context) ([]Guest, error) {
	var gs Guests
	err := c.do(ctx, http.MethodGet, PathGuests, nil, &gs)
	return gs.Guests, err
}

// AddForward calls POST /v1/forwards and returns the forward as started.
func (c *Client) AddForward(ctx context.Context, f Forward) (Forward, error) {
	f.Guest = netip.AddrPort{}
	body, err := json.Marshal(f)
	if err != nil {
		return Forward{}, fmt.Errorf("api: %w", err)
	}
	var got Forward
	err = c.do(ctx, http.MethodPost, PathForwards, body, &got)
	return got, err
}

// RemoveForward calls DELETE /v1/forwards for f.Proto and f.Host (f.Path
// for unix); a non-zero f.GuestPort must match the forward's.
func (c *Client) RemoveForward(ctx context.Context, f Forward) error {
	q := url.Values{"proto": {f.Proto}, "host": {f.Host.String()}}
	if f.Proto == "unix" {
		q = url.Values{"proto": {f.Proto}, "path": {f.Path}}
	}
	if f.GuestPort != 0 {
		q.Set("guest_port", strconv.Itoa(int(f.GuestPort)))
	}
	return c.do(ctx, http.MethodDelete, PathForwards+"?"+q.Encode(), nil, nil)
}

// Exposes calls GET /v1/exposes.
func (c *Client) Exposes(ctx context.Context) ([]Expose, error) {
	var es Exposes
	err := c.do(ctx, http.MethodGet, PathExposes, nil, &es)
	return es.Exposes, err
}

// AddExpose calls POST /v1/exposes and returns the expose as started.
func (c *Client) AddExpose(ctx context.Context, e Expose) (Expose, error) {
	body, err := json.Marshal(exposeRequest{Proto: e.Proto, GatewayPort: int64(e.GatewayPort), Path: e.Path})
	if err != nil {
		return Expose{}, fmt.Errorf("api: %w", err)
	}
	var got Expose
	err = c.do(ctx, http.MethodPost, PathExposes, body, &got)
	return got, err
}

// RemoveExpose calls DELETE /v1/exposes for e.GatewayPort; a non-empty
// e.Path must match the expose's.
func (c *Client) RemoveExpose(ctx context.Context, e Expose) error {
	q := url.Values{"gateway_port": {strconv.Itoa(int(e.GatewayPort))}}
	if e.Path != "" {
		q.Set("path", e.Path)
	}
	return c.do(ctx, http.MethodDelete, PathExposes+"?"+q.Encode(), nil, nil)
}

// SaveState calls GET /v1/state and returns the source's device state.
func (c *Client) SaveState(ctx context.Context) ([]byte, error) {
	var b bytes.Buffer
	err := c.do(ctx, http.MethodGet, PathState, nil, &b)
	return b.Bytes(), err
}

// LoadState calls POST /v1/state with a device state from SaveState.
func (c *Client) LoadState(ctx context.Context, state []byte) (StateSummary, error) {
	var sum StateSummary
	err := c.send(ctx, http.MethodPost, PathState, StateContentType, state, &sum)
	return sum, err
}

// do performs one request with a JSON body. out is a *bytes.Buffer for raw
// bytes, any other pointer for JSON, or nil to discard the body.
func (c *Client) do(ctx context.Context, method, path string, body []byte, out any) error {
	return c.send(ctx, method, path, "application/json", body, out)
}

// send is do with the body's content type.
func (c *Client) send(ctx context.Context, method, path, contentType string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, baseURL+path, rd)
	if err != nil {
		return fmt.Errorf("api: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.transportError(err)
	}
	defer resp.Body.Close()
	// Replies are small; the limit only guards against a wrong socket.
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("vunet API at %s: reading reply: %w", c.path, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(data, &eb) != nil || eb.Error == "" {
			eb.Error = fmt.Sprintf("vunet API at %s: %s", c.path, resp.Status)
		}
		return &StatusError{Status: resp.StatusCode, Message: eb.Error}
	}
	switch o := out.(type) {
	case nil:
	case *bytes.Buffer:
		o.Write(data)
	default:
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("vunet API at %s: bad reply to %s %s: %w", c.path, method, path, err)
		}
	}
	return nil
}

// transportError turns a failed round trip into a one-line message: the
// socket is missing or refused (UnreachableError), or the server is too
// slow.
func (c *Client) transportError(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return &UnreachableError{Path: c.path, Err: op.Err}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("vunet API at %s did not answer within %v", c.path, RequestTimeout)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return fmt.Errorf("vunet API at %s: %w", c.path, err)
}
