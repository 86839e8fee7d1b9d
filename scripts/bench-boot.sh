#!/usr/bin/env bash
# Measures rangevm's boot figures (issue 3) and prints them as one table:
#
#   on this host's own /dev/kvm, with a tiny hand-made guest (works even where KVM can
#   only run tiny guests, e.g. kvm_pvm):
#     - time from spawning `rangevm run` to the guest's first serial byte (its first
#       instruction writes it), median of --tiny-runs runs, and the CPU time of a whole run
#     - rangevm's resident memory with a 512M guest that touches almost nothing: peak
#       RSS (wait4's ru_maxrss, what /usr/bin/time -v reports) and, while the guest
#       idles, RSS split into guest RAM and the VMM's own
#   inside ONE emulated host (QEMU software emulation with real nested KVM,
#   resources/build-emuhost.sh):
#     - Linux boot-to-marker time of the default guest (resources/build-guest.sh) under
#       rangevm (--cpus 1 and 2, --mem-lock range and global) and under QEMU/KVM booting
#       the same kernel and initramfs there (-M pc and -M microvm), --rounds rounds of
#       each, alternating; medians and the rangevm/QEMU ratios
#
# Usage: scripts/bench-boot.sh [OPTIONS]
#   --rounds N       boots of each configuration in the emulated host (default 3)
#   --tiny-runs N    tiny-guest runs for the start-up time (default 50)
#   --memory SIZE    memory of the Linux guest in the emulated host (default 256M)
#   --host-cpus N    CPUs of the emulated host (default 1). The emulated host itself
#                    freezes now and then (about 1 guest boot in 40 here, with 1 or 2
#                    CPUs, under rangevm and QEMU/KVM alike); its heartbeat stops, the
#                    run is marked and a new emulated host goes on with the next one
#   --configs LIST   comma-separated subset of: rangevm-c1-range, rangevm-c2-range,
#                    rangevm-c1-global, qemu-pc, qemu-pc-c2, qemu-microvm (default: all)
#   --skip-tiny      skip the measurements on this host's /dev/kvm
#   --skip-emulated  skip the emulated host (the Linux boot times)
#   -h, --help       this text
#
# Needs: cargo, python3, apt-get/dpkg-deb (the guest), qemu-system-x86_64 (Debian package
# qemu-system-x86) and its firmware (bios-256k.bin from seabios, qboot.rom etc. from
# qemu-system-data). Takes about 4-6 minutes with the defaults. Exit status 0 if every
# run succeeded, 1 if any failed (the table shows which), 2 on a bad option.
# Environment: RANGEVM_BIN=PATH uses that rangevm binary instead of building one.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="bench-boot"
ALL_CONFIGS="rangevm-c1-range,rangevm-c2-range,rangevm-c1-global,qemu-pc,qemu-pc-c2,qemu-microvm"

# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

rounds=3
tiny_runs=50
memory=256M
host_cpus=1
configs="$ALL_CONFIGS"
do_tiny=1
do_emulated=1

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then
        usage_error "$1 needs a value"
    fi
}
while [ "$#" -gt 0 ]; do
    case "$1" in
        --rounds) need_value "$@"; rounds="$2"; shift 2 ;;
        --tiny-runs) need_value "$@"; tiny_runs="$2"; shift 2 ;;
        --memory) need_value "$@"; memory="$2"; shift 2 ;;
        --host-cpus) need_value "$@"; host_cpus="$2"; shift 2 ;;
        --configs) need_value "$@"; configs="$2"; shift 2 ;;
        --skip-tiny) do_tiny=0; shift ;;
        --skip-emulated) do_emulated=0; shift ;;
        -h | --help)
            awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
            exit 0
            ;;
        *) usage_error "unknown option '$1'" ;;
    esac
done

