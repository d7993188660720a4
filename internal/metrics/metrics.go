// Package metrics is vunet's counter registry. Each layer declares its
// counters once, as tagged atomic fields of a plain struct next to the code
// that increments them:
//
//	type Stats struct {
//		Malformed atomic.Uint64 `metric:"dns_malformed_total" help:"Malformed DNS queries." hostile:"dns"`
//		Active    atomic.Int64  `metric:"tftp_active_transfers" kind:"gauge" help:"TFTP transfers under way."`
//		Refused   atomic.Uint64 `metric:"forward_tcp_dial_failures_total{reason=refused}" help:"..."`
//	}
//
// The appliance registers each struct once (Registry.Register); GET
// /v1/stats, GET /metrics and `vunet stats` are all rendered from
// Registry.Snapshot, so a new field appears in all three with no other
// edit. Registration walks the struct by reflection once; a scrape only
// loads the atomics it kept pointers to, and an increment is the plain
// atomic add the layer always did: the data path never sees the registry.
package metrics

import (
	"fmt"
	"maps"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vunet/vunet/api"
)

// Prefix starts every metric name; tags leave it out.
const Prefix = "vunet_"

// Kinds of series, as in the Prometheus text format.
const (
	Counter = api.Counter // monotonic since start; the name ends in _total
	Gauge   = api.Gauge   // a current value
)

// Tag keys read from a registered struct's fields.
const (
	// TagMetric is the series: a name without Prefix and optional fixed
	// labels, "forward_drops_total{reason=broadcast}". "-" skips the field.
	TagMetric = "metric"
	// TagHelp is the family's help text; one field of a family must set
	// it, the others may repeat it or leave it out.
	TagHelp = "help"
	// TagKind is "gauge" for gauges; counters leave it out.
	TagKind = "kind"
	// TagHostile, when set, adds the series to vunet_hostile_input_total
	// with source=<value>: input from the guest or frontend that was
	// rejected as malformed.
	TagHostile = "hostile"
)

var (
	nameRE  = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	labelRE = regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
)

// Registry holds the declared series of every registered struct. It is
// created by the appliance and safe for concurrent use.
type Registry struct {
	mu     sync.Mutex
	series []series
	seen   map[string]bool    // name and labels, to refuse duplicates
	fams   map[string]*family // by full name
}

type family struct {
	name, help, kind string
}

type series struct {
	layer   string
	fam     *family
	labels  map[string]string
	hostile string
	load    func() int64
}

// New returns an empty registry.
func New() *Registry {
	return &Registry{seen: map[string]bool{}, fams: map[string]*family{}}
}

