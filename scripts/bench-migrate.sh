#!/usr/bin/env bash
# Measures precopy live migration (issue 6) on this host's own /dev/kvm, over TCP
# loopback, and prints one table: for an idle and a busy tiny guest of each memory size,
# total time, downtime (source vCPUs paused -> destination guest running), rounds,
# bytes sent and whether precopy converged to the downtime target, medians of --rounds
# migrations.
#
#   idle: a tiny guest that rewrites one page in a loop (memory static after boot)
#   busy: a tiny guest that rewrites its pass number into --busy-pages pages (64 MiB by
#         default) as fast as this host runs it (kvm_pvm emulates guest code at about
#         1.5 M instructions/s: about 500-600 MiB/s of dirtied pages here)
#
# Usage: scripts/bench-migrate.sh [OPTIONS]
#   --rounds N          migrations per configuration (default 3)
#   --sizes LIST        comma-separated guest memory sizes (default 256M,1G)
#   --busy-pages N      pages the busy guest dirties per pass (default 16384)
#   --downtime-target MS  (default 300)
#   --verify            also have the destination check every page's CRC32C (adds a
#                       pass over memory on each side to the downtime)
#   -h, --help          this text
# Needs: cargo, python3, /dev/kvm. Exit status 0 if every migration completed, 1 if any
# failed, 2 on a bad option. RANGEVM_BIN=PATH uses that rangevm binary.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="bench-migrate"
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

rounds=3
sizes="256M,1G"
busy_pages=16384
downtime=300
verify=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || usage_error "--rounds needs a value"; rounds="$2"; shift 2 ;;
        --sizes) [ $# -ge 2 ] || usage_error "--sizes needs a value"; sizes="$2"; shift 2 ;;
        --busy-pages) [ $# -ge 2 ] || usage_error "--busy-pages needs a value"; busy_pages="$2"; shift 2 ;;
        --downtime-target) [ $# -ge 2 ] || usage_error "--downtime-target needs a value"; downtime="$2"; shift 2 ;;
        --verify) verify="--verify"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done
for n in "$rounds" "$busy_pages" "$downtime"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage_error "'$n' is not a positive number"
done
[ -e /dev/kvm ] || die "no /dev/kvm on this host"

cd "$ROOT"
rangevm_binary
say "building the tiny guest writer (cargo build --release -p rangevm-tests --bin tiny-guest)"
cargo build --release -p rangevm-tests --bin tiny-guest >&2 || die "cargo build failed"
tiny="$(dirname "$rangevm")/tiny-guest"
work="$(mktemp -d /tmp/rangevm-bench-migrate.XXXXXX)"
trap 'rm -rf "$work"' EXIT
"$tiny" counter --out "$work/idle.elf" --pages 1 --print-every 100000
"$tiny" counter --out "$work/busy.elf" --pages "$busy_pages" --print-every 100000

python3 - "$rangevm" "$work" "$rounds" "$sizes" "$downtime" "$verify" <<'PY'
import json, os, socket, statistics, subprocess, sys, time

rangevm, work, rounds, sizes, downtime, verify = sys.argv[1:7]
rounds = int(rounds)

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

def wait_for(pred, limit, what):
    end = time.time() + limit
    while not pred():
        if time.time() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)

def one(kind, size, n):
    port = free_port()
    src_api, dst_api = f"{work}/s{n}.api", f"{work}/d{n}.api"
    derr = open(f"{work}/d{n}.err", "w+")
    serr = open(f"{work}/s{n}.err", "w+")
    dst = subprocess.Popen([rangevm, "run", "--incoming", f"tcp:127.0.0.1:{port}",
                            "--serial", "null", "--api-socket", dst_api], stderr=derr)
    src = subprocess.Popen([rangevm, "run", "--kernel", f"{work}/{kind}.elf", "--memory", size,
                            "--serial", "null", "--api-socket", src_api], stderr=serr)
    try:
        wait_for(lambda: os.path.exists(src_api) and "waiting" in open(derr.name).read(), 20, "both VMMs")
        time.sleep(1.0)  # let the guest run (and the busy one dirty its pages) first
        args = [rangevm, "ctl", "--api-socket", src_api, "migrate", "send",
                f"tcp:127.0.0.1:{port}", "--downtime-target", downtime]
        if verify:
            args.append(verify)
        out = subprocess.run(args, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            return {"failed": (out.stdout + out.stderr).strip().splitlines()[-1:]}
        status = json.loads(out.stdout)
        src.wait(timeout=30)
        subprocess.run([rangevm, "ctl", "--api-socket", dst_api, "vm", "shutdown"],
                       capture_output=True, timeout=30)
        dst.wait(timeout=30)
        return status
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill()
                p.wait()

results = {}
failed = 0
for size in sizes.split(","):
    for kind in ("idle", "busy"):
        runs = []
        for n in range(rounds):
            r = one(kind, size, f"{kind}{size}{n}")
            if "failed" in r:
                failed += 1
                print(f"bench-migrate: {kind} {size} run {n}: FAILED {r['failed']}", file=sys.stderr)
                continue
            print(f"bench-migrate: {kind} {size} run {n}: total {r['total_ms']:.0f} ms, "
                  f"downtime {r['downtime_ms']:.1f} ms, {r['round'] + 1} round(s), "
                  f"{r['bytes_sent'] / 2**20:.1f} MiB", file=sys.stderr)
            runs.append(r)
        results[(kind, size)] = runs

med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"\nPrecopy over TCP loopback, downtime target {downtime} ms{', --verify' if verify else ''}; "
      f"medians of {rounds} (all runs in brackets)\n")
print("| guest | memory | total ms | downtime ms | rounds | MiB sent | converged |")
print("|---|---|---|---|---|---|---|")
for (kind, size), runs in results.items():
    if not runs:
        print(f"| {kind} | {size} | failed | | | | |")
        continue
    tot = [r["total_ms"] for r in runs]
    dt = [r["downtime_ms"] for r in runs]
    rd = [r["round"] + 1 for r in runs]
    mb = [r["bytes_sent"] / 2**20 for r in runs]
    conv = sum(1 for r in runs if r["converged"])
    f = lambda xs, p=0: "[" + ", ".join(f"{x:.{p}f}" for x in xs) + "]"
    print(f"| {kind} | {size} | {med(tot):.0f} {f(tot)} | {med(dt):.1f} {f(dt, 1)} | "
          f"{med(rd):.0f} {f(rd)} | {med(mb):.1f} | {conv}/{len(runs)} |")
sys.exit(1 if failed else 0)
PY
