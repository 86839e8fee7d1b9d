//! Postcopy live migration between two `rangevm` processes on this machine's KVM, with
//! the tiny counter guest: the destination runs the guest at once, its memory served
//! by userfaultfd, fetching the pages the guest touches from the source while the rest
//! arrives in the background; every page that arrives is checked against the source's
//! CRC32C at switch-over (`--verify`). And the failure the guest cannot survive: the
//! source dies mid-postcopy, and the destination ends with a clear error, not a hang.

#![cfg(target_arch = "x86_64")]

mod common;

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rangevm_tests::tiny::{Mode, TinyGuest};

#[test]
fn a_counter_guest_migrates_in_postcopy_and_every_page_arrives_as_the_source_had_it() {
    let dir = Scratch::new("postcopy");
    let kernel = counter_guest(&dir, 2048);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut dst = spawn_destination(&dir, "dst", &mig, &dst_log, &dst_api);
    let mut src = spawn_source(&dir, &kernel, "256M", &src_log, &src_api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        lines(&src_log) >= 3
    });
    let out = ctl(
        &src_api,
        &["migrate", "send", "--postcopy", "--verify", &mig],
    );
    let stdout = text(&out);
    assert!(
        out.status.success(),
        "{stdout}\nsource: {}\ndestination: {}",
        src.stderr(),
        dst.stderr()
    );
    let status: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(status["phase"], "completed", "{stdout}");
    assert_eq!(
        src.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        src.stderr()
    );
    let at_switch = read(&src_log);
    // The destination's figures: every page arrived (on demand or in the background),
    // each checked against the source's CRC32C at switch-over.
    let st = ctl_json(&dst_api, &["migrate", "status"]);
    let pc = &st["postcopy"];
    assert_eq!(pc["phase"], "completed", "{st}");
    assert_eq!(pc["missing_pages"], 0, "{st}");
    assert_eq!(pc["digest_mismatches"], 0, "{st}");
    let pages = 256 * MIB / 4096;
    let demand = pc["demand_pages"].as_u64().unwrap();
    let background = pc["background_pages"].as_u64().unwrap();
    assert_eq!(demand + background, pages, "{st}");
    assert!(
        demand > 0,
        "the guest touched pages before they were pushed: {st}"
    );
    assert_eq!(pc["verified_pages"].as_u64().unwrap(), pages, "{st}");
    assert!(pc["demand_p50_us"].as_f64().unwrap() > 0.0, "{st}");
    goes_on_and_shuts_down(&mut dst, &dst_api, &dst_log, &at_switch, 3);
    assert!(
        dst.stderr().contains("postcopy complete"),
        "{}",
        dst.stderr()
    );
    eprintln!("{}\n{st}", dst.stderr());
}

