package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/vunet/vunet/devstate"
)

// Backend is what the API serves; the appliance implements it. Methods are
// called concurrently from request goroutines.
type Backend interface {
	// Health reports liveness; it must be cheap.
	Health() Health
	// Stats returns a snapshot of every counter.
	Stats() Stats
	// Forwards lists the active port forwards.
	Forwards() []Forward
	// AddForward starts a port forward and returns it as started (the
	// kernel's port filled in for port 0, Guest set). Errors wrap
	// ErrInvalid or ErrConflict to choose the status.
	AddForward(Forward) (Forward, error)
	// RemoveForward stops the forward on f.Proto and f.Host; if
	// f.GuestPort is not 0 it must match. Errors wrap ErrNotFound or
	// ErrInvalid.
	RemoveForward(Forward) error
}

// StateBackend is implemented by a Backend that can hand its device state
// to another vunet, for live migration with frontends that do not transfer
// back-end state themselves (docs/migration.md).
type StateBackend interface {
	// SaveState returns the device state (devstate's format).
	SaveState() ([]byte, error)
	// LoadState applies a device state from the source vunet. Errors
	// wrap ErrInvalid for a state that does not decode.
	LoadState([]byte) (StateSummary, error)
}

// ExposeBackend is implemented by a Backend that maps gateway ports to
// host Unix sockets at run time (/v1/exposes).
type ExposeBackend interface {
	// Exposes lists the exposed gateway ports, by port.
	Exposes() []Expose
	// AddExpose exposes e.GatewayPort and returns it as started
	// (Gateway set). Errors wrap ErrInvalid or ErrConflict.
	AddExpose(Expose) (Expose, error)
	// RemoveExpose ends the mapping on e.GatewayPort; if e.Path is not
	// empty it must match. Errors wrap ErrNotFound.
	RemoveExpose(Expose) error
}

// GuestsBackend is implemented by a Backend that lists its guests
// (GET /v1/guests).
type GuestsBackend interface {
	// GuestList returns the connected guests by port.
	GuestList() []Guest
}

// Routes.
const (
	PathGuests   = "/v1/guests"
	PathHealth   = "/v1/health"
	PathStats    = "/v1/stats"
	PathForwards = "/v1/forwards"
	PathExposes  = "/v1/exposes"
	PathState    = "/v1/state"
	PathMetrics  = "/metrics"
)

// StateContentType is the media type of a device state.
const StateContentType = "application/vnd.vunet.device-state"

// MetricsContentType is the Prometheus text exposition format.
const MetricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// maxBody bounds request bodies: a Forward is under 200 bytes, and the
// API must not buffer whatever a confused client sends.
const maxBody = 64 << 10

// errMethod selects 405; only the server produces it.
var errMethod = errors.New("method not allowed")

// Server is the API's http.Handler.
type Server struct {
	b   Backend
	log *slog.Logger
	mux *http.ServeMux
}

// NewServer returns the handler for b. log may be nil.
func NewServer(b Backend, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{b: b, log: log, mux: http.NewServeMux()}
	s.mux.HandleFunc("GET "+PathHealth, s.health)
	s.mux.HandleFunc("GET "+PathStats, s.stats)
	s.mux.HandleFunc("GET "+PathMetrics, s.metrics)
	s.mux.HandleFunc("GET "+PathForwards, s.listForwards)
	s.mux.HandleFunc("POST "+PathForwards, s.addForward)
	s.mux.HandleFunc("DELETE "+PathForwards, s.removeForward)
	allow := map[string]string{PathHealth: "GET", PathStats: "GET", PathMetrics: "GET", PathForwards: "GET, POST, DELETE"}
	if sb, ok := b.(StateBackend); ok {
		s.mux.HandleFunc("GET "+PathState, func(w http.ResponseWriter, r *http.Request) { s.saveState(w, r, sb) })
		s.mux.HandleFunc("POST "+PathState, func(w http.ResponseWriter, r *http.Request) { s.loadState(w, r, sb) })
		allow[PathState] = "GET, POST"
	}
	if eb, ok := b.(ExposeBackend); ok {
		s.mux.HandleFunc("GET "+PathExposes, func(w http.ResponseWriter, r *http.Request) {
			es := eb.Exposes()
			if es == nil {
				es = []Expose{} // "[]", not "null"
			}
			s.reply(w, r, http.StatusOK, Exposes{Exposes: es})
		})
		s.mux.HandleFunc("POST "+PathExposes, func(w http.ResponseWriter, r *http.Request) { s.addExpose(w, r, eb) })
		s.mux.HandleFunc("DELETE "+PathExposes, func(w http.ResponseWriter, r *http.Request) { s.removeExpose(w, r, eb) })
		allow[PathExposes] = "GET, POST, DELETE"
	}
	if gb, ok := b.(GuestsBackend); ok {
		s.mux.HandleFunc("GET "+PathGuests, func(w http.ResponseWriter, r *http.Request) {
			gs := gb.GuestList()
			if gs == nil {
				gs = []Guest{} // "[]", not "null"
			}
			s.reply(w, r, http.StatusOK, Guests{Guests: gs})
		})
		allow[PathGuests] = "GET"
	}
	// Everything else gets a JSON error too, 405 for a known path (which
	// the method patterns above would give, were "/" not registered).
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if methods, ok := allow[r.URL.Path]; ok {
			w.Header().Set("Allow", methods)
			s.fail(w, r, Errorf(errMethod, "%s %s: method not allowed (allowed: %s)", r.Method, r.URL.Path, methods))
			return
		}
		s.fail(w, r, Errorf(ErrNotFound, "no route %s %s", r.Method, r.URL.Path))
	})
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Serve serves HTTP on l until ctx is done, then shuts down, giving
// requests in flight a moment to finish. It closes l.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{
		Handler: s,
		// The peer is a local process, but a stuck one must not hold a
		// goroutine forever.
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
	})
	defer stop()
	err := srv.Serve(l)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("api: %w", err)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	s.reply(w, r, http.StatusOK, s.b.Health())
}

