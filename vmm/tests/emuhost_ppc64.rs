//! rangevm inside the emulated PowerPC64 host (QEMU's pseries machine under software
//! emulation, POWER9 with nested HV, kvm-hv loaded): the host side of the ppc64 port,
//! checked on a machine that is not a PowerPC.

#[path = "common/balloon_linux.rs"]
mod balloon_linux;
#[path = "common/linux_guest.rs"]
mod linux_guest;
#[path = "common/migrate_linux.rs"]
mod migrate_linux;
#[path = "common/postcopy_balloon.rs"]
mod postcopy_balloon;

use std::time::Duration;

use rangevm_tests::{static_rangevm_ppc64le, DefaultGuest, EmuHost, QemuArch};

/// The balloon scenario (`common/balloon_linux.rs`) with the Debian ppc64el guest, whose
/// balloon is a virtio PCI function behind the sPAPR host bridge: inflating by 128 MiB
/// lowers the guest's MemAvailable and rangevm's resident memory (64 KiB host pages,
/// each discarded once its sixteen 4 KiB balloon pages are in), deflating gives the
/// memory back, and the statistics arrive.
#[test]
fn balloon_inflate_and_deflate_with_a_linux_guest_inside_the_emulated_powerpc64_host() {
    balloon_linux::balloon_inflate_and_deflate(linux_guest::Setup::ppc64());
}

/// The postcopy scenario (`common/postcopy_balloon.rs`) with the Debian ppc64el guest:
/// postcopy with `--verify`, the destination's balloon inflated while pages are still
/// arriving, `balloon check`, deflate, one tick sequence, both VMMs exit 0.
#[test]
fn a_linux_guest_migrates_in_postcopy_and_its_balloon_works_meanwhile_inside_the_emulated_powerpc64_host(
) {
    postcopy_balloon::postcopy_with_balloon(linux_guest::Setup::ppc64());
}

/// The precopy scenarios (`common/migrate_linux.rs`) with the Debian ppc64el guest: with
/// 1 and 2 vCPUs the console goes on across the migration; then an inflated balloon
/// migrates (its 64 KiB pages as zero runs) and deflates on the destination.
#[test]
fn a_linux_guest_and_its_balloon_migrate_in_precopy_inside_the_emulated_powerpc64_host() {
    migrate_linux::console_goes_on(linux_guest::Setup::ppc64());
    migrate_linux::balloon_survives_a_migration(linux_guest::Setup::ppc64());
}

/// A statically linked ppc64le `rangevm host-check` inside the emulated PowerPC64 host
/// finds KVM (API version 12, user memory regions) on a host with 64 KiB pages, and
/// exits with status 0.
#[test]
fn rangevm_host_check_finds_kvm_hv_inside_the_emulated_powerpc64_host() {
    let rangevm = static_rangevm_ppc64le().expect("build a static rangevm for ppc64le");
    let host = EmuHost::ppc64().with_file(&rangevm);
    assert_eq!(host.arch(), QemuArch::Ppc64);
    let console = host
        .run(
            "rangevm host-check; echo HOSTCHECK-END status=$?",
            Duration::from_secs(300),
        )
        .expect("boot the emulated PowerPC64 host");
    eprintln!(
        "emulated PowerPC64 host: boot, host-check and power-off in {:.1} s",
        console.elapsed.as_secs_f64()
    );
    let out = console.output.replace('\r', "");
    assert!(out.contains("RANGEVM-EMUHOST-UP kvm=yes"), "{out}");
    assert!(out.contains("architecture     powerpc64"), "{out}");
    assert!(out.contains("host page size   65536 bytes"), "{out}");
    assert!(out.contains("KVM              API version 12"), "{out}");
    assert!(
        out.contains("KVM_CAP_USER_MEMORY                yes"),
        "{out}"
    );
    assert!(out.contains("HOSTCHECK-END status=0"), "{out}");
    assert_eq!(console.command_status(), Some(0), "{out}");
}

