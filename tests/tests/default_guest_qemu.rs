//! The default guest boots under plain QEMU (software emulation): the guest image itself
//! works, independently of rangevm, and this is the reference the boot issue compares
//! rangevm's boot time with.

use std::time::Duration;

use rangevm_tests::{run_qemu, DefaultGuest, MARKER};

#[test]
fn default_guest_boots_runs_a_command_and_powers_off() {
    let guest = DefaultGuest::build().expect("build the default guest");
    let cmdline = guest.cmdline_running(
        "echo answer=$((40+2)); cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' '; echo",
    );
    let console = run_qemu(
        &guest.kernel,
        &guest.initrd,
        &cmdline,
        512,
        Duration::from_secs(120),
    )
    .expect("boot the default guest under QEMU");
    eprintln!(
        "guest ran {:.1} s under QEMU TCG",
        console.elapsed.as_secs_f64()
    );
    let out = &console.output;
    assert!(out.contains(MARKER), "no marker:\n{out}");
    assert!(out.contains("answer=42"), "command did not run:\n{out}");
    assert!(
        out.contains("virtio virtio_balloon virtio_mmio virtio_ring"),
        "virtio modules not loaded:\n{out}"
    );
    assert_eq!(console.command_status(), Some(0), "{out}");
}
