package boot

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vunet/vunet/e2e/harness"
	"github.com/vunet/vunet/internal/vunettest"
)

const (
	ipxeLkrn = "/usr/lib/ipxe/ipxe.lkrn"
	ipxeEFI  = "/usr/lib/ipxe/ipxe.efi"
)

// ipxeCommands is what iPXE runs in both tests: DHCP, then an HTTP download
// through the NAT (10.0.2.2 is the host's 127.0.0.1), imgstat to print the
// size iPXE received, then the download runs as a script that checks its
// own content (see payload). Settings expand only when iPXE runs the line,
// so the markers cannot match the console echo of a typed command. The
// caller adds the end marker: scriptCommands or typedCommands.
func ipxeCommands(port int) []string {
	return []string{
		"dhcp",
		"echo VUNET-ADDR ${net0/ip} ${net0/netmask} ${net0/gateway} ${net0/dns} file=${net0/filename}",
		fmt.Sprintf("imgfetch http://10.0.2.2:%d/big.bin", port),
		"imgstat",
		"imgexec big.bin",
	}
}

// scriptCommands is cmds as script lines: the first failure jumps to the
// FAILED marker, and the DONE marker follows the last command.
func scriptCommands(cmds []string) string {
	var b strings.Builder
	for _, c := range cmds {
		b.WriteString(c + " || goto failed\n")
	}
	b.WriteString("echo VUNET-${net0/mac}-DONE\n")
	return b.String()
}

// typedCommands is cmds for iPXE's prompt, one line per prompt: each
// failure is remembered, and the last line prints DONE only if none failed
// (a failed command does not stop the commands typed after it).
func typedCommands(cmds []string) []string {
	var out []string
	for _, c := range cmds {
		out = append(out, c+" || set vunet-failed 1")
	}
	return append(out, "isset ${vunet-failed} && echo VUNET-${net0/mac}-FAILED || echo VUNET-${net0/mac}-DONE")
}

var (
	reIPXEAddr = regexp.MustCompile(`VUNET-ADDR ([0-9.]+) ([0-9.]+) ([0-9.]+) ([0-9.]+) file=(\S*)`)
	reIPXEStat = regexp.MustCompile(`big\.bin : (\d+) bytes`)
	reIPXEEnd  = regexp.MustCompile(`VUNET-[0-9a-f:]{17}-(DONE|FAILED)`)
)

// checkIPXEOutput checks the console output of ipxeCommands: the DHCP
// configuration, the downloaded size and that no command failed.
func checkIPXEOutput(t *testing.T, out, wantFile string) {
	t.Helper()
	var lines []string
	for _, re := range []*regexp.Regexp{reIPXEAddr, reIPXEStat, reIPXEEnd} {
		lines = append(lines, re.FindString(out))
	}
	t.Logf("iPXE said: %q", lines)
	if m := reIPXEEnd.FindStringSubmatch(out); m == nil || m[1] != "DONE" {
		t.Errorf("iPXE: the commands did not all succeed")
	}
	// The content check: the downloaded script verified every line of
	// itself (see payload). A payload of the right size with one byte
	// changed prints the CORRUPT marker or no OK marker.
	if !strings.Contains(out, payloadOK) || strings.Contains(out, payloadCorrupt) {
		t.Errorf("iPXE: the downloaded payload did not verify its own content (%q printed: %v, %q printed: %v)",
			payloadOK, strings.Contains(out, payloadOK), payloadCorrupt, strings.Contains(out, payloadCorrupt))
	}
	if m := reIPXEAddr.FindStringSubmatch(out); m == nil {
		t.Errorf("iPXE: no address line (DHCP failed?)")
	} else {
		if got := strings.Join(m[1:5], " "); got != "10.0.2.15 255.255.255.0 10.0.2.2 10.0.2.3" {
			t.Errorf("iPXE DHCP: ip/netmask/gateway/dns = %s", got)
		}
		if m[5] != wantFile {
			t.Errorf("iPXE DHCP: filename %q, want %q", m[5], wantFile)
		}
	}
	if m := reIPXEStat.FindStringSubmatch(out); m == nil {
		t.Errorf("iPXE: no imgstat line for big.bin (download failed?)")
	} else if n, _ := strconv.Atoi(m[1]); n != payloadSize {
		t.Errorf("iPXE imgstat: big.bin is %d bytes, want %d", n, payloadSize)
	}
}

