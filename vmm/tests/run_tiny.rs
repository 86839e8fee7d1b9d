//! `rangevm run` booting tiny hand-made guests (`rangevm_tests::tiny`) on this
//! machine's KVM: every exit path and its documented exit status, the serial console
//! destinations, both memory lock modes, several vCPUs, guest memory across the whole
//! RAM range (above 4 GiB too), clean shutdown on SIGTERM/SIGINT, and bad input.
//!
//! Every test that boots a guest needs `/dev/kvm` and fails, saying so, without it.
//! Every child gets a deadline: a hung `rangevm` is killed and the test fails.

#![cfg(target_arch = "x86_64")]

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rangevm_tests::tiny::{Exit, Mode, TinyGuest, PATTERN_BAD, PATTERN_OK};

/// The most any `rangevm run` here may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How soon after SIGTERM/SIGINT `rangevm` must be gone.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting test looks at the child (also the resolution of the times it
/// reports).
const POLL: Duration = Duration::from_millis(1);
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Where the tiny guests' pattern tests start: clear of the boot structures below
/// 1 MiB and of the guest image at 1 MiB.
const PATTERN_START: u64 = 2 * MIB;

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

/// A folder of its own for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("rangevm-run-tiny-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `guest` as `guest.elf` and returns its path.
    fn guest(&self, guest: &TinyGuest) -> PathBuf {
        let path = self.path("guest.elf");
        guest
            .write_to(&path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(path: &Path) -> &str {
    path.to_str().expect("scratch paths are UTF-8")
}

/// How a `rangevm` process ended, and what it printed.
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Outcome {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rangevm ended with {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// A running `rangevm` whose output is collected while it runs; killed if dropped
/// before it ends (a failing test never leaves a VM behind).
struct Vmm {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

fn collect(mut from: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let to = Arc::clone(&buf);
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            to.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, reader)
}

fn lossy(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

impl Vmm {
    fn spawn(args: &[&str]) -> Self {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_rangevm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rangevm");
        let (stdout, out_reader) = collect(child.stdout.take().expect("piped stdout"));
        let (stderr, err_reader) = collect(child.stderr.take().expect("piped stderr"));
        Vmm {
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
            started,
        }
    }

    /// Kills the VMM and fails the test with `why` and the output so far.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "{why} (after {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.started.elapsed(),
            lossy(&self.stdout),
            lossy(&self.stderr)
        );
    }

    /// Waits until the guest console on stdout shows `text`; returns the time since the
    /// start.
    fn wait_for_stdout(&mut self, text: &str) -> Duration {
        loop {
            if lossy(&self.stdout).contains(text) {
                return self.started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!(
                    "rangevm ended ({status}) before printing {text:?}"
                ));
            }
            if self.started.elapsed() > TIMEOUT {
                self.fail(&format!("no {text:?} on stdout within {TIMEOUT:?}"));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` to the VMM.
    fn signal(&mut self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) touches no memory of ours. `pid` is our child, which has not
        // been reaped (only `wait`/`fail`/`drop` reap it and none has run), so the pid
        // cannot have been reused by another process.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            self.fail(&format!("cannot send signal {signal} to rangevm: {e}"));
        }
    }

    /// The VMM's resident set size, from /proc.
    fn rss_bytes(&mut self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        match kib {
            Some(kib) => kib * 1024,
            None => self.fail("no VmRSS in /proc/<pid>/status"),
        }
    }

    /// Waits at most `timeout` for the VMM to end.
    fn wait(mut self, timeout: Duration) -> Outcome {
        let since = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if since.elapsed() > timeout => {
                    self.fail(&format!("rangevm did not end within {timeout:?}"))
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => self.fail(&format!("cannot wait for rangevm: {e}")),
            }
        };
        let elapsed = self.started.elapsed();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Outcome {
            status,
            stdout: lossy(&self.stdout),
            stderr: lossy(&self.stderr),
            elapsed,
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // A no-op once the child has been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rangevm <args>`, to the end.
fn rangevm(args: &[&str]) -> Outcome {
    Vmm::spawn(args).wait(TIMEOUT)
}

/// `rangevm run --kernel <guest> <extra>`, to the end.
fn run_guest(test: &str, guest: &TinyGuest, extra: &[&str]) -> Outcome {
    require_kvm();
    let dir = Scratch::new(test);
    let kernel = dir.guest(guest);
    let mut args = vec!["run", "--kernel", text(&kernel)];
    args.extend_from_slice(extra);
    rangevm(&args)
}

/// The run ended as `exit` documents, printing exactly `console` on stdout.
fn assert_ended(out: &Outcome, exit: Exit, console: &str) {
    let want = exit.expected_status().expect("an exit with a status");
    assert_eq!(
        out.code(),
        Some(want),
        "{exit:?} must exit with {want}: {out}"
    );
    assert_eq!(out.stdout, console, "the guest console on stdout: {out}");
    assert!(!out.stderr.contains("panicked at"), "{out}");
}

fn exits_with(test: &str, mode: Mode, exit: Exit) {
    let console = format!("{mode:?} guest, {exit:?} exit\n");
    let out = run_guest(test, &TinyGuest::new(mode).print(&console).exit(exit), &[]);
    assert_ended(&out, exit, &console);
}

#[test]
fn long_mode_power_off_exits_0() {
    exits_with("long-poweroff", Mode::Long, Exit::PowerOff);
}

#[test]
fn pvh_power_off_exits_0() {
    exits_with("pvh-poweroff", Mode::Pvh, Exit::PowerOff);
}

#[test]
fn long_mode_i8042_reset_exits_3() {
    exits_with("long-reset", Mode::Long, Exit::Reset);
}

#[test]
fn pvh_i8042_reset_exits_3() {
    exits_with("pvh-reset", Mode::Pvh, Exit::Reset);
}

#[test]
fn long_mode_acpi_reset_exits_3() {
    exits_with("long-acpi-reset", Mode::Long, Exit::AcpiReset);
}

#[test]
fn pvh_acpi_reset_exits_3() {
    exits_with("pvh-acpi-reset", Mode::Pvh, Exit::AcpiReset);
}

#[test]
fn long_mode_triple_fault_exits_4() {
    exits_with("long-triple", Mode::Long, Exit::TripleFault);
}

#[test]
fn pvh_triple_fault_exits_4() {
    exits_with("pvh-triple", Mode::Pvh, Exit::TripleFault);
}

#[test]
fn long_mode_panic_exits_5() {
    exits_with("long-panic", Mode::Long, Exit::Panic);
}

#[test]
fn pvh_panic_exits_5() {
    exits_with("pvh-panic", Mode::Pvh, Exit::Panic);
}

#[test]
fn first_port_write_is_the_first_console_byte() {
    let guest = TinyGuest::new(Mode::Long)
        .marker(b'@')
        .print("after the marker\n")
        .exit(Exit::PowerOff);
    require_kvm();
    let dir = Scratch::new("marker");
    let kernel = dir.guest(&guest);
    let mut vmm = Vmm::spawn(&["run", "--kernel", text(&kernel)]);
    let first = vmm.wait_for_stdout("@");
    let out = vmm.wait(TIMEOUT);
    eprintln!(
        "process start to the guest's first port write: {:.1} ms (debug build, under test)",
        first.as_secs_f64() * 1000.0
    );
    assert_ended(&out, Exit::PowerOff, "@after the marker\n");
}

#[test]
fn serial_file_gets_the_console_and_stdout_stays_empty() {
    require_kvm();
    let dir = Scratch::new("serial-file");
    let console = "to the file\n";
    let kernel = dir.guest(
        &TinyGuest::new(Mode::Long)
            .print(console)
            .exit(Exit::PowerOff),
    );
    let file = dir.path("console.txt");
    let serial = format!("file:{}", text(&file));
    let out = rangevm(&["run", "--kernel", text(&kernel), "--serial", &serial]);
    assert_ended(&out, Exit::PowerOff, "");
    let written = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("no console file {}: {e}\n{out}", file.display()));
    assert_eq!(written, console);
}

#[test]
fn serial_null_discards_the_console() {
    let guest = TinyGuest::new(Mode::Pvh)
        .print("nobody reads this\n")
        .exit(Exit::PowerOff);
    let out = run_guest("serial-null", &guest, &["--serial", "null"]);
    assert_ended(&out, Exit::PowerOff, "");
}

#[test]
fn serial_stdio_is_the_default_and_can_be_named() {
    let guest = TinyGuest::new(Mode::Long)
        .print("on stdout\n")
        .exit(Exit::PowerOff);
    let out = run_guest("serial-stdio", &guest, &["--serial", "stdio"]);
    assert_ended(&out, Exit::PowerOff, "on stdout\n");
}

#[test]
fn logs_go_to_stderr_never_into_the_console() {
    let guest = TinyGuest::new(Mode::Long)
        .print("console only\n")
        .exit(Exit::PowerOff);
    let out = run_guest("log-debug", &guest, &["--log-level", "debug"]);
    assert_ended(&out, Exit::PowerOff, "console only\n");
}

/// A guest that writes the pattern to every `stride`-th page from 2 MiB to the end
/// of `memory` (below 3 GiB) and checks it.
fn pattern_guest(mode: Mode, memory: u64, stride: u64) -> TinyGuest {
    let count = (memory - PATTERN_START) / stride;
    TinyGuest::new(mode)
        .touch_pages(PATTERN_START, count, stride)
        .check_pages(PATTERN_START, count, stride)
        .exit(Exit::PowerOff)
}

#[test]
fn long_mode_guest_memory_holds_a_pattern_across_64m() {
    let out = run_guest(
        "long-pattern",
        &pattern_guest(Mode::Long, 64 * MIB, 0x1000),
        &["--memory", "64M"],
    );
    assert_ended(&out, Exit::PowerOff, PATTERN_OK);
}

#[test]
fn pvh_guest_memory_holds_a_pattern_across_64m() {
    let out = run_guest(
        "pvh-pattern",
        &pattern_guest(Mode::Pvh, 64 * MIB, 0x1000),
        &["--memory", "64M"],
    );
    assert_ended(&out, Exit::PowerOff, PATTERN_OK);
}

#[test]
fn pattern_check_of_untouched_memory_fails() {
    // Fresh guest memory is zero, so a check without a touch must see a bad pattern:
    // the check is not vacuous.
    let guest = TinyGuest::new(Mode::Long)
        .check_pages(PATTERN_START, 16, 0x1000)
        .exit(Exit::PowerOff);
    let out = run_guest("pattern-bad", &guest, &["--memory", "64M"]);
    assert_ended(&out, Exit::PowerOff, PATTERN_BAD);
}

#[test]
fn global_mem_lock_runs_the_same_guest() {
    let out = run_guest(
        "mem-lock-global",
        &pattern_guest(Mode::Long, 64 * MIB, 0x4000),
        &["--memory", "64M", "--mem-lock", "global"],
    );
    assert_ended(&out, Exit::PowerOff, PATTERN_OK);
}

#[test]
fn range_mem_lock_can_be_named() {
    let out = run_guest(
        "mem-lock-range",
        &pattern_guest(Mode::Pvh, 64 * MIB, 0x4000),
        &["--memory", "64M", "--mem-lock", "range"],
    );
    assert_ended(&out, Exit::PowerOff, PATTERN_OK);
}

#[test]
fn two_cpus_still_run_the_guest() {
    let out = run_guest(
        "two-cpus",
        &pattern_guest(Mode::Long, 64 * MIB, 0x4000),
        &["--memory", "64M", "--cpus", "2"],
    );
    assert_ended(&out, Exit::PowerOff, PATTERN_OK);
}

#[test]
fn long_mode_guest_memory_above_4g_holds_a_pattern() {
    // 4200 MiB: 3 GiB below the 32-bit hole, 1128 MiB from 4 GiB on.
    let high = 4200 * MIB - 3 * GIB;
    let guest = TinyGuest::new(Mode::Long)
        // The last pages below the hole.
        .touch_pages(3 * GIB - 16 * MIB, 16, MIB)
        .check_pages(3 * GIB - 16 * MIB, 16, MIB)
        // Spread over the RAM above 4 GiB (the guest maps it itself)...
        .touch_pages(4 * GIB, high / (8 * MIB), 8 * MIB)
        .check_pages(4 * GIB, high / (8 * MIB), 8 * MIB)
        // ... up to its very last page.
        .touch_pages(4 * GIB + high - 0x1000, 1, 0x1000)
        .check_pages(4 * GIB + high - 0x1000, 1, 0x1000)
        .exit(Exit::PowerOff);
    let out = run_guest("pattern-4g", &guest, &["--memory", "4200M"]);
    assert_ended(&out, Exit::PowerOff, &PATTERN_OK.repeat(3));
}

#[test]
fn the_vmm_leaves_big_guest_memory_untouched() {
    require_kvm();
    let dir = Scratch::new("rss");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).print("up\n").exit(Exit::Hang));
    let mut vmm = Vmm::spawn(&["run", "--kernel", text(&kernel), "--memory", "4200M"]);
    vmm.wait_for_stdout("up\n");
    let rss = vmm.rss_bytes();
    eprintln!(
        "rangevm RSS with a 4200 MiB guest: {:.1} MiB",
        rss as f64 / MIB as f64
    );
    assert!(
        rss < 64 * MIB,
        "rangevm's RSS is {} MiB with a 4200 MiB guest that touched nothing",
        rss / MIB
    );
}

/// A guest that prints, then hangs with interrupts off; `signal` must stop it cleanly
/// with exit status `status`.
fn signal_stops_hanging_guest(test: &str, mode: Mode, extra: &[&str], signal: i32, status: i32) {
    require_kvm();
    let dir = Scratch::new(test);
    let kernel = dir.guest(&TinyGuest::new(mode).print("hanging\n").exit(Exit::Hang));
    let mut args = vec!["run", "--kernel", text(&kernel)];
    args.extend_from_slice(extra);
    let mut vmm = Vmm::spawn(&args);
    vmm.wait_for_stdout("hanging\n");
    // Let the vCPU reach its `hlt`.
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    vmm.signal(signal);
    let out = vmm.wait(SIGNAL_TIMEOUT);
    assert_eq!(
        out.code(),
        Some(status),
        "signal {signal} must end rangevm with status {status}: {out}"
    );
    assert_eq!(out.stdout, "hanging\n", "{out}");
    assert!(!out.stderr.contains("panicked at"), "{out}");
    eprintln!("signal {signal} to exit: {:?}", sent.elapsed());
}

#[test]
fn sigterm_stops_a_hanging_guest_with_143() {
    signal_stops_hanging_guest("sigterm", Mode::Long, &[], libc::SIGTERM, 143);
}

#[test]
fn sigint_stops_a_hanging_guest_with_130() {
    signal_stops_hanging_guest("sigint", Mode::Pvh, &[], libc::SIGINT, 130);
}

#[test]
fn sigterm_stops_a_two_cpu_guest_whose_second_cpu_waits_for_sipi() {
    signal_stops_hanging_guest(
        "sigterm-2cpus",
        Mode::Long,
        &["--cpus", "2"],
        libc::SIGTERM,
        143,
    );
}

#[test]
fn a_small_initrd_is_accepted() {
    require_kvm();
    let dir = Scratch::new("initrd-ok");
    let kernel = dir.guest(
        &TinyGuest::new(Mode::Long)
            .print("ok\n")
            .exit(Exit::PowerOff),
    );
    let initrd = dir.path("initrd.img");
    std::fs::write(&initrd, vec![0x5a; 1 << 20]).expect("write the initrd");
    let out = rangevm(&[
        "run",
        "--kernel",
        text(&kernel),
        "--initrd",
        text(&initrd),
        "--memory",
        "64M",
        "--cmdline",
        "console=ttyS0 quiet",
    ]);
    assert_ended(&out, Exit::PowerOff, "ok\n");
}

// ---- Bad input ----

/// The VMM refused to run: status 1 and one line on stderr, `rangevm: ...`, a sentence
/// that names `subject` (before any OS error text), with no panic; or, with
/// `clap_ok`, clap's usage error (status 2) naming `subject`.
fn assert_refused(out: &Outcome, subject: &str, clap_ok: bool) {
    assert!(!out.stderr.contains("panicked at"), "{out}");
    assert!(!out.stderr.contains("RUST_BACKTRACE"), "{out}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out}");
    let lower = out.stderr.to_lowercase();
    match out.code() {
        Some(2) if clap_ok => {
            assert!(
                out.stderr.starts_with("error:"),
                "clap's usage error: {out}"
            );
            assert!(lower.contains(subject), "must name {subject:?}: {out}");
        }
        Some(1) => {
            let lines: Vec<&str> = out.stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one line on stderr: {out}");
            let line = lines[0];
            assert!(line.starts_with("rangevm: "), "{out}");
            let sentence = line.to_lowercase();
            let sentence = sentence.split("os error").next().unwrap_or_default();
            assert!(
                sentence.contains(subject),
                "the sentence must name {subject:?} before any OS error text: {out}"
            );
            // No Debug formatting of errors, no bare errno or ioctl numbers.
            for raw in ["{ ", "errno", "error(", "kind:"] {
                assert!(!sentence.contains(raw), "raw error text {raw:?}: {out}");
            }
        }
        _ => panic!(
            "bad input must end with status 1{}: {out}",
            if clap_ok { " or 2" } else { "" }
        ),
    }
}

#[test]
fn missing_kernel_file_is_refused() {
    require_kvm();
    let dir = Scratch::new("no-kernel");
    let missing = dir.path("no-such-vmlinux");
    let out = rangevm(&["run", "--kernel", text(&missing)]);
    assert_refused(&out, "kernel", false);
    assert!(
        out.stderr.contains("no-such-vmlinux"),
        "names the file: {out}"
    );
}

#[test]
fn kernel_of_random_bytes_is_refused() {
    require_kvm();
    let dir = Scratch::new("random-kernel");
    let kernel = dir.path("random.bin");
    // xorshift64: reproducible noise, never an ELF or bzImage header.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&kernel, noise).expect("write the kernel");
    let out = rangevm(&["run", "--kernel", text(&kernel)]);
    assert_refused(&out, "kernel", false);
}

#[test]
fn empty_kernel_file_is_refused() {
    require_kvm();
    let dir = Scratch::new("empty-kernel");
    let kernel = dir.path("empty");
    std::fs::write(&kernel, b"").expect("write the kernel");
    let out = rangevm(&["run", "--kernel", text(&kernel)]);
    assert_refused(&out, "kernel", false);
}

#[test]
fn truncated_elf_kernel_is_refused() {
    require_kvm();
    let dir = Scratch::new("truncated-kernel");
    let kernel = dir.path("truncated.elf");
    let elf = TinyGuest::new(Mode::Long).exit(Exit::PowerOff).build();
    // The ELF header says there are program headers; the file ends before them.
    std::fs::write(&kernel, &elf[..80]).expect("write the kernel");
    let out = rangevm(&["run", "--kernel", text(&kernel)]);
    assert_refused(&out, "kernel", false);
}

#[test]
fn initrd_larger_than_guest_memory_is_refused() {
    require_kvm();
    let dir = Scratch::new("big-initrd");
    let kernel = dir.guest(
        &TinyGuest::new(Mode::Long)
            .print("booted\n")
            .exit(Exit::PowerOff),
    );
    let initrd = dir.path("initrd.img");
    // 128 MiB, sparse: it costs no disk.
    let file = std::fs::File::create(&initrd).expect("create the initrd");
    file.set_len(128 * MIB).expect("size the initrd");
    drop(file);
    let out = rangevm(&[
        "run",
        "--kernel",
        text(&kernel),
        "--initrd",
        text(&initrd),
        "--memory",
        "64M",
    ]);
    assert_refused(&out, "initrd", false);
}

#[test]
fn missing_initrd_file_is_refused() {
    require_kvm();
    let dir = Scratch::new("no-initrd");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).exit(Exit::PowerOff));
    let missing = dir.path("no-such-initrd");
    let out = rangevm(&["run", "--kernel", text(&kernel), "--initrd", text(&missing)]);
    assert_refused(&out, "initrd", false);
}

#[test]
fn one_kib_of_memory_is_refused() {
    require_kvm();
    let dir = Scratch::new("mem-1k");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).exit(Exit::PowerOff));
    let out = rangevm(&["run", "--kernel", text(&kernel), "--memory", "1K"]);
    assert_refused(&out, "memory", true);
}

