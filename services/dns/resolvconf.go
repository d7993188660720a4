package dns

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// ErrNoNameservers is returned (wrapped) by ReadResolvConf when the file has
// no usable nameserver line.
var ErrNoNameservers = errors.New("no usable nameserver in resolv.conf")

// ReadResolvConf reads a resolv.conf(5) file and returns its name servers
// (port 53) and search domains. A "domain" line is used as the search list
// when there is no "search" line, as the C library does. Malformed lines are
// skipped. If the file has no nameserver the servers are nil and the error
// wraps ErrNoNameservers (the search domains are still returned).
func ReadResolvConf(path string) ([]netip.AddrPort, []string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read resolv.conf: %w", err)
	}
	servers, search := parseResolvConf(b)
	if len(servers) == 0 {
		return nil, search, fmt.Errorf("%s: %w", path, ErrNoNameservers)
	}
	return servers, search, nil
}

func parseResolvConf(b []byte) ([]netip.AddrPort, []string) {
	var (
		servers        []netip.AddrPort
		search, domain []string
		seen           = map[netip.AddrPort]bool{}
	)
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "nameserver":
			a, err := netip.ParseAddr(f[1])
			if err != nil {
				continue
			}
			ap := netip.AddrPortFrom(a.Unmap(), 53)
			if !seen[ap] {
				seen[ap] = true
				servers = append(servers, ap)
			}
		case "search":
			// The last search line wins, as in glibc.
			search = nil
			for _, d := range f[1:] {
				if d = strings.TrimSuffix(d, "."); d != "" {
					search = append(search, d)
				}
			}
		case "domain":
			domain = []string{strings.TrimSuffix(f[1], ".")}
		}
	}
	if search == nil && len(domain) == 1 && domain[0] != "" {
		search = domain
	}
	return servers, search
}
