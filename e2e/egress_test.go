package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
	"github.com/vunet/vunet/internal/vunettest"
)

// Addresses the egress test gives the test namespace (on a dummy interface
// it creates): the cloud metadata addresses and two "host addresses", the
// second added only after vunet has started.
const (
	meta4     = "169.254.169.254"
	meta6     = "fd00:ec2::254"
	hostAddr  = "192.0.2.10"
	hostAddr2 = "192.0.2.11"
)

// TestLinuxGuestEgress checks the egress policy (docs/security.md) from a
// real guest, one boot per vunet configuration:
//
//   - defaults: the metadata addresses (v4 and v6) are denied at once, TCP
//     with "administratively prohibited"; a host address and the gateway
//     alias are reachable (TCP, ping, UDP DNS to a server on the host
//     address);
//   - --allow-metadata --deny tcp:HOST:80: metadata reachable, the host
//     service that was reachable before is denied;
//   - --no-host-addresses: both host addresses denied (the second one was
//     added after vunet started: the set follows the kernel's
//     notifications), the gateway alias to the host's loopback still works;
//   - --egress none: DNS through vunet's resolver and the gateway alias work,
//     and nothing else does (TCP, ping, UDP).
func TestLinuxGuestEgress(t *testing.T) {
	e := setup(t)
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	// On a dummy interface where the kernel has the module, else on lo
	// (the namespace's own; the test removes its addresses again).
	dev := fmt.Sprintf("vegress%d", os.Getpid()%10000)
	if exec.Command("ip", "link", "add", dev, "type", "dummy").Run() == nil {
		t.Cleanup(func() { exec.Command("ip", "link", "del", dev).Run() })
		sh("ip", "link", "set", dev, "up")
	} else {
		dev = "lo"
	}
	addAddr := func(a string) {
		t.Helper()
		args := []string{"ip", "addr", "add", a, "dev", dev}
		if strings.Contains(a, ":") {
			args = append(args, "nodad")
		}
		sh(args...)
		t.Cleanup(func() { exec.Command("ip", "addr", "del", a, "dev", dev).Run() })
	}
	addAddr(meta4 + "/32")
	addAddr(meta6 + "/128")
	addAddr(hostAddr + "/32")
	for _, a := range []string{meta4, "[" + meta6 + "]", hostAddr} {
		serveText(t, a+":80", "egress-"+strings.Trim(a, "[]"))
	}
	serveDNS(t, hostAddr+":53")
	// Let vunet forward pings through host ping sockets.
	const pingRange = "/proc/sys/net/ipv4/ping_group_range"
	if old, err := os.ReadFile(pingRange); err == nil {
		t.Cleanup(func() { os.WriteFile(pingRange, old, 0o644) })
	}
	if err := os.WriteFile(pingRange, []byte("0 2147483647"), 0o644); err != nil {
		t.Fatalf("allowing ping sockets: %v", err)
	}

	url := func(addr string) string {
		if strings.Contains(addr, ":") {
			addr = "[" + addr + "]"
		}
		return "http://" + addr + "/"
	}
	hello4 := fmt.Sprintf("http://%s:%d/hello", harness.Gateway4, e.http.Port4)
	hello6 := fmt.Sprintf("http://[%s]:%d/hello", harness.Gateway6, e.http.Port6)
	hello := strings.TrimSuffix(harness.HelloText, "\n")
	dnsName := strings.TrimSuffix(harness.DNSName, ".")

	for _, tc := range []struct {
		name  string
		args  []string
		after func(t *testing.T) // once vunet is serving, before the guest boots
		steps []string
		log   []string // vunet log lines that must appear
	}{
		{
			name: "defaults",
			steps: []string{
				harness.StepFetchDenied("meta4-denied", url(meta4)),
				harness.StepIPv6(e.http.Port6),
				harness.StepFetchDenied("meta6-denied", url(meta6)),
				harness.StepFetch("host-allowed", url(hostAddr), "egress-"+hostAddr),
				harness.StepPingTo("host-ping", hostAddr, true),
				harness.StepLookup("host-udp", hostAddr, dnsName, harness.DNSA),
				harness.StepFetch("gateway4", hello4, hello),
			},
			log: []string{`rule="deny 169.254.0.0/16"`, `rule="deny fd00:ec2::254/128"`},
		},
		{
			name: "allow-metadata and a deny rule",
			args: []string{"--allow-metadata", "--deny", "tcp:" + hostAddr + ":80"},
			steps: []string{
				harness.StepFetch("meta4-allowed", url(meta4), "egress-"+meta4),
				harness.StepIPv6(e.http.Port6),
				harness.StepFetch("meta6-allowed", url(meta6), "egress-"+meta6),
				harness.StepFetchDenied("host-denied", url(hostAddr)),
				harness.StepPingTo("host-ping", hostAddr, true), // the rule is TCP port 80 only
			},
			log: []string{`rule="deny tcp:` + hostAddr + `:80"`},
		},
		{
			name: "no-host-addresses",
			args: []string{"--no-host-addresses"},
			after: func(t *testing.T) {
				addAddr(hostAddr2 + "/32")
				serveText(t, hostAddr2+":80", "egress-"+hostAddr2)
			},
			steps: []string{
				harness.StepFetchDenied("host-denied", url(hostAddr)),
				harness.StepFetchDenied("host2-denied", url(hostAddr2)),
				harness.StepPingTo("host-ping-denied", hostAddr, false),
				harness.StepFetch("gateway4", hello4, hello),
				harness.StepIPv6(e.http.Port6),
				harness.StepFetch("gateway6", hello6, hello),
			},
			log: []string{`rule="deny host-addresses"`},
		},
		{
			name: "egress none",
			args: []string{"--egress", "none"},
			steps: []string{
				harness.StepLookup("dns-vunet", "", dnsName, harness.DNSA),
				harness.StepFetch("gateway4", hello4, hello),
				harness.StepFetchDenied("host-denied", url(hostAddr)),
				harness.StepFetchDenied("meta4-denied", url(meta4)),
				harness.StepPingTo("host-ping-denied", hostAddr, false),
				harness.StepLookup("host-udp-denied", hostAddr, dnsName, ""),
			},
			log: []string{`rule="deny any"`},
		},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "-"), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
			defer cancel()
			vn := vunettest.Start(t, e.vunetArgs(tc.args...)...)
			if tc.after != nil {
				tc.after(t)
			}
			inst := startGuest(t, ctx, &qemutest.Guest{
				Socket: vn.Socket,
				Script: script(append([]string{harness.StepDHCP(1500)}, tc.steps...)...),
			})
			var want []string
			for _, s := range tc.steps {
				want = append(want, stepNames(s)...)
			}
			finish(t, inst, append([]string{"dhcp"}, want...)...)
			for _, l := range tc.log {
				if !strings.Contains(vn.Log(), l) {
					t.Errorf("vunet log lacks %s", l)
				}
			}
		})
	}
}

// stepNames returns the names of the steps a script fragment reports.
func stepNames(s string) []string {
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(s, "\n") {
		for _, kw := range []string{"pass ", "fail "} {
			i := strings.Index(line, kw)
			if i < 0 {
				continue
			}
			f := strings.Fields(line[i+len(kw):])
			if len(f) > 0 && !strings.HasPrefix(f[0], "$") && !seen[f[0]] {
				seen[f[0]] = true
				out = append(out, f[0])
			}
		}
	}
	return out
}

// serveText serves body over HTTP on addr until the test ends.
func serveText(t *testing.T, addr, body string) {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, body) }),
		ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

// serveDNS answers harness.DNSName with harness.DNSA over UDP on addr.
func serveDNS(t *testing.T, addr string) {
	t.Helper()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		if len(req.Question) == 1 && req.Question[0].Qtype == dns.TypeA && strings.EqualFold(req.Question[0].Name, harness.DNSName) {
			m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: harness.DNSName, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60},
				A: net.ParseIP(harness.DNSA)})
		}
		_ = w.WriteMsg(m)
	})}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
}
