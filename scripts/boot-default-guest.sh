#!/usr/bin/env bash
# Builds rangevm and the default Linux guest, and boots the guest under rangevm:
#
#   - directly on this host's /dev/kvm when that KVM can run a stock Linux guest;
#   - otherwise inside an *emulated host* (QEMU software emulation with real nested KVM,
#     resources/build-emuhost.sh), saying why. That path is slow (about 15-60 s).
# On a ppc64le (POWER9 or later, kvm-hv, radix) host the guest is Debian's ppc64el kernel
# and it boots directly (there is no emulated host for that case).
# By default the guest prints its marker line, runs a command and powers off.
#
# Usage: scripts/boot-default-guest.sh [OPTIONS]
#   --shell           give a shell prompt on the guest console instead of running the
#                     command and powering off ("poweroff -f" leaves); in the emulated
#                     host too, where it is slow and Ctrl-C ends the emulated host
#   --command TEXT    the shell command the guest runs after its marker line
#                     (default: uname -a; cat /proc/meminfo | head -3)
#   --cpus N          guest vCPUs (default 1)
#   --memory SIZE     guest memory, e.g. 256M or 1G (default 256M)
#   --mem-lock MODE   range or global: how rangevm locks guest memory (default range)
#   --emulated        use the emulated host even if this host's KVM could run the guest
#   --direct          use /dev/kvm even if this script thinks it cannot run the guest
#   --timeout SECS    give up on the emulated host after SECS seconds (default 600)
#   -h, --help        this text
#
# The exit status is rangevm's: 0 the guest powered off, 1 VMM error, 2 bad rangevm
# command line, 3 guest reset, 4 triple fault, 5 guest panic, 130/143 SIGINT/SIGTERM.
# This script itself exits 2 on a bad option and 1 when it cannot get that far.
# Needs: cargo, apt-get and dpkg-deb (Debian/Ubuntu, for the guest), and for the
# emulated host qemu-system-x86_64 (Debian package qemu-system-x86).
# Environment: RANGEVM_BIN=PATH uses that rangevm binary instead of building one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="boot-default-guest"

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

# --- options -----------------------------------------------------------------------------

shell=0
command_text='uname -a; cat /proc/meminfo | head -3'
command_given=0
cpus=1
memory=256M
mem_lock=range
force=""
timeout_secs=600

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        usage_error "$1 needs a value"
    fi
}
while [ "$#" -gt 0 ]; do
    case "$1" in
        --shell) shell=1; shift ;;
        --command) need_value "$@"; command_text="$2"; command_given=1; shift 2 ;;
        --command=*) command_text="${1#*=}"; command_given=1; shift ;;
        --cpus) need_value "$@"; cpus="$2"; shift 2 ;;
        --cpus=*) cpus="${1#*=}"; shift ;;
        --memory) need_value "$@"; memory="$2"; shift 2 ;;
        --memory=*) memory="${1#*=}"; shift ;;
        --mem-lock) need_value "$@"; mem_lock="$2"; shift 2 ;;
        --mem-lock=*) mem_lock="${1#*=}"; shift ;;
        --timeout) need_value "$@"; timeout_secs="$2"; shift 2 ;;
        --timeout=*) timeout_secs="${1#*=}"; shift ;;
        --emulated) [ "$force" != direct ] || usage_error "--emulated and --direct exclude each other"; force=emulated; shift ;;
        --direct) [ "$force" != emulated ] || usage_error "--emulated and --direct exclude each other"; force=direct; shift ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *) usage_error "unknown option '$1'" ;;
    esac
done

if ! [[ "$cpus" =~ ^[0-9]{1,3}$ ]] || [ "$((10#$cpus))" -lt 1 ] || [ "$((10#$cpus))" -gt 254 ]; then
    usage_error "--cpus '$cpus' is not a number of vCPUs from 1 to 254"
