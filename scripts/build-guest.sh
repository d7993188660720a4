#!/usr/bin/env bash
# Builds the tiny Linux guest the real-QEMU tests boot (internal/qemutest).
#
# Usage: scripts/build-guest.sh [OUTDIR]      (default: build/guest)
#
# Produces OUTDIR/vmlinuz (Debian's cloud kernel) and OUTDIR/initrd.gz (a gzip
# newc cpio with busybox-static, the virtio-net modules, iperf3 and its
# libraries, /init from testdata/guest/init and the testdata/guest/rootfs
# overlay). Tests append their own cpio (with /test/run.sh) to initrd.gz.
#
# Cached: does nothing if the outputs are newer than this script, every file
# under testdata/guest and the host binaries copied in. The kernel .deb is
# kept in OUTDIR/cache so rebuilds work offline. Set VUNET_GUEST_KERNEL_DEB to
# a linux-image-*.deb to use that kernel instead of downloading one.
#
# Needs: apt-get (for the kernel), dpkg-deb, busybox-static, iperf3, cpio,
# gzip. Root is not required.
set -euo pipefail

die() {
	echo "build-guest: $*" >&2
	exit 1
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
self=$root/scripts/build-guest.sh
src=$root/testdata/guest
out=${1:-$root/build/guest}
busybox=/bin/busybox
iperf3=/usr/bin/iperf3
# dhcpcd (Debian's dhcpcd-base) is the guest's DHCPv6 client, as busybox-static
# has no udhcpc6; optional: without it the DHCPv6 e2e test fails its step.
dhcpcd=/usr/sbin/dhcpcd

mkdir -p "$out" || die "cannot create $out"
out=$(cd "$out" && pwd)

# Up-to-date check: initrd.gz is written last, so its mtime marks a complete
# build. Anything newer than it means the build is stale.
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ]; then
	inputs=("$self" "$src" "$busybox" "$iperf3")
	[ -x "$dhcpcd" ] && inputs+=("$dhcpcd")
	[ -n "${VUNET_GUEST_KERNEL_DEB:-}" ] && inputs+=("$VUNET_GUEST_KERNEL_DEB")
	if [ -z "$(find -L "${inputs[@]}" -newer "$out/initrd.gz" -print -quit 2>/dev/null)" ]; then
		echo "build-guest: up to date: $out"
		exit 0
	fi
fi

for tool in dpkg-deb cpio gzip find; do
	command -v "$tool" >/dev/null || die "missing tool '$tool' (run scripts/install-deps.sh)"
done
[ -x "$busybox" ] || die "missing $busybox (apt-get install busybox-static)"
# A dynamically linked busybox (Debian's 'busybox' package) would need its
# libraries in the guest too; only the static build is supported.
if ldd "$busybox" >/dev/null 2>&1; then
	die "$busybox is dynamically linked; install busybox-static instead of busybox"
fi
[ -x "$iperf3" ] || die "missing $iperf3 (apt-get install iperf3)"
[ -f "$src/init" ] || die "missing $src/init"
[ -f "$src/modules.txt" ] || die "missing $src/modules.txt"

start=$(date +%s)
cache=$out/cache
mkdir -p "$cache"

# --- kernel package --------------------------------------------------------
if [ -n "${VUNET_GUEST_KERNEL_DEB:-}" ]; then
	deb=$VUNET_GUEST_KERNEL_DEB
	[ -f "$deb" ] || die "VUNET_GUEST_KERNEL_DEB=$deb does not exist"