// Register adds every field of *set (a pointer to a struct of atomics) as
// series of layer (the section of `vunet stats`, the "layer" of each JSON
// entry). labels are constant name, value pairs added to every series of
// set: "queue", "0" for one virtqueue's counters, "guest", name when
// several guests share a registry. Every field must carry a metric tag
// (or metric:"-"), so that a counter cannot be declared and silently not
// exported. Errors are programming errors; the appliance fails to start.
func (r *Registry) Register(layer string, set any, labels ...string) error {
	v := reflect.ValueOf(set)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct || v.IsNil() {
		return fmt.Errorf("metrics: %s: Register wants a pointer to a struct, got %T", layer, set)
	}
	if len(labels)%2 != 0 {
		return fmt.Errorf("metrics: %s: labels must be name, value pairs", layer)
	}
	v = v.Elem()
	var add []series
	for i := range v.NumField() {
		f := v.Type().Field(i)
		s, ok, err := parseField(layer, f, v.Field(i))
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		for j := 0; j < len(labels); j += 2 {
			if !labelRE.MatchString(labels[j]) {
				return fmt.Errorf("metrics: %s: bad label name %q", layer, labels[j])
			}
			if _, dup := s.labels[labels[j]]; dup {
				return fmt.Errorf("metrics: %s.%s: label %q set twice", layer, f.Name, labels[j])
			}
			s.labels[labels[j]] = labels[j+1]
		}
		add = append(add, s)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	pending := map[string]bool{}
	for i, s := range add {
		key := seriesKey(s.fam.name, s.labels)
		if r.seen[key] || pending[key] {
			return fmt.Errorf("metrics: %s: series %s declared twice", layer, key)
		}
		pending[key] = true
		fam, ok := r.fams[s.fam.name]
		if !ok {
			// Families declared in this call are shared by its fields too.
			for _, p := range add[:i] {
				if p.fam.name == s.fam.name {
					fam, ok = p.fam, true
					break
				}
			}
		}
		if ok {
			if fam.kind != s.fam.kind {
				return fmt.Errorf("metrics: %s: %s is both a %s and a %s", layer, s.fam.name, fam.kind, s.fam.kind)
			}
			if s.fam.help != "" && fam.help != "" && s.fam.help != fam.help {
				return fmt.Errorf("metrics: %s: %s has two help texts", layer, s.fam.name)
			}
			if fam.help == "" {
				fam.help = s.fam.help
			}
			add[i].fam = fam
		}
	}
	for _, s := range add {
		if s.fam.help == "" {
			return fmt.Errorf("metrics: %s: %s has no help text", layer, s.fam.name)
		}
	}
	for _, s := range add {
		r.seen[seriesKey(s.fam.name, s.labels)] = true
		r.fams[s.fam.name] = s.fam
		r.series = append(r.series, s)
	}
	return nil
}

// MustRegister is Register for declarations known to be valid (tests).
func (r *Registry) MustRegister(layer string, set any, labels ...string) {
	if err := r.Register(layer, set, labels...); err != nil {
		panic(err)
	}
}

// parseField reads one field's tags; ok is false for metric:"-".
func parseField(layer string, f reflect.StructField, v reflect.Value) (s series, ok bool, err error) {
	where := layer + "." + f.Name
	tag, has := f.Tag.Lookup(TagMetric)
	if !has {
		return s, false, fmt.Errorf("metrics: %s has no %s tag (use %s:\"-\" to leave it out)", where, TagMetric, TagMetric)
	}
	if tag == "-" {
		return s, false, nil
	}
	if !f.IsExported() {
		return s, false, fmt.Errorf("metrics: %s must be exported", where)
	}
	name, labels, err := parseSeries(tag)
	if err != nil {
		return s, false, fmt.Errorf("metrics: %s: %w", where, err)
	}
	kind := Counter
	switch k := f.Tag.Get(TagKind); k {
	case "", Counter:
	case Gauge:
		kind = Gauge
	default:
		return s, false, fmt.Errorf("metrics: %s: kind %q, want gauge or counter", where, k)
	}
	if (kind == Counter) != strings.HasSuffix(name, "_total") {
		return s, false, fmt.Errorf("metrics: %s: %s: counters, and only counters, end in _total", where, name)
	}
	s = series{layer: layer, labels: labels, hostile: f.Tag.Get(TagHostile),
		fam: &family{name: Prefix + name, help: f.Tag.Get(TagHelp), kind: kind}}
	// A counter kept by a library (gVisor's *tcpip.StatCounter): read
	// through its Value method.
	if v.Kind() == reflect.Pointer {
		c, isCounter := v.Interface().(valuer)
		if !isCounter || kind != Counter || v.IsNil() {
			return s, false, fmt.Errorf("metrics: %s: a pointer field is a counter with a Value() uint64 method and must be set before Register", where)
		}
		s.load = func() int64 { return int64(min(c.Value(), math.MaxInt64)) }
		return s, true, nil
	}
	switch p := v.Addr().Interface().(type) {
	case *atomic.Uint64:
		s.load = func() int64 { return int64(min(p.Load(), math.MaxInt64)) }
	case *atomic.Int64:
		if kind == Counter {
			return s, false, fmt.Errorf("metrics: %s: a counter is an atomic.Uint64", where)
		}
		s.load = p.Load
	case *func() int64:
		// A gauge computed when read (a map's length under its lock):
		// the layer sets the function before the appliance registers it.
		if kind == Counter || *p == nil {
			return s, false, fmt.Errorf("metrics: %s: a func() int64 field is a gauge and must be set before Register", where)
		}
		s.load = *p
	default:
		return s, false, fmt.Errorf("metrics: %s: type %s, want atomic.Uint64, atomic.Int64, func() int64 or a pointer to a counter with Value() uint64", where, f.Type)
	}
	return s, true, nil
}

// valuer is a counter kept outside vunet, such as gVisor's
// *tcpip.StatCounter.
type valuer interface{ Value() uint64 }

// parseSeries splits "name{a=b,c=d}".
func parseSeries(tag string) (string, map[string]string, error) {
	labels := map[string]string{}
	name, rest, hasLabels := strings.Cut(tag, "{")
	if !nameRE.MatchString(name) {
		return "", nil, fmt.Errorf("bad metric name %q", name)
	}
	if !hasLabels {
		return name, labels, nil
	}
	body, ok := strings.CutSuffix(rest, "}")
	if !ok || body == "" {
		return "", nil, fmt.Errorf("%q: want name{label=value,...}", tag)
	}
	for _, kv := range strings.Split(body, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || !labelRE.MatchString(k) || val == "" {
			return "", nil, fmt.Errorf("%q: bad label %q", tag, kv)
		}
		if _, dup := labels[k]; dup {
			return "", nil, fmt.Errorf("%q: label %q twice", tag, k)
		}
		labels[k] = val
	}
	return name, labels, nil
}

func seriesKey(name string, labels map[string]string) string {
	var b strings.Builder
	b.WriteString(name)
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		b.WriteString("," + k + "=" + labels[k])
	}
	return b.String()
}

// Snapshot reads every series, in registration order. Values are read one
// at a time, so the snapshot is not atomic as a whole. The Labels maps are
// the registry's own: read them, do not modify them.
func (r *Registry) Snapshot() []api.Metric {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]api.Metric, len(r.series))
	for i, s := range r.series {
		out[i] = api.Metric{Layer: s.layer, Name: s.fam.name, Kind: s.fam.kind, Help: s.fam.help,
			Labels: s.labels, Hostile: s.hostile, Value: s.load()}
	}
	return out
}
