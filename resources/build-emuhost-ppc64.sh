#!/usr/bin/env bash
# Builds the initramfs of an emulated *PowerPC64* host: Debian's ppc64el kernel booted by
# qemu-system-ppc64 in software emulation (-M pseries,cap-nested-hv=on -cpu POWER9), in
# which KVM is real (kvm-hv on QEMU's nested-HV sPAPR machine, radix guests only).
# rangevm for powerpc64le runs inside it. The x86_64 counterpart is build-emuhost.sh.
#
# Usage: resources/build-emuhost-ppc64.sh --payload DIR --out FILE
#   --payload DIR  files to put under /payload (statically linked ppc64le programs, guest
#                  kernels, ...); nothing is added for dynamically linked programs
#   --out FILE     the gzipped cpio to write
# Prints the path of the host kernel (an ELF vmlinux) on standard output.
#
# The host's /init loads kvm and kvm-hv, prints "RANGEVM-EMUHOST-UP kvm=yes|no", runs the
# command given as rangevm.cmd64=<base64> on the kernel command line in /payload (which
# is on PATH), prints "RANGEVM-CMD-EXIT=<status>", and powers off.
# Needs apt-get, dpkg-deb, gzip and qemu-ppc64le-static (to run the ppc64el busybox while
# packing). The ppc64el packages come through the package lists in
# $RANGEVM_CACHE/apt-ppc64el (dpkg's own state is not touched).
set -euo pipefail

payload=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --payload) payload="${2:-}"; shift 2 ;;
        --out) out="${2:-}"; shift 2 ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-emuhost-ppc64: unknown argument '$1' (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "build-emuhost-ppc64: $*" >&2; }
die() {
    echo "build-emuhost-ppc64: error: $*" >&2
    exit 1
}
if [ -z "$payload" ] || [ ! -d "$payload" ]; then
    die "--payload DIR is required and must be a folder"
fi
[ -n "$out" ] || die "--out FILE is required"
for tool in apt-get apt-cache dpkg-deb gzip qemu-ppc64le-static; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed (scripts/ensure-deps.sh installs it)"
done

cache="${RANGEVM_CACHE:-$HOME/.cache/rangevm}"
# shellcheck source=resources/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
BUSYBOX_RUNNER=(qemu-ppc64le-static)

# The extracted packages and the kernel are kept: every test run builds a new initramfs
# around them. (Without fresh package lists, a cached extraction is used as it is.)
pkg="$(debian_kernel_pkg_ppc64el)"
abi="${pkg#linux-image-}"
base="$cache/emuhost-ppc64/$abi"
kernel="$base/vmlinux"
if [ ! -s "$kernel" ] || [ ! -f "$base/bin/busybox" ]; then
    rm -rf "$base"
    debian_extract_ppc64el "$base/pkg" "$pkg" busybox-static
    cp "$base/pkg/bin/busybox" "$base/busybox.tmp"
    ppc64el_vmlinux "$base/pkg" "$abi" "$base/vmlinux.tmp"
    mkdir -p "$base/bin" "$base/modules"
    mods="$base/pkg/lib/modules/$abi/kernel"
    for m in arch/powerpc/kvm/kvm.ko arch/powerpc/kvm/kvm-hv.ko; do
        [ -f "$mods/$m" ] || die "no $m in $pkg"
        cp "$mods/$m" "$base/modules/"
    done
    # irqbypass is built in on Debian's ppc64el kernel; take it if it ever is a module.
    if [ -f "$mods/virt/lib/irqbypass.ko" ]; then
        cp "$mods/virt/lib/irqbypass.ko" "$base/modules/"
    fi
    rm -rf "$base/pkg"
    mv "$base/vmlinux.tmp" "$kernel"
    mv "$base/busybox.tmp" "$base/bin/busybox"
fi
busybox="$base/bin/busybox"

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-emuhost-ppc64.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
busybox_root "$root" "$busybox"
cp "$base"/modules/*.ko "$root/lib/modules/"

mkdir -p "$root/payload"
cp -a "$payload/." "$root/payload/"

cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in irqbypass kvm kvm-hv; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
kvm=no
[ -c /dev/kvm ] && kvm=yes
echo "RANGEVM-EMUHOST-UP kvm=$kvm"
cmd=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        rangevm.cmd64=*) cmd="$(echo "${word#rangevm.cmd64=}" | base64 -d)" ;;
    esac
done
if [ -n "$cmd" ]; then
    cd /payload
    PATH="/payload:$PATH" sh -c "$cmd"
    echo "RANGEVM-CMD-EXIT=$?"
fi
sync
poweroff -f
INIT
chmod 755 "$root/init"

pack_cpio "$root" "$busybox" "$out"
log "built $out ($(du -h "$out" | cut -f1)) around $pkg"
echo "$kernel"
