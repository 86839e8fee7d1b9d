#!/usr/bin/env bash
# Measures postcopy live migration (issue 7) on this host's own /dev/kvm and prints one
# table: demand-fetch latency p50/p99 (a vCPU's fault on a page not yet received, to
# the page in place), demand faults/s, pages on demand and in the background, total
# postcopy time and downtime, for each link, fault-handler count and memory lock mode,
# medians of --rounds migrations.
#
#   guest:  a tiny guest that rewrites its pass number into --busy-pages pages (64 MiB by
#           default) of a --memory guest; migrated with `migrate send --postcopy`
#   links:  loopback  TCP over 127.0.0.1
#           10g       TCP between two network namespaces over a veth pair shaped to
#                     10 Gbit/s with a token-bucket filter (`tc qdisc ... tbf rate
#                     10gbit burst 4mb latency 10ms`) on both ends
#
# Usage: scripts/bench-postcopy.sh [OPTIONS]
#   --rounds N        migrations per configuration (default 3)
#   --memory SIZE     guest memory (default 1G)
#   --busy-pages N    pages the guest rewrites per pass (default 16384)
#   --links LIST      comma-separated: loopback,10g (default both)
#   --cpus N          vCPUs, each rewriting --busy-pages pages of its own, so that
#                     several fault at once on the destination (default 1)
#   -h, --help        this text
# Needs: root (for the namespaces), iproute2 (ip, tc), cargo, python3, /dev/kvm.
# Exit status 0 if every migration completed, 1 if any failed, 2 on a bad option.
# RANGEVM_BIN=PATH uses that rangevm binary.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ME="bench-postcopy"
# shellcheck source=scripts/common.sh
. "$ROOT/scripts/common.sh"

rounds=3
memory=1G
busy_pages=16384
links="loopback,10g"
cpus=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || usage_error "--rounds needs a value"; rounds="$2"; shift 2 ;;
        --memory) [ $# -ge 2 ] || usage_error "--memory needs a value"; memory="$2"; shift 2 ;;
        --busy-pages) [ $# -ge 2 ] || usage_error "--busy-pages needs a value"; busy_pages="$2"; shift 2 ;;
        --links) [ $# -ge 2 ] || usage_error "--links needs a value"; links="$2"; shift 2 ;;
        --cpus) [ $# -ge 2 ] || usage_error "--cpus needs a value"; cpus="$2"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown option $1" ;;
    esac
done
for n in "$rounds" "$busy_pages" "$cpus"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage_error "'$n' is not a positive number"
done
[ -e /dev/kvm ] || die "no /dev/kvm on this host"
case ",$links," in *,10g,*)
    command -v ip >/dev/null && command -v tc >/dev/null || die "the 10g link needs ip and tc (Debian: iproute2)"
    [ "$(id -u)" -eq 0 ] || die "the 10g link needs root (network namespaces)"
esac

cd "$ROOT"
rangevm_binary
say "building the tiny guest writer"
cargo build --release -p rangevm-tests --bin tiny-guest >&2 || die "cargo build failed"
tiny="$(dirname "$rangevm")/tiny-guest"
work="$(mktemp -d /tmp/rangevm-bench-postcopy.XXXXXX)"
nsa="rvpcA$$"
nsb="rvpcB$$"
cleanup() {
    ip netns del "$nsa" 2>/dev/null || true
    ip netns del "$nsb" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$tiny" counter --out "$work/busy.elf" --pages "$busy_pages" --print-every 100000 --cpus "$cpus"

case ",$links," in *,10g,*)
    ip netns add "$nsa"
    ip netns add "$nsb"
    ip link add rvpca type veth peer name rvpcb
    ip link set rvpca netns "$nsa"
    ip link set rvpcb netns "$nsb"
    ip -n "$nsa" addr add 10.77.0.1/24 dev rvpca
    ip -n "$nsb" addr add 10.77.0.2/24 dev rvpcb
    for ns in "$nsa" "$nsb"; do ip -n "$ns" link set lo up; done
    ip -n "$nsa" link set rvpca up
    ip -n "$nsb" link set rvpcb up
    ip netns exec "$nsa" tc qdisc add dev rvpca root tbf rate 10gbit burst 4mb latency 10ms
    ip netns exec "$nsb" tc qdisc add dev rvpcb root tbf rate 10gbit burst 4mb latency 10ms
    say "10g link: $nsa 10.77.0.1 <-> $nsb 10.77.0.2, tbf rate 10gbit both ways"
esac