func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	s.reply(w, r, http.StatusOK, s.b.Stats())
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", MetricsContentType)
	w.Header().Set("Cache-Control", "no-store")
	if err := WriteMetrics(w, s.b.Stats()); err != nil {
		s.log.Debug("api: writing metrics", "err", err)
	}
}

func (s *Server) listForwards(w http.ResponseWriter, r *http.Request) {
	fs := s.b.Forwards()
	if fs == nil {
		fs = []Forward{} // "[]", not "null"
	}
	s.reply(w, r, http.StatusOK, Forwards{Forwards: fs})
}

func (s *Server) addForward(w http.ResponseWriter, r *http.Request) {
	var f Forward
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		s.fail(w, r, Errorf(ErrInvalid, "request body: %v", err))
		return
	}
	if err := f.validate(true); err != nil {
		s.fail(w, r, err)
		return
	}
	f.Guest = netip.AddrPort{}
	got, err := s.b.AddForward(f)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Debug("api: port forward added", "forward", got.String())
	s.reply(w, r, http.StatusCreated, got)
}

// removeForward takes the forward from the query string (proto, host or,
// for unix, path, and optionally guest_port): DELETE bodies are ignored by some clients and
// proxies, and the query keeps `curl -X DELETE` usable.
func (s *Server) removeForward(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := Forward{Proto: q.Get("proto")}
	var err error
	if f.Proto == "unix" {
		f.Path = q.Get("path")
	} else if f.Host, err = netip.ParseAddrPort(q.Get("host")); err != nil {
		s.fail(w, r, Errorf(ErrInvalid, "host %q: expected IP:PORT (IPv6 in brackets)", q.Get("host")))
		return
	}
	if gp := q.Get("guest_port"); gp != "" {
		n, err := strconv.ParseUint(gp, 10, 16)
		if err != nil || n == 0 {
			s.fail(w, r, Errorf(ErrInvalid, "guest_port %q: expected 1..65535", gp))
			return
		}
		f.GuestPort = uint16(n)
	}
	if err := f.validate(false); err != nil {
		s.fail(w, r, err)
		return
	}
	if err := s.b.RemoveForward(f); err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Debug("api: port forward removed", "forward", f.String())
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) addExpose(w http.ResponseWriter, r *http.Request, eb ExposeBackend) {
	var req exposeRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		s.fail(w, r, Errorf(ErrInvalid, "request body: %v", err))
		return
	}
	e, err := req.validate(true)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	got, err := eb.AddExpose(e)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Debug("api: gateway port exposed", "expose", got.String())
	s.reply(w, r, http.StatusCreated, got)
}

// removeExpose takes the expose from the query string (gateway_port, and
// optionally proto and path), as removeForward does.
func (s *Server) removeExpose(w http.ResponseWriter, r *http.Request, eb ExposeBackend) {
	q := r.URL.Query()
	req := exposeRequest{Proto: q.Get("proto"), Path: q.Get("path")}
	gp := q.Get("gateway_port")
	n, err := strconv.ParseInt(gp, 10, 64)
	if err != nil {
		s.fail(w, r, Errorf(ErrInvalid, "gateway_port %q: expected 1..65535", gp))
		return
	}
	req.GatewayPort = n
	e, err := req.validate(false)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if err := eb.RemoveExpose(e); err != nil {
		s.fail(w, r, err)
		return
	}
	s.log.Debug("api: gateway port no longer exposed", "gateway_port", e.GatewayPort)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) saveState(w http.ResponseWriter, r *http.Request, sb StateBackend) {
	b, err := sb.SaveState()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", StateContentType)
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	if _, err := w.Write(b); err != nil {
		s.log.Debug("api: writing device state", "err", err)
	}
}

// loadState reads at most devstate.MaxSize bytes: a larger body is refused
// before it is buffered.
func (s *Server) loadState(w http.ResponseWriter, r *http.Request, sb StateBackend) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, devstate.MaxSize))
	if err != nil {
		s.fail(w, r, Errorf(ErrInvalid, "device state body: %v", err))
		return
	}
	sum, err := sb.LoadState(b)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, r, http.StatusOK, sum)
}

// reply writes v as JSON with status.
func (s *Server) reply(w http.ResponseWriter, r *http.Request, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		s.fail(w, r, fmt.Errorf("encoding reply: %w", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if _, err := w.Write(append(b, '\n')); err != nil {
		s.log.Debug("api: writing reply", "path", r.URL.Path, "err", err)
	}
}

// fail writes err as an ErrorBody, choosing the status from the sentinel
// it wraps.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	status := StatusOf(err)
	if status >= 500 {
		s.log.Warn("api: request failed", "method", r.Method, "path", r.URL.Path, "err", err)
	} else {
		s.log.Debug("api: request refused", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	b, _ := json.Marshal(ErrorBody{Error: err.Error()})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

// StatusOf returns the HTTP status for a Backend error.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrConflict):
		return http.StatusConflict
	case errors.Is(err, errMethod):
		return http.StatusMethodNotAllowed
	}
	return http.StatusInternalServerError
}
