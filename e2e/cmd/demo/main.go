// Command demo boots the test guest under QEMU (TCG) against a real vunet
// and prints what the guest achieved: DHCP, DNS, ping, an HTTP download with
// checksum, an inbound port forward and IPv6. `make demo` runs it through
// scripts/demo.sh, which installs the dependencies, builds bin/vunet and the
// guest, and starts this program in a fresh network namespace
// (`unshare --net`), so the guest can reach nothing but the servers started
// here on loopback.
//
// It exits 0 only if every row of the final table passed.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/qemutest"
)

const guestFwdPort = 8080

var (
	vunetBin   = flag.String("vunet", "bin/vunet", "vunet binary to run")
	timeout    = flag.Duration("timeout", 3*time.Minute, "give up after this long")
	anyNetns   = flag.Bool("allow-shared-netns", false, "run even if this network namespace has interfaces besides lo")
	verbose    = flag.Bool("v", false, "print the guest console and the vunet log at the end")
	start      = time.Now()
	progressTo = io.Writer(os.Stdout)
)

func progress(format string, args ...any) {
	fmt.Fprintf(progressTo, "[%5.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	flag.Parse()
	os.Exit(run())
}

func run() int {
	if err := checkNetns(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		return 2
	}
	bin, err := filepath.Abs(*vunetBin)
	if err == nil {
		_, err = os.Stat(bin)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: vunet binary: %v (run `make build`)\n", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	// Host side: everything on this namespace's loopback.
	h, err := harness.StartHTTP()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: HTTP server: %v\n", err)
		return 1
	}
	defer h.Close()
	d, err := harness.StartDNS()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: DNS server: %v\n", err)
		return 1
	}
	defer d.Close()
	progress("host servers up: HTTP 127.0.0.1:%d and [::1]:%d (8 MiB file sha256 %.12s…), DNS %s",
		h.Port4, h.Port6, h.BlobSHA256, d.Addr)

	dir, err := os.MkdirTemp("", "vunet-demo")
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "vunet.sock")
	fwdHost, err := freePort()
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		return 1
	}
	vn, err := harness.StartVunet(ctx, bin, sock,
		"--dns-upstream", d.Addr,
		"--forward", fmt.Sprintf("tcp:127.0.0.1:%d:%d", fwdHost, guestFwdPort),
		"--log-level", "debug")
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: starting vunet: %v\n", err)
		return 1
	}
	defer vn.Stop(5 * time.Second)
	progress("vunet ready: socket %s, forward 127.0.0.1:%d -> guest:%d, DNS upstream %s", sock, fwdHost, guestFwdPort, d.Addr)

	script := harness.Prelude + strings.Join([]string{
		harness.StepDHCP(1500),
		harness.StepDNS(),
		harness.StepPing(),
		harness.StepDownload("download", h.Port4, h.BlobSHA256),
		harness.StepForward(guestFwdPort),
		harness.StepIPv6(h.Port6),
	}, "") + harness.Epilogue

	var (
		console  string
		peer     string
		probeErr error
	)
	failed, skipped := harness.RunTB("demo", os.Stdout, func(tb *harness.TB) {
		progress("booting the guest: QEMU TCG, Debian cloud kernel + busybox initramfs, virtio-net over vhost-user")
		inst, err := (&qemutest.Guest{Socket: sock, Script: script, Timeout: *timeout}).Start(ctx, tb)
		if err != nil {
			tb.Fatalf("demo: starting QEMU: %v", err)
		}
		watchDone := make(chan struct{})
		go watch(inst, watchDone)
		if err := inst.WaitFor(ctx, harness.ReadyLine("forward")); err == nil {
			pctx, pcancel := context.WithTimeout(ctx, time.Minute)
			peer, probeErr = harness.ProbeForward(pctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(fwdHost)))
			pcancel()
		} else {
			probeErr = err
		}
		res, err := inst.Wait()
		<-watchDone
		console = res.Console
		if err != nil {
			progress("guest: %v", err)
		} else {
			progress("guest powered off (QEMU ran %.1fs)", res.Duration.Seconds())
		}
	})
	if skipped {
		fmt.Fprintln(os.Stderr, "demo: QEMU or the guest is unavailable (see above); run scripts/install-deps.sh as root")
		return 1
	}

	ok := table(harness.ParseSteps(console), d.Addr, fwdHost, peer, probeErr)
	if *verbose || !ok || failed {
		fmt.Printf("\n--- guest console ---\n%s\n--- vunet log ---\n%s\n", console, vn.Output())
	}
	if !ok || failed {
		fmt.Printf("demo: FAILED after %.1fs\n", time.Since(start).Seconds())
		return 1
	}
	fmt.Printf("demo: all checks passed in %.1fs\n", time.Since(start).Seconds())
	return 0
}

// checkNetns refuses to run where the guest could reach a real network.
func checkNetns() error {
	if out, err := exec.Command("ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return fmt.Errorf("ip link set lo up: %v: %s", err, out)
	}
	if *anyNetns {
		return nil
	}
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback == 0 {
			return fmt.Errorf("interface %s exists: run me in a private network namespace (scripts/demo.sh does `unshare --net`) or pass -allow-shared-netns", ifc.Name)
		}
	}
	return nil
}

