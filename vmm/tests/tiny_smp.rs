//! `rangevm run --cpus 3` with the tiny SMP counter guest (`TinyGuest::counter_smp`, made
//! for migration tests where several vCPUs fault at once) on this machine's KVM: vCPU 0
//! starts the other two through its local APIC (INIT, start-up IPIs), all three count
//! over their own pages at the same time, and a dirty-page harvest shows every vCPU's
//! pages written; vCPU 0's console lines are consecutive until SIGTERM ends it with 143.
//!
//! Needs `/dev/kvm` and fails, saying so, without it. Every wait has a deadline: a hung
//! `rangevm` is killed and the test fails.

#![cfg(target_arch = "x86_64")]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rangevm_tests::tiny::{check_consecutive, parse_counter_lines, Mode, TinyGuest, COUNTER_ADDR};

const RANGEVM: &str = env!("CARGO_BIN_EXE_rangevm");
/// The longest any wait here may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How soon after SIGTERM `rangevm` must be gone.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);
const MIB: u64 = 1 << 20;
const PAGE: u64 = 0x1000;
const CPUS: u32 = 3;
/// Each vCPU's pages: 256 of them, vCPU i's from 16 MiB + i MiB, inside the 64 MiB guest.
const START: u64 = 16 * MIB;
const PAGES_PER_CPU: u64 = 256;
const PRINT_EVERY: u64 = 10;
/// How long the guest runs before dirty logging starts, and how long it is logged.
const RUN_FOR: Duration = Duration::from_secs(2);
const LOG_FOR: Duration = Duration::from_millis(500);

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "this test boots a tiny guest under `rangevm run` on /dev/kvm, \
             which cannot be opened on this host: {e}"
        );
    }
}

/// A running SMP counter guest; killed and its folder removed when dropped.
struct SmpVm {
    child: Child,
    dir: PathBuf,
    console: PathBuf,
    socket: PathBuf,
    started: Instant,
}

impl SmpVm {
    fn start(test: &str) -> Self {
        require_kvm();
        let dir = std::env::temp_dir().join(format!("rangevm-smp-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let kernel = dir.join("smp.elf");
        TinyGuest::new(Mode::Long)
            .counter_smp(START, PAGES_PER_CPU, PAGE, PRINT_EVERY, CPUS)
            .write_to(&kernel)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", kernel.display()));
        let console = dir.join("console.txt");
        let socket = dir.join("api.sock");
        let child = Command::new(RANGEVM)
            .args([
                "run",
                "--memory",
                "64M",
                "--cpus",
                &CPUS.to_string(),
                "--kernel",
            ])
            .arg(&kernel)
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rangevm");
        SmpVm {
            child,
            dir,
            console,
            socket,
            started: Instant::now(),
        }
    }

    /// Kills the VMM and fails the test with `why`, the console so far and the log.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let stderr = self.child.stderr.take().map(|mut e| {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        });
        let _ = self.child.wait();
        let console = self.console_text();
        let tail = &console[console.len().saturating_sub(2000)..];
        panic!(
            "{why} (after {:?})\n--- console (tail) ---\n{tail}\n--- stderr ---\n{}",
            self.started.elapsed(),
            stderr.unwrap_or_default()
        );
    }

    fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn passes(&mut self) -> Vec<u64> {
        match parse_counter_lines(&self.console_text()) {
            Ok(passes) => passes,
            Err(e) => self.fail(&format!("the console is not counter lines: {e}")),
        }
    }

    /// Waits until the console has more than `lines` complete counter lines.
    fn wait_for_lines(&mut self, lines: usize) -> Vec<u64> {
        let since = Instant::now();
        loop {
            let passes = self.passes();
            if passes.len() > lines {
                return passes;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("rangevm ended ({status}) with {passes:?} printed"));
            }
            if since.elapsed() > TIMEOUT {
                self.fail(&format!(
                    "no more than {lines} counter lines within {TIMEOUT:?}"
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn wait_for_socket(&mut self) {
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if self.started.elapsed() > TIMEOUT {
                self.fail("no API socket");
            }
            std::thread::sleep(POLL);
        }
    }

    fn ctl(&mut self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(RANGEVM)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run rangevm ctl");
        if !out.status.success() {
            self.fail(&format!("ctl {args:?} failed: {out:?}"));
        }
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| self.fail(&format!("ctl {args:?} printed no JSON ({e}): {out:?}")))
    }

    /// Sends SIGTERM and waits for the VMM to end.
    fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) touches no memory of ours. `pid` is our child, which has not
        // been reaped (only `fail`, `drop` and the wait below reap it), so the pid cannot
        // have been reused by another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            self.fail(&format!("cannot send SIGTERM to rangevm: {e}"));
        }
        let sent = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if sent.elapsed() > SIGNAL_TIMEOUT => self.fail(&format!(
                    "rangevm still runs {SIGNAL_TIMEOUT:?} after SIGTERM"
                )),
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => self.fail(&format!("cannot wait for rangevm: {e}")),
            }
        }
    }
}

