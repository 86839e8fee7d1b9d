#!/usr/bin/env bash
# Builds the initramfs of an *emulated host*: Debian's x86_64 kernel booted by QEMU in
# software emulation (-accel tcg -cpu max), in which KVM is real (AMD SVM as QEMU
# emulates it, kvm_amd with nested=1 npt=1). rangevm runs inside it, where this machine's
# own KVM cannot run stock guests.
#
# Usage: resources/build-emuhost.sh --payload DIR --out FILE
#   --payload DIR  files to put under /payload (e.g. a rangevm binary, a guest kernel and
#                  initramfs); the shared libraries of any dynamically linked ELF
#                  program in DIR are copied in too, from this host
#   --out FILE     the gzipped cpio to write
# Prints the path of the host kernel (bzImage) on standard output.
#
# The host's /init loads irqbypass, ccp, kvm and kvm_amd, prints
# "RANGEVM-EMUHOST-UP kvm=yes|no", runs the command given as rangevm.cmd64=<base64> on
# the kernel command line in /payload (which is on PATH), prints
# "RANGEVM-CMD-EXIT=<status>", and powers off.
set -euo pipefail

payload=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --payload) payload="${2:-}"; shift 2 ;;
        --out) out="${2:-}"; shift 2 ;;
        -h | --help)
            sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-emuhost: unknown argument '$1' (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "build-emuhost: $*" >&2; }
die() {
    echo "build-emuhost: error: $*" >&2
    exit 1
}
if [ -z "$payload" ] || [ ! -d "$payload" ]; then
    die "--payload DIR is required and must be a folder"
fi
[ -n "$out" ] || die "--out FILE is required"

cache="${RANGEVM_CACHE:-$HOME/.cache/rangevm}"
# shellcheck source=resources/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/debian.sh"
pkg="$(debian_kernel_pkg)"
abi="${pkg#linux-image-}"

# The extracted packages are kept: every test run builds a new initramfs around them.
base="$cache/emuhost-x86_64/$abi"
if [ ! -s "$base/boot/vmlinuz-$abi" ] || [ ! -x "$base/bin/busybox" ]; then
    rm -rf "$base"
    debian_extract "$base" "$pkg" busybox-static
fi
kernel="$base/boot/vmlinuz-$abi"
busybox="$base/bin/busybox"

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-emuhost.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
busybox_root "$root" "$busybox"

mods="$base/lib/modules/$abi/kernel"
for m in virt/lib/irqbypass.ko drivers/crypto/ccp/ccp.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko; do
    [ -f "$mods/$m" ] || die "no $m in $pkg"
    cp "$mods/$m" "$root/lib/modules/"
done

mkdir -p "$root/payload"
cp -a "$payload/." "$root/payload/"
# Shared libraries of dynamically linked programs, at the paths the loader expects.
for f in "$root"/payload/*; do
    if [ ! -f "$f" ] || [ ! -x "$f" ]; then
        continue
    fi
    ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done

cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
for m in irqbypass ccp kvm; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
insmod /lib/modules/kvm-amd.ko nested=1 npt=1 2>/dev/null
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