/// The default ppc64le guest (Debian's ppc64el kernel, ELF vmlinux, and a busybox
/// initramfs) boots under rangevm inside the emulated PowerPC64 host to its marker, with 1
/// and 2 vCPUs in both `--mem-lock` modes, sees its vCPUs, runs a command and powers off
/// through RTAS with exit status 0.
#[test]
fn default_ppc64le_guest_boots_under_rangevm_inside_the_emulated_powerpc64_host() {
    let guest = DefaultGuest::build_ppc64().expect("build the default ppc64le guest");
    let kernel = std::fs::read(&guest.kernel)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guest.kernel.display()));
    assert!(kernel.len() > 64, "{} is too short", guest.kernel.display());
    assert_eq!(
        &kernel[..6],
        b"\x7fELF\x02\x01",
        "not an ELF64 little-endian file"
    );
    assert_eq!(
        u16::from_le_bytes([kernel[18], kernel[19]]),
        21,
        "not EM_PPC64"
    );
    let rangevm = static_rangevm_ppc64le().expect("build a static rangevm for ppc64le");
    let cases = [(1, "range"), (2, "range"), (1, "global"), (2, "global")];
    let mut script = String::new();
    for (cpus, lock) in cases {
        let cmdline =
            guest.cmdline_running("echo guest-sees-cpus=$(grep -c ^processor /proc/cpuinfo)");
        script.push_str(&format!(
            "echo CASE-BEGIN cpus={cpus} lock={lock}; \
             rangevm run --kernel vmlinux --initrd initramfs.cpio.gz --memory 512M \
             --cpus {cpus} --mem-lock {lock} --cmdline '{cmdline}'; \
             echo CASE-END cpus={cpus} lock={lock} status=$?; "
        ));
    }
    let console = EmuHost::ppc64()
        .with_file(&rangevm)
        .with_file(&guest.kernel)
        .with_file(&guest.initrd)
        .run(&script, Duration::from_secs(600))
        .expect("boot the emulated PowerPC64 host");
    eprintln!(
        "emulated PowerPC64 host: 4 guest boots in {:.1} s",
        console.elapsed.as_secs_f64()
    );
    let out = console.output.replace('\r', "");
    for (cpus, lock) in cases {
        let begin = format!("CASE-BEGIN cpus={cpus} lock={lock}");
        let end = format!("CASE-END cpus={cpus} lock={lock} status=");
        let at = out
            .find(&begin)
            .unwrap_or_else(|| panic!("{begin} missing:\n{out}"));
        let case = &out[at..];
        let stop = case
            .find(&end)
            .unwrap_or_else(|| panic!("{end} missing:\n{out}"));
        let (case, rest) = case.split_at(stop);
        assert!(
            case.contains(rangevm_tests::MARKER),
            "no marker for {begin}:\n{case}"
        );
        assert!(
            case.contains(&format!("guest-sees-cpus={cpus}")),
            "{begin}: the guest does not see {cpus} vCPUs:\n{case}"
        );
        assert!(case.contains("RANGEVM-CMD-EXIT=0"), "{begin}:\n{case}");
        assert!(
            rest[end.len()..].starts_with('0'),
            "{begin}: rangevm did not exit 0:\n{case}"
        );
    }
    assert_eq!(console.command_status(), Some(0), "{out}");
}

/// The text between `begin` and `end` lines of `out`.
fn section<'a>(out: &'a str, begin: &str, end: &str) -> &'a str {
    let start = out
        .find(begin)
        .map(|i| i + begin.len())
        .unwrap_or_else(|| panic!("no {begin} in:\n{out}"));
    let stop = out[start..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end} after {begin} in:\n{out}"));
    &out[start..start + stop]
}

/// A `KEY=value` line's value.
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

