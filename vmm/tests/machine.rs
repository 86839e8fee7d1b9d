//! The machine and its vCPU state machine through the library API, on this machine's
//! KVM with tiny guests: pause and resume keep the guest's state, a guest request ends
//! the machine, and stopping joins every vCPU thread.

#![cfg(target_arch = "x86_64")]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rangevm::machine::{Machine, MachineConfig};
use rangevm::vcpu::VcpuExitReason;
use rangevm_devices::GuestRequest;
use rangevm_memory::LockMode;
use rangevm_tests::tiny::{Exit, Mode, TinyGuest};

/// A writer the test can read while the machine runs.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn start(guest: &TinyGuest, name: &str, cpus: u32) -> (Machine, Console) {
    let dir = std::env::temp_dir().join(format!("rangevm-machine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join(name);
    guest.write_to(&kernel).unwrap();
    let console = Console::default();
    let machine = Machine::start(MachineConfig {
        kernel,
        initrd: None,
        cmdline: String::new(),
        memory: 64 << 20,
        cpus,
        mem_lock: LockMode::Range,
        serial_out: Box::new(console.clone()),
    })
    .expect("start the machine (needs /dev/kvm)");
    (machine, console)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn pause_and_resume_keep_the_guest_running_where_it_was() {
    // The guest prints, then hangs (cli; hlt) on both vCPUs' worth of machine: pause
    // and resume it several times in that state, then finish it from the VMM side.
    let guest = TinyGuest::new(Mode::Long)
        .print("before\n")
        .exit(Exit::Hang);
    let (mut machine, console) = start(&guest, "hang.elf", 2);
    wait_for("the first line", || console.text() == "before\n");
    for _ in 0..3 {
        machine.pause().expect("pause");
        machine.resume().expect("resume");
    }
    assert_eq!(machine.vcpu_exit(), None, "no vCPU exited by itself");
    assert_eq!(machine.requests().first(), None);
    let reasons = machine.stop();
    assert_eq!(reasons, vec![VcpuExitReason::Finished; 2]);
    assert_eq!(console.text(), "before\n");
    // Stopping again is harmless.
    assert!(machine.stop().is_empty());
}

#[test]
fn a_paused_guest_does_not_run_until_resumed() {
    // The guest prints a line, then a long busy loop of prints; while paused the console
    // must not grow.
    let mut guest = TinyGuest::new(Mode::Long);
    for i in 0..200 {
        guest = guest.print(&format!("line {i}\n"));
    }
    let guest = guest.exit(Exit::PowerOff);
    let (mut machine, console) = start(&guest, "lines.elf", 1);
    wait_for("some output", || console.text().contains("line 3\n"));
    machine.pause().expect("pause");
    let frozen = console.text();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(console.text(), frozen, "the guest ran while paused");
    machine.resume().expect("resume");
    wait_for("power-off", || machine.requests().first().is_some());
    assert_eq!(machine.requests().first(), Some(GuestRequest::PowerOff));
    assert!(console.text().ends_with("line 199\n"));
    machine.stop();
}

#[test]
fn a_triple_fault_is_reported_by_the_vcpu() {
    let guest = TinyGuest::new(Mode::Pvh).print("x").exit(Exit::TripleFault);
    let (mut machine, _console) = start(&guest, "tf.elf", 1);
    wait_for("the vCPU to exit", || machine.vcpu_exit().is_some());
    assert_eq!(machine.vcpu_exit(), Some(VcpuExitReason::TripleFault));
    assert_eq!(machine.stop(), vec![VcpuExitReason::TripleFault]);
}
