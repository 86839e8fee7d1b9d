#!/usr/bin/env bash
# Runs rangevm's whole test suite:
#   1. native    cargo test --workspace                                    (host, x86_64)
#   2. ppc64le   cargo test -p rangevm-memory --target powerpc64le-...     (under qemu-ppc64le-static,
#                runner set in .cargo/config.toml, with QEMU_PAGESIZE=65536 so the tests see the
#                64 KiB pages of a ppc64le host; the page-size test checks that they do), then
#                rangevm's unit tests (64 KiB pages) and rangevm-devices' (4 KiB pages) the same way
#   3. ppc64le-build  cargo check --workspace --all-targets --target powerpc64le-... with -D warnings
#   4. loom      RUSTFLAGS="--cfg loom" cargo test -p rangevm-memory --release --test loom_range_lock
#                (model checking of the range lock's small cases, every interleaving with up to
#                5 preemptions, ~15 s; own target dir so the normal build cache stays)
#   5. fuzz      cargo +nightly fuzz build, then every target runs FUZZ_SECONDS (default 20) s
# Installs missing prerequisites first (scripts/ensure-deps.sh). Every step runs even if an
# earlier one failed; the exit status is non-zero if any failed. Ends with a summary line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CROSS_TARGET=powerpc64le-unknown-linux-gnu
TARGET_BASE="${CARGO_TARGET_DIR:-$ROOT/target}"
LOOM_TARGET_DIR="$TARGET_BASE/loom"

section() { printf '\n==== %s ====\n' "$*"; }

section "prerequisites"
bash "$ROOT/scripts/ensure-deps.sh"
echo "ok"

LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/rangevm-test.XXXXXX")"
trap 'rm -rf "$LOG_DIR"' EXIT

step_names=()
step_results=()
total_passed=0
total_failed=0
total_ignored=0

# run_step NAME COMMAND...: runs COMMAND with its output shown and kept, adds up the
# libtest "test result:" lines it printed, and records pass/fail and the time taken.
run_step() {
    local name="$1"
    shift
    # Header shows the command as one would type it: `env` dropped, values with spaces quoted.
    local shown="" word
    for word in "$@"; do
        case "$word" in
            env) [ -z "$shown" ] && continue ;;
            *=*\ *) word="${word%%=*}=\"${word#*=}\"" ;;
        esac
        shown+="$word "
    done
    section "$name: ${shown% }"
    local log="$LOG_DIR/$name.log"
    local start=$SECONDS rc
    set +e
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local elapsed=$((SECONDS - start))

    local p f i
    read -r p f i < <(
        sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored;.*/\1 \2 \3/p' "$log" |
            awk '{p += $1; f += $2; i += $3} END {print p + 0, f + 0, i + 0}'
    )
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
    total_ignored=$((total_ignored + i))

    local status=ok
    [ "$rc" -eq 0 ] || status="FAILED (exit $rc)"
    step_names+=("$name")
    step_results+=("$(printf '%-18s %4ds  %d passed, %d failed, %d ignored' "$status" "$elapsed" "$p" "$f" "$i")")
}

run_step native \
    cargo test --workspace

# QEMU_PAGESIZE=65536: the emulated process sees 64 KiB pages (sysconf, AT_PAGESZ,
# mmap alignment) as on a ppc64le host, so a hidden 4096 shows up here.
run_step ppc64le \
    env QEMU_PAGESIZE=65536 RANGEVM_EXPECT_PAGE_SIZE=65536 cargo test -p rangevm-memory --target "$CROSS_TARGET"

# rangevm's own unit tests (the sPAPR hypercalls, RTAS, ELF loader, device tree and state
# bytes; migration, API and CLI parsing) on 64 KiB pages too. The ones that need KVM are
# integration tests (vmm/tests), run inside the emulated PowerPC host.
run_step ppc64le-vmm \
    env QEMU_PAGESIZE=65536 cargo test -p rangevm --lib --target "$CROSS_TARGET"

# The device models' tests, built for PowerPC, on qemu-user's 4 KiB pages:
# their balloon cases are written in 4 KiB host pages, and the 64 KiB host case has its
# own test (simulated_64k_host_discards_only_whole_host_pages).
run_step ppc64le-devices \
    cargo test -p rangevm-devices --target "$CROSS_TARGET"

# The whole workspace builds for ppc64le without warnings (x86-only code stays behind
# arch/); a target dir of its own, since RUSTFLAGS differ from the test build's.
run_step ppc64le-build \
    env RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-D warnings" CARGO_TARGET_DIR="$TARGET_BASE/ppc64le-check" \
    cargo check --workspace --all-targets --target "$CROSS_TARGET"

if [ -f "$ROOT/memory/tests/loom_range_lock.rs" ]; then
    run_step loom \
        env RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }--cfg loom" \
        CARGO_TARGET_DIR="$LOOM_TARGET_DIR" \
        LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-5}" \
        cargo test -p rangevm-memory --release --test loom_range_lock
else
    # Not skipped silently: the loom model check is part of the suite.
    run_step loom \
        sh -c 'echo "memory/tests/loom_range_lock.rs is missing" >&2; exit 1'
fi

# Fuzz targets of the guest-facing parsers (fuzz/, a cargo-fuzz workspace of its own):
# built, then each run briefly (FUZZ_SECONDS, default 20) from an empty corpus.
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
if command -v rustup >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    run_step fuzz-build \
        env -u CARGO_TARGET_DIR -C "$ROOT/fuzz" cargo +nightly fuzz build
    for target in $(cd "$ROOT/fuzz" && cargo +nightly fuzz list); do
        run_step "fuzz-$target" \
            env -u CARGO_TARGET_DIR -C "$ROOT/fuzz" \
            cargo +nightly fuzz run "$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048
    done
else
    # Not skipped silently: the fuzz targets are part of the suite.
    run_step fuzz-build \
        sh -c 'echo "cargo fuzz or rustup is missing (scripts/ensure-deps.sh installs them)" >&2; exit 1'
fi

section "summary"
failed_steps=()
for idx in "${!step_names[@]}"; do
    printf '  %-14s %s\n' "${step_names[$idx]}" "${step_results[$idx]}"
    case "${step_results[$idx]}" in FAILED*) failed_steps+=("${step_names[$idx]}") ;; esac
done
if [ "${#failed_steps[@]}" -gt 0 ]; then
    echo "failed steps: ${failed_steps[*]}"
fi
# Plain closing line: tests counted over all steps (ignored tests shown as skipped).
echo "tests: $total_passed passed, $total_failed failed, $total_ignored skipped"
[ "${#failed_steps[@]}" -eq 0 ]