impl Drop for SmpVm {
    fn drop(&mut self) {
        // A no-op once the child has been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The guest-physical addresses the running vCPUs write: the pass numbers' page, then
/// every vCPU's pages in order (vCPU i's are `START + (i * PAGES_PER_CPU + p) * PAGE`).
fn written_pages() -> Vec<u64> {
    std::iter::once(COUNTER_ADDR)
        .chain((0..u64::from(CPUS) * PAGES_PER_CPU).map(|p| START + p * PAGE))
        .collect()
}

#[test]
fn three_vcpus_count_over_their_own_pages_at_once() {
    let mut vm = SmpVm::start("three");
    vm.wait_for_socket();
    vm.wait_for_lines(2);
    if let Some(left) = RUN_FOR.checked_sub(vm.started.elapsed()) {
        std::thread::sleep(left);
    }

    // All three vCPUs write: the pass numbers' page and 3 x 256 pages, nothing else.
    assert_eq!(vm.ctl(&["dirty", "start"])["dirty_logging"], true);
    std::thread::sleep(LOG_FOR);
    let harvest = vm.ctl(&["dirty", "harvest"]);
    let want = written_pages();
    let first: Vec<u64> = want.iter().copied().take(64).collect();
    let pages = harvest["pages"].as_u64().unwrap_or_default();
    // BSP alone: 1 + 256 pages; one AP more: 1 + 512.
    if pages != len_u64(&want) || harvest["first_pages"] != serde_json::json!(first) {
        vm.fail(&format!(
            "expected {} dirty pages ({COUNTER_ADDR:#x} and {CPUS} x {PAGES_PER_CPU} from \
             {START:#x}: every vCPU writing), harvested {pages} ({} vCPUs' worth): {harvest}",
            want.len(),
            pages.saturating_sub(1) / PAGES_PER_CPU
        ));
    }
    // A second harvest: the APs still write (they run on, not just once).
    std::thread::sleep(LOG_FOR);
    let again = vm.ctl(&["dirty", "harvest"]);
    if again["pages"] != len_u64(&want) {
        vm.fail(&format!(
            "the second harvest is not every vCPU's pages: {again}"
        ));
    }
    assert_eq!(vm.ctl(&["dirty", "stop"])["dirty_logging"], false);

    let status = vm.terminate();
    if status.code() != Some(143) {
        vm.fail(&format!("SIGTERM ended rangevm with {status}, not 143"));
    }
    let passes = vm.passes();
    if let Err(e) = check_consecutive(&passes, PRINT_EVERY) {
        vm.fail(&e);
    }
    if passes.first() != Some(&PRINT_EVERY) || passes.len() < 3 {
        vm.fail(&format!(
            "vCPU 0's lines do not start at pass {PRINT_EVERY} or are fewer than 3: {passes:?}"
        ));
    }
    eprintln!(
        "{} lines, last pass {:#x}, {pages} dirty pages, in {:?}",
        passes.len(),
        passes.last().copied().unwrap_or_default(),
        vm.started.elapsed()
    );
}

fn len_u64(v: &[u64]) -> u64 {
    u64::try_from(v.len()).expect("a length fits in u64")
}
