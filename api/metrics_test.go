package api

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var (
	metricName = `[a-zA-Z_:][a-zA-Z0-9_:]*`
	labelPair  = `[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"`
	helpLine   = regexp.MustCompile(`^# HELP (` + metricName + `) (?:[^\\\n]|\\[\\n])*$`)
	typeLine   = regexp.MustCompile(`^# TYPE (` + metricName + `) (counter|gauge|histogram|summary|untyped)$`)
	sampleLine = regexp.MustCompile(`^(` + metricName + `)(\{(?:` + labelPair + `)(?:,` + labelPair + `)*\})? (\S+)$`)
)

// checkExposition validates text against the Prometheus text format 0.0.4
// as vunet uses it: every line is a HELP, TYPE or sample line; each family
// has HELP then TYPE before its samples and appears once; counters end in
// _total; series are unique; values parse.
func checkExposition(t *testing.T, text string) map[string]string {
	t.Helper()
	fams, problems := lintExposition(text)
	for _, p := range problems {
		t.Error(p)
	}
	return fams
}

func lintExposition(text string) (families map[string]string, problems []string) {
	errorf := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	if !strings.HasSuffix(text, "\n") {
		errorf("exposition does not end with a newline")
	}
	families = map[string]string{}
	series := map[string]bool{}
	var cur string
	var help bool
	for n, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		n++
		switch {
		case helpLine.MatchString(line):
			name := helpLine.FindStringSubmatch(line)[1]
			if _, dup := families[name]; dup {
				errorf("line %d: family %s repeated", n, name)
			}
			families[name], cur, help = "", name, true
		case typeLine.MatchString(line):
			m := typeLine.FindStringSubmatch(line)
			if m[1] != cur || !help || families[cur] != "" {
				errorf("line %d: TYPE %s not right after its HELP", n, m[1])
			}
			families[m[1]] = m[2]
			if m[2] == "counter" && !strings.HasSuffix(m[1], "_total") {
				errorf("line %d: counter %s does not end in _total", n, m[1])
			}
		case sampleLine.MatchString(line):
			m := sampleLine.FindStringSubmatch(line)
			if m[1] != cur || families[cur] == "" {
				errorf("line %d: sample of %s outside its family (current %q)", n, m[1], cur)
			}
			if _, err := strconv.ParseFloat(m[3], 64); err != nil {
				errorf("line %d: value %q: %v", n, m[3], err)
			}
			if key := m[1] + m[2]; series[key] {
				errorf("line %d: series %s repeated", n, key)
			} else {
				series[key] = true
			}
		default:
			errorf("line %d: not a valid exposition line: %q", n, line)
		}
	}
	return families, problems
}

func TestMetricsFormat(t *testing.T) {
	var b strings.Builder
	if err := WriteMetrics(&b, sampleStats()); err != nil {
		t.Fatal(err)
	}
	text := b.String()
	fams := checkExposition(t, text)
	for _, want := range []string{
		`vunet_build_info{version="v1.0 \"quoted\" \\ back"} 1`,
		`# HELP vunet_link_frames_total Help for vunet_link_frames_total with \\ and\na newline.`,
		`# TYPE vunet_link_frames_total counter`,
		`vunet_link_frames_total{direction="from_guest",queue="1"} 1152921504606846976`,
		`vunet_link_frames_total{direction="to_guest",queue="2"} 7`,
		`vunet_link_drops_total{reason="tx_short"} 3`,
		`# TYPE vunet_flows gauge`,
		`vunet_flows{proto="icmp"} 14`,
		`vunet_link_rx_backlog 6`,
		`vunet_dns_queries_total{transport="udp"} 9223372036854775807`,
		`vunet_hostile_input_total{source="virtqueue"} 3`,
		`vunet_hostile_input_total{source="link"} 8`,
		`vunet_start_time_seconds 1767323045.5`,
	} {
		if !strings.Contains(text, want+"\n") {
			t.Errorf("metrics lack %q:\n%s", want, text)
		}
	}
	if fams["vunet_flows"] != "gauge" || fams["vunet_dns_queries_total"] != "counter" || fams["vunet_hostile_input_total"] != "counter" {
		t.Errorf("types: %v", fams)
	}

	// An empty snapshot is valid too, without a rollup of nothing.
	b.Reset()
	WriteMetrics(&b, Stats{})
	if fams := checkExposition(t, b.String()); fams["vunet_hostile_input_total"] != "" {
		t.Errorf("empty snapshot: %v", fams)
	}
}

// TestCheckExposition makes sure the checker itself rejects what it should.
func TestCheckExposition(t *testing.T) {
	bad := []string{
		"x 1\n",                                  // sample before HELP/TYPE
		"# HELP x h\n# TYPE x counter\nx 1\n",    // counter without _total
		"# HELP x h\n# TYPE x gauge\nx{a=b} 1\n", // unquoted label
		"# HELP x h\n# TYPE x gauge\nx one\n",    // bad value
		"# HELP x h\n# TYPE x gauge\nx 1\nx 2\n",
		"# HELP x h\n# TYPE x gauge\n# HELP x h\n# TYPE x gauge\n",
	}
	for _, text := range bad {
		if _, problems := lintExposition(text); len(problems) == 0 {
			t.Errorf("checker accepted %q", text)
		}
	}
}
