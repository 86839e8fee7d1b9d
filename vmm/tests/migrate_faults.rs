//! Live migration when things go wrong: a destination killed in the middle of precopy,
//! a connection cut by the peer, a destination that refuses, bad streams sent to a real
//! destination, and a migration between two network namespaces over a veth pair.
//!
//! The source must recover (its guest keeps counting, consecutively, and can migrate
//! again); the destination must exit with status 1 and one clear sentence, never panic
//! and never hang.

#![cfg(target_arch = "x86_64")]

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rangevm::migration::protocol::{
    encode_to_vec, AckKind, Arch, Crc32c, Decoder, Encoder, Header, Message, PageRun,
    ProtocolError, Region, FRAME_HEADER_LEN, FRAME_TRAILER_LEN,
};
use rangevm_tests::tiny::{check_consecutive, parse_counter_lines};

// ---------------------------------------------------------------------------------------
// Helpers (those of migrate_tiny.rs, with deadlines on every child and every wait).

/// The source guest keeps printing: at least `more` new lines after `before`, and all
/// lines so far consecutive.
fn assert_keeps_counting(src: &mut Proc, log: &Path, before: usize, more: usize) {
    wait_for(
        Duration::from_secs(60),
        "the source guest to print new counter lines",
        || {
            assert!(src.alive(), "the source exited: {}", src.stderr());
            lines(log) >= before + more
        },
    );
    let all = parse_counter_lines(&read(log)).unwrap();
    check_consecutive(&all, PRINT_EVERY).unwrap();
}

/// `vm info` says the guest runs and dirty logging is off again.
fn assert_running_without_dirty_log(api: &str) {
    let info = ctl_json(api, &["vm", "info"]);
    assert_eq!(info["state"], "running", "vm info: {info}");
    assert_eq!(
        info["dirty_logging"], false,
        "dirty logging is still on after the failed migration: {info}"
    );
}

fn assert_no_panic(p: &Proc, who: &str) {
    let err = p.stderr();
    assert!(!err.contains("panicked"), "the {who} panicked:\n{err}");
}

