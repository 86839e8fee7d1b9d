//! Live migration (precopy) between two `rangevm` processes on this machine's KVM, with
//! a tiny guest that keeps writing a counter pattern across its memory and printing its
//! pass number: the guest goes on from where it stopped, on the destination.

#![cfg(target_arch = "x86_64")]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rangevm::migration::protocol::{
    AckKind, Arch, Decoder, Encoder, Header, Message, MessageType, PageDigests, Region, SwitchMode,
    FEATURE_VERIFY,
};
use rangevm_tests::tiny::{check_consecutive, parse_counter_lines, Mode, TinyGuest};

const MIB: u64 = 1 << 20;
const PRINT_EVERY: u64 = 16;

/// A folder of its own for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rangevm-mig-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn s(&self, name: &str) -> String {
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

/// A child killed when dropped.
struct Proc {
    child: Option<Child>,
    stderr_path: PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], stderr: &Path) -> Self {
        let err = std::fs::File::create(stderr).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rangevm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            stderr_path: stderr.to_path_buf(),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits at most `limit` for the exit status.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        while start.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ctl(socket: &str, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--api-socket", socket];
    all.extend_from_slice(args);
    Command::new(env!("CARGO_BIN_EXE_rangevm"))
        .args(&all)
        .output()
        .unwrap()
}

fn ctl_json(socket: &str, args: &[&str]) -> serde_json::Value {
    let out = ctl(socket, args);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Waits until `f` holds, at most `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counter_guest(scratch: &Scratch, pages: u64) -> String {
    let guest = TinyGuest::new(Mode::Long).counter(16 * MIB, pages, 4096, PRINT_EVERY);
    let path = scratch.path("counter.elf");
    guest.write_to(&path).unwrap();
    path.to_str().unwrap().to_string()
}

fn lines(path: &Path) -> usize {
    parse_counter_lines(&read(path))
        .map(|v| v.len())
        .unwrap_or(0)
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_running_counter_guest_migrates_and_goes_on_where_it_stopped() {
    let dir = Scratch::new("counter");
    let mig = format!("unix:{}", dir.s("mig.sock"));
    migrate_counter(&dir, &mig, 1);
}

#[test]
fn a_two_vcpu_counter_guest_migrates_over_tcp() {
    let dir = Scratch::new("counter-tcp");
    let mig = format!("tcp:127.0.0.1:{}", free_port());
    migrate_counter(&dir, &mig, 2);
}

/// Migrates a 64 MiB counter guest with `cpus` vCPUs to `mig` with `--verify`, and
/// checks the destination starts from the source's memory page for page and goes on
/// counting from where the source stopped.
fn migrate_counter(dir: &Scratch, mig: &str, cpus: u32) {
    let kernel = counter_guest(dir, 512);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = mig.to_string();
    let cpus_arg = cpus.to_string();
    let mut src = Proc::spawn(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--cpus",
            &cpus_arg,
            "--serial",
            &format!("file:{}", src_log.display()),
            "--api-socket",
            &src_api,
        ],
        &dir.path("src.err"),
    );
    let mut dst = Proc::spawn(
        &[
            "run",
            "--incoming",
            &mig,
            "--serial",
            &format!("file:{}", dst_log.display()),
            "--api-socket",
            &dst_api,
        ],
        &dir.path("dst.err"),
    );
    wait_for(Duration::from_secs(20), "the source guest to print", || {
        lines(&src_log) >= 3
    });
    wait_for(Duration::from_secs(10), "the destination to listen", || {
        dst.stderr().contains("waiting for an incoming migration")
    });
    let out = ctl(&src_api, &["migrate", "send", "--verify", &mig]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "migrate send failed: {stdout}\n{stderr}\nsource: {}\ndestination: {}",
        src.stderr(),
        dst.stderr()
    );
    assert_eq!(
        src.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr()
    );
    let at_switch = read(&src_log);
    wait_for(
        Duration::from_secs(20),
        "the destination guest to print",
        || lines(&dst_log) >= 3,
    );
    assert!(dst.alive(), "{}", dst.stderr());
    let info = ctl_json(&dst_api, &["vm", "info"]);
    assert_eq!(info["cpus"], cpus, "{info}");
    assert_eq!(info["memory_bytes"], 64 * MIB, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    let out = ctl(&dst_api, &["vm", "shutdown"]);
    assert!(out.status.success());
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let after = read(&dst_log);
    // Every page the destination started from had the source's CRC32C at switch-over.
    let pages = 64 * MIB / 4096;
    assert!(
        dst.stderr()
            .contains(&format!("all {pages} pages verified")),
        "{}",
        dst.stderr()
    );
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["phase"], "completed", "{stdout}");
    assert!(status["downtime_ms"].as_f64().unwrap() > 0.0, "{stdout}");
    let all = parse_counter_lines(&format!("{at_switch}{after}")).unwrap();
    check_consecutive(&all, PRINT_EVERY).unwrap();
    let before = parse_counter_lines(&at_switch).unwrap();
    assert!(all.len() > before.len() + 2, "{all:?}");
    eprintln!("{stdout}\n{stderr}");
}

/// A source whose digests do not match what it sent: the destination refuses to start
/// the guest, tells the source why, and exits 1.
#[test]
fn a_destination_refuses_pages_that_do_not_match_the_digests() {
    let dir = Scratch::new("digests");
    let sock = dir.path("mig.sock");
    let mig = format!("unix:{}", sock.display());
    let mut dst = Proc::spawn(
        &["run", "--incoming", &mig, "--serial", "null"],
        &dir.path("dst.err"),
    );
    wait_for(Duration::from_secs(10), "the destination to listen", || {
        dst.stderr().contains("waiting for an incoming migration")
    });
    let stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut enc = Encoder::new(stream.try_clone().unwrap());
    let mut dec = Decoder::new(stream);
    let memory = 8 * MIB;
    let header = Header::new(
        Arch::host().unwrap(),
        12,
        1,
        vec![Region {
            gpa: 0,
            size: memory,
        }],
        FEATURE_VERIFY,
    );
    enc.send(&Message::Header(header)).unwrap();
    assert_eq!(
        dec.recv_expecting(&[MessageType::Ack]).unwrap(),
        Message::Ack(AckKind::Accepted)
    );
    // One page with contents; every digest says "zero page", which page 0x1000 is not.
    enc.send_pages(0x1000, 12, &[0xa5; 4096]).unwrap();
    enc.send(&Message::SwitchOver(SwitchMode::Precopy)).unwrap();
    let zero = rangevm::migration::protocol::Crc32c::of(&[0u8; 4096]);
    let pages = usize::try_from(memory / 4096).unwrap();
    enc.send(&Message::PageDigests(PageDigests {
        gpa: 0,
        page_shift: 12,
        digests: vec![zero; pages],
    }))
    .unwrap();
    enc.send(&Message::Complete).unwrap();
    match dec.recv() {
        Ok(Message::Error(why)) => {
            assert!(why.contains("1 of 2048 pages differ"), "{why}");
            assert!(why.contains("0x1000"), "{why}");
        }
        other => panic!("expected an Error, got {other:?}; {}", dst.stderr()),
    }
    assert_eq!(
        dst.wait(Duration::from_secs(10)),
        Some(1),
        "{}",
        dst.stderr()
    );
    let err = dst.stderr();
    assert!(err.contains("rangevm: Incoming migration failed"), "{err}");
    assert!(err.contains("Verification failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
