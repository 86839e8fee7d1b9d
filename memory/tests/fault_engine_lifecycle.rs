//! The fault engine on real userfaultfd: handler threads start and stop cleanly, and
//! neither an address outside guest RAM nor a failing source hangs the engine.
//!
//! The tests here count this process's `uffd-handler-*` threads, so they run one at a
//! time (`serial`).

mod fault_engine_common;

use std::io;
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use fault_engine_common::{
    eventually, handler_threads, pattern_page, pattern_word, read_page, touch, PatternSource,
    Watchdog,
};
use rangevm_memory::uffd::Userfaultfd;
use rangevm_memory::{
    host_page_size, FaultEngine, FaultEngineConfig, GuestRam, GuestRamError, LockMode, PageContent,
    PageSource,
};

/// How long `FaultEngine::stop` may take: handlers look at the stop flag every 20 ms;
/// the rest is slack for a loaded 2-core CI machine.
const PROMPT: Duration = Duration::from_secs(1);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn missing_ram(pages: u64) -> Arc<GuestRam> {
    let page = host_page_size();
    Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, pages * page)]).unwrap())
}

/// Stops `engine`, checks that it was prompt and left no handler thread behind.
fn stop_and_check(engine: FaultEngine, what: &str) -> rangevm_memory::FaultStats {
    let started = Instant::now();
    let stats = engine.stop();
    let took = started.elapsed();
    assert!(took < PROMPT, "{what}: stop took {took:?}");
    assert_eq!(
        handler_threads(),
        Vec::<String>::new(),
        "{what}: threads left"
    );
    stats
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn idle_handlers_stop_promptly() {
    let _serial = serial();
    let _watchdog = Watchdog::arm("idle_handlers_stop_promptly");
    let ram = missing_ram(64);
    for (handlers, shards) in [(1, 1), (2, 2), (5, 3)] {
        let engine = FaultEngine::start(
            Arc::clone(&ram),
            Arc::new(PatternSource::new(64)),
            FaultEngineConfig { handlers, shards },
        )
        .unwrap();
        // Each handler names itself once it runs.
        eventually("all handlers run", || handler_threads().len() == handlers);
        // Let every handler settle into its poll.
        thread::sleep(Duration::from_millis(100));
        let stats = stop_and_check(engine, &format!("{handlers}x{shards} idle"));
        assert_eq!(stats, Default::default());
    }
    // Dropping an engine stops it too.
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::new(PatternSource::new(64)),
        FaultEngineConfig::default(),
    )
    .unwrap();
    drop(engine);
    assert_eq!(
        handler_threads(),
        Vec::<String>::new(),
        "threads left after drop"
    );
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn handlers_stop_promptly_right_after_heavy_faulting() {
    let _serial = serial();
    let _watchdog = Watchdog::arm("handlers_stop_promptly_right_after_heavy_faulting");
    const PAGES: u64 = 1024;
    let page = host_page_size();
    let ram = missing_ram(PAGES);
    let source = Arc::new(PatternSource::new(PAGES));
    let config = FaultEngineConfig {
        handlers: 4,
        shards: 2,
    };
    let engine = FaultEngine::start(Arc::clone(&ram), Arc::clone(&source) as _, config).unwrap();
    let start = Barrier::new(4);
    thread::scope(|s| {
        for t in 0..4u64 {
            let (ram, start) = (&ram, &start);
            s.spawn(move || {
                start.wait();
                // Each toucher takes every fourth page, all four at full speed.
                for p in (t..PAGES).step_by(4) {
                    assert_eq!(touch(ram, p * page, t), pattern_word(p, t));
                }
            });
        }
    });
    // The last fault was resolved a moment ago; stop at once.
    let stats = stop_and_check(engine, "after heavy faulting");
    assert_eq!(stats.copied, PAGES, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(source.total_reads(), PAGES);
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn repeated_start_and_stop_on_the_same_ram_keeps_serving() {
    let _serial = serial();
    let _watchdog = Watchdog::arm("repeated_start_and_stop_on_the_same_ram");
    const ROUNDS: u64 = 12;
    const PER_ROUND: u64 = 8;
    let page = host_page_size();
    let ram = missing_ram(ROUNDS * PER_ROUND);
    let source = Arc::new(PatternSource::new(ROUNDS * PER_ROUND));
    for round in 0..ROUNDS {
        let config = FaultEngineConfig {
            handlers: 1 + usize::try_from(round % 3).unwrap(),
            shards: 1 + usize::try_from(round % 4).unwrap(),
        };
        let engine =
            FaultEngine::start(Arc::clone(&ram), Arc::clone(&source) as _, config).unwrap();
        // This round's pages are new: they fault and come from the source. Earlier
        // rounds' pages stay filled across engines (no second fetch).
        let fresh = round * PER_ROUND..(round + 1) * PER_ROUND;
        thread::scope(|s| {
            for p in fresh.clone() {
                let ram = &ram;
                s.spawn(move || assert_eq!(touch(ram, p * page, 2), pattern_word(p, 2)));
            }
        });
        for p in 0..fresh.end {
            assert!(
                read_page(&ram, p * page) == pattern_page(p),
                "round {round} page {p}"
            );
        }
        let stats = stop_and_check(engine, &format!("round {round} {config:?}"));
        assert_eq!(stats.copied, PER_ROUND, "round {round}: {stats:?}");
        assert_eq!(stats.errors, 0, "round {round}: {stats:?}");
    }
    assert_eq!(source.total_reads(), ROUNDS * PER_ROUND);
    assert!(ram.range_lock().is_idle());
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn addresses_outside_guest_ram_are_errors_and_the_engine_carries_on() {
    let _serial = serial();
    let _watchdog = Watchdog::arm("addresses_outside_guest_ram_are_errors");
    let page = host_page_size();
    // Pages 0..16 and 32..48: a hole between, and nothing above 48.
    let ram = Arc::new(
        GuestRam::new_missing(LockMode::Range, &[(0, 16 * page), (32 * page, 16 * page)]).unwrap(),
    );
    let source = Arc::new(PatternSource::new(48));
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::clone(&source) as _,
        FaultEngineConfig::default(),
    )
    .unwrap();
    assert_eq!(touch(&ram, 3 * page, 0), pattern_word(3, 0));
    // A worker asked to fault on guest addresses that are not RAM gets errors at once:
    // there is no host address to touch, and resolving such a page fails without
    // keeping any lock or asking the source (the top page used to overflow).
    let stray = Userfaultfd::new().unwrap();
    for gpa in [20 * page, 48 * page, 1 << 40, u64::MAX - page + 1] {
        assert!(ram.host_address(gpa).is_err(), "{gpa:#x}");
        let r = ram.resolve_fault(&stray, gpa, source.as_ref());
        assert!(
            matches!(r, Err(GuestRamError::NotMapped { .. })),
            "{gpa:#x}: {r:?}"
        );
        eventually("the page locks are released", || ram.range_lock().is_idle());
    }
    assert_eq!(source.total_reads(), 1);
    // The engine still serves every page, in both regions, from several threads.
    thread::scope(|s| {
        for p in (0..16).chain(32..48) {
            let ram = &ram;
            s.spawn(move || assert_eq!(touch(ram, p * page, 1), pattern_word(p, 1)));
        }
    });
    let stats = stop_and_check(engine, "after stray addresses");
    assert_eq!((stats.copied, stats.errors), (32, 0), "{stats:?}");
}

/// Serves like [`PatternSource`] except that reading page `bad` fails.
struct FailingSource {
    inner: PatternSource,
    bad: u64,
}

impl PageSource for FailingSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        if gpa / host_page_size() == self.bad {
            return Err(io::Error::other("injected read failure"));
        }
        self.inner.read_page(gpa, buf)
    }
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn a_failing_source_does_not_hang_the_engine() {
    let _serial = serial();
    let _watchdog = Watchdog::arm("a_failing_source_does_not_hang_the_engine");
    const PAGES: u64 = 32;
    let page = host_page_size();
    let bad = 5u64;
    let ram = missing_ram(PAGES);
    let source = Arc::new(FailingSource {
        inner: PatternSource::new(PAGES),
        bad,
    });
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::clone(&source) as _,
        FaultEngineConfig::default(),
    )
    .unwrap();
    thread::scope(|s| {
        let ram = &ram;
        // This vCPU's page cannot be fetched: it stays blocked in its fault.
        let stuck = s.spawn(move || touch(ram, bad * page, 0));
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine.stats().errors == 0 {
            assert!(Instant::now() < deadline, "the failure was never counted");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(!stuck.is_finished());
        assert!(!ram.page_state(bad * page).unwrap().present);
        // Every other page is still served, by the same handlers.
        for p in (0..PAGES).filter(|&p| p != bad) {
            assert_eq!(touch(ram, p * page, 1), pattern_word(p, 1), "page {p}");
        }
        eventually("every other page is counted", || {
            engine.stats().copied == PAGES - 1
        });
        assert_eq!(engine.stats().errors, 1);
        eventually("the page locks are released", || ram.range_lock().is_idle());
        // Stopping closes the userfaultfds, which releases the blocked vCPU: the
        // kernel then serves its page as plain anonymous memory, a zero page.
        stop_and_check(engine, "with a vCPU blocked on a failed page");
        assert_eq!(stuck.join().unwrap(), 0);
    });
}
