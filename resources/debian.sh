# shellcheck shell=bash disable=SC2154
# ($cache, log and die come from the script that sources this file.)
# Shared by resources/build-*.sh (sourced, not run): Debian packages in a download cache.
# Expects `die` and `log` functions and $cache (the rangevm cache folder).

# The kernel package behind the linux-image-amd64 meta package, e.g. linux-image-6.1.0-56-amd64.
debian_kernel_pkg() {
    local pkg
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)"
    if [ -z "$pkg" ]; then
        log "package lists have no linux-image-amd64; running apt-get update"
        apt-get -q update >/dev/null 2>&1 || die "apt-get update failed (run it as root once)"
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)"
    fi
    [ -n "$pkg" ] || die "cannot find the kernel package behind linux-image-amd64"
    echo "$pkg"
}

# debian_extract DEST PKG...: downloads each package into $cache/debs (once) and
# extracts it into DEST.
debian_extract() {
    local dest="$1" pkg deb
    shift
    mkdir -p "$cache/debs" "$dest"
    for pkg in "$@"; do
        deb="$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        if [ -z "$deb" ]; then
            log "downloading $pkg"
            (cd "$cache/debs" && apt-get -q download "$pkg" >"$cache/debs/download.log" 2>&1) || {
                cat "$cache/debs/download.log" >&2
                die "apt-get download $pkg failed"
            }
            deb="$(find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        fi
        [ -n "$deb" ] || die "no .deb for $pkg after download"
        dpkg-deb -x "$deb" "$dest"
    done
}

# busybox_root ROOT BUSYBOX: a root folder with busybox and one link per applet.
busybox_root() {
    local root="$1" busybox="$2" applet
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$busybox" "$root/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
}

# pack_cpio ROOT BUSYBOX OUT: a gzipped newc cpio of ROOT.
pack_cpio() {
    local root="$1" busybox="$2" out="$3"
    (cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -6 >"$out"
}
