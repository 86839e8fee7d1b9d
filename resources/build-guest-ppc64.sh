#!/usr/bin/env bash
# Builds rangevm's default ppc64le guest (sPAPR, radix) from Debian ppc64el packages into
# a cached folder, the counterpart of build-guest.sh:
#
#   $RANGEVM_CACHE/guest-ppc64le/vmlinux            the distribution kernel (ELF, 64 KiB pages)
#   $RANGEVM_CACHE/guest-ppc64le/initramfs.cpio.gz  busybox, the virtio modules, /init
#   $RANGEVM_CACHE/guest-ppc64le/cmdline            a kernel command line (console=hvc0)
#
# (RANGEVM_CACHE defaults to ~/.cache/rangevm.) /init is the x86_64 guest's (see
# build-guest.sh): it prints "RANGEVM-GUEST-UP", runs rangevm.cmd64=<base64> or
# rangevm.cmd=<word>, prints "RANGEVM-CMD-EXIT=<status>" and powers off, or starts a
# shell with rangevm.shell=1.
#
# Usage: resources/build-guest-ppc64.sh [--force] [--print-dir]
#   --force      rebuild even if the cache is up to date
#   --print-dir  print only the output folder (for scripts)
# Needs: apt-get, dpkg-deb, gzip, qemu-ppc64le-static (runs the ppc64el busybox while
# packing). Package lists and .debs are kept in $RANGEVM_CACHE/apt-ppc64el (dpkg's own
# state is not touched); about 50 MB the first time.
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
            echo "build-guest-ppc64: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { [ "$print_dir" -eq 1 ] || echo "build-guest-ppc64: $*" >&2; }
die() {
    echo "build-guest-ppc64: error: $*" >&2
    exit 1
}

for tool in apt-get apt-cache dpkg-deb gzip qemu-ppc64le-static; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed (scripts/ensure-deps.sh installs it)"
done

cache="${RANGEVM_CACHE:-$HOME/.cache/rangevm}"
out="$cache/guest-ppc64le"
mkdir -p "$out"

# shellcheck source=resources/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
BUSYBOX_RUNNER=(qemu-ppc64le-static)
pkg="$(debian_kernel_pkg_ppc64el)"
abi="${pkg#linux-image-}"

stamp="$pkg $(cat "$0" "$(dirname "$0")/debian.sh" | sha256sum | cut -d' ' -f1)"
if [ "$force" -eq 0 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
    [ -s "$out/vmlinux" ] && [ -s "$out/initramfs.cpio.gz" ]; then
    log "up to date: $out ($pkg)"
    [ "$print_dir" -eq 0 ] || echo "$out"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-guest-ppc64.XXXXXX")"
trap 'rm -rf "$work"' EXIT

debian_extract_ppc64el "$work/pkg" "$pkg" busybox-static
ppc64el_vmlinux "$work/pkg" "$abi" "$work/vmlinux"
busybox="$work/pkg/bin/busybox"
[ -f "$busybox" ] || die "no bin/busybox in busybox-static"

log "building the initramfs"
root="$work/root"
busybox_root "$root" "$busybox"

# The virtio modules /init loads (in this order), uncompressed or not.
moddir="$work/pkg/lib/modules/$abi/kernel/drivers/virtio"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
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

cp "$work/vmlinux" "$out/vmlinux"
cp "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "console=hvc0 reboot=k panic=1 loglevel=4" >"$out/cmdline"
echo "$stamp" >"$out/stamp"
log "built $out: vmlinux $(du -h "$out/vmlinux" | cut -f1), initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1) ($pkg)"
[ "$print_dir" -eq 0 ] || echo "$out"