/// Inside one boot of the emulated PowerPC64 host: tiny sPAPR guests under rangevm print
/// through H_PUT_TERM_CHAR and end through RTAS (power-off: status 0, system-reboot: 3,
/// ibm,os-term: 5); and a tiny counter guest migrates between two rangevm processes,
/// once in precopy and once in postcopy, its pass lines going on as one sequence on the
/// destination (its memory pages checked by the guest itself: every pass rewrites them).
#[test]
fn tiny_ppc64_guests_print_stop_and_migrate_inside_the_emulated_powerpc64_host() {
    use rangevm_tests::tiny::{check_consecutive, parse_counter_lines};
    use rangevm_tests::tiny_ppc64::{PpcExit, TinyPpcGuest};

    let dir = std::env::temp_dir().join(format!("rangevm-tinyppc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let hello = "hello from a tiny ppc64 guest, in more than sixteen bytes\n";
    let guests = [
        (
            "hello.elf",
            TinyPpcGuest::new().print(hello).exit(PpcExit::PowerOff),
        ),
        (
            "reboot.elf",
            TinyPpcGuest::new()
                .print("rebooting\n")
                .exit(PpcExit::Reboot),
        ),
        ("osterm.elf", TinyPpcGuest::new().exit(PpcExit::OsTerm)),
        // 64 pages of 64 KiB from 16 MiB; a line every 16 passes.
        (
            "counter.elf",
            TinyPpcGuest::new().counter(16 << 20, 64, 0x1_0000, 16),
        ),
    ];
    let mut host = EmuHost::ppc64()
        .with_file(static_rangevm_ppc64le().expect("build a static rangevm for ppc64le"));
    for (name, guest) in &guests {
        let path = dir.join(name);
        guest.write_to(&path).expect("write a tiny guest");
        host = host.with_file(path);
    }
    let mut script = String::from(
        r#"waitfor() { i=0; until [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "${3:-1}" ] 2>/dev/null || [ $i -gt 600 ]; do sleep 0.2; i=$((i+1)); done; }
for g in hello reboot osterm; do
  rangevm run --kernel $g.elf --memory 64M >/tmp/$g.out 2>/tmp/$g.err; echo "$g-STATUS=$?"
  echo "$g-OUT-BEGIN"; cat /tmp/$g.out; echo "$g-OUT-END"; cat /tmp/$g.err
done
"#,
    );
    for mode in ["precopy", "postcopy"] {
        let flag = if mode == "postcopy" { "--postcopy" } else { "" };
        script.push_str(&format!(
            r#"rm -f /tmp/m.sock /tmp/src.api /tmp/dst.api /tmp/src.out /tmp/dst.out
rangevm run --incoming unix:/tmp/m.sock --serial file:/tmp/dst.out --api-socket /tmp/dst.api </dev/null >/dev/null 2>/tmp/dst.err & dpid=$!
rangevm run --kernel counter.elf --memory 128M --cpus 2 --serial file:/tmp/src.out --api-socket /tmp/src.api </dev/null >/dev/null 2>/tmp/src.err & spid=$!
waitfor /tmp/src.out '^pass ' 3
waitfor /tmp/dst.err 'waiting for an incoming migration'
rangevm ctl --api-socket /tmp/src.api migrate send {flag} unix:/tmp/m.sock >/tmp/mig.out 2>&1; echo "{mode}-MIGRATE=$?"
wait $spid; echo "{mode}-SRC=$?"
n=$(grep -c '^pass ' /tmp/dst.out); waitfor /tmp/dst.out '^pass ' $((n + 3))
rangevm ctl --api-socket /tmp/dst.api vm shutdown >/dev/null; wait $dpid; echo "{mode}-DST=$?"
echo "{mode}-SRC-BEGIN"; cat /tmp/src.out; echo "{mode}-SRC-END"
echo "{mode}-DST-BEGIN"; cat /tmp/dst.out; echo "{mode}-DST-END"
grep -a 'downtime' /tmp/mig.out | tr '\r' '\n' | grep -a 'completed' | tail -n 1
cat /tmp/src.err /tmp/dst.err | tr '\r' '\n' | grep -av '%'
"#
        ));
    }
    let console = host
        .run(&script, Duration::from_secs(600))
        .expect("boot the emulated PowerPC64 host");
    let _ = std::fs::remove_dir_all(&dir);
    let out = console.output.replace("\r\n", "\n").replace('\r', "\n");
    eprintln!(
        "emulated PowerPC64 host ran {:.1} s",
        console.elapsed.as_secs_f64()
    );
    assert_eq!(value(&out, "hello-STATUS="), "0", "{out}");
    assert_eq!(
        section(&out, "hello-OUT-BEGIN\n", "hello-OUT-END").trim_end(),
        hello.trim_end()
    );
    assert_eq!(value(&out, "reboot-STATUS="), "3", "{out}");
    assert!(section(&out, "reboot-OUT-BEGIN\n", "reboot-OUT-END").contains("rebooting"));
    assert_eq!(value(&out, "osterm-STATUS="), "5", "{out}");
    assert!(
        out.contains("tiny guest gives up"),
        "the os-term message is logged:\n{out}"
    );
    for mode in ["precopy", "postcopy"] {
        assert_eq!(
            value(&out, &format!("{mode}-MIGRATE=")),
            "0",
            "{mode}:\n{out}"
        );
        assert_eq!(value(&out, &format!("{mode}-SRC=")), "0", "{mode}:\n{out}");
        assert_eq!(value(&out, &format!("{mode}-DST=")), "0", "{mode}:\n{out}");
        let src = section(
            &out,
            &format!("{mode}-SRC-BEGIN\n"),
            &format!("{mode}-SRC-END"),
        );
        let dst = section(
            &out,
            &format!("{mode}-DST-BEGIN\n"),
            &format!("{mode}-DST-END"),
        );
        // The console is one stream: a line the source began at the switch-over is
        // finished by the destination (the 16550 and the guest's registers migrate).
        let stream = format!("{src}{dst}");
        let all = parse_counter_lines(&stream).unwrap_or_else(|e| panic!("{mode}: {e}\n{out}"));
        let before = parse_counter_lines(src).unwrap_or_else(|e| panic!("{mode}: {e}\n{out}"));
        assert!(
            before.len() >= 3,
            "{mode}: too few passes on the source:\n{out}"
        );
        assert!(
            all.len() >= before.len() + 3,
            "{mode}: too few passes on the destination:\n{out}"
        );
        check_consecutive(&all, 16).unwrap_or_else(|e| panic!("{mode}: {e}\n{out}"));
    }
}