#[test]
fn when_the_source_dies_mid_postcopy_the_destination_ends_with_a_clear_error() {
    let dir = Scratch::new("postcopy-kill");
    // 2 GiB to push: the background stream takes seconds, long enough to cut.
    let kernel = counter_guest(&dir, 4096);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut dst = spawn_destination_with(
        &dir,
        "dst",
        &mig,
        &dst_log,
        &dst_api,
        &["--postcopy-resume-timeout", "3"],
    );
    let mut src = spawn_source(&dir, &kernel, "2G", &src_log, &src_api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        lines(&src_log) >= 2
    });
    let out = ctl(
        &src_api,
        &["migrate", "send", "--postcopy", "--detach", &mig],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_for(Duration::from_secs(30), "postcopy to start", || {
        let st = status(&src_api);
        assert_ne!(phase(&st), "failed", "{st}");
        phase(&st) == "postcopy"
    });
    let st = ctl_json(&dst_api, &["migrate", "status"]);
    assert_eq!(phase(&st), "postcopy", "{st}");
    src.kill();
    // The guest needs pages only the source had: the destination must say so and end,
    // not leave the guest hanging.
    let code = dst.exit_code(
        Duration::from_secs(30),
        "the destination after its source died",
    );
    let err = dst.stderr();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot go on without its source"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Precopy first; a guest that dirties its pages faster than a 1 ms target allows
/// switches to postcopy after 2 rounds: the pages written since they were sent are
/// dropped on the destination and fetched again, and the destination's memory matches
/// the source's switch-over contents page for page (the pages it held were checked
/// before the guest started, the others as they arrived).
#[test]
fn a_guest_that_does_not_converge_switches_to_postcopy_after_two_rounds() {
    let dir = Scratch::new("postcopy-after");
    let kernel = counter_guest(&dir, 2048);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut dst = spawn_destination(&dir, "dst", &mig, &dst_log, &dst_api);
    let mut src = spawn_source(&dir, &kernel, "128M", &src_log, &src_api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        lines(&src_log) >= 3
    });
    let out = ctl(
        &src_api,
        &[
            "migrate",
            "send",
            "--postcopy-after",
            "2",
            "--downtime-target",
            "1",
            "--verify",
            &mig,
        ],
    );
    let stdout = text(&out);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        src.stderr(),
        dst.stderr()
    );
    let status: serde_json::Value =
        serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(status["phase"], "completed", "{stdout}");
    assert_eq!(status["round"], 1, "two precopy rounds: {stdout}");
    assert_eq!(status["converged"], false, "{stdout}");
    assert_eq!(
        src.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        src.stderr()
    );
    let at_switch = read(&src_log);
    let st = ctl_json(&dst_api, &["migrate", "status"]);
    let pc = &st["postcopy"];
    assert_eq!(pc["phase"], "completed", "{st}");
    assert_eq!(pc["missing_pages"], 0, "{st}");
    assert_eq!(pc["digest_mismatches"], 0, "{st}");
    let stale = pc["stale_pages"].as_u64().unwrap();
    // The guest rewrites its 2048 counter pages (and its pass number's page) nonstop.
    assert!(stale >= 2048, "{st}");
    let refetched = pc["demand_pages"].as_u64().unwrap() + pc["background_pages"].as_u64().unwrap();
    assert_eq!(refetched, stale, "exactly the stale pages came again: {st}");
    assert_eq!(
        pc["verified_pages"].as_u64().unwrap(),
        128 * MIB / 4096,
        "{st}"
    );
    goes_on_and_shuts_down(&mut dst, &dst_api, &dst_log, &at_switch, 3);
}

/// A Unix-socket proxy between the source and the destination that forwards slowly
/// (so that postcopy lasts long enough to be cut) and can cut every connection.
struct Proxy {
    conns: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

impl Proxy {
    fn start(listen: &Path, target: &Path) -> Self {
        let listener = std::os::unix::net::UnixListener::bind(listen).unwrap();
        let conns: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> = Arc::default();
        let (target, keep) = (target.to_path_buf(), Arc::clone(&conns));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::os::unix::net::UnixStream::connect(&target) else {
                    return;
                };
                let mut list = keep.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || Self::pump(from, to));
                }
            }
        });
        Proxy { conns }
    }

    /// Copies 16 KiB every 2 ms (about 8 MB/s) until either side ends.
    fn pump(mut from: std::os::unix::net::UnixStream, mut to: std::os::unix::net::UnixStream) {
        use std::io::Write;
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    }

    /// Cuts every connection, as a dropped link would.
    fn cut(&self) -> usize {
        let list = self.conns.lock().unwrap();
        for c in list.iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        list.len()
    }
}