fi
cpus=$((10#$cpus))
if ! [[ "$timeout_secs" =~ ^[0-9]{1,6}$ ]] || [ "$((10#$timeout_secs))" -lt 1 ]; then
    usage_error "--timeout '$timeout_secs' is not a number of seconds"
fi
timeout_secs=$((10#$timeout_secs))
case "$mem_lock" in
    range | global) ;;
    *) usage_error "--mem-lock '$mem_lock' is neither range nor global" ;;
esac

# size_mib SIZE: the size in MiB (rounded down) of a rangevm size (bytes, or K/M/G/T).
size_mib() {
    local n unit
    [[ "$1" =~ ^([0-9]{1,13})([KkMmGgTt]?)$ ]] || return 1
    n=$((10#${BASH_REMATCH[1]}))
    unit="${BASH_REMATCH[2]^^}"
    case "$unit" in
        "") echo $((n >> 20)) ;;
        K) echo $((n >> 10)) ;;
        M) echo "$n" ;;
        G) echo $((n << 10)) ;;
        T) echo $((n << 20)) ;;
    esac
}
memory_mib="$(size_mib "$memory")" || usage_error "--memory '$memory' is not a size (examples: 256M, 1G)"
[ "$memory_mib" -ge 96 ] || usage_error "--memory '$memory' is too small for the default guest (at least 96M)"

# --- which way: /dev/kvm or the emulated host --------------------------------------------

# Sets `why_not` to the reason this host's KVM cannot run a stock guest, or "" if it can.
why_not=""
if [ ! -e /dev/kvm ]; then
    why_not="this host has no /dev/kvm (no hardware virtualization here, or the kvm_intel/kvm_amd module is not loaded)"
elif [ -d /sys/module/kvm_pvm ]; then
    why_not="this host's /dev/kvm comes from kvm_pvm, which cannot run a stock Linux kernel"
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    why_not="you may not open /dev/kvm (add yourself to its group, e.g. 'sudo usermod -aG kvm $(id -un)', and log in again)"
fi

# On a PowerPC64 (ppc64le) host the default guest is Debian's ppc64el kernel
# (resources/build-guest-ppc64.sh), booted on kvm-hv; there is no emulated host for it.
host_arch="$(uname -m)"
guest_script=build-guest.sh
guest_kernel=vmlinuz
guest_extra=" pci=off"
if [ "$host_arch" = ppc64le ]; then
    guest_script=build-guest-ppc64.sh
    guest_kernel=vmlinux
    guest_extra=""
    [ -z "$why_not" ] || die "$why_not; on a POWER host load kvm-hv ('sudo modprobe kvm-hv') on a POWER9 or later booted in radix mode"
    [ "$force" != emulated ] || usage_error "--emulated is for x86_64 hosts; this is a $host_arch host"
fi

mode=direct
[ -z "$why_not" ] || mode=emulated
[ -z "$force" ] || mode="$force"
# What the emulated host needs: QEMU, and memory for the guest plus the host's own.
host_mib=$((memory_mib + 768))
check_emulated_host_tools() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 ||
        die "the emulated host needs qemu-system-x86_64: install the Debian/Ubuntu package qemu-system-x86 ('sudo apt-get install qemu-system-x86', or scripts/ensure-deps.sh, which installs it with the test suite's other tools)"
    local avail_mib
    avail_mib="$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo 2>/dev/null || echo 0)"
    if [ "${avail_mib:-0}" -gt 0 ] && [ "$host_mib" -gt "$avail_mib" ]; then
        die "the emulated host would need ${host_mib} MiB of memory for a $memory guest, but only ${avail_mib} MiB are available (use a smaller --memory)"
    fi
}
# Check the tools of the chosen way before the slow steps.
[ -n "${RANGEVM_BIN:-}" ] || command -v cargo >/dev/null 2>&1 ||
    die "cargo is not installed (https://rustup.rs installs it)"
[ "$mode" != emulated ] || check_emulated_host_tools

# --- build ---------------------------------------------------------------------------------

cd "$ROOT"
rangevm_binary "the first build takes a minute or two"

say "building the default guest (resources/$guest_script; the first time it downloads about 70 MB of Debian packages)"
bash "$ROOT/resources/$guest_script" || die "resources/$guest_script failed"
guest_dir="$(bash "$ROOT/resources/$guest_script" --print-dir)"
kernel="$guest_dir/$guest_kernel"
initrd="$guest_dir/initramfs.cpio.gz"
base_cmdline="$(cat "$guest_dir/cmdline")"

# The guest's command line: rangevm has no PCI (pci=off on x86); the command travels base64-coded
# (with --shell only a command given with --command runs, before the prompt).
cmdline="$base_cmdline$guest_extra"
if [ -n "$command_text" ] && { [ "$shell" -eq 0 ] || [ "$command_given" -eq 1 ]; }; then
    cmdline+=" rangevm.cmd64=$(printf '%s' "$command_text" | base64 -w0)"
