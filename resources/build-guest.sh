#!/usr/bin/env bash
# Builds rangevm's default x86_64 guest from Debian packages into a cached folder:
#
#   $RANGEVM_CACHE/guest-x86_64/vmlinuz            the distribution kernel (bzImage)
#   $RANGEVM_CACHE/guest-x86_64/initramfs.cpio.gz  busybox, the virtio modules, /init
#   $RANGEVM_CACHE/guest-x86_64/cmdline            a kernel command line that fits it
#
# (RANGEVM_CACHE defaults to ~/.cache/rangevm.) The guest's /init mounts /proc, /sys and
# /dev, prints the marker line "RANGEVM-GUEST-UP", loads the virtio modules, runs the test
# command given on the kernel command line, prints "RANGEVM-CMD-EXIT=<status>", and
# powers off. The command comes as
#   rangevm.cmd64=<base64 of the command>   (any shell text), or
#   rangevm.cmd=<word>                      (a single word, no spaces)
# and rangevm.shell=1 starts a shell on the console instead of powering off.
#
# Usage: resources/build-guest.sh [--force] [--print-dir]
#   --force      rebuild even if the cache is up to date
#   --print-dir  print only the output folder (for scripts)
# Needs: apt-get (Debian/Ubuntu), dpkg-deb, gzip. Downloads about 70 MB the first time
# (kept in $RANGEVM_CACHE/debs).
set -euo pipefail

force=0
print_dir=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --print-dir) print_dir=1 ;;
        -h | --help)
            sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-guest: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { [ "$print_dir" -eq 1 ] || echo "build-guest: $*" >&2; }
die() {
    echo "build-guest: error: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb gzip; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed (a Debian-based host)"
done

cache="${RANGEVM_CACHE:-$HOME/.cache/rangevm}"
out="$cache/guest-x86_64"
mkdir -p "$out"

# shellcheck source=resources/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
pkg="$(debian_kernel_pkg)"
abi="${pkg#linux-image-}"

stamp="$pkg $(cat "$0" "$(dirname "$0")/debian.sh" | sha256sum | cut -d' ' -f1)"
if [ "$force" -eq 0 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
    [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ]; then
    log "up to date: $out ($pkg)"
    [ "$print_dir" -eq 0 ] || echo "$out"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-guest.XXXXXX")"
trap 'rm -rf "$work"' EXIT

debian_extract "$work/pkg" "$pkg" busybox-static
vmlinuz="$work/pkg/boot/vmlinuz-$abi"
[ -s "$vmlinuz" ] || die "no boot/vmlinuz-$abi in $pkg"
busybox="$work/pkg/bin/busybox"
[ -x "$busybox" ] || die "no bin/busybox in busybox-static"

log "building the initramfs"
root="$work/root"
busybox_root "$root" "$busybox"

# The virtio modules the balloon needs, in load order, uncompressed or not.
moddir="$work/pkg/lib/modules/$abi/kernel/drivers/virtio"
for m in virtio_ring virtio virtio_mmio virtio_balloon; do
    found="$(find "$moddir" -name "$m.ko*" 2>/dev/null | head -n 1)"
    if [ -n "$found" ]; then
        cp "$found" "$root/lib/modules/"
    else
        log "note: $m is built in or missing in $pkg"
    fi
done

guest_init >"$root/init"
chmod 755 "$root/init"

pack_cpio "$root" "$busybox" "$work/initramfs.cpio.gz"

cp "$vmlinuz" "$out/vmlinuz"
cp "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "console=ttyS0 reboot=k panic=1 loglevel=4" >"$out/cmdline"
echo "$stamp" >"$out/stamp"
log "built $out: vmlinuz $(du -h "$out/vmlinuz" | cut -f1), initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1) ($pkg)"
[ "$print_dir" -eq 0 ] || echo "$out"
