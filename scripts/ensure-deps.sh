#!/usr/bin/env bash
# Installs what building and testing rangevm needs and is not already there, so that
# scripts/test.sh and .ci/run work on a fresh Debian (bookworm) machine.
#
#   scripts/ensure-deps.sh          cross toolchain, qemu-user, qemu-system-x86 and qemu-system-ppc (the
#                                   emulated hosts) and iproute2 (ip netns, for the migration test between
#                                   two network namespaces) (apt), ppc64le Rust target,
#                                   a nightly toolchain and cargo-fuzz (for the fuzz step)
#   scripts/ensure-deps.sh --lint   the same, plus the rustfmt and clippy components
#
# Idempotent: does nothing (and touches no network) when everything is present. apt runs
# only when a package is missing; its output goes to a log that is printed on failure.
# Needs root, or passwordless sudo, only when a Debian package has to be installed.
set -euo pipefail

CROSS_TARGET=powerpc64le-unknown-linux-gnu
APT_PACKAGES=(gcc-powerpc64le-linux-gnu libc6-dev-ppc64el-cross qemu-user-static qemu-system-x86 qemu-system-ppc iproute2)

want_lint=0
for arg in "$@"; do
    case "$arg" in
        --lint) want_lint=1 ;;
        -h | --help)
            sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "ensure-deps: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

log() { echo "ensure-deps: $*"; }
die() {
    echo "ensure-deps: error: $*" >&2
    exit 1
}

# Run from the repository root so rustup resolves the same toolchain cargo will use
# (a rust-toolchain file, if one is ever added, lives there).
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- Debian packages ---------------------------------------------------------------------

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing_pkgs=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${APT_PACKAGES[@]}"; do
        pkg_installed "$pkg" || missing_pkgs+=("$pkg")
    done
else
    # Not a Debian-like system: just check that the tools are there.
    if ! command -v powerpc64le-linux-gnu-gcc >/dev/null 2>&1 ||
        ! command -v qemu-ppc64le-static >/dev/null 2>&1; then
        die "need powerpc64le-linux-gnu-gcc, a ppc64le glibc sysroot in /usr/powerpc64le-linux-gnu and qemu-ppc64le-static (Debian: ${APT_PACKAGES[*]})"
    fi
fi

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        die "missing Debian packages: ${missing_pkgs[*]}
  install them as root:  apt-get install -y --no-install-recommends ${missing_pkgs[*]}"
    fi

    apt_log="$(mktemp "${TMPDIR:-/tmp}/rangevm-apt.XXXXXX.log")"
    log "installing ${missing_pkgs[*]} (apt log: $apt_log)"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
    if ! { "${as_root[@]}" apt-get "${apt_opts[@]}" update &&
        "${as_root[@]}" apt-get "${apt_opts[@]}" install -y --no-install-recommends \
            "${missing_pkgs[@]}"; } >"$apt_log" 2>&1 </dev/null; then
        echo "ensure-deps: apt-get failed; its output follows" >&2
        cat "$apt_log" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi

command -v powerpc64le-linux-gnu-gcc >/dev/null 2>&1 || die "powerpc64le-linux-gnu-gcc not found after install"
command -v qemu-ppc64le-static >/dev/null 2>&1 || die "qemu-ppc64le-static not found after install"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 not found after install (package qemu-system-x86)"
command -v qemu-system-ppc64 >/dev/null 2>&1 || die "qemu-system-ppc64 not found after install (package qemu-system-ppc)"
[ -e /usr/powerpc64le-linux-gnu/lib64/ld64.so.2 ] || [ -e /usr/powerpc64le-linux-gnu/lib/ld64.so.2 ] ||
    die "ppc64le sysroot /usr/powerpc64le-linux-gnu has no ld64.so.2 (libc6-ppc64el-cross)"

# --- Rust target and components -------------------------------------------------------------

if command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$CROSS_TARGET"; then
        log "rustup target add $CROSS_TARGET"
        rustup -q target add "$CROSS_TARGET" </dev/null
    fi
    if [ "$want_lint" -eq 1 ]; then
        installed_components="$(rustup component list --installed)"
        for comp in rustfmt clippy; do
            if ! grep -q "^$comp\(-\|$\)" <<<"$installed_components"; then
                log "rustup component add $comp"
                rustup -q component add "$comp" </dev/null
            fi
        done
    fi
    # Fuzzing (cargo fuzz) needs a nightly toolchain and cargo-fuzz.
    if ! rustup toolchain list | grep -q '^nightly'; then
        log "rustup toolchain install nightly (for cargo fuzz)"
        rustup -q toolchain install nightly --profile minimal </dev/null
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "cargo install cargo-fuzz (about a minute)"
        cargo install -q --locked cargo-fuzz </dev/null
    fi
else
    # A toolchain without rustup: the target's standard library must already be there.
    [ -d "$(rustc --print sysroot)/lib/rustlib/$CROSS_TARGET" ] ||
        die "no rustup, and rustc has no standard library for $CROSS_TARGET"
    if [ "$want_lint" -eq 1 ]; then
        cargo fmt --version >/dev/null 2>&1 || die "no rustup, and cargo fmt is missing"
        cargo clippy --version >/dev/null 2>&1 || die "no rustup, and cargo clippy is missing"
    fi
fi