fi
[ "$shell" -eq 0 ] || cmdline+=" rangevm.shell=1"

# A last check before booting directly: rangevm's own probe of /dev/kvm (it opens it,
# checks the API version and the capabilities rangevm needs).
if [ "$mode" = direct ] && [ -z "$force" ] && ! "$rangevm" host-check >/dev/null 2>&1; then
    why_not="'rangevm host-check' finds this host's KVM unusable (run it to see why)"
    mode=emulated
    check_emulated_host_tools
fi

describe_status() {
    case "$1" in
        0) echo "the guest powered off" ;;
        1) echo "rangevm failed; its message is above" ;;
        2) echo "rangevm rejected its command line" ;;
        3) echo "the guest reset itself" ;;
        4) echo "a vCPU triple-faulted" ;;
        5) echo "the guest kernel panicked" ;;
        130) echo "stopped by SIGINT (Ctrl-C)" ;;
        143) echo "stopped by SIGTERM" ;;
        *) echo "unexpected status" ;;
    esac
}

run_args=(run --kernel "$kernel" --initrd "$initrd" --memory "$memory" --cpus "$cpus"
    --mem-lock "$mem_lock" --cmdline "$cmdline")

# --- direct: rangevm on this host's /dev/kvm -----------------------------------------------

if [ "$mode" = direct ]; then
    if [ -n "$why_not" ]; then
        say "--direct: using /dev/kvm although $why_not"
    fi
    say "booting the default guest on this host's /dev/kvm: $cpus vCPU(s), $memory, --mem-lock $mem_lock"
    if [ "$shell" -eq 1 ]; then
        say "a shell prompt follows once the guest is up; 'poweroff -f' powers the guest off, Ctrl-C stops rangevm"
    fi
    status=0
    "$rangevm" "${run_args[@]}" || status=$?
    say "rangevm exited with status $status ($(describe_status "$status"))"
    exit "$status"
fi

# --- emulated: rangevm inside QEMU's software-emulated host --------------------------------

if [ "$force" = emulated ]; then
    say "using the emulated host (--emulated): QEMU software emulation with nested KVM inside; about 15-60 s"
else
    say "$why_not, so the guest boots inside an emulated host (QEMU software emulation with real nested KVM); about 15-60 s"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-boot.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/payload"
cp "$rangevm" "$work/payload/rangevm"
cp "$kernel" "$initrd" "$work/payload/"

say "building the emulated host's initramfs (resources/build-emuhost.sh; the first time it downloads Debian's kernel)"
host_kernel="$(bash "$ROOT/resources/build-emuhost.sh" --payload "$work/payload" --out "$work/host.cpio.gz")" ||
    die "resources/build-emuhost.sh failed"

# Inside, the command runs in /payload; its last line carries rangevm's exit status. A
# heartbeat on the emulated host's second serial port (a file here) tells a frozen
# emulated host from a slow guest: QEMU's software emulation of nested SVM freezes now
# and then (about 1 boot in 40 here, under rangevm and under QEMU/KVM alike).
status_tag="BOOT-DEFAULT-GUEST-RANGEVM-STATUS="
inner="( while :; do echo . >/dev/ttyS1; sleep 5; done ) & rangevm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory $memory --cpus $cpus --mem-lock $mem_lock --cmdline \"$cmdline\"; echo \"$status_tag\$?\""
# The emulated host gets a CPU per guest vCPU, up to this machine's count.
host_cpus="$cpus"
ncpu="$(nproc 2>/dev/null || echo 1)"
[ "$host_cpus" -le "$ncpu" ] || host_cpus="$ncpu"
host_cmdline="console=ttyS0 loglevel=4 reboot=k panic=1 rangevm.cmd64=$(printf '%s' "$inner" | base64 -w0)"
console="$work/console.log"
heartbeat="$work/heartbeat"
# -display none, not -nographic: no firmware messages on the serial console.
qemu_args=(-accel tcg -cpu max -smp "$host_cpus" -m "${host_mib}M" -display none -no-reboot
    -nodefaults -serial stdio -serial "file:$heartbeat" -pidfile "$work/qemu.pid"
    -kernel "$host_kernel" -initrd "$work/host.cpio.gz" -append "$host_cmdline")

