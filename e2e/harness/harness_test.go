package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestParseSteps(t *testing.T) {
	console := "junk\nE2E-PASS dhcp 0.17s ip=10.0.2.15/24 mtu=1500\n[ 1.2] kernel line\n" +
		"E2E-FAIL ping 5.00s no reply\nE2E-PASS empty 1s\nE2E-PASS dhcp 0.20s ip=10.0.2.16/24\n"
	steps := ParseSteps(console)
	if len(steps) != 4 {
		t.Fatalf("got %d steps: %+v", len(steps), steps)
	}
	if s := steps[1]; s.Name != "ping" || s.OK || s.Elapsed != 5*time.Second || s.Detail != "no reply" {
		t.Errorf("ping step %+v", s)
	}
	if s := steps[2]; s.Name != "empty" || !s.OK || s.Detail != "" {
		t.Errorf("empty step %+v", s)
	}
	s, ok := Find(steps, "dhcp")
	if !ok || s.Field("ip") != "10.0.2.16/24" || s.Field("mtu") != "" {
		t.Errorf("Find(dhcp) = %+v, %v", s, ok)
	}
	if _, ok := Find(steps, "nope"); ok {
		t.Error("found a step that does not exist")
	}
}

func TestBlobDeterministic(t *testing.T) {
	a, sa := Blob()
	b, sb := Blob()
	if len(a) != BlobSize || sa != sb || !bytes.Equal(a, b) {
		t.Fatal("Blob is not deterministic")
	}
	sum := sha256.Sum256(a)
	if hex.EncodeToString(sum[:]) != sa {
		t.Fatal("Blob hash mismatch")
	}
}

func TestHTTPServer(t *testing.T) {
	h, err := StartHTTP()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	base := fmt.Sprintf("http://127.0.0.1:%d", h.Port4)
	resp, err := http.Get(base + "/blob")
	if err != nil {
		t.Fatal(err)
	}
	hash := sha256.New()
	n, _ := io.Copy(hash, resp.Body)
	resp.Body.Close()
	if n != BlobSize || hex.EncodeToString(hash.Sum(nil)) != h.BlobSHA256 {
		t.Errorf("GET /blob: %d bytes, wrong hash", n)
	}
	body := strings.Repeat("upload!", 1000)
	resp, err = http.Post(base+"/upload/x", "text/plain", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	answer, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := sha256.Sum256([]byte(body))
	want := fmt.Sprintf("sha256 %x bytes %d\n", sum, len(body))
	if string(answer) != want {
		t.Errorf("upload answer %q, want %q", answer, want)
	}
	if u, ok := h.Upload("x"); !ok || u.SHA256 != hex.EncodeToString(sum[:]) || u.Bytes != int64(len(body)) {
		t.Errorf("recorded upload %+v %v", u, ok)
	}
	h.SetGeneration(7)
	resp, err = http.Get(base + "/generation")
	if err != nil {
		t.Fatal(err)
	}
	g, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(g) != "7\n" {
		t.Errorf("generation %q", g)
	}
	if h.Port6 != 0 {
		resp, err := http.Get(fmt.Sprintf("http://[::1]:%d/hello", h.Port6))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != HelloText {
			t.Errorf("/hello over IPv6: %q", b)
		}
	}
}

func TestDNSServer(t *testing.T) {
	d, err := StartDNS()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, tc := range []struct {
		name  string
		qtype uint16
		want  string
		rcode int
	}{
		{DNSName, dns.TypeA, DNSA, dns.RcodeSuccess},
		{DNSName, dns.TypeAAAA, DNSAAAA, dns.RcodeSuccess},
		{DNSName, dns.TypeTXT, DNSTXT, dns.RcodeSuccess},
		{DNSSRV, dns.TypeSRV, fmt.Sprint(DNSSRVPort), dns.RcodeSuccess},
		{"nope." + DNSName, dns.TypeA, "", dns.RcodeNameError},
	} {
		for _, proto := range []string{"udp", "tcp"} {
			m := new(dns.Msg)
			m.SetQuestion(tc.name, tc.qtype)
			c := &dns.Client{Net: proto, Timeout: 5 * time.Second}
			r, _, err := c.Exchange(m, d.Addr)
			if err != nil {
				t.Fatalf("%s %s over %s: %v", dns.TypeToString[tc.qtype], tc.name, proto, err)
			}
			if r.Rcode != tc.rcode || (tc.want != "" && (len(r.Answer) != 1 || !strings.Contains(r.Answer[0].String(), tc.want))) {
				t.Errorf("%s %s over %s: %v", dns.TypeToString[tc.qtype], tc.name, proto, r)
			}
		}
	}
	if len(d.Queries()) != 10 {
		t.Errorf("queries %v", d.Queries())
	}
}

func TestProbeForward(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, len(ForwardProbe)+1)
		io.ReadFull(c, buf)
		fmt.Fprintf(c, "%speer=::ffff:10.0.2.2:1234\n", buf)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	peer, err := ProbeForward(ctx, l.Addr().String())
	if err != nil || peer != "::ffff:10.0.2.2:1234" {
		t.Errorf("ProbeForward = %q, %v", peer, err)
	}
}

func TestRunTB(t *testing.T) {
	var log bytes.Buffer
	var order []string
	failed, skipped := RunTB("x", &log, func(tb *TB) {
		tb.Cleanup(func() { order = append(order, "first") })
		tb.Cleanup(func() { order = append(order, "second") })
		dir := tb.TempDir()
		tb.Cleanup(func() { order = append(order, "tmp:"+fmt.Sprint(dir != "")) })
		tb.Fatalf("boom %d", 1)
		order = append(order, "not reached")
	})
	if !failed || skipped || strings.Join(order, ",") != "tmp:true,second,first" || log.String() != "boom 1\n" {
		t.Errorf("failed=%v skipped=%v order=%v log=%q", failed, skipped, order, log.String())
	}
	failed, skipped = RunTB("y", io.Discard, func(tb *TB) { tb.Skip("no qemu") })
	if failed || !skipped {
		t.Errorf("skip: failed=%v skipped=%v", failed, skipped)
	}
}