// TestIPXE boots Debian's ipxe.lkrn (iPXE as a Linux kernel image, under
// SeaBIOS) with a script as initrd: iPXE's own virtio-net driver does DHCP
// and downloads a multi-megabyte file over HTTP. iPXE puts the virtio-net
// header and the frame in separate descriptors and verifies every checksum.
// vunet captures the traffic (--pcap), and tshark checks the capture.
func TestIPXE(t *testing.T) {
	setup(t, qemuNeed, ipxeLkrn+"\tipxe", "tshark\ttshark")
	began := time.Now()
	data := payload()
	fs := startFileServer(t, "big.bin", data)

	dir := t.TempDir()
	pcapFile := filepath.Join(dir, "ipxe.pcap")
	// Without boot options iPXE's DHCP reports no filename.
	in := vunettest.Start(t, "--pcap", pcapFile)

	script := "#!ipxe\n" + scriptCommands(ipxeCommands(fs.Port)) + "exit\n:failed\necho VUNET-${net0/mac}-FAILED\n"
	scriptFile := filepath.Join(dir, "script.ipxe")
	if err := os.WriteFile(scriptFile, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	v := (&firmwareVM{
		Socket:   in.Socket,
		Machine:  "pc",
		Firmware: []string{"-kernel", ipxeLkrn, "-initrd", scriptFile},
		Timeout:  5 * time.Minute,
	}).start(t)
	// iPXE runs the script, exits back to SeaBIOS and cannot power off;
	// the marker is the end.
	v.waitFor(t, 0, regexp.MustCompile(`iPXE initialising devices`), 2*time.Minute)
	v.waitFor(t, 0, reIPXEEnd, 3*time.Minute)
	elapsed := time.Since(began)
	v.kill()
	checkIPXEOutput(t, v.text(), "")
	fs.checkDelivered(t, "/big.bin", len(data))
	if err := in.Stop(); err != nil {
		t.Errorf("vunet: %v", err)
	}
	t.Logf("iPXE (BIOS, ipxe.lkrn): DHCP + %d-byte HTTP download in %v wall time (vunet start to imgstat)", payloadSize, elapsed.Round(time.Millisecond))

	checkPcap(t, pcapFile, fs.Port)
}

// checkPcap checks vunet's capture of the iPXE run with tshark: no
// malformed frames, every IPv4/TCP/UDP/ICMPv6 checksum correct (iPXE
// negotiates no checksum offload, so both directions carry full
// checksums), a complete DHCP exchange and the HTTP download.
func checkPcap(t *testing.T, file string, port int) {
	t.Helper()
	tshark := func(args ...string) string { t.Helper(); return harness.Tshark(t, file, args...) }
	if out := tshark("-Y", "_ws.malformed"); out != "" {
		t.Errorf("malformed frames in the capture:\n%s", out)
	}
	if out := tshark("-o", "ip.check_checksum:TRUE", "-o", "tcp.check_checksum:TRUE",
		"-o", "udp.check_checksum:TRUE",
		"-Y", "ip.checksum.status == 0 || tcp.checksum.status == 0 || udp.checksum.status == 0 || icmp.checksum.status == 0 || icmpv6.checksum.status == 0"); out != "" {
		t.Errorf("frames with bad checksums in the capture:\n%s", lastLines(out, 20))
	}
	// DHCP message types in order: DISCOVER(1) OFFER(2) REQUEST(3) ACK(5),
	// possibly with retransmitted DISCOVER/OFFER pairs first.
	types := strings.Fields(tshark("-Y", "dhcp", "-T", "fields", "-e", "dhcp.option.dhcp"))
	if s := strings.Join(types, " "); !regexp.MustCompile(`^(1 2 )+3 5$`).MatchString(s) {
		t.Errorf("DHCP message types in the capture: %q, want DISCOVER OFFER [...] REQUEST ACK", s)
	}
	req := tshark("-Y", "http.request", "-T", "fields", "-e", "http.request.method", "-e", "http.request.uri")
	if req != "GET\t/big.bin" {
		t.Errorf("HTTP requests in the capture: %q", req)
	}
	resp := tshark("-Y", "http.response", "-T", "fields", "-e", "http.response.code", "-e", "http.content_length")
	if resp != fmt.Sprintf("200\t%d", payloadSize) {
		t.Errorf("HTTP responses in the capture: %q", resp)
	}
	// Every payload byte went through the capture: the sum of TCP segment
	// lengths from the server exceeds the body (headers add a little;
	// retransmissions would add more, and are reported).
	var sent int
	for _, f := range strings.Fields(tshark("-Y", fmt.Sprintf("tcp.srcport == %d", port), "-T", "fields", "-e", "tcp.len")) {
		n, _ := strconv.Atoi(f)
		sent += n
	}
	if sent < payloadSize {
		t.Errorf("TCP payload from the server in the capture: %d bytes, want at least %d", sent, payloadSize)
	}
	frames := len(strings.Split(tshark(), "\n"))
	retrans := tshark("-Y", "tcp.analysis.retransmission || tcp.analysis.fast_retransmission", "-T", "fields", "-e", "frame.number")
	nRetrans := 0
	if retrans != "" {
		nRetrans = len(strings.Split(retrans, "\n"))
	}
	t.Logf("pcap: %d frames, %d TCP payload bytes from the server, %d retransmissions, no malformed frames or bad checksums", frames, sent, nRetrans)
}
