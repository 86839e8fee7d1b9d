//! rangevm inside the emulated host (QEMU software emulation with real nested KVM):
//! the path every real-guest test of the boot issue takes on machines whose own KVM
//! cannot run stock guests.

use std::time::Duration;

use rangevm_tests::EmuHost;

#[test]
fn host_check_sees_real_kvm_inside_the_emulated_host() {
    let console = EmuHost::new()
        .with_file(env!("CARGO_BIN_EXE_rangevm"))
        .run("rangevm host-check", Duration::from_secs(180))
        .expect("boot the emulated host");
    eprintln!("emulated host ran {:.1} s", console.elapsed.as_secs_f64());
    let out = &console.output;
    assert!(out.contains("RANGEVM-EMUHOST-UP kvm=yes"), "{out}");
    assert!(out.contains("KVM              API version 12"), "{out}");
    assert!(
        out.contains("KVM_CAP_USER_MEMORY                yes"),
        "{out}"
    );
    assert_eq!(console.command_status(), Some(0), "{out}");
}