python3 - "$rangevm" "$work" "$rounds" "$memory" "$links" "$nsa" "$nsb" "$cpus" <<'PY'
import json, os, socket, statistics, subprocess, sys, time

rangevm, work, rounds, memory, links, nsa, nsb, cpus = sys.argv[1:9]
rounds = int(rounds)

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_for(pred, limit, what):
    end = time.time() + limit
    while not pred():
        if time.time() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)

def ctl(api, *args, timeout=300):
    return subprocess.run([rangevm, "ctl", "--api-socket", api, *args], capture_output=True, text=True, timeout=timeout)

def one(link, handlers, lock, n):
    port = free_port()
    if link == "loopback":
        wrap_src, wrap_dst, host = [], [], "127.0.0.1"
    else:
        wrap_src, wrap_dst, host = ["ip", "netns", "exec", nsa], ["ip", "netns", "exec", nsb], "10.77.0.2"
    src_api, dst_api = f"{work}/s{n}.api", f"{work}/d{n}.api"
    derr = open(f"{work}/d{n}.err", "w+")
    dst = subprocess.Popen(wrap_dst + [rangevm, "run", "--incoming", f"tcp:{host}:{port}", "--serial", "null",
                           "--api-socket", dst_api, "--mem-lock", lock, "--postcopy-handlers", str(handlers)], stderr=derr)
    src = subprocess.Popen(wrap_src + [rangevm, "run", "--kernel", f"{work}/busy.elf", "--memory", memory, "--cpus", cpus,
                           "--serial", "null", "--api-socket", src_api], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(src_api) and "waiting" in open(derr.name).read(), 20, "both VMMs")
        time.sleep(1.0)
        out = ctl(src_api, "migrate", "send", "--postcopy", f"tcp:{host}:{port}")
        if out.returncode != 0:
            return {"failed": (out.stdout + out.stderr).strip().splitlines()[-1:]}
        final = json.loads(out.stdout)
        st = json.loads(ctl(dst_api, "migrate", "status").stdout)
        src.wait(timeout=30)
        ctl(dst_api, "vm", "shutdown")
        dst.wait(timeout=30)
        pc = st["postcopy"]
        if pc["phase"] != "completed":
            return {"failed": [f"destination postcopy phase {pc['phase']}: {pc.get('error')}"]}
        return {"downtime_ms": final["downtime_ms"], **pc}
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.kill(); p.wait()

failed = 0
rows = []
configs = [(l, h, m) for l in links.split(",") for h in (1, 2) for m in ("range", "global")]
for (link, handlers, lock) in configs:
    runs = []
    for n in range(rounds):
        r = one(link, handlers, lock, f"{link}{handlers}{lock}{n}")
        if "failed" in r:
            failed += 1
            print(f"bench-postcopy: {link} h{handlers} {lock} run {n}: FAILED {r['failed']}", file=sys.stderr)
            continue
        r["faults_per_s"] = r["demand_pages"] / max(r["total_ms"] / 1e3, 1e-9)
        print(f"bench-postcopy: {link} handlers={handlers} {lock} run {n}: p50 {r['demand_p50_us']:.0f} us, "
              f"p99 {r['demand_p99_us']:.0f} us, {r['demand_pages']} on demand, total {r['total_ms']:.0f} ms, "
              f"downtime {r['downtime_ms']:.1f} ms", file=sys.stderr)
        runs.append(r)
    rows.append(((link, handlers, lock), runs))

med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"\nPostcopy (migrate send --postcopy) of a {memory} tiny guest with {cpus} vCPU(s); medians of {rounds} (all runs in brackets)\n")
print("| link | handlers | lock | demand p50 us | demand p99 us | demand faults/s | on demand | background | postcopy ms | downtime ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (link, h, lock), runs in rows:
    if not runs:
        print(f"| {link} | {h} | {lock} | failed | | | | | | |"); continue
    g = lambda k: [r[k] for r in runs]
    f = lambda xs, p=0: "[" + ", ".join(f"{x:.{p}f}" for x in xs) + "]"
    print(f"| {link} | {h} | {lock} | {med(g('demand_p50_us')):.0f} {f(g('demand_p50_us'))} | "
          f"{med(g('demand_p99_us')):.0f} {f(g('demand_p99_us'))} | {med(g('faults_per_s')):.0f} | "
          f"{med(g('demand_pages')):.0f} | {med(g('background_pages')):.0f} | "
          f"{med(g('total_ms')):.0f} {f(g('total_ms'))} | {med(g('downtime_ms')):.1f} |")
sys.exit(1 if failed else 0)
PY
