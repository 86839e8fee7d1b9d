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

/// The default ppc64le guest's files: an ELF64 little-endian PowerPC (e_machine 21)
/// vmlinux, a non-empty gzipped initramfs, and a command line on hvc0. (Not booted: the
/// ppc64 backend is not there yet.)
#[test]
fn the_default_ppc64le_guest_is_an_elf_vmlinux_and_an_initramfs() {
    let guest = DefaultGuest::build_ppc64().expect("build the default ppc64le guest");
    let kernel = std::fs::read(&guest.kernel)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guest.kernel.display()));
    assert!(kernel.len() > 64, "{} is too short", guest.kernel.display());
    assert_eq!(&kernel[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(kernel[4], 2, "EI_CLASS: not ELF64");
    assert_eq!(kernel[5], 1, "EI_DATA: not little-endian");
    assert_eq!(
        u16::from_le_bytes([kernel[18], kernel[19]]),
        21,
        "e_machine: not EM_PPC64"
    );
    let initrd = std::fs::read(&guest.initrd)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guest.initrd.display()));
    assert!(initrd.len() > 1024, "the initramfs is nearly empty");
    assert_eq!(&initrd[..2], b"\x1f\x8b", "the initramfs is not gzipped");
    assert!(guest.cmdline.contains("console=hvc0"), "{}", guest.cmdline);
    assert!(
        guest.cmdline_running("true").contains("rangevm.cmd64="),
        "{}",
        guest.cmdline
    );
}
