//! The fault engine on real userfaultfd, racing: several handlers or an explicit
//! resolution on the same page (EEXIST races), and balloon discards while faults on the
//! page are in flight.

mod fault_engine_common;

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fault_engine_common::{pattern_page, pattern_word, read_page, touch, PatternSource, Watchdog};
use rangevm_memory::uffd::Userfaultfd;
use rangevm_memory::{
    host_page_size, FaultEngine, FaultEngineConfig, GuestRam, LockMode, PageContent, PageSource,
    Resolution,
};

/// Long enough for an idle handler (which polls every 20 ms) or a freshly spawned thread
/// to reach the point a test waits for.
const SETTLE: Duration = Duration::from_millis(200);

/// A [`PatternSource`] that holds the first read of each gated page until the test
/// opens the gate, and reports on `entered` when a read is being held: the handler in
/// it then holds that page's write lock.
struct GatedSource {
    inner: PatternSource,
    gated: Mutex<HashSet<u64>>,
    open: Condvar,
    entered: Mutex<mpsc::Sender<u64>>,
}

impl GatedSource {
    fn new(pages: u64, gated: &[u64]) -> (Arc<Self>, mpsc::Receiver<u64>) {
        let (tx, rx) = mpsc::channel();
        let source = GatedSource {
            inner: PatternSource::new(pages),
            gated: Mutex::new(gated.iter().copied().collect()),
            open: Condvar::new(),
            entered: Mutex::new(tx),
        };
        (Arc::new(source), rx)
    }

    /// Lets the held read of page `p` (and any later one) through.
    fn open(&self, p: u64) {
        self.gated.lock().unwrap().remove(&p);
        self.open.notify_all();
    }
}

impl PageSource for GatedSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let p = gpa / host_page_size();
        let mut gated = self.gated.lock().unwrap();
        if gated.contains(&p) {
            let _ = self.entered.lock().unwrap().send(p);
            while gated.contains(&p) {
                gated = self.open.wait(gated).unwrap();
            }
        }
        drop(gated);
        self.inner.read_page(gpa, buf)
    }
}

/// Waits for the gated read of page `p` to be held.
fn wait_entered(entered: &mpsc::Receiver<u64>, p: u64) {
    let got = entered
        .recv_timeout(Duration::from_secs(10))
        .expect("no handler reached the gated page");
    assert_eq!(got, p);
}

fn missing_ram(pages: u64) -> Arc<GuestRam> {
    let page = host_page_size();
    Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, pages * page)]).unwrap())
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn two_handlers_faulting_the_same_page_fill_it_once() {
    let _watchdog = Watchdog::arm("two_handlers_faulting_the_same_page_fill_it_once");
    const PAGES: u64 = 32;
    let page = host_page_size();
    // One page in each shard (pages 0..16 and 16..32).
    let racy = [3u64, 20, 9, 30];
    let ram = missing_ram(PAGES);
    let (source, entered) = GatedSource::new(PAGES, &racy);
    // Four handlers on two shards: two handlers read each userfaultfd.
    let config = FaultEngineConfig {
        handlers: 4,
        shards: 2,
    };
    let engine = FaultEngine::start(Arc::clone(&ram), Arc::clone(&source) as _, config).unwrap();
    assert_eq!(engine.shards(), 2);
    for &p in &racy {
        thread::scope(|s| {
            let ram = &ram;
            let first = s.spawn(move || touch(ram, p * page, 1));
            // One handler of the shard now holds page p's write lock, inside the source.
            wait_entered(&entered, p);
            // Two more vCPUs fault on the same page; the shard's other handler reads one
            // of their faults and waits on the page's lock.
            let others: Vec<_> = (2..4)
                .map(|w| s.spawn(move || touch(ram, p * page, w)))
                .collect();
            thread::sleep(SETTLE);
            source.open(p);
            assert_eq!(first.join().unwrap(), pattern_word(p, 1), "page {p}");
            for (w, t) in (2..).zip(others) {
                assert_eq!(t.join().unwrap(), pattern_word(p, w), "page {p}");
            }
        });
        assert!(read_page(&ram, p * page) == pattern_page(p), "page {p}");
        assert_eq!(source.inner.reads(p), 1, "page {p} fetched twice");
    }
    let stats = engine.stop();
    assert_eq!(stats.copied, racy.len() as u64, "{stats:?}");
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert!(
        stats.already_present >= 1,
        "no second handler resolved a page already filled: {stats:?}"
    );
    let waits = ram.range_lock().stats();
    assert!(
        waits.waits >= 1,
        "no handler waited on a page lock: {waits:?}"
    );
    assert_eq!(waits.disjoint_waits, 0, "{waits:?}");
    assert!(ram.range_lock().is_idle());
}