#[test]
fn memory_that_is_not_a_size_is_a_usage_error() {
    let out = rangevm(&["run", "--kernel", "/nonexistent", "--memory", "lots"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("'lots'"), "{out}");
    assert!(out.stderr.contains("--memory"), "{out}");
    assert!(!out.stderr.contains("panicked at"), "{out}");
}

#[test]
fn zero_cpus_are_refused() {
    require_kvm();
    let dir = Scratch::new("cpus-0");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).exit(Exit::PowerOff));
    let out = rangevm(&["run", "--kernel", text(&kernel), "--cpus", "0"]);
    assert_refused(&out, "cpu", true);
}

#[test]
fn more_cpus_than_kvm_allows_are_refused_in_a_sentence() {
    require_kvm();
    let dir = Scratch::new("cpus-many");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).exit(Exit::PowerOff));
    let out = rangevm(&["run", "--kernel", text(&kernel), "--cpus", "100000"]);
    assert_refused(&out, "cpu", true);
}

#[test]
fn unwritable_serial_file_is_refused() {
    require_kvm();
    let dir = Scratch::new("serial-unwritable");
    let kernel = dir.guest(&TinyGuest::new(Mode::Long).exit(Exit::PowerOff));
    let serial = format!("file:{}", text(&dir.path("no-such-dir/console.txt")));
    let out = rangevm(&["run", "--kernel", text(&kernel), "--serial", &serial]);
    assert_refused(&out, "serial", true);
}

#[test]
fn unknown_serial_target_is_a_usage_error() {
    let out = rangevm(&["run", "--kernel", "/nonexistent", "--serial", "bogus"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("'bogus'"), "{out}");
    assert!(out.stderr.contains("--serial"), "{out}");
}

#[test]
fn run_without_a_kernel_is_a_usage_error() {
    let out = rangevm(&["run"]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("--kernel"), "{out}");
}