positive() {
    if ! [[ "$2" =~ ^[0-9]{1,4}$ ]] || [ "$((10#$2))" -lt 1 ]; then
        usage_error "$1 '$2' is not a positive number"
    fi
}
positive --rounds "$rounds"
positive --tiny-runs "$tiny_runs"
positive --host-cpus "$host_cpus"
rounds=$((10#$rounds))
tiny_runs=$((10#$tiny_runs))
host_cpus=$((10#$host_cpus))
[[ "$memory" =~ ^([0-9]{1,6})([MmGg])$ ]] || usage_error "--memory '$memory' is not a size like 256M or 1G"
memory_mib=$((10#${BASH_REMATCH[1]}))
case "${BASH_REMATCH[2]}" in [Gg]) memory_mib=$((memory_mib << 10)) ;; esac
[ "$memory_mib" -ge 128 ] || usage_error "--memory '$memory' is too small for the default guest (at least 128M)"
config_list=()
IFS=',' read -r -a wanted <<<"$configs"
for c in "${wanted[@]}"; do
    case ",$ALL_CONFIGS," in
        *",$c,"*) config_list+=("$c") ;;
        *) usage_error "--configs: unknown configuration '$c' (known: $ALL_CONFIGS)" ;;
    esac
done
[ "${#config_list[@]}" -gt 0 ] || usage_error "--configs names no configuration"
[ "$do_tiny" -eq 1 ] || [ "$do_emulated" -eq 1 ] || usage_error "--skip-tiny and --skip-emulated leave nothing to measure"

# --- prerequisites -------------------------------------------------------------------------

[ -n "${RANGEVM_BIN:-}" ] || command -v cargo >/dev/null 2>&1 ||
    die "cargo is not installed (https://rustup.rs installs it)"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the timers and the table (Debian package python3)"
fw_dir_list=(/usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu)
# find_fw NAME: the first copy of a QEMU firmware file in QEMU's search path.
find_fw() {
    local d
    for d in "${fw_dir_list[@]}"; do
        if [ -e "$d/$1" ]; then
            echo "$d/$1"
            return 0
        fi
    done
    return 1
}
# The firmware QEMU loads for -M pc (SeaBIOS, the -kernel option ROM, the TPR patcher)
# and -M microvm (qboot), with -nodefaults (no NIC, no VGA).
FIRMWARE=(bios-256k.bin linuxboot_dma.bin kvmvapic.bin bios-microvm.bin)
if [ "$do_emulated" -eq 1 ]; then
    qemu_bin="$(command -v qemu-system-x86_64 || true)"
    [ -n "$qemu_bin" ] ||
        die "the emulated host needs qemu-system-x86_64: install the Debian/Ubuntu package qemu-system-x86 ('sudo apt-get install qemu-system-x86', or scripts/ensure-deps.sh)"
    for f in "${FIRMWARE[@]}"; do
        find_fw "$f" >/dev/null || die "QEMU firmware $f not found in ${fw_dir_list[*]} (packages seabios, qemu-system-data)"
    done
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-bench.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cd "$ROOT"
rangevm_binary ""

# --- the Python helpers: tiny guests, the spawn timer, the final table ----------------------

cat >"$work/bench.py" <<'PY'
"""Helpers of scripts/bench-boot.sh: tiny guests, the start-up timer, the table."""
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import time

LOAD = 0x100000


def elf64(code):
    """A minimal ELF64 executable: one PT_LOAD segment at LOAD, entered at its start."""
    offset = 0x1000
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LOAD, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, LOAD, LOAD, len(code), len(code), 0x1000)
    image = header + phdr
    return image + bytes(offset - len(image)) + code


# mov dx,0x3f8; mov al,'H'; out dx,al  (the first instruction that has an effect)
PRINT_H = bytes.fromhex("66baf803" "b048" "ee")
# mov dx,0x600; mov al,0x34; out dx,al (ACPI S5: power off); hlt
POWER_OFF = bytes.fromhex("66ba0006" "b034" "ee" "f4")
# cli; hlt; jmp back to the hlt (idles until the VMM is told to stop)
IDLE = bytes.fromhex("fa" "f4" "ebfd")


def make_guests(folder):
    with open(os.path.join(folder, "tiny-poweroff.elf"), "wb") as f:
        f.write(elf64(PRINT_H + POWER_OFF))
    with open(os.path.join(folder, "tiny-idle.elf"), "wb") as f:
        f.write(elf64(PRINT_H + IDLE))


def spawn(argv):
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def reap(proc):
    """Waits for proc with wait4: (exit code, rusage)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def kb_fields(path):
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def largest_mapping_rss(pid, size_kb):
    """Rss (kB) of the mappings of at least size_kb kB (guest RAM), and their count."""
    rss, count, size = 0, 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "Size:":
                size = int(parts[1])
            elif parts[0] == "Rss:" and size >= size_kb:
                rss += int(parts[1])
                count += 1
    return rss, count


def tiny(rangevm, folder, runs, out_json):
    poweroff = os.path.join(folder, "tiny-poweroff.elf")
    idle = os.path.join(folder, "tiny-idle.elf")
    res = {"runs": runs, "failures": []}

    # Python's own spawn cost, for context: spawn -> exit of /bin/true.
    true_ms = []
    for _ in range(20):
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(["true"], stdin=subprocess.DEVNULL)
        p.wait()
        true_ms.append((time.perf_counter_ns() - t0) / 1e6)
    res["spawn_true_ms"] = statistics.median(true_ms)

    first, whole, cpu = [], [], []
    argv = [rangevm, "run", "--kernel", poweroff, "--memory", "512M"]
    for i in range(runs + 3):  # three warm-up runs, not counted
        t0 = time.perf_counter_ns()
        p = spawn(argv)
        byte = os.read(p.stdout.fileno(), 1)
        t1 = time.perf_counter_ns()
        rest = p.stdout.read()
        err = p.stderr.read()
        code, usage = reap(p)
        t2 = time.perf_counter_ns()
        if byte != b"H" or rest or code != 0:
            res["failures"].append(f"run {i}: exit {code}, output {byte + rest!r}, "
                                   f"stderr {err.decode(errors='replace').strip()!r}")
            continue
        if i < 3:
            continue
        first.append((t1 - t0) / 1e6)
        whole.append((t2 - t0) / 1e6)
        cpu.append((usage.ru_utime + usage.ru_stime) * 1e3)
    if first:
        res["first_byte_ms"] = {"median": statistics.median(first), "min": min(first),
                                "max": max(first)}
        res["whole_run_ms"] = statistics.median(whole)
        res["cpu_ms"] = statistics.median(cpu)

    # Peak RSS as /usr/bin/time reports it (wait4's ru_maxrss). Not taken from the runs
    # above: a child spawned by this Python process inherits Python's RSS peak at exec.
    gnu_time = "/usr/bin/time"
    if os.access(gnu_time, os.X_OK):
        maxrss = []
        out = os.path.join(folder, "time.out")
        for _ in range(10):
            p = subprocess.run([gnu_time, "-f", "%M", "-o", out] + argv,
                               stdin=subprocess.DEVNULL, capture_output=True)
            with open(out) as f:
                last = f.read().split()
            if p.returncode == 0 and last and last[-1].isdigit():
                maxrss.append(int(last[-1]))
        if maxrss:
            res["maxrss_kb"] = {"median": statistics.median(maxrss), "max": max(maxrss)}
    else:
        res["no_gnu_time"] = True

    # Steady state: the idle guest has printed its byte; look at the VMM, then SIGTERM.
    p = spawn([rangevm, "run", "--kernel", idle, "--memory", "512M"])
    byte = os.read(p.stdout.fileno(), 1)
    time.sleep(0.3)
    status = kb_fields(f"/proc/{p.pid}/status")
    guest_rss, guest_maps = largest_mapping_rss(p.pid, 512 * 1024)
    threads = len(os.listdir(f"/proc/{p.pid}/task"))
    p.send_signal(signal.SIGTERM)
    p.stdout.read()
    err = p.stderr.read()
    code, _ = reap(p)
    res["idle"] = {"byte": byte.decode(errors="replace"), "vm_rss_kb": status.get("VmRSS"),
                   "vm_hwm_kb": status.get("VmHWM"),
                   "rss_anon_kb": status.get("RssAnon"), "rss_file_kb": status.get("RssFile"),
                   "guest_ram_rss_kb": guest_rss, "guest_ram_mappings": guest_maps,
                   "threads": threads, "sigterm_exit": code,
                   "stderr": err.decode(errors="replace").strip()}
    with open(out_json, "w") as f:
        json.dump(res, f, indent=1)


CONFIG_TEXT = {
    "rangevm-c1-range": "rangevm  --cpus 1 --mem-lock range",
    "rangevm-c2-range": "rangevm  --cpus 2 --mem-lock range",
    "rangevm-c1-global": "rangevm  --cpus 1 --mem-lock global",
    "qemu-pc": "QEMU/KVM -M pc      -smp 1",
    "qemu-pc-c2": "QEMU/KVM -M pc      -smp 2",
    "qemu-microvm": "QEMU/KVM -M microvm -smp 1",
}


def med(values):
    return statistics.median(values) if values else None


def fmt(v, unit=" s", digits=2):
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def report(tiny_json, console, order, rounds, memory, host_cpus, load):
    ok = True
    print()
    print("==== rangevm boot figures ====")
    print(f"(this machine: {os.cpu_count()} CPUs; load average {load})")
    if tiny_json and os.path.exists(tiny_json):
        with open(tiny_json) as f:
            t = json.load(f)
        print()
        print(f"On this host's /dev/kvm, tiny ELF guest (print 'H' to COM1, power off), "
              f"--memory 512M, {t['runs']} runs:")
        if "first_byte_ms" in t:
            fb = t["first_byte_ms"]
            print(f"  spawn -> first guest byte on stdout   median {fb['median']:6.2f} ms"
                  f"  (min {fb['min']:.2f}, max {fb['max']:.2f}; target <= 10 ms)")
            print(f"  spawn -> exit (whole run)             median {t['whole_run_ms']:6.2f} ms")
            print(f"  CPU time of a whole run (user+sys)    median {t['cpu_ms']:6.2f} ms"
                  f"  (Firecracker: <= 8 CPU-ms to start)")
        if "maxrss_kb" in t:
            mr = t["maxrss_kb"]
            print(f"  peak RSS (/usr/bin/time, 10 runs)     median {mr['median'] / 1024:6.2f} MiB"
                  f"  (max {mr['max'] / 1024:.2f}; target <= 5 MiB beyond guest memory)")
        elif t.get("no_gnu_time"):
            print("  peak RSS: no /usr/bin/time (Debian package time); see VmHWM below")
        print(f"  (python's own spawn -> exit of /bin/true: {t['spawn_true_ms']:.2f} ms)")
        idle = t.get("idle", {})
        if idle.get("vm_rss_kb") is not None:
            own = idle["vm_rss_kb"] - idle["guest_ram_rss_kb"]
            print(f"  idle guest (cli; hlt), 512M:          peak RSS (VmHWM) {idle['vm_hwm_kb'] / 1024:.2f} MiB;"
                  f" now RSS {idle['vm_rss_kb'] / 1024:.2f} MiB =")
            print(f"                                        "
                  f"guest RAM {idle['guest_ram_rss_kb'] / 1024:.2f} MiB + VMM's own {own / 1024:.2f} MiB")
            print(f"                                        (anonymous {idle['rss_anon_kb'] / 1024:.2f} MiB,"
                  f" file-backed {idle['rss_file_kb'] / 1024:.2f} MiB; {idle['threads']} threads;"
                  f" SIGTERM -> exit {idle['sigterm_exit']})")
            if idle["sigterm_exit"] != 143:
                ok = False
                print(f"  !! SIGTERM gave exit {idle['sigterm_exit']}, documented: 143")
        for fail in t["failures"]:
            ok = False
            print(f"  !! {fail}")
    if console:
        results = {}
        failures = []
        host_up = None
        reported = 0
        finished = False
        froze = []
        with open(console, errors="replace") as f:
            for line in f:
                parts = line.split()
                if "RANGEVM-EMUHOST-UP" in line:
                    host_up = line.strip()
                if line.startswith("bench: done"):
                    finished = True
                if len(parts) == 7 and parts[0] == "BENCH-RESULT":
                    reported += 1
                    name, rnd, t0, mark, end, st = parts[1:]
                    if st == "0" and mark != "-":
                        r = results.setdefault(name, {"mark": [], "end": []})
                        r["mark"].append(float(mark) - float(t0))
                        r["end"].append(float(end) - float(t0))
                    elif st == "froze":
                        froze.append(f"{name} round {rnd}")
                    else:
                        failures.append(f"{name} round {rnd}: exit status {st}, "
                                        f"marker {'seen' if mark != '-' else 'not seen'}")
        print()
        print(f"Inside the emulated host (QEMU TCG -cpu max, {host_cpus} CPU(s), nested KVM), "
              f"default Linux guest, {memory}, {rounds} round(s) each, alternating;")
        print("seconds from starting the VMM to the marker line / to the VMM's exit "
              "(/proc/uptime, 10 ms steps):")
        print(f"  {'configuration':38} {'marker':>8} {'exit':>8}   all marker times")
        for name in order:
            r = results.get(name)
            text = CONFIG_TEXT.get(name, name)
            if not r:
                print(f"  {text:38} {'-':>8} {'-':>8}   (no successful run)")
                continue
            runs = " ".join(f"{v:.2f}" for v in r["mark"])
            print(f"  {text:38} {fmt(med(r['mark'])):>8} {fmt(med(r['end'])):>8}   {runs}")
        base = results.get("rangevm-c1-range")
        for other, label in (("qemu-pc", "QEMU -M pc"), ("qemu-microvm", "QEMU -M microvm")):
            if base and results.get(other):
                a, b = med(base["mark"]), med(results[other]["mark"])
                print(f"  ratio rangevm (1 vCPU, range) / {label:16} boot-to-marker {a / b:.2f}"
                      f"  (to exit {med(base['end']) / med(results[other]['end']):.2f})")
        c2, q2 = results.get("rangevm-c2-range"), results.get("qemu-pc-c2")
        if c2 and q2:
            print(f"  ratio rangevm (2 vCPUs, range) / QEMU -M pc -smp 2   boot-to-marker "
                  f"{med(c2['mark']) / med(q2['mark']):.2f}")
        g = results.get("rangevm-c1-global")
        if base and g:
            print(f"  ratio --mem-lock global / range (1 vCPU)             boot-to-marker "
                  f"{med(g['mark']) / med(base['mark']):.2f}")
        if host_up is None:
            ok = False
            print("  !! the emulated host never came up")
        for fail in failures:
            ok = False
            print(f"  !! {fail}")
        for run in froze:
            print(f"  note: the emulated host froze during {run} (not counted; a new one went on)")
        for name in order:
            if name not in results:
                ok = False
        expected = len(order) * int(rounds)
        if host_up is not None and not finished:
            ok = False
            nxt = reported + 1
            stuck = order[(nxt - 1) % len(order)] if order else "?"
            print(f"  !! the benchmark did not finish: {reported} of {expected} runs reported; "
                  f"run {nxt} ({stuck}, round {(nxt - 1) // len(order) + 1}) never ended")
    return ok


def main():
    cmd = sys.argv[1]
    if cmd == "guests":
        make_guests(sys.argv[2])
    elif cmd == "tiny":
        tiny(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif cmd == "report":
        tiny_json, console = sys.argv[2] or None, sys.argv[3] or None
        order = sys.argv[4].split(",")
        ok = report(tiny_json, console, order, sys.argv[5], sys.argv[6], sys.argv[7],
                    sys.argv[8])
        sys.exit(0 if ok else 1)


main()
PY

# --- 1. tiny guest on this host's /dev/kvm -------------------------------------------------

# loadavg: the 1-minute load average (other work on this machine slows every figure).
loadavg() { cut -d' ' -f1 /proc/loadavg; }
load="at start $(loadavg)"
tiny_json=""
if [ "$do_tiny" -eq 1 ]; then
    if [ ! -e /dev/kvm ] || [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        say "no usable /dev/kvm here: skipping the tiny-guest start-up and RSS figures"
    else
        kind="KVM"
        [ ! -d /sys/module/kvm_pvm ] || kind="KVM (kvm_pvm)"
        say "tiny guest on this host's $kind: $tiny_runs runs of spawn -> first serial byte, then RSS"
        python3 "$work/bench.py" guests "$work"
        tiny_json="$work/tiny.json"
        python3 "$work/bench.py" tiny "$rangevm" "$work" "$tiny_runs" "$tiny_json"
    fi
fi

# --- 2. Linux boot times inside one emulated host ----------------------------------------

console=""
if [ "$do_emulated" -eq 1 ]; then
    say "building the default guest (resources/build-guest.sh)"
    bash "$ROOT/resources/build-guest.sh" || die "resources/build-guest.sh failed"
    guest_dir="$(bash "$ROOT/resources/build-guest.sh" --print-dir)"
    base_cmdline="$(cat "$guest_dir/cmdline")"

    payload="$work/payload"
    mkdir -p "$payload/qemu-fw"
    cp "$rangevm" "$payload/rangevm"
    cp "$qemu_bin" "$guest_dir/vmlinuz" "$guest_dir/initramfs.cpio.gz" "$payload/"
    for f in "${FIRMWARE[@]}"; do
        cp -L "$(find_fw "$f")" "$payload/qemu-fw/$f"
    done

    per_run_timeout=150
    {
        echo "ROUNDS=$rounds"
        echo "MEM=$memory"
        echo "TIMEOUT=$per_run_timeout"
        echo "CONFIGS='${config_list[*]}'"
        # rangevm and QEMU's microvm have no PCI: pci=off. QEMU's pc has PCI (and its
        # ACPI tables use it: with pci=off the kernel logs pages of ACPI errors).
        echo "CL_NOPCI='$base_cmdline pci=off rangevm.cmd=true'"
        echo "CL_PCI='$base_cmdline rangevm.cmd=true'"
    } >"$payload/bench.env"

    cat >"$payload/bench-inner.sh" <<'INNER'
#!/bin/sh
# Runs inside the emulated host (busybox sh), in /payload. See scripts/bench-boot.sh.
# $RV, $QEMU and the @END fields are split into words on purpose.
# shellcheck disable=SC1091,SC2046,SC2086
. ./bench.env
RV="rangevm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory $MEM"
QEMU="qemu-system-x86_64 -L /payload/qemu-fw -accel kvm -cpu host -m $MEM -nographic -no-reboot -nodefaults -serial stdio -kernel vmlinuz -initrd initramfs.cpio.gz"
START=${1:-1}
total=0
for c in $CONFIGS; do total=$((total + ROUNDS)); done
n=0
# A heartbeat, so the script outside can tell a frozen emulated host from a slow boot.
( while :; do sleep 15; echo "BENCH-HB"; done ) &
hb=$!

# run_one NAME ROUND COMMAND...: runs the VMM, its console through a loop that notes
# /proc/uptime when the marker line arrives and when the VMM exits.
run_one() {
    name=$1
    round=$2
    shift 2
    n=$((n + 1))
    # After a restart of the emulated host: skip the runs already done.
    [ "$n" -ge "$START" ] || return 0
    log=/tmp/bench-$name-$round.log
    read -r t0 _ </proc/uptime
    {
        timeout -k 10 "$TIMEOUT" "$@" </dev/null 2>&1
        rc=$?
        echo
        echo "BENCH-VMM-EXIT=$rc"
    } | {
        mark=-
        while IFS= read -r line; do
            case "$line" in
                *RANGEVM-GUEST-UP*)
                    if [ "$mark" = - ]; then read -r mark _ </proc/uptime; fi
                    ;;
                *BENCH-VMM-EXIT=*)
                    read -r end _ </proc/uptime
                    echo "@END $mark $end ${line##*BENCH-VMM-EXIT=}"
                    continue
                    ;;
            esac
            printf '%s\n' "$line"
        done
    } >"$log"
    set -- $(sed -n 's/^@END //p' "$log")
    mark=${1:--}
    end=${2:--}
    st=${3:-?}
    echo "BENCH-RESULT $name $round $t0 $mark $end $st"
    if [ "$mark" != - ]; then
        m=$(awk -v a="$t0" -v b="$mark" -v c="$end" 'BEGIN { printf "marker %.2f s, exit %.2f s", b - a, c - a }')
    else
        m=$(awk -v a="$t0" -v c="$end" 'BEGIN { printf "NO marker, exit %.2f s", c - a }')
    fi
    echo "bench: [$n/$total] $name round $round: $m, status $st"
    if [ "$st" != 0 ] || [ "$mark" = - ]; then
        echo "bench: $name round $round failed; the end of its console:"
        grep -v '^@END' "$log" | tail -n 15 | sed 's/^/  | /'
    fi
}

echo "bench: emulated host has $(grep -c ^processor /proc/cpuinfo) CPU(s), $(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo) MiB"
round=1
while [ "$round" -le "$ROUNDS" ]; do
    for c in $CONFIGS; do
        case "$c" in
            rangevm-c1-range) run_one "$c" "$round" $RV --cpus 1 --mem-lock range --cmdline "$CL_NOPCI" ;;
            rangevm-c2-range) run_one "$c" "$round" $RV --cpus 2 --mem-lock range --cmdline "$CL_NOPCI" ;;
            rangevm-c1-global) run_one "$c" "$round" $RV --cpus 1 --mem-lock global --cmdline "$CL_NOPCI" ;;
            qemu-pc) run_one "$c" "$round" $QEMU -M pc -smp 1 -append "$CL_PCI" ;;
            qemu-pc-c2) run_one "$c" "$round" $QEMU -M pc -smp 2 -append "$CL_PCI" ;;
            qemu-microvm) run_one "$c" "$round" $QEMU -M microvm -smp 1 -append "$CL_NOPCI" ;;
        esac
    done
    round=$((round + 1))
done
kill "$hb"
echo "bench: done"
INNER

    say "building the emulated host's initramfs (resources/build-emuhost.sh; QEMU and its libraries go in too)"
    host_kernel="$(bash "$ROOT/resources/build-emuhost.sh" --payload "$payload" --out "$work/host.cpio.gz")" ||
        die "resources/build-emuhost.sh failed"

    host_mib=$((memory_mib + 768))
    total_runs=$((rounds * ${#config_list[@]}))
    whole_timeout=$((total_runs * (per_run_timeout + 10) + 300))
    # The inner script prints a heartbeat every 15 s: a minute of silence means the
    # emulated host froze. That happens now and then (about 1 boot in 40 here, under
    # rangevm and under QEMU/KVM alike: both of its CPUs spin in its kernel with
    # interrupts off); the stuck run is marked and a new emulated host goes on.
    stall_secs=60
    max_sessions=4
    console="$work/console.log"
    : >"$console"
    load+=", before the emulated host $(loadavg)"
    first=1
    session=0
    say "booting the emulated host ($host_cpus CPU(s), $host_mib MiB) for $total_runs guest boots (${#config_list[@]} configurations x $rounds rounds); about 10-20 s each"
    while :; do
        session=$((session + 1))
        start=$SECONDS
        ups_before="$(grep -c 'RANGEVM-EMUHOST-UP' "$console" || true)"
        rm -f "$work/qemu.pid" "$work/stalled"
        set +e
        timeout --foreground "$whole_timeout" qemu-system-x86_64 -accel tcg -cpu max -smp "$host_cpus" -m "${host_mib}M" \
            -display none -no-reboot -nodefaults -serial stdio -kernel "$host_kernel" \
            -initrd "$work/host.cpio.gz" -pidfile "$work/qemu.pid" \
            -append "console=ttyS0 loglevel=4 reboot=k panic=1 rangevm.cmd64=$(printf 'sh bench-inner.sh %s' "$first" | base64 -w0)" \
            </dev/null | {
            while true; do
                if ! IFS= read -r -t "$stall_secs" line; then
                    # A timeout (QEMU still there) or the end of its output.
                    [ -z "$line" ] || printf '%s\n' "$line" >>"$console"
                    if [ -s "$work/qemu.pid" ] && kill -0 "$(cat "$work/qemu.pid")" 2>/dev/null; then
                        : >"$work/stalled"
                        kill "$(cat "$work/qemu.pid")" 2>/dev/null
                    fi
                    break
                fi
                while [[ "$line" == *$'\r' ]]; do line="${line%$'\r'}"; done
                printf '%s\n' "$line" >>"$console"
                case "$line" in
                    *RANGEVM-EMUHOST-UP*) say "emulated host up after $((SECONDS - start)) s (${line##*RANGEVM-EMUHOST-UP })" ;;
                    bench:* | "  | "*) printf '%s\n' "$line" ;;
                    *) ;;
                esac
            done
        }
        qemu_status="${PIPESTATUS[0]}"
        set -e
        if grep -q '^bench: done' "$console"; then
            say "emulated host finished after $((SECONDS - start)) s"
            break
        fi
        done_runs="$(grep -c '^BENCH-RESULT ' "$console" || true)"
        ups_after="$(grep -c 'RANGEVM-EMUHOST-UP' "$console" || true)"
        if [ -e "$work/stalled" ] && [ "$ups_after" -eq "$ups_before" ] && [ "$session" -lt "$max_sessions" ]; then
            say "the emulated host froze while booting; trying a new one"
            continue
        fi
        if [ ! -e "$work/stalled" ]; then
            say "the emulated host stopped (qemu exit status $qemu_status) after $done_runs of $total_runs runs; the end of its console:"
            tail -n 25 "$console" | sed 's/^/  | /' >&2
            break
        fi
        # The run that was going on when it froze: mark it, go on with the next one.
        stuck=$((done_runs + 1))
        stuck_name="${config_list[$(((stuck - 1) % ${#config_list[@]}))]}"
        stuck_round=$(((stuck - 1) / ${#config_list[@]} + 1))
        echo "BENCH-RESULT $stuck_name $stuck_round - - - froze" >>"$console"
        say "the emulated host froze during run $stuck ($stuck_name, round $stuck_round): no output for $stall_secs s; stopped it"
        if [ "$stuck" -ge "$total_runs" ]; then
            echo "bench: done" >>"$console"
            break
        fi
        if [ "$session" -ge "$max_sessions" ]; then
            say "giving up after $session emulated hosts"
            break
        fi
        first=$((stuck + 1))
        say "booting a new emulated host for runs $first to $total_runs"
    done
fi

order="$(
    IFS=,
    echo "${config_list[*]}"
)"
load+=", at the end $(loadavg)"
python3 "$work/bench.py" report "$tiny_json" "$console" "$order" "$rounds" "$memory" "$host_cpus" "$load"