# emulated_run: one emulated host, its console streamed line by line (its own boot
# messages hidden, progress lines added). Sets `stalled` to 1 if it froze.
emulated_run() {
    local phase=boot line="" chunk="" quiet up_at=0 rc
    stalled=0
    : >"$console"
    : >"$heartbeat"
    rm -f "$work/qemu.pid"
    # --foreground: QEMU stays in the terminal's process group, so Ctrl-C reaches it.
    timeout --foreground "$timeout_secs" qemu-system-x86_64 "${qemu_args[@]}" </dev/null 2>>"$work/qemu.err" |
        while :; do
            if IFS= read -r -t 10 chunk; then
                line="$line$chunk"
            else
                rc=$?
                if [ "$rc" -le 128 ]; then
                    # End of the output: QEMU exited.
                    line="$line$chunk"
                    [ -z "$line" ] || printf '%s\n' "$line" >>"$console"
                    break
                fi
                # Nothing for 10 s (a partial line stays in $chunk): is the host alive?
                line="$line$chunk"
                quiet=0
                if [ "$phase" = boot ]; then
                    [ $((SECONDS - start)) -lt 180 ] || quiet=1
                elif [ $((SECONDS - up_at)) -ge 60 ] &&
                    [ $(($(date +%s) - $(stat -c %Y "$heartbeat"))) -ge 60 ]; then
                    quiet=1
                fi
                if [ "$quiet" -eq 1 ] && [ -s "$work/qemu.pid" ]; then
                    : >"$work/stalled"
                    kill "$(cat "$work/qemu.pid")" 2>/dev/null
                fi
                continue
            fi
            while [[ "$line" == *$'\r' ]]; do line="${line%$'\r'}"; done
            printf '%s\n' "$line" >>"$console"
            case "$phase:$line" in
                boot:*RANGEVM-EMUHOST-UP\ kvm=yes*)
                    phase=guest
                    up_at=$SECONDS
                    say "emulated host up after $((SECONDS - start)) s, KVM works inside; starting rangevm (the guest's console follows)"
                    ;;
                boot:*RANGEVM-EMUHOST-UP\ kvm=no*)
                    phase=finished
                    say "the emulated host is up but has no /dev/kvm (kvm_amd did not load); cannot run rangevm there"
                    ;;
                boot:*) ;;
                guest:*"$status_tag"*) phase=finished ;;
                guest:*) printf '%s\n' "$line" ;;
                *) ;;
            esac
            line=""
        done
    codes=("${PIPESTATUS[@]}")
    [ ! -e "$work/stalled" ] || stalled=1
    rm -f "$work/stalled"
}

say "booting the emulated host ($host_cpus CPU(s), ${host_mib} MiB; its firmware and kernel take 10-30 s)"
start=$SECONDS
set +e
if [ "$shell" -eq 1 ]; then
    # Interactive: the terminal goes to QEMU's serial port, which is the emulated host's
    # console and rangevm's standard input there; the output is passed on byte by byte.
    say "a shell prompt follows once the guest is up; 'poweroff -f' powers the guest off, Ctrl-C ends the emulated host"
    qemu-system-x86_64 "${qemu_args[@]}" | tee "$console"
    codes=("${PIPESTATUS[@]}")
else
    emulated_run
    if [ "$stalled" -eq 1 ]; then
        say "the emulated host froze (no sign of life for a minute; QEMU's software emulation does that now and then); trying once more"
        start=$SECONDS
        emulated_run
    fi
fi
set -e

status="$(sed -n "s/.*$status_tag\([0-9]*\).*/\1/p" "$console" | tail -n 1)"
if [ -z "$status" ]; then
    if [ "$shell" -eq 0 ] && [ "$stalled" -eq 1 ]; then
        say "the emulated host froze again; giving up"
    elif [ "${codes[0]}" -eq 124 ]; then
        say "the emulated host did not finish within $timeout_secs s (--timeout); stopped it"
    elif [ "${codes[0]}" -ne 0 ]; then
        say "qemu-system-x86_64 exited with status ${codes[0]} before rangevm finished"
    else
        say "the emulated host powered off without reporting rangevm's status"
    fi
    say "the last lines of the emulated host's console:"
    tail -n 20 "$console" | sed 's/^/  | /' >&2
    if [ -s "$work/qemu.err" ]; then
        say "qemu-system-x86_64 said:"
        sed 's/^/  | /' "$work/qemu.err" >&2
    fi
    exit 1
fi
say "rangevm exited with status $status ($(describe_status "$status")); whole run $((SECONDS - start)) s in the emulated host"
exit "$status"