// watch prints boot progress and each step result as the guest reports it.
func watch(inst *qemutest.Instance, done chan<- struct{}) {
	defer close(done)
	seen := 0
	booted := false
	lastTick := time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-inst.Done():
			report(inst.Console(), &seen, &booted)
			return
		case <-tick.C:
		}
		report(inst.Console(), &seen, &booted)
		if !booted && time.Since(lastTick) >= 2*time.Second {
			lastTick = time.Now()
			progress("  … guest kernel still booting")
		}
	}
}

// report prints the interesting complete lines of console after *seen.
func report(console string, seen *int, booted *bool) {
	end := strings.LastIndexByte(console, '\n')
	if end < *seen {
		return
	}
	for _, line := range strings.Split(console[*seen:end], "\n") {
		switch {
		case strings.HasPrefix(line, qemutest.ReadyMarker):
			*booted = true
			progress("  guest booted, test script running")
		case strings.HasPrefix(line, "udhcpc: lease of"):
			progress("  guest %s", line)
		case strings.HasPrefix(line, "E2E-PASS "), strings.HasPrefix(line, "E2E-FAIL "):
			if s := harness.ParseSteps(line); len(s) == 1 {
				status := "ok"
				if !s[0].OK {
					status = "FAILED"
				}
				progress("  guest step %-11s %-6s (%.2fs)", s[0].Name, status, s[0].Elapsed.Seconds())
			}
		case strings.HasPrefix(line, harness.ReadyLine("forward")):
			progress("  guest listens on :%d; connecting through the forward", guestFwdPort)
		}
	}
	*seen = end + 1
}

type row struct {
	name, detail string
	ok           bool
}

// table prints the summary and reports whether every row passed.
func table(steps []harness.Step, upstream string, fwdHost int, peer string, probeErr error) bool {
	get := func(name string) (harness.Step, bool) {
		s, ok := harness.Find(steps, name)
		return s, ok && s.OK
	}
	var rows []row
	add := func(name string, ok bool, detail string) { rows = append(rows, row{name, detail, ok}) }
	missing := func(name string) string {
		if s, found := harness.Find(steps, name); found {
			return s.Detail
		}
		return "no result (guest did not get this far)"
	}

	if s, ok := get("dhcp"); ok {
		add("DHCP address", true, fmt.Sprintf("%s, router %s, dns %s, mtu %s", s.Field("ip"), s.Field("router"), s.Field("dns"), s.Field("lease_mtu")))
	} else {
		add("DHCP address", false, missing("dhcp"))
	}
	if _, ok := get("dns"); ok {
		add("DNS answer", true, fmt.Sprintf("%s A %s via 10.0.2.3 -> upstream %s (also AAAA, TXT, SRV, NXDOMAIN, host.vunet.internal)",
			strings.TrimSuffix(harness.DNSName, "."), harness.DNSA, upstream))
	} else {
		add("DNS answer", false, missing("dns"))
	}
	if s, ok := get("ping"); ok {
		detail := "3/3 replies from " + harness.Gateway4
		if i := strings.Index(s.Detail, "= "); i >= 0 {
			detail += ", min/avg/max " + strings.TrimSpace(s.Detail[i+2:])
		}
		add("ping gateway", true, detail)
	} else {
		add("ping gateway", false, missing("ping"))
	}
	if s, ok := get("download"); ok {
		add("HTTP download", true, fmt.Sprintf("%s bytes in %s, sha256 %.16s… matches", s.Field("bytes"), s.Field("wget"), s.Field("sha256")))
	} else {
		add("HTTP download", false, missing("download"))
	}
	_, fwdOK := get("forward")
	switch {
	case probeErr != nil:
		add("inbound forward", false, probeErr.Error())
	case !fwdOK:
		add("inbound forward", false, missing("forward"))
	default:
		add("inbound forward", true, fmt.Sprintf("127.0.0.1:%d -> guest:%d echoed; guest saw the client as %s", fwdHost, guestFwdPort, strings.TrimPrefix(peer, "::ffff:")))
	}
	v6 := []string{"ipv6-slaac", "ping6", "http6"}
	v6ok := true
	var v6bad []string
	for _, n := range v6 {
		if _, ok := get(n); !ok {
			v6ok = false
			v6bad = append(v6bad, n+": "+missing(n))
		}
	}
	if v6ok {
		s, _ := get("ipv6-slaac")
		add("IPv6", true, fmt.Sprintf("SLAAC %s, ping6 %s, HTTP via [%s]", s.Field("addr"), harness.Gateway6, harness.Gateway6))
	} else {
		add("IPv6", false, strings.Join(v6bad, "; "))
	}

	fmt.Println()
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(w, "  %-16s %-6s %s\n", "CHECK", "RESULT", "DETAIL")
	all := true
	for _, r := range rows {
		res := "PASS"
		if !r.ok {
			res = "FAIL"
			all = false
		}
		fmt.Fprintf(w, "  %-16s %-6s %s\n", r.name, res, r.detail)
	}
	w.Flush()
	fmt.Println()
	return all
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