/// Waits for `migrate status` to say failed, with an error sentence; returns it.
fn wait_failed(api: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let st = status(api);
        if phase(&st) == "failed" {
            let err = st["error"].as_str().unwrap_or("").to_string();
            assert!(err.len() > 10, "failed without an error sentence: {st}");
            return err;
        }
        assert!(
            start.elapsed() < limit,
            "migrate status did not reach failed within {limit:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates `src` to a new destination at `addr` (with `extra` send options) and checks
/// the guest goes on there, consecutively.
#[allow(clippy::too_many_arguments)]
fn migrate_and_check(
    src: &mut Proc,
    src_log: &Path,
    src_api: &str,
    dst: &mut Proc,
    dst_log: &Path,
    dst_api: &str,
    addr: &str,
    extra: &[&str],
) {
    let mut args = vec!["migrate", "send", addr];
    args.extend_from_slice(extra);
    let out = ctl(src_api, &args);
    assert!(
        out.status.success(),
        "migrate send failed: {}\nsource: {}\ndestination: {}",
        text(&out),
        src.stderr(),
        dst.stderr()
    );
    assert_eq!(
        src.wait(Duration::from_secs(20)),
        Some(0),
        "the source did not end after the migration: {}",
        src.stderr()
    );
    let at_switch = read(src_log);
    wait_for(
        Duration::from_secs(60),
        "the destination guest to print",
        || {
            assert!(dst.alive(), "the destination exited: {}", dst.stderr());
            lines(dst_log) >= 3
        },
    );
    let out = ctl(dst_api, &["vm", "shutdown"]);
    assert!(out.status.success(), "vm shutdown: {}", text(&out));
    assert_eq!(
        dst.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        dst.stderr()
    );
    let after = read(dst_log);
    let all = parse_counter_lines(&format!("{at_switch}{after}")).unwrap();
    check_consecutive(&all, PRINT_EVERY).unwrap();
    let before = parse_counter_lines(&at_switch).unwrap();
    assert!(all.len() > before.len() + 2, "{all:?}");
    assert_no_panic(dst, "destination");
}

// ---------------------------------------------------------------------------------------
// Fake peers.

/// Accepts one connection on `listener`, at most `limit`.
fn accept(listener: &UnixListener, limit: Duration) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < limit,
                    "nobody connected to the fake destination within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects to a Unix socket, retrying until it exists, at most `limit`.
fn connect(path: &Path, limit: Duration) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(
                    start.elapsed() < limit,
                    "cannot connect to {} within {limit:?}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The header of a 64 MiB, 1-vCPU x86_64 VM on 4 KiB pages: what a real destination
/// with no `--memory` accepts.
fn good_header() -> Header {
    let mut h = Header::new(
        Arch::X86_64,
        12,
        1,
        vec![Region {
            gpa: 0,
            size: 64 * MIB,
        }],
        0,
    );
    h.session_id = 0x5eed_0000_0000_0001;
    h
}

fn header_frame(h: Header) -> Vec<u8> {
    encode_to_vec(&Message::Header(h)).unwrap()
}

/// Recomputes a frame's CRC32C after its bytes were patched.
fn fix_crc(frame: &mut [u8]) {
    let end = frame.len() - FRAME_TRAILER_LEN;
    let crc = Crc32c::of(&frame[..end]);
    frame[end..].copy_from_slice(&crc.to_le_bytes());
}

/// A `Pages` frame of 4 pages of non-zero bytes at 1 MiB.
fn pages_frame() -> Vec<u8> {
    let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
    encode_to_vec(&Message::Pages(PageRun::bytes(MIB, 12, data))).unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. The destination dies in the middle of precopy.

#[test]
fn killing_the_destination_mid_precopy_leaves_the_source_running_and_able_to_migrate() {
    let dir = Scratch::new("kill");
    // 8192 pages rewritten every pass: 32 MiB dirty per round, never under 1 ms.
    let kernel = counter_guest(&dir, 8192);
    let (src_log, dst_log, dst2_log) = (
        dir.path("src.console"),
        dir.path("dst.console"),
        dir.path("dst2.console"),
    );
    let (src_api, dst_api, dst2_api) = (dir.s("src.api"), dir.s("dst.api"), dir.s("dst2.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut src = spawn_source(&dir, &kernel, "1G", &src_log, &src_api);
    let mut dst = spawn_destination(&dir, "dst", &mig, &dst_log, &dst_api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        assert!(src.alive(), "the source exited: {}", src.stderr());
        lines(&src_log) >= 3
    });

    let out = ctl(
        &src_api,
        &[
            "migrate",
            "send",
            &mig,
            "--downtime-target",
            "1",
            "--max-rounds",
            "10000",
            "--detach",
        ],
    );
    assert!(
        out.status.success(),
        "migrate send --detach: {}",
        text(&out)
    );
    let start = Instant::now();
    let st = loop {
        let st = status(&src_api);
        if phase(&st) == "precopy" && st["round"].as_u64().unwrap_or(0) >= 1 {
            break st;
        }
        assert!(
            matches!(phase(&st), "connecting" | "precopy"),
            "the migration should still be in precopy: {st}\nsource: {}\ndestination: {}",
            src.stderr(),
            dst.stderr()
        );
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "precopy did not reach round 1 within 90 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st["bytes_sent"].as_u64().unwrap() > 8 * MIB, "{st}");
    assert_eq!(ctl_json(&src_api, &["vm", "info"])["dirty_logging"], true);

    let before_kill = lines(&src_log);
    dst.kill();
    let killed_at = Instant::now();
    let error = wait_failed(&src_api, Duration::from_secs(10));
    eprintln!(
        "status failed {:?} after the SIGKILL: {error}",
        killed_at.elapsed()
    );
    assert!(src.alive(), "the source died: {}", src.stderr());
    assert_keeps_counting(&mut src, &src_log, before_kill, 3);
    assert_running_without_dirty_log(&src_api);
    assert_no_panic(&src, "source");

    // The source recovered: a second migration, to a fresh destination, completes.
    let mig2 = format!("unix:{}", dir.s("mig2.sock"));
    let mut dst2 = spawn_destination(&dir, "dst2", &mig2, &dst2_log, &dst2_api);
    migrate_and_check(
        &mut src,
        &src_log,
        &src_api,
        &mut dst2,
        &dst2_log,
        &dst2_api,
        &mig2,
        &["--max-rounds", "3"],
    );
}

// ---------------------------------------------------------------------------------------
// 2. and 3. Fake destinations.

/// A source running a small counter guest, printing.
fn small_source(dir: &Scratch) -> (Proc, PathBuf, String) {
    let kernel = counter_guest(dir, 512);
    let log = dir.path("src.console");
    let api = dir.s("src.api");
    let mut src = spawn_source(dir, &kernel, "64M", &log, &api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        assert!(src.alive(), "the source exited: {}", src.stderr());
        lines(&log) >= 3
    });
    (src, log, api)
}

#[test]
fn a_destination_that_drops_the_connection_fails_the_send_and_the_guest_goes_on() {
    let dir = Scratch::new("cut");
    let (mut src, log, api) = small_source(&dir);
    let sock = dir.path("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let stream = accept(&listener, Duration::from_secs(30));
        let mut dec = Decoder::new(stream.try_clone().unwrap());
        let header = match dec.recv().expect("the source's header") {
            Message::Header(h) => h,
            other => panic!("expected a Header, got {other:?}"),
        };
        let mut enc = Encoder::new(stream.try_clone().unwrap());
        enc.send(&Message::Ack(AckKind::Accepted)).unwrap();
        enc.flush().unwrap();
        let mut frames = Vec::new();
        for _ in 0..16 {
            frames.push(dec.recv().expect("a frame of the full pass"));
        }
        stream.shutdown(Shutdown::Both).unwrap();
        (header, frames)
    });
    let before = lines(&log);
    let out = ctl(
        &api,
        &["migrate", "send", &format!("unix:{}", sock.display())],
    );
    let (header, frames) = fake.join().unwrap();
    assert_eq!(header.arch, Arch::X86_64);
    assert_eq!(header.page_shift, 12);
    assert_eq!(header.vcpu_count, 1);
    assert_eq!(header.memory_size(), u128::from(64 * MIB));
    assert!(
        frames.iter().all(|m| matches!(m, Message::Pages(_))),
        "{:?}",
        frames.iter().map(Message::message_type).collect::<Vec<_>>()
    );
    assert_eq!(out.status.code(), Some(1), "migrate send: {}", text(&out));
    let said = text(&out);
    assert!(said.contains("failed"), "{said}");
    let error = wait_failed(&api, Duration::from_secs(10));
    eprintln!("after the cut: {error}");
    assert_keeps_counting(&mut src, &log, before, 3);
    assert_running_without_dirty_log(&api);
    assert_no_panic(&src, "source");
}

#[test]
fn a_destination_that_refuses_the_header_fails_the_send_with_its_sentence() {
    const WHY: &str = "This fake destination refuses every VM, for a test.";
    let dir = Scratch::new("refuse");
    let (mut src, log, api) = small_source(&dir);
    let sock = dir.path("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let stream = accept(&listener, Duration::from_secs(30));
        let mut dec = Decoder::new(stream.try_clone().unwrap());
        assert!(matches!(dec.recv(), Ok(Message::Header(_))));
        let mut enc = Encoder::new(stream.try_clone().unwrap());
        enc.send(&Message::error(WHY)).unwrap();
        enc.flush().unwrap();
        // The source closes after reading the refusal.
        match dec.recv() {
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => {}
            other => panic!("after the refusal the source should close, got {other:?}"),
        }
    });
    let before = lines(&log);
    let out = ctl(
        &api,
        &["migrate", "send", &format!("unix:{}", sock.display())],
    );
    fake.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "migrate send: {}", text(&out));
    assert!(text(&out).contains(WHY), "{}", text(&out));
    let error = wait_failed(&api, Duration::from_secs(10));
    assert!(error.contains(WHY), "{error}");
    assert_keeps_counting(&mut src, &log, before, 3);
    assert_running_without_dirty_log(&api);
    assert_no_panic(&src, "source");
}

// ---------------------------------------------------------------------------------------
// 4. Bad streams to a real destination.

/// Starts a real destination, lets `feed` talk to it, and checks it exits 1 within a few
/// seconds with one "Incoming migration failed" line containing `cause`, no panic, and
/// (if `reply` is given) an `Error` message containing `reply` sent back first.
fn bad_stream(name: &str, cause: &str, reply: Option<&str>, feed: impl FnOnce(&mut UnixStream)) {
    let dir = Scratch::new(&format!("bad-{name}"));
    let sock = dir.path("mig.sock");
    let mut dst = spawn_destination(
        &dir,
        "dst",
        &format!("unix:{}", sock.display()),
        &dir.path("dst.console"),
        &dir.s("dst.api"),
    );
    let mut stream = connect(&sock, Duration::from_secs(10));
    feed(&mut stream);
    if let Some(reply) = reply {
        let mut dec = Decoder::new(stream.try_clone().unwrap());
        match dec.recv() {
            Ok(Message::Error(text)) => assert!(
                text.contains(reply),
                "{name}: the destination's Error {text:?} does not say {reply:?}"
            ),
            other => panic!(
                "{name}: expected an Error message from the destination, got {other:?}; its \
                 stderr:\n{}",
                dst.stderr()
            ),
        }
        match dec.recv() {
            Err(ProtocolError::Closed | ProtocolError::Io(_)) => {}
            other => panic!("{name}: after its Error the destination should close: {other:?}"),
        }
    }
    let code = dst.exit_code(
        Duration::from_secs(10),
        &format!("{name}: the destination should give up"),
    );
    let err = dst.stderr();
    assert_eq!(code, 1, "{name}: exit status; stderr:\n{err}");
    assert!(!err.contains("panicked"), "{name}: panicked:\n{err}");
    let failed: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("Incoming migration failed"))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "{name}: expected one \"Incoming migration failed\" line:\n{err}"
    );
    assert!(
        failed[0].starts_with("rangevm: Incoming migration failed") && failed[0].contains(cause),
        "{name}: the failure line does not name the cause {cause:?}: {}",
        failed[0]
    );
    eprintln!("{name}: {}", failed[0]);
}

