//! rangevm inside the emulated PowerPC64 host (QEMU's pseries machine under software
//! emulation, POWER9 with nested HV, kvm-hv loaded): the host side of the ppc64 port,
//! checked on a machine that is not a PowerPC.

use std::time::Duration;

use rangevm_tests::{static_rangevm_ppc64le, DefaultGuest, EmuHost, QemuArch};

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