/// The link drops in the middle of postcopy: both sides pause (the guest waits on the
/// destination for pages only the source has), `migrate resume` on both reconnects,
/// and the migration completes with every page placed exactly once, each matching the
/// source's switch-over contents.
#[test]
fn a_postcopy_cut_mid_way_resumes_with_no_page_lost_or_placed_twice() {
    let dir = Scratch::new("postcopy-resume");
    let kernel = counter_guest(&dir, 4096);
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut dst = spawn_destination(&dir, "dst", &mig, &dst_log, &dst_api);
    let proxy = Proxy::start(&dir.path("proxy.sock"), &dir.path("mig.sock"));
    let mut src = spawn_source(&dir, &kernel, "1G", &src_log, &src_api);
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        lines(&src_log) >= 2
    });
    let via_proxy = format!("unix:{}", dir.s("proxy.sock"));
    let out = ctl(
        &src_api,
        &[
            "migrate",
            "send",
            "--postcopy",
            "--verify",
            "--detach",
            &via_proxy,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_for(Duration::from_secs(60), "postcopy to start", || {
        let st = status(&src_api);
        assert_ne!(phase(&st), "failed", "{st}");
        phase(&st) == "postcopy"
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(proxy.cut() >= 4, "main and demand connections, both ends");
    wait_for(Duration::from_secs(30), "the source to pause", || {
        phase(&status(&src_api)) == "postcopy-paused"
    });
    wait_for(Duration::from_secs(30), "the destination to pause", || {
        status(&dst_api)["postcopy"]["phase"] == "paused"
    });
    assert!(dst.alive() && src.alive());
    let resume = format!("unix:{}", dir.s("resume.sock"));
    let out = ctl(&dst_api, &["migrate", "resume", &resume]);
    assert!(out.status.success(), "{}", text(&out));
    let out = ctl(&src_api, &["migrate", "resume", &resume]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        src.exit_code(
            Duration::from_secs(120),
            "the source after the resumed postcopy"
        ),
        0,
        "{}",
        src.stderr()
    );
    let at_switch = read(&src_log);
    let st = ctl_json(&dst_api, &["migrate", "status"]);
    let pc = &st["postcopy"];
    assert_eq!(pc["phase"], "completed", "{st}");
    assert_eq!(pc["resumes"], 1, "{st}");
    assert_eq!(pc["missing_pages"], 0, "{st}");
    assert_eq!(pc["digest_mismatches"], 0, "{st}");
    // Every page was placed exactly once: on demand or from the background, never
    // twice (a page held before the cut is not written again after it).
    let pages = 1024 * MIB / 4096;
    let placed = pc["demand_pages"].as_u64().unwrap() + pc["background_pages"].as_u64().unwrap();
    assert_eq!(placed, pages, "{st}");
    assert_eq!(pc["verified_pages"].as_u64().unwrap(), pages, "{st}");
    goes_on_and_shuts_down(&mut dst, &dst_api, &dst_log, &at_switch, 2);
}

/// Three vCPUs count over their own pages at once, so after the switch-over several of
/// them fault on missing pages at the same time, resolved by two handler threads
/// under per-page write locks: every page still arrives exactly once and as the
/// source had it, and all three go on counting (their dirty pages after the
/// migration cover all three ranges).
#[test]
fn three_vcpus_faulting_at_once_migrate_in_postcopy() {
    let dir = Scratch::new("postcopy-smp");
    let guest = TinyGuest::new(Mode::Long).counter_smp(16 * MIB, 1024, 4096, PRINT_EVERY, 3);
    let kernel = dir.path("smp.elf");
    guest.write_to(&kernel).unwrap();
    let kernel = kernel.to_str().unwrap().to_string();
    let (src_log, dst_log) = (dir.path("src.console"), dir.path("dst.console"));
    let (src_api, dst_api) = (dir.s("src.api"), dir.s("dst.api"));
    let mig = format!("unix:{}", dir.s("mig.sock"));
    let mut dst = spawn_destination_with(
        &dir,
        "dst",
        &mig,
        &dst_log,
        &dst_api,
        &["--postcopy-handlers", "2"],
    );
    let serial = format!("file:{}", src_log.display());
    let mut src = Proc::spawn(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            "256M",
            "--cpus",
            "3",
            "--serial",
            &serial,
            "--api-socket",
            &src_api,
        ],
        &dir.path("src.err"),
    );
    wait_for(Duration::from_secs(30), "the source guest to print", || {
        lines(&src_log) >= 3
    });
    let out = ctl(
        &src_api,
        &["migrate", "send", "--postcopy", "--verify", &mig],
    );
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out),
        src.stderr(),
        dst.stderr()
    );
    assert_eq!(
        src.wait(Duration::from_secs(30)),
        Some(0),
        "{}",
        src.stderr()
    );
    let at_switch = read(&src_log);
    let st = ctl_json(&dst_api, &["migrate", "status"]);
    let pc = &st["postcopy"];
    assert_eq!(pc["phase"], "completed", "{st}");
    assert_eq!(pc["digest_mismatches"], 0, "{st}");
    let pages = 256 * MIB / 4096;
    let placed = pc["demand_pages"].as_u64().unwrap() + pc["background_pages"].as_u64().unwrap();
    assert_eq!(placed, pages, "{st}");
    assert_eq!(pc["verified_pages"].as_u64().unwrap(), pages, "{st}");
    assert!(pc["demand_pages"].as_u64().unwrap() > 0, "{st}");
    eprintln!("3 vCPUs, 2 handlers: {pc}");
    // All three vCPUs run on the destination: their pages are written again.
    assert!(ctl(&dst_api, &["dirty", "start"]).status.success());
    std::thread::sleep(Duration::from_millis(700));
    let harvest = ctl_json(&dst_api, &["dirty", "harvest"]);
    assert!(
        harvest["pages"].as_u64().unwrap() >= 3 * 1024,
        "three vCPUs' pages: {harvest}"
    );
    goes_on_and_shuts_down(&mut dst, &dst_api, &dst_log, &at_switch, 3);
}