/// Sends a good header and reads the `Ack(Accepted)`.
fn handshake(s: &mut UnixStream) {
    s.write_all(&header_frame(good_header())).unwrap();
    let mut dec = Decoder::new(s.try_clone().unwrap());
    match dec.recv() {
        Ok(Message::Ack(AckKind::Accepted)) => {}
        other => panic!("the destination should accept a good header: {other:?}"),
    }
}

#[test]
fn a_truncated_stream_makes_the_destination_exit_1() {
    bad_stream(
        "truncated",
        "ended in the middle of a message",
        Some("ended in the middle of a message"),
        |s| {
            handshake(s);
            let frame = pages_frame();
            s.write_all(&frame[..frame.len() / 2]).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        },
    );
}

#[test]
fn a_corrupted_frame_makes_the_destination_exit_1() {
    bad_stream(
        "corrupted",
        "Checksum mismatch",
        Some("Checksum mismatch"),
        |s| {
            handshake(s);
            let mut frame = pages_frame();
            let at = FRAME_HEADER_LEN + 16 + 1000;
            frame[at] ^= 0x40;
            s.write_all(&frame).unwrap();
        },
    );
}

#[test]
fn a_header_of_another_protocol_version_is_refused() {
    bad_stream(
        "version",
        "protocol version 2; this rangevm speaks version 1",
        Some("protocol version 2; this rangevm speaks version 1"),
        |s| {
            let mut frame = header_frame(good_header());
            frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + 4].copy_from_slice(&2u32.to_le_bytes());
            fix_crc(&mut frame);
            s.write_all(&frame).unwrap();
        },
    );
}

