//! The default guest boots under plain QEMU (software emulation): the guest image itself
//! works, independently of rangevm, and this is the reference the boot issue compares
//! rangevm's boot time with.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rangevm_tests::{DefaultGuest, MARKER};

#[test]
fn default_guest_boots_runs_a_command_and_powers_off() {
    let guest = DefaultGuest::build().expect("build the default guest");
    let cmdline = guest.cmdline_running(
        "echo answer=$((40+2)); cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' '; echo",
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "512M", "-smp", "1"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/ensure-deps.sh installs it)");
    // QEMU exits when the guest powers off (-no-reboot); give up after two minutes.
    let deadline = start + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the guest did not power off within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut console = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut console).expect("read the console");
    }
    eprintln!(
        "guest ran {:.1} s under QEMU TCG",
        start.elapsed().as_secs_f64()
    );
    assert!(status.success(), "qemu failed: {status}\n{console}");
    assert!(console.contains(MARKER), "no marker:\n{console}");
    assert!(
        console.contains("answer=42"),
        "command did not run:\n{console}"
    );
    assert!(
        console.contains("virtio virtio_balloon virtio_mmio virtio_ring"),
        "virtio modules not loaded:\n{console}"
    );
    assert!(console.contains("RANGEVM-CMD-EXIT=0"), "{console}");
}
