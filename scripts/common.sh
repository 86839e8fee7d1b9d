#!/usr/bin/env bash
# Shared by the scripts in this folder (sourced, not run). The caller sets ME, the
# name its messages start with.

# say MESSAGE: a progress line on standard error.
say() { echo "$ME: $*" >&2; }
# die MESSAGE: an error line, exit 1.
die() {
    echo "$ME: error: $*" >&2
    exit 1
}
# usage_error MESSAGE: a bad command line, exit 2.
usage_error() {
    echo "$ME: $* (try --help)" >&2
    exit 2
}

# rangevm_binary [NOTE] (from the repository root): sets $rangevm to $RANGEVM_BIN if that is set, else builds
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