#[test]
fn a_header_of_another_page_size_is_refused() {
    bad_stream(
        "page-size",
        "host page size is 65536 bytes; this host's is 4096 bytes",
        Some("host page size is 65536 bytes; this host's is 4096 bytes"),
        |s| {
            let mut h = good_header();
            h.page_shift = 16;
            s.write_all(&header_frame(h)).unwrap();
        },
    );
}

#[test]
fn a_header_of_another_architecture_is_refused() {
    bad_stream(
        "arch",
        "The source is a ppc64le VM; this host runs x86_64 VMs",
        Some("The source is a ppc64le VM; this host runs x86_64 VMs"),
        |s| {
            let mut h = good_header();
            h.arch = Arch::Ppc64le;
            s.write_all(&header_frame(h)).unwrap();
        },
    );
}

#[test]
fn a_stream_that_is_not_rangevm_is_refused() {
    bad_stream(
        "garbage",
        "not a rangevm migration stream",
        Some("not a rangevm migration stream"),
        |s| {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        },
    );
}

// ---------------------------------------------------------------------------------------
// 5. Two network namespaces joined by a veth pair.

/// Two network namespaces and a veth pair between them, deleted when dropped.
struct NetnsPair {
    a: String,
    b: String,
}

fn ip(args: &[&str]) -> Output {
    match Command::new("ip").args(args).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "this test needs the `ip` command of iproute2 (ip netns, veth) and runs as root: \
             cannot run `ip {}`: {e}",
            args.join(" ")
        ),
    }
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "this test needs `ip netns` and veth links (iproute2, root, CAP_NET_ADMIN): \
         `ip {}` failed: {}",
        args.join(" "),
        text(&out)
    );
}