/// A handler loop of our own on `uffd` (the engine keeps its userfaultfds private, so
/// an explicit resolution racing a handler needs one it can reach), until `stop`.
fn serve(
    ram: &GuestRam,
    uffd: &Userfaultfd,
    source: &dyn PageSource,
    stop: &AtomicBool,
) -> Vec<Resolution> {
    let mut done = Vec::new();
    while !stop.load(Ordering::Acquire) {
        match uffd.read_fault().unwrap() {
            Some(fault) => {
                let gpa = ram.fault_gpa(fault.addr).unwrap();
                done.push(ram.resolve_fault(uffd, gpa, source).unwrap());
            }
            None => thread::sleep(Duration::from_micros(200)),
        }
    }
    done
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn an_explicit_resolution_racing_a_handler_fills_the_page_once() {
    let _watchdog = Watchdog::arm("an_explicit_resolution_racing_a_handler");
    const PAGES: u64 = 16;
    let page = host_page_size();
    let (explicit_first, handler_first) = (4u64, 11u64);
    let ram = missing_ram(PAGES);
    let uffd = Userfaultfd::new().unwrap();
    ram.register_missing(&uffd).unwrap();
    let (source, entered) = GatedSource::new(PAGES, &[explicit_first, handler_first]);
    let stop = AtomicBool::new(false);
    let (handled, explicit) = thread::scope(|s| {
        let (ram, uffd, source, stop) = (&ram, &uffd, &source, &stop);
        let handler = s.spawn(move || serve(ram, uffd, source.as_ref(), stop));
        let mut explicit = Vec::new();

        // 1. A postcopy push resolves the page first and is held in the source; a vCPU
        //    faults on it and the handler waits on the page lock.
        let p = explicit_first;
        let push = s.spawn(move || ram.resolve_fault(uffd, p * page, source.as_ref()));
        wait_entered(&entered, p);
        let vcpu = s.spawn(move || touch(ram, p * page, 5));
        thread::sleep(SETTLE);
        source.open(p);
        explicit.push(push.join().unwrap().unwrap());
        assert_eq!(vcpu.join().unwrap(), pattern_word(p, 5));

        // 2. The handler is first (held in the source) and the push waits on the lock.
        let p = handler_first;
        let vcpu = s.spawn(move || touch(ram, p * page, 6));
        wait_entered(&entered, p);
        let push = s.spawn(move || ram.resolve_fault(uffd, p * page + 8, source.as_ref()));
        thread::sleep(SETTLE);
        source.open(p);
        explicit.push(push.join().unwrap().unwrap());
        assert_eq!(vcpu.join().unwrap(), pattern_word(p, 6));

        stop.store(true, Ordering::Release);
        (handler.join().unwrap(), explicit)
    });
    assert_eq!(
        explicit,
        [Resolution::Copied, Resolution::AlreadyPresent],
        "push first, then handler first"
    );
    // The handler saw one fault per page: the second page it copied; the first it
    // found present (its fault may also have been woken before it was read).
    assert!(handled.contains(&Resolution::Copied), "{handled:?}");
    assert!(
        handled.iter().all(|r| *r != Resolution::Zeroed),
        "{handled:?}"
    );
    for p in [explicit_first, handler_first] {
        assert_eq!(source.inner.reads(p), 1, "page {p} fetched twice");
        assert!(read_page(&ram, p * page) == pattern_page(p), "page {p}");
    }
    let waits = ram.range_lock().stats();
    assert!(
        waits.waits >= 2,
        "the racers did not meet on the lock: {waits:?}"
    );
    assert!(ram.range_lock().is_idle());
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn pushes_racing_faults_on_every_page_fetch_each_page_once() {
    let _watchdog = Watchdog::arm("pushes_racing_faults_on_every_page");
    const PAGES: u64 = 128;
    let page = host_page_size();
    let ram = missing_ram(PAGES);
    let uffd = Userfaultfd::new().unwrap();
    ram.register_missing(&uffd).unwrap();
    let source = PatternSource::new(PAGES);
    let stop = AtomicBool::new(false);
    let start = Barrier::new(4);
    let (handled, pushed) = thread::scope(|s| {
        let (ram, uffd, source, stop, start) = (&ram, &uffd, &source, &stop, &start);
        let handlers: Vec<_> = (0..2)
            .map(|_| s.spawn(move || serve(ram, uffd, source, stop)))
            .collect();
        // Two pushers walk the pages up and down; two vCPUs touch them in other orders.
        let pushers: Vec<_> = [false, true]
            .into_iter()
            .map(|down| {
                s.spawn(move || {
                    start.wait();
                    let mut done = Vec::new();
                    for i in 0..PAGES {
                        let p = if down { PAGES - 1 - i } else { i };
                        done.push(ram.resolve_fault(uffd, p * page, source).unwrap());
                    }
                    done
                })
            })
            .collect();
        let vcpus: Vec<_> = [5u64, 9]
            .into_iter()
            .map(|stride| {
                s.spawn(move || {
                    start.wait();
                    for i in 0..PAGES {
                        let p = (i * stride) % PAGES;
                        assert_eq!(touch(ram, p * page, stride), pattern_word(p, stride));
                    }
                })
            })
            .collect();
        let pushed: Vec<Resolution> = pushers
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        for v in vcpus {
            v.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        let handled: Vec<Resolution> = handlers
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (handled, pushed)
    });
    let copies = handled
        .iter()
        .chain(&pushed)
        .filter(|r| **r == Resolution::Copied)
        .count();
    assert_eq!(copies, count(PAGES), "one copy per page");
    assert!(handled
        .iter()
        .chain(&pushed)
        .all(|r| *r != Resolution::Zeroed));
    // Every page was pushed twice, so at least one push per page found it present.
    let present = pushed
        .iter()
        .filter(|r| **r == Resolution::AlreadyPresent)
        .count();
    assert!(present >= count(PAGES), "{present}");
    for p in 0..PAGES {
        assert_eq!(source.reads(p), 1, "page {p}");
        assert!(read_page(&ram, p * page) == pattern_page(p), "page {p}");
    }
    assert!(ram.range_lock().is_idle());
}

/// A page count as a usize.
fn count(pages: u64) -> usize {
    usize::try_from(pages).unwrap()
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn a_fault_read_before_a_discard_is_resolved_as_zero() {
    let _watchdog = Watchdog::arm("a_fault_read_before_a_discard_is_resolved_as_zero");
    const PAGES: u64 = 16;
    let page = host_page_size();
    let (blocker, victim) = (2u64, 7u64);
    let ram = missing_ram(PAGES);
    let (source, entered) = GatedSource::new(PAGES, &[blocker]);
    // One handler on one userfaultfd, so holding it on `blocker` keeps the victim's
    // fault queued (or read and waiting) while the balloon discards the victim.
    let config = FaultEngineConfig {
        handlers: 1,
        shards: 1,
    };
    let engine = FaultEngine::start(Arc::clone(&ram), Arc::clone(&source) as _, config).unwrap();
    thread::scope(|s| {
        let ram = &ram;
        let held = s.spawn(move || touch(ram, blocker * page, 0));
        wait_entered(&entered, blocker);
        let vcpu = s.spawn(move || touch(ram, victim * page, 3));
        thread::sleep(SETTLE);
        // The vCPU is blocked in its fault; the balloon takes the page meanwhile.
        ram.discard(victim * page..(victim + 1) * page).unwrap();
        let state = ram.page_state(victim * page).unwrap();
        assert!(state.ballooned && !state.present, "{state:?}");
        source.open(blocker);
        assert_eq!(held.join().unwrap(), pattern_word(blocker, 0));
        assert_eq!(
            vcpu.join().unwrap(),
            0,
            "a discarded page came back from the source"
        );
    });
    assert_eq!(
        source.inner.reads(victim),
        0,
        "the source was asked for a discarded page"
    );
    assert!(read_page(&ram, victim * page).iter().all(|&b| b == 0));
    let stats = engine.stop();
    assert_eq!(
        (stats.copied, stats.zeroed, stats.errors),
        (1, 1, 0),
        "{stats:?}"
    );
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn a_discard_waiting_on_a_resolution_wins_afterwards() {
    let _watchdog = Watchdog::arm("a_discard_waiting_on_a_resolution_wins_afterwards");
    const PAGES: u64 = 16;
    let page = host_page_size();
    let victim = 9u64;
    let ram = missing_ram(PAGES);
    let (source, entered) = GatedSource::new(PAGES, &[victim]);
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::clone(&source) as _,
        FaultEngineConfig::default(),
    )
    .unwrap();
    let range = victim * page..(victim + 1) * page;
    thread::scope(|s| {
        let ram = &ram;
        // A handler is filling the page from the source (holding its lock) ...
        let vcpu = s.spawn(move || touch(ram, victim * page, 4));
        wait_entered(&entered, victim);
        // ... when the balloon discards it: the discard waits for the fill.
        let range2 = range.clone();
        let balloon = s.spawn(move || ram.discard(range2));
        thread::sleep(SETTLE);
        assert!(
            !balloon.is_finished(),
            "the discard did not wait for the page lock"
        );
        source.open(victim);
        // The vCPU's access came before the discard: either value is legal for it.
        let v = vcpu.join().unwrap();
        assert!(v == pattern_word(victim, 4) || v == 0, "{v:#x}");
        balloon.join().unwrap().unwrap();
    });
    // After the discard the page is zero on next touch, and stays zero across deflate.
    assert_eq!(touch(&ram, victim * page, 4), 0);
    ram.reclaim(range.clone()).unwrap();
    assert_eq!(touch(&ram, victim * page, 5), 0);
    assert!(read_page(&ram, victim * page).iter().all(|&b| b == 0));
    assert_eq!(source.inner.reads(victim), 1);
    let stats = engine.stop();
    assert_eq!((stats.copied, stats.errors), (1, 0), "{stats:?}");
}

#[test]
#[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
fn balloon_churn_during_faults_never_resurrects_source_content() {
    let _watchdog = Watchdog::arm("balloon_churn_during_faults_never_resurrects");
    const PAGES: u64 = 96;
    let page = host_page_size();
    let words = page / 8;
    let ram = missing_ram(PAGES);
    let source = Arc::new(PatternSource::new(PAGES));
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::clone(&source) as _,
        FaultEngineConfig {
            handlers: 2,
            shards: 2,
        },
    )
    .unwrap();
    // Every third page is discarded (three times over) while the vCPUs run. A page
    // reads as its source content until its first discard, zero from then on.
    let discarded: Vec<AtomicBool> = (0..PAGES).map(|_| AtomicBool::new(false)).collect();
    let victims: Vec<u64> = (0..PAGES).filter(|p| p % 3 == 1).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let (ram, discarded, stop) = (&ram, &discarded, &stop);
        let vcpus: Vec<_> = [7u64, 13]
            .into_iter()
            .map(|stride| {
                s.spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                        let p = (i * stride) % PAGES;
                        let w = (i * 5 + stride) % words;
                        // The flag is set before the discard starts, so a zero read
                        // here must find it set when loaded after the read.
                        let v = touch(ram, p * page, w);
                        let gone = discarded[usize::try_from(p).unwrap()].load(Ordering::SeqCst);
                        assert!(
                            v == pattern_word(p, w) || (v == 0 && gone),
                            "page {p} word {w}: {v:#x} (discarded: {gone})"
                        );
                        i += 1;
                    }
                    i
                })
            })
            .collect();
        for (n, &p) in victims.iter().cycle().take(3 * victims.len()).enumerate() {
            let range = p * page..(p + 1) * page;
            discarded[usize::try_from(p).unwrap()].store(true, Ordering::SeqCst);
            ram.discard(range.clone()).unwrap();
            // Half the victims are deflated before their next touch, half after (the
            // halves swap each round).
            if (n + n / victims.len()) % 2 == 0 {
                ram.reclaim(range.clone()).unwrap();
                assert_eq!(touch(ram, p * page, 0), 0, "page {p} after deflate");
            } else {
                assert_eq!(touch(ram, p * page, 0), 0, "page {p} after inflate");
                ram.reclaim(range.clone()).unwrap();
                assert_eq!(touch(ram, p * page, 1), 0, "page {p} after deflate");
            }
            thread::sleep(Duration::from_millis(2));
        }
        // Let the vCPUs see the final state for a while, then stop them.
        thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Release);
        for v in vcpus {
            assert!(v.join().unwrap() > 0);
        }
    });
    for p in 0..PAGES {
        let content = read_page(&ram, p * page);
        if victims.contains(&p) {
            assert!(content.iter().all(|&b| b == 0), "page {p} came back");
            let state = ram.page_state(p * page).unwrap();
            assert!(state.present && !state.ballooned, "page {p}: {state:?}");
        } else {
            assert!(content == pattern_page(p), "page {p}");
        }
        assert!(
            source.reads(p) <= 1,
            "page {p} fetched {} times",
            source.reads(p)
        );
    }
    let stats = engine.stop();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert!(ram.range_lock().is_idle());
}
