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
    debian_extract_from "$cache/debs" apt-get "$@"
}

# debian_extract_from DEBDIR APT_GET DEST PKG...: like debian_extract, with the .debs kept
# in DEBDIR and downloaded by the command APT_GET (a function or program taking
# apt-get's arguments).
debian_extract_from() {
    local debs="$1" apt="$2" dest="$3" pkg deb
    shift 3
    mkdir -p "$debs" "$dest"
    for pkg in "$@"; do
        deb="$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        if [ -z "$deb" ]; then
            log "downloading $pkg"
            (cd "$debs" && "$apt" -q download "$pkg" >"$debs/download.log" 2>&1) || {
                cat "$debs/download.log" >&2
                die "apt-get download $pkg failed"
            }
            deb="$(find "$debs" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        fi
        [ -n "$deb" ] || die "no .deb for $pkg after download"
        dpkg-deb -x "$deb" "$dest"
    done
}

# --- ppc64el packages, without touching dpkg's or apt's own state -------------------------
# Package lists live in $cache/apt-ppc64el (lists, cache, an empty status file), the
# downloaded .debs in $cache/apt-ppc64el/debs.

# ppc64el_apt_opts: prints apt's -o options for ppc64el, one per line (creates the folders).
ppc64el_apt_opts() {
    local dir="$cache/apt-ppc64el"
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    [ -e "$dir/status" ] || : >"$dir/status"
    printf '%s\n' -o APT::Architecture=ppc64el -o APT::Architectures::=ppc64el \
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" \
        -o "Dir::State::status=$dir/status"
}

# ppc64el_apt_get ARGS...: apt-get with the ppc64el options.
ppc64el_apt_get() {
    local opts
    mapfile -t opts < <(ppc64el_apt_opts)
    apt-get "${opts[@]}" "$@"
}

# ppc64el_apt_cache ARGS...: apt-cache with the ppc64el options.
ppc64el_apt_cache() {
    local opts
    mapfile -t opts < <(ppc64el_apt_opts)
    apt-cache "${opts[@]}" "$@"
}

# ppc64el_update: fetches the ppc64el package lists when there are none younger than a
# week (old lists name packages the mirror no longer has).
ppc64el_update() {
    local dir="$cache/apt-ppc64el"
    mkdir -p "$dir"
    if ! find "$dir/lists" -maxdepth 1 -name '*_Packages*' -mtime -7 2>/dev/null | grep -q .; then
        log "fetching the ppc64el package lists into $dir"
        ppc64el_apt_get -q update >"$dir/update.log" 2>&1 || {
            cat "$dir/update.log" >&2
            die "apt-get update for ppc64el failed"
        }
    fi
}

# debian_kernel_pkg_ppc64el: the kernel package behind linux-image-powerpc64le, e.g.
# linux-image-6.1.0-57-powerpc64le.
debian_kernel_pkg_ppc64el() {
    local pkg
    ppc64el_update
    pkg="$(ppc64el_apt_cache depends linux-image-powerpc64le 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9].*-powerpc64le\)$/\1/p' | head -n 1)"
    [ -n "$pkg" ] || die "cannot find the kernel package behind linux-image-powerpc64le"
    echo "$pkg"
}

# debian_extract_ppc64el DEST PKG...: downloads the ppc64el packages (once) and extracts
# them into DEST.
debian_extract_ppc64el() {
    ppc64el_update
    debian_extract_from "$cache/apt-ppc64el/debs" ppc64el_apt_get "$@"
}

# ppc64el_vmlinux PKGROOT ABI OUT: the kernel of an extracted ppc64el kernel package as an
# uncompressed ELF vmlinux (the package's boot/vmlinux-ABI, gunzipped if compressed).
ppc64el_vmlinux() {
    local root="$1" abi="$2" out="$3" f
    f="$(find "$root/boot" -maxdepth 1 -name "vmlinu[xz]-$abi" | head -n 1)"
    [ -n "$f" ] || die "no boot/vmlinux-$abi or boot/vmlinuz-$abi in the kernel package"
    if [ "$(head -c 2 "$f" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
        gzip -dc "$f" >"$out"
    else
        cp "$f" "$out"
    fi
    [ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || die "$f is not an ELF kernel"
}

# The command that runs BUSYBOX on this machine: empty for a native one; the ppc64el
# scripts set it to (qemu-ppc64le-static) to list applets and pack the cpio.
BUSYBOX_RUNNER=()

# busybox_root ROOT BUSYBOX: a root folder with busybox and one link per applet.
busybox_root() {
    local root="$1" busybox="$2" applet
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules}
    cp "$busybox" "$root/bin/busybox"
    for applet in $("${BUSYBOX_RUNNER[@]}" "$busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    [ -L "$root/bin/sh" ] || die "$busybox --list did not run (or has no sh)"
}

# pack_cpio ROOT BUSYBOX OUT: a gzipped newc cpio of ROOT.
pack_cpio() {
    local root="$1" busybox="$2" out="$3"
    (cd "$root" && find . | "${BUSYBOX_RUNNER[@]}" "$busybox" cpio -o -H newc 2>/dev/null) | gzip -6 >"$out"
}

# guest_init: prints the default guest's /init (resources/build-guest.sh describes it;
# the x86_64 and the ppc64le guest share it).
guest_init() {
    cat <<'INIT'
#!/bin/sh
# rangevm default guest. See resources/build-guest.sh (and build-guest-ppc64.sh).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "RANGEVM-GUEST-UP $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo) mem_kb=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)"
for m in virtio_ring virtio virtio_mmio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
    for f in /lib/modules/$m.ko*; do
        [ -e "$f" ] && insmod "$f" 2>/dev/null
    done
done
cmd=""
shell=0
for word in $(cat /proc/cmdline); do
    case "$word" in
        rangevm.cmd64=*) cmd="$(echo "${word#rangevm.cmd64=}" | base64 -d)" ;;
        rangevm.cmd=*) cmd="${word#rangevm.cmd=}" ;;
        rangevm.shell=1) shell=1 ;;
    esac
done
if [ -n "$cmd" ]; then
    sh -c "$cmd"
    echo "RANGEVM-CMD-EXIT=$?"
fi
if [ "$shell" = 1 ]; then
    exec setsid cttyhack sh
fi
sync
poweroff -f
INIT
}