impl NetnsPair {
    /// Namespaces `a`, `b`; veth `va` in `a` with `a_ip`/24, `vb` in `b` with `b_ip`/24.
    fn new(tag: u32, a_ip: &str, b_ip: &str) -> Self {
        let version = ip(&["-V"]);
        assert!(
            version.status.success(),
            "`ip -V` failed: this test needs iproute2: {}",
            text(&version)
        );
        let pair = NetnsPair {
            a: format!("rvmfA{tag}"),
            b: format!("rvmfB{tag}"),
        };
        let (va, vb) = (format!("rvfa{tag}"), format!("rvfb{tag}"));
        // Left over by a killed run with the same pid: start clean.
        let _ = ip(&["netns", "del", &pair.a]);
        let _ = ip(&["netns", "del", &pair.b]);
        ip_ok(&["netns", "add", &pair.a]);
        ip_ok(&["netns", "add", &pair.b]);
        ip_ok(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        ip_ok(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{a_ip}/24"),
            "dev",
            &va,
        ]);
        ip_ok(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{b_ip}/24"),
            "dev",
            &vb,
        ]);
        for (ns, dev) in [(&pair.a, &va), (&pair.b, &vb)] {
            ip_ok(&["-n", ns, "link", "set", dev, "up"]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// `ip netns exec NS rangevm ARGS` (ip execs rangevm: the child is rangevm).
    fn spawn(&self, ns: &str, args: &[&str], stderr: &Path) -> Proc {
        let mut all = vec!["netns", "exec", ns, env!("CARGO_BIN_EXE_rangevm")];
        all.extend_from_slice(args);
        Proc::spawn_program("ip", &all, stderr)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in [&self.a, &self.b] {
            let out = ip(&["netns", "del", ns]);
            if !out.status.success() {
                eprintln!("cannot delete netns {ns}: {}", text(&out));
            }
        }
    }
}

#[test]
fn a_guest_migrates_over_tcp_between_two_network_namespaces() {
    let pid = std::process::id();
    let (x, y) = (200 + (pid >> 8) % 50, pid % 256);
    let (a_ip, b_ip) = (format!("10.{x}.{y}.1"), format!("10.{x}.{y}.2"));
    let port = 20000 + pid % 20000;
    let dir = Scratch::new("netns");
    let kernel = counter_guest(&dir, 512);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("tcp:{b_ip}:{port}");

    let ns = NetnsPair::new(pid, &a_ip, &b_ip);
    // The processes are dropped (killed) before the namespaces: declared after them.
    let mut src = ns.spawn(
        &ns.a,
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--serial",
            &format!("file:{}", src_log.display()),
            "--api-socket",
            &src_api,
        ],
        &dir.path("src.err"),
    );
    let mut dst = ns.spawn(
        &ns.b,
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
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        assert!(src.alive(), "the source exited: {}", src.stderr());
        lines(&src_log) >= 3
    });
    wait_for(Duration::from_secs(20), "the destination to listen", || {
        assert!(dst.alive(), "the destination exited: {}", dst.stderr());
        dst.stderr().contains("waiting for an incoming migration")
    });
    // Each rangevm runs in its namespace, so the migration crosses the veth pair.
    for (p, want) in [(&src, &ns.a), (&dst, &ns.b)] {
        let out = ip(&["netns", "identify", &p.pid().to_string()]);
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.trim(),
            want.as_str(),
            "ip netns identify: {}",
            text(&out)
        );
    }
    migrate_and_check(
        &mut src,
        &src_log,
        &src_api,
        &mut dst,
        &dst_log,
        &dst_api,
        &mig,
        &[],
    );
    // The destination saw the source's address on the veth pair.
    let dst_err = read(&dir.path("dst.err"));
    assert!(
        dst_err.contains(&format!("from {a_ip}:")),
        "the destination should name the source {a_ip}:\n{dst_err}"
    );
}
