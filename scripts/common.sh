#!/usr/bin/env bash
# Shared by the scripts in this folder (sourced, not run). The caller defines
# say MESSAGE and die MESSAGE, and has cd'ed to the repository root.

# rangevm_binary [NOTE]: sets $rangevm to $RANGEVM_BIN if that is set, else builds
# rangevm (release) and points at the build; NOTE is added to the "building" line.
# shellcheck disable=SC2120 # NOTE is optional.
rangevm_binary() {
    if [ -n "${RANGEVM_BIN:-}" ]; then
        rangevm="$RANGEVM_BIN"
        [ -x "$rangevm" ] || die "RANGEVM_BIN=$rangevm is not an executable file"
        say "using RANGEVM_BIN=$rangevm (not building)"
        return
    fi
    say "building rangevm (cargo build --release -p rangevm${1:+; $1})"
    cargo build --release -p rangevm >&2 || die "cargo build failed"
    local target_dir
    target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
    rangevm="${target_dir:-$PWD/target}/release/rangevm"
    [ -x "$rangevm" ] || die "cargo built no $rangevm"
}
