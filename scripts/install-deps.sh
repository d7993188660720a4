#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use (run as root).
# Idempotent: packages already present are skipped quickly by apt.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
# libvirt-daemon-system: e2e TestLibvirt runs its own libvirtd and virtlogd.
# dhcpcd-base: the test guest's DHCPv6 client (busybox-static has no udhcpc6).
pkgs=(qemu-system-x86 ipxe ovmf busybox-static iperf3 dhcpcd-base socat cpio kmod iproute2 tshark dpdk-dev util-linux libvirt-daemon-system)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