else
	# linux-image-cloud-amd64 is a metapackage; the kernel lives in the
	# versioned package it depends on.
	meta=linux-image-cloud-amd64
	pkg=$(apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -n1)
	if [ -z "$pkg" ]; then
		# Offline or no package lists: fall back to a previously downloaded one.
		deb=$(ls -t "$cache"/linux-image-*.deb 2>/dev/null | head -n1 || true)
		[ -n "$deb" ] || die "cannot resolve $meta with apt-cache (run apt-get update?) and no kernel cached in $cache"
		echo "build-guest: apt-cache cannot resolve $meta; using cached $(basename "$deb")"
	else
		deb=$(ls -t "$cache/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
		if [ -z "$deb" ]; then
			echo "build-guest: downloading $pkg"
			log=$cache/apt-download.log
			# apt warns when root downloads into a directory _apt cannot
			# write; the download itself works, so only the status matters.
			if ! (cd "$cache" && apt-get download -q "$pkg") >"$log" 2>&1; then
				reason=$(grep -m1 '^E:' "$log" || tail -n1 "$log")
				die "apt-get download $pkg failed: ${reason:-unknown error} (log: $log)"
			fi
			deb=$(ls -t "$cache/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
			[ -n "$deb" ] || die "apt-get download $pkg succeeded but left no .deb in $cache"
		fi
	fi
fi

work=$out/.work
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

dpkg-deb -x "$deb" "$work/kpkg" || die "cannot unpack $deb"
vmlinuz=$(ls "$work"/kpkg/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
kver=${vmlinuz##*/vmlinuz-}
moddir=$work/kpkg/lib/modules/$kver
[ -d "$moddir" ] || moddir=$work/kpkg/usr/lib/modules/$kver
[ -d "$moddir" ] || die "no lib/modules/$kver in $deb"

# --- root filesystem -------------------------------------------------------
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,dev,proc,sys,run,tmp,root,test,var}
ln -s ../run "$rootfs/var/run"
chmod 1777 "$rootfs/tmp"
chmod 700 "$rootfs/root"

cp "$busybox" "$rootfs/bin/busybox"
# Applet links are made at build time (not `busybox --install` at boot) so
# /init's #!/bin/sh works and every applet sits at its usual path.
while read -r applet; do
	[ -n "$applet" ] || continue
	[ -e "$rootfs/$applet" ] || [ -L "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done < <("$busybox" --list-full)
[ -L "$rootfs/bin/sh" ] || die "busybox has no sh applet"

# iperf3 (and dhcpcd) are dynamically linked: copy the binary, every library
# ldd reports and the dynamic loader, each at the path the binary expects.
bins=("$iperf3")
[ -x "$dhcpcd" ] && bins+=("$dhcpcd")
for bin in "${bins[@]}"; do
	mkdir -p "$rootfs$(dirname "$bin")"
	cp "$bin" "$rootfs$bin"
	libs=$(ldd "$bin" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u)
	[ -n "$libs" ] || die "ldd found no libraries for $bin"
	for lib in $libs; do
		mkdir -p "$rootfs$(dirname "$lib")"
		cp -L "$lib" "$rootfs$lib" || die "cannot copy $lib"
	done
done

# Modules, flattened into lib/modules/$kver/NAME.ko in the order /init loads
# them. Compressed modules are unpacked because busybox insmod cannot.
kmods=$rootfs/lib/modules/$kver
mkdir -p "$kmods"
loaded=()
while read -r m; do
	case "$m" in '' | '#'*) continue ;; esac
	f=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)
	if [ -z "$f" ]; then
		if grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
			echo "build-guest: module $m is built into $kver"
		else
			echo "build-guest: module $m not found in $kver, skipping"
		fi
		continue
	fi
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$kmods/$m.ko" ;;
	*.ko.zst) zstd -qdc "$f" >"$kmods/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$kmods/$m.ko" ;;
	*) cp "$f" "$kmods/$m.ko" ;;
	esac || die "cannot unpack module $f"
	loaded+=("$m")
done <"$src/modules.txt"
cp "$src/modules.txt" "$rootfs/etc/modules.txt"

if [ -d "$src/rootfs" ]; then
	cp -R "$src/rootfs/." "$rootfs/"
fi
install -m 0755 "$src/init" "$rootfs/init"
echo "$kver" >"$rootfs/etc/kernel-version"

# The kernel opens /dev/console before running /init; the node must exist in
# the archive for that. mknod needs root; /init re-opens the console after
# mounting devtmpfs, so the guest still works without it.
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$rootfs/dev/console" c 5 1
	mknod -m 666 "$rootfs/dev/null" c 1 3
fi

# --- archive ---------------------------------------------------------------
(cd "$rootfs" && find . -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --quiet) |
	gzip -6 -n >"$work/initrd.gz" || die "cannot create the initramfs archive"

# vmlinuz first, initrd.gz last: the up-to-date check keys on initrd.gz.
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$kver" >"$out/kernel-version"
mv -f "$work/initrd.gz" "$out/initrd.gz"

echo "build-guest: built $out (kernel $kver, modules: ${loaded[*]:-none}, initrd $(du -k "$out/initrd.gz" | cut -f1) KiB) in $(($(date +%s) - start))s"
