//! `rangevm run` with the tiny counter guest (`TinyGuest::counter`, made for live-migration
//! tests) on this machine's KVM: its console shows consecutive passes until SIGTERM ends
//! it with 143, it writes exactly its pages and its pass number, and a paused VM neither
//! prints nor writes memory until it is resumed, then carries on without losing a pass.
//!
//! Every test needs `/dev/kvm` and fails, saying so, without it. Every child gets a
//! deadline: a hung `rangevm` is killed and the test fails.

#![cfg(target_arch = "x86_64")]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use rangevm_tests::tiny::{
    check_consecutive, parse_counter_lines, Mode, TinyGuest, COUNTER_ADDR, COUNTER_PREFIX,
};

const RANGEVM: &str = env!("CARGO_BIN_EXE_rangevm");
/// The longest any wait here may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How soon after SIGTERM `rangevm` must be gone.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);
const MIB: u64 = 1 << 20;
const PAGE: u64 = 0x1000;
/// The counter's pages: 256 of them from 16 MiB, well inside the 64 MiB guest.
const START: u64 = 16 * MIB;
const PAGES: u64 = 256;
/// About 50 lines a second under the instruction emulator (some 500 passes a second).
const PRINT_EVERY: u64 = 10;
/// How long the guest runs before it is stopped.
const RUN_FOR: Duration = Duration::from_secs(2);

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

/// A running counter guest: its `rangevm`, console file and (maybe) API socket; killed
/// and its folder removed when dropped.
struct CounterVm {
    child: Child,
    dir: PathBuf,
    console: PathBuf,
    socket: Option<PathBuf>,
    started: Instant,
}

impl CounterVm {
    fn start(test: &str, mode: Mode, api: bool) -> Self {
        require_kvm();
        let dir =
            std::env::temp_dir().join(format!("rangevm-counter-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let kernel = dir.join("counter.elf");
        TinyGuest::new(mode)
            .counter(START, PAGES, PAGE, PRINT_EVERY)
            .write_to(&kernel)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", kernel.display()));
        let console = dir.join("console.txt");
        let socket = api.then(|| dir.join("api.sock"));
        let mut cmd = Command::new(RANGEVM);
        cmd.args(["run", "--memory", "64M", "--kernel"])
            .arg(&kernel)
            .arg("--serial")
            .arg(format!("file:{}", console.display()));
        if let Some(socket) = &socket {
            cmd.arg("--api-socket").arg(socket);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rangevm");
        CounterVm {
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
        // Absent until the VMM creates it; lossy, as the tail may end inside a line.
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The passes of the complete counter lines so far.
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

    fn ctl(&mut self, args: &[&str]) -> serde_json::Value {
        let socket = self.socket.clone().expect("started with an API socket");
        let out: Output = Command::new(RANGEVM)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .output()
            .expect("run rangevm ctl");
        if !out.status.success() {
            self.fail(&format!("ctl {args:?} failed: {out:?}"));
        }
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| self.fail(&format!("ctl {args:?} printed no JSON ({e}): {out:?}")))
    }

    /// Waits for the API socket to accept connections.
    fn wait_for_socket(&mut self) {
        let socket = self.socket.clone().expect("started with an API socket");
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if self.started.elapsed() > TIMEOUT {
                self.fail("no API socket");
            }
            std::thread::sleep(POLL);
        }
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

    /// The counter lines of the whole run, which must be consecutive.
    fn check_console(&mut self) -> Vec<u64> {
        let passes = self.passes();
        if let Err(e) = check_consecutive(&passes, PRINT_EVERY) {
            self.fail(&e);
        }
        if passes.first() != Some(&PRINT_EVERY) {
            self.fail(&format!("the first line is not pass {PRINT_EVERY}"));
        }
        passes
    }
}

impl Drop for CounterVm {
    fn drop(&mut self) {
        // A no-op once the child has been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn counts_until_sigterm(test: &str, mode: Mode) {
    let mut vm = CounterVm::start(test, mode, false);
    vm.wait_for_lines(2);
    if let Some(left) = RUN_FOR.checked_sub(vm.started.elapsed()) {
        std::thread::sleep(left);
    }
    let status = vm.terminate();
    if status.code() != Some(143) {
        vm.fail(&format!("SIGTERM ended rangevm with {status}, not 143"));
    }
    let passes = vm.check_console();
    if passes.len() < 3 {
        vm.fail(&format!("only {} counter lines", passes.len()));
    }
    eprintln!(
        "{mode:?}: {} lines, last pass {:#x}, in {:?}",
        passes.len(),
        passes.last().copied().unwrap_or_default(),
        vm.started.elapsed()
    );
}

#[test]
fn long_mode_counter_prints_consecutive_passes_until_sigterm() {
    counts_until_sigterm("long", Mode::Long);
}

#[test]
fn pvh_counter_prints_consecutive_passes_until_sigterm() {
    counts_until_sigterm("pvh", Mode::Pvh);
}

/// The guest-physical addresses a counter pass writes: its pass number, then its pages.
fn written_pages() -> Vec<u64> {
    std::iter::once(COUNTER_ADDR)
        .chain((0..PAGES).map(|p| START + p * PAGE))
        .collect()
}

#[test]
fn paused_counter_neither_prints_nor_writes_and_resumes_without_a_gap() {
    let mut vm = CounterVm::start("pause", Mode::Long, true);
    vm.wait_for_socket();
    vm.wait_for_lines(2);

    // A running counter writes its pass number and every one of its pages, nothing else.
    assert_eq!(vm.ctl(&["dirty", "start"])["dirty_logging"], true);
    std::thread::sleep(Duration::from_millis(300));
    let harvest = vm.ctl(&["dirty", "harvest"]);
    let want = written_pages();
    let first: Vec<u64> = want.iter().copied().take(64).collect();
    if harvest["pages"] != want.len() || harvest["first_pages"] != serde_json::json!(first) {
        vm.fail(&format!(
            "the counter wrote other pages than {COUNTER_ADDR:#x} and {PAGES} from \
             {START:#x}: {harvest}"
        ));
    }

    // Paused: no line and no write.
    assert_eq!(vm.ctl(&["vm", "pause"])["state"], "paused");
    std::thread::sleep(Duration::from_millis(200));
    let before = vm.console_text();
    vm.ctl(&["dirty", "harvest"]);
    std::thread::sleep(Duration::from_secs(1));
    let after = vm.console_text();
    if after != before {
        vm.fail(&format!(
            "the paused guest printed {:?}",
            after.get(before.len()..).unwrap_or(&after)
        ));
    }
    let harvest = vm.ctl(&["dirty", "harvest"]);
    if harvest["pages"] != 0 {
        vm.fail(&format!("the paused guest wrote memory: {harvest}"));
    }
    assert_eq!(vm.ctl(&["dirty", "stop"])["dirty_logging"], false);

    // Resumed: it counts on from where it was.
    let paused_at = parse_counter_lines(&before).expect("counter lines").len();
    assert!(paused_at > 2, "{before}");
    assert_eq!(vm.ctl(&["vm", "resume"])["state"], "running");
    vm.wait_for_lines(paused_at + 2);
    let status = vm.terminate();
    if status.code() != Some(143) {
        vm.fail(&format!("SIGTERM ended rangevm with {status}, not 143"));
    }
    let passes = vm.check_console();
    let text = vm.console_text();
    assert!(text.starts_with(COUNTER_PREFIX), "{text}");
    eprintln!(
        "{} lines ({paused_at} before the pause), last pass {:#x}",
        passes.len(),
        passes.last().copied().unwrap_or_default()
    );
}
