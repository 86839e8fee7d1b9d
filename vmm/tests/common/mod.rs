//! Helpers shared by the migration tests: a scratch folder per test, `rangevm`
//! children with deadlines (killed when dropped or by a watchdog), `rangevm ctl`
//! calls with deadlines, and waits that fail with a message.

#![allow(dead_code)] // Each test file uses its own subset.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rangevm_tests::tiny::{parse_counter_lines, Mode, TinyGuest};

/// No child of these tests lives longer than this.
pub const CHILD_DEADLINE: Duration = Duration::from_secs(240);
/// No `rangevm ctl` call takes longer than this.
pub const CTL_DEADLINE: Duration = Duration::from_secs(120);

/// A folder of its own for one test, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rangevm-migf-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("RANGEVM_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child killed when dropped, or by a watchdog once [`CHILD_DEADLINE`] has passed.
pub struct Proc {
    child: Arc<Mutex<Option<Child>>>,
    stderr_path: PathBuf,
    name: String,
}

impl Proc {
    /// `rangevm ARGS`.
    pub fn spawn(args: &[&str], stderr: &Path) -> Self {
        Self::spawn_program(env!("CARGO_BIN_EXE_rangevm"), args, stderr)
    }

    pub fn spawn_program(program: &str, args: &[&str], stderr: &Path) -> Self {
        let err = std::fs::File::create(stderr).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} {args:?}: {e}"));
        let child = Arc::new(Mutex::new(Some(child)));
        let watched = Arc::downgrade(&child);
        let name = format!("{program} {}", args.join(" "));
        let what = name.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < CHILD_DEADLINE {
                std::thread::sleep(Duration::from_millis(200));
                if watched.strong_count() == 0 {
                    return;
                }
            }
            if let Some(child) = watched.upgrade() {
                if let Some(c) = child.lock().unwrap().as_mut() {
                    eprintln!("watchdog: killing `{what}` after {CHILD_DEADLINE:?}");
                    let _ = c.kill();
                }
            }
        });
        Proc {
            child,
            stderr_path: stderr.to_path_buf(),
            name,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits at most `limit` for the exit status (-1 for a signal).
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            {
                let mut guard = self.child.lock().unwrap();
                let child = guard.as_mut()?;
                if let Some(status) = child.try_wait().unwrap() {
                    *guard = None;
                    return Some(status.code().unwrap_or(-1));
                }
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `limit`; panics with a message if it is still running.
    pub fn exit_code(&mut self, limit: Duration, what: &str) -> i32 {
        match self.wait(limit) {
            Some(code) => code,
            None => panic!(
                "{what}: `{}` still runs after {limit:?}; its stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().map_or(0, Child::id)
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `program ARGS` to the end, at most `limit`, collecting its output.
pub fn run_with_deadline(program: &str, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} {args:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{program} {}` did not end within {limit:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn ctl(socket: &str, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--api-socket", socket];
    all.extend_from_slice(args);
    run_with_deadline(env!("CARGO_BIN_EXE_rangevm"), &all, CTL_DEADLINE)
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ctl ... ARGS` whose stdout is JSON.
pub fn ctl_json(socket: &str, args: &[&str]) -> serde_json::Value {
    let out = ctl(socket, args);
    assert!(out.status.success(), "ctl {args:?} failed: {}", text(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl {args:?} printed no JSON ({e}): {}", text(&out)))
}

pub fn status(socket: &str) -> serde_json::Value {
    ctl_json(socket, &["migrate", "status"])
}

pub fn phase(st: &serde_json::Value) -> &str {
    st["phase"].as_str().unwrap_or("")
}

pub fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Waits until `f` holds, at most `limit`.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// How often the counter guests of these tests print.
pub const PRINT_EVERY: u64 = 16;

pub fn lines(path: &Path) -> usize {
    parse_counter_lines(&read(path))
        .map(|v| v.len())
        .unwrap_or(0)
}

/// `rangevm run` of a counter guest with a serial log and an API socket.
pub fn spawn_source(dir: &Scratch, kernel: &str, memory: &str, log: &Path, api: &str) -> Proc {
    Proc::spawn(
        &[
            "run",
            "--kernel",
            kernel,
            "--memory",
            memory,
            "--serial",
            &format!("file:{}", log.display()),
            "--api-socket",
            api,
        ],
        &dir.path("src.err"),
    )
}

/// `rangevm run --incoming ADDR`, waiting until it listens.
pub fn spawn_destination(dir: &Scratch, tag: &str, addr: &str, log: &Path, api: &str) -> Proc {
    spawn_destination_with(dir, tag, addr, log, api, &[])
}

/// As [`spawn_destination`], with more options.
pub fn spawn_destination_with(
    dir: &Scratch,
    tag: &str,
    addr: &str,
    log: &Path,
    api: &str,
    more: &[&str],
) -> Proc {
    let serial = format!("file:{}", log.display());
    let mut args = vec![
        "run",
        "--incoming",
        addr,
        "--serial",
        &serial,
        "--api-socket",
        api,
    ];
    args.extend_from_slice(more);
    let mut dst = Proc::spawn(&args, &dir.path(&format!("{tag}.err")));
    wait_for(Duration::from_secs(20), "the destination to listen", || {
        assert!(dst.alive(), "the destination exited: {}", dst.stderr());
        dst.stderr().contains("waiting for an incoming migration")
    });
    dst
}

pub fn counter_guest(scratch: &Scratch, pages: u64) -> String {
    let guest = TinyGuest::new(Mode::Long).counter(16 * MIB, pages, 4096, PRINT_EVERY);
    let path = scratch.path(&format!("counter{pages}.elf"));
    guest.write_to(&path).unwrap();
    path.to_str().unwrap().to_string()
}

/// The migrated guest goes on: the destination's console shows at least `lines` more
/// counter lines, `vm shutdown` ends it with status 0, and the source's console up to
/// the switch-over followed by the destination's is one consecutive sequence.
pub fn goes_on_and_shuts_down(
    dst: &mut Proc,
    dst_api: &str,
    dst_log: &Path,
    at_switch: &str,
    lines_wanted: usize,
) {
    wait_for(
        Duration::from_secs(30),
        "the destination guest to print",
        || lines(dst_log) >= lines_wanted,
    );
    let out = ctl(dst_api, &["vm", "shutdown"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        dst.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let all = rangevm_tests::tiny::parse_counter_lines(&format!("{at_switch}{}", read(dst_log)))
        .unwrap_or_else(|e| panic!("{e}"));
    rangevm_tests::tiny::check_consecutive(&all, PRINT_EVERY).unwrap_or_else(|e| panic!("{e}"));
}
