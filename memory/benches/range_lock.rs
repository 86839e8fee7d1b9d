//! Benchmarks of the guest-physical range lock against its baselines.
//!
//! Every benchmark sits in the same criterion group as its baseline, so the ratios the
//! range lock is judged by come from one run on one (noisy, 2-core) machine:
//!
//! - `uncontended`: one acquire + release in one thread, read and write, for the range
//!   lock (`Range` and `Global` mode), `std::sync::RwLock<()>`, `parking_lot::RwLock<()>`
//!   and a naive range lock (one mutex over a `BTreeMap`, defined below).
//! - `held`: acquire + release of one 4 KiB write range while 0..4096 disjoint 4 KiB
//!   ranges are held, laid out adjacently from 0, at random pages of the first GiB (with
//!   the default 1024 buckets, and with the lock sized for 1 GiB as `GuestRam` sizes
//!   it), and (range lock only, a worst case) all in granules that alias to one bucket.
//! - `two_threads`: throughput of two threads taking write ranges, on disjoint pages
//!   and on one shared page, in `Range` and `Global` mode, against one thread doing the
//!   same per-thread work. Elements are acquire/release pairs, summed over threads.
//!   Diagnostics: disjoint with thread 1 staggered by half a bucket cycle, one private
//!   lock per thread (the machine's ceiling), and one `std::sync::RwLock<()>`.
//! - `fault_path`: a simulated userfaultfd fault path over 64 MiB of "guest memory":
//!   state lookup, page write lock, 4 KiB copy (standing for `UFFDIO_COPY`), state
//!   update, unlock; with the range lock, one `std::sync::RwLock<()>` and `Global` mode,
//!   and without the copy to show the lock's share of the path.
//!
//! After `two_threads` and `fault_path`, `paired ...` lines on stderr give the same
//! ratios measured from alternating back-to-back runs (median and quartiles of 31/41
//! pairs), which a noisy machine disturbs less than benchmarks run seconds apart.

use std::collections::{BTreeMap, HashSet};
use std::hint::black_box;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rangevm_memory::range_lock::{LockMode, RangeLock};

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;
const PAGES_PER_GIB: u64 = GIB / PAGE;
/// Held-range counts of the `held` group.
const HELD_COUNTS: [usize; 4] = [0, 16, 256, 4096];
/// Seed of every random layout, so runs compare.
const SEED: u64 = 0x5eed_4a11_0c0d_e001;

type Wall = criterion::measurement::WallTime;

fn page_range(page: u64) -> Range<u64> {
    page * PAGE..(page + 1) * PAGE
}

// ---------------------------------------------------------------------------------------
// The naive range lock: one mutex over a map of held ranges.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct NaiveState {
    /// `(start, id) -> (end, write)`: the id makes keys unique when readers share a start.
    held: BTreeMap<(u64, u64), (u64, bool)>,
    /// Upper bound on `end - start` of every held range; reset when the map empties.
    max_len: u64,
    next_id: u64,
}

/// One mutex over a `BTreeMap` of held ranges; `try_*` only (fails instead of waiting).
#[derive(Debug, Default)]
struct NaiveRangeLock {
    state: Mutex<NaiveState>,
}

#[derive(Debug)]
struct NaiveGuard<'a> {
    lock: &'a NaiveRangeLock,
    key: (u64, u64),
}

impl NaiveRangeLock {
    fn state(&self) -> MutexGuard<'_, NaiveState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_lock(&self, range: Range<u64>, write: bool) -> Option<NaiveGuard<'_>> {
        let (start, end) = (range.start, range.end);
        assert!(start < end, "empty or inverted range");
        let mut st = self.state();
        // Every range that can overlap [start, end) starts in [start - max_len, end).
        let lower = start.saturating_sub(st.max_len);
        let conflict = st
            .held
            .range((lower, 0)..(end, 0))
            .any(|(_, &(e_end, e_write))| e_end > start && (write || e_write));
        if conflict {
            return None;
        }
        let key = (start, st.next_id);
        st.next_id += 1;
        st.max_len = st.max_len.max(end - start);
        st.held.insert(key, (end, write));
        Some(NaiveGuard { lock: self, key })
    }

    fn try_write(&self, range: Range<u64>) -> Option<NaiveGuard<'_>> {
        self.try_lock(range, true)
    }

    fn try_read(&self, range: Range<u64>) -> Option<NaiveGuard<'_>> {
        self.try_lock(range, false)
    }
}

impl Drop for NaiveGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.lock.state();
        let removed = st.held.remove(&self.key);
        debug_assert!(removed.is_some());
        if st.held.is_empty() {
            st.max_len = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------

fn configure(group: &mut BenchmarkGroup<'_, Wall>, samples: usize) {
    group
        .sample_size(samples)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .nresamples(20_000);
}

fn range_write(lock: &RangeLock, range: Range<u64>) {
    drop(black_box(lock.write(range).expect("valid range")));
}

fn naive_write(lock: &NaiveRangeLock, range: Range<u64>) {
    drop(black_box(lock.try_write(range).expect("uncontended")));
}

/// True when the binary runs as a benchmark (not `--test`) and the filter, if any,
/// selects something in `group`.
fn selected(group: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    benching
        && (filters.is_empty()
            || filters
                .iter()
                .any(|f| f.contains(group) || group.contains(f.as_str())))
}

/// Median and quartiles of `candidate() / baseline()` over `rounds` back-to-back pairs
/// (order alternating), which cancels most of the drift of a noisy machine that
/// separate criterion benchmarks, seconds apart, suffer from.
fn paired_ratio(
    rounds: usize,
    mut baseline: impl FnMut() -> Duration,
    mut candidate: impl FnMut() -> Duration,
) -> [f64; 3] {
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|i| {
            let (b, c) = if i % 2 == 0 {
                let b = baseline();
                (b, candidate())
            } else {
                let c = candidate();
                (baseline(), c)
            };
            c.as_secs_f64() / b.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    [
        ratios[rounds / 4],
        ratios[rounds / 2],
        ratios[rounds * 3 / 4],
    ]
}

fn print_sizes() {
    eprintln!(
        "sizes: RangeLock::new(Range).footprint() = {} B, RangeLock::entry_size() = {} B, \
         RangeLock::new(Global).footprint() = {} B, size_of::<std::sync::RwLock<()>>() = {} B, \
         size_of::<parking_lot::RwLock<()>>() = {} B",
        RangeLock::new(LockMode::Range).footprint(),
        RangeLock::entry_size(),
        RangeLock::new(LockMode::Global).footprint(),
        std::mem::size_of::<std::sync::RwLock<()>>(),
        std::mem::size_of::<parking_lot::RwLock<()>>(),
    );
}

// ---------------------------------------------------------------------------------------
// 1. uncontended
// ---------------------------------------------------------------------------------------

fn uncontended(c: &mut Criterion) {
    let mut g = c.benchmark_group("uncontended");
    configure(&mut g, 40);
    let r = 0x10000..0x11000u64;

    let range = RangeLock::new(LockMode::Range);
    let global = RangeLock::new(LockMode::Global);
    let std_rw = std::sync::RwLock::new(());
    let pl_rw = parking_lot::RwLock::new(());
    let naive = NaiveRangeLock::default();

    g.bench_function("write/range", |b| {
        b.iter(|| drop(black_box(range.write(black_box(r.clone())).expect("valid"))))
    });
    g.bench_function("write/global", |b| {
        b.iter(|| {
            drop(black_box(
                global.write(black_box(r.clone())).expect("valid"),
            ))
        })
    });
    g.bench_function("write/std_rwlock", |b| {
        b.iter(|| drop(black_box(black_box(&std_rw).write().expect("unpoisoned"))))
    });
    g.bench_function("write/parking_lot_rwlock", |b| {
        b.iter(|| drop(black_box(black_box(&pl_rw).write())))
    });
    g.bench_function("write/naive_btree", |b| {
        b.iter(|| {
            drop(black_box(
                naive.try_write(black_box(r.clone())).expect("free"),
            ))
        })
    });

    g.bench_function("read/range", |b| {
        b.iter(|| drop(black_box(range.read(black_box(r.clone())).expect("valid"))))
    });
    g.bench_function("read/global", |b| {
        b.iter(|| drop(black_box(global.read(black_box(r.clone())).expect("valid"))))
    });
    g.bench_function("read/std_rwlock", |b| {
        b.iter(|| drop(black_box(black_box(&std_rw).read().expect("unpoisoned"))))
    });
    g.bench_function("read/parking_lot_rwlock", |b| {
        b.iter(|| drop(black_box(black_box(&pl_rw).read())))
    });
    g.bench_function("read/naive_btree", |b| {
        b.iter(|| {
            drop(black_box(
                naive.try_read(black_box(r.clone())).expect("free"),
            ))
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------
// 2. held
// ---------------------------------------------------------------------------------------

/// A layout of held pages and the pages benchmarked against them (cycled through).
struct Layout {
    held: Vec<u64>,
    bench: Vec<u64>,
}

/// Held pages `0..n`; the benchmarked page is the first one past them.
fn adjacent_layout(n: usize) -> Layout {
    let n = n as u64;
    Layout {
        held: (0..n).collect(),
        bench: vec![n],
    }
}

/// `n` distinct random pages of the first GiB held; 1024 other random unheld pages
/// benchmarked in turn.
fn random_layout(n: usize) -> Layout {
    let mut rng = SmallRng::seed_from_u64(SEED ^ n as u64);
    let mut held = HashSet::with_capacity(n);
    while held.len() < n {
        held.insert(rng.random_range(0..PAGES_PER_GIB));
    }
    let mut bench = Vec::with_capacity(1024);
    while bench.len() < 1024 {
        let p = rng.random_range(0..PAGES_PER_GIB);
        if !held.contains(&p) {
            bench.push(p);
        }
    }
    let mut held: Vec<u64> = held.into_iter().collect();
    held.sort_unstable();
    Layout { held, bench }
}

/// Worst case for the bucketed lock: every held page in a granule that aliases to the
/// same bucket (granules `k * buckets`, first 8 pages of each), and the benchmarked page
/// in the middle of them, so it shares its bucket with all `n` held entries and is
/// inserted in the middle of that bucket's sorted list.
fn aliased_layout(n: usize, lock: &RangeLock) -> Layout {
    let pages_per_granule = lock.granule() / PAGE;
    let stride = lock.granule() * lock.buckets() as u64 / PAGE; // pages between aliases
    let per_granule = 8.min(pages_per_granule);
    let n = n as u64;
    let held = (0..n)
        .map(|i| (i / per_granule) * stride + i % per_granule)
        .collect();
    let mid_granule = n.div_ceil(per_granule) / 2;
    Layout {
        held,
        bench: vec![mid_granule * stride + per_granule],
    }
}

fn bench_held_range(g: &mut BenchmarkGroup<'_, Wall>, name: &str, lock: &RangeLock, l: &Layout) {
    let guards: Vec<_> = l
        .held
        .iter()
        .map(|&p| lock.write(page_range(p)).expect("valid range"))
        .collect();
    let mask = l.bench.len() - 1;
    assert!(l.bench.len().is_power_of_two());
    let mut i = 0;
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) & mask;
            range_write(lock, page_range(l.bench[i]));
        })
    });
    drop(guards);
    assert!(lock.is_idle());
}

fn bench_held_naive(
    g: &mut BenchmarkGroup<'_, Wall>,
    name: &str,
    lock: &NaiveRangeLock,
    l: &Layout,
) {
    let guards: Vec<_> = l
        .held
        .iter()
        .map(|&p| lock.try_write(page_range(p)).expect("disjoint"))
        .collect();
    let mask = l.bench.len() - 1;
    assert!(l.bench.len().is_power_of_two());
    let mut i = 0;
    g.bench_function(name, |b| {
        b.iter(|| {
            i = (i + 1) & mask;
            naive_write(lock, page_range(l.bench[i]));
        })
    });
    drop(guards);
}

fn held(c: &mut Criterion) {
    let mut g = c.benchmark_group("held");
    configure(&mut g, 30);
    let lock = RangeLock::new(LockMode::Range);
    let naive = NaiveRangeLock::default();
    for n in HELD_COUNTS {
        let l = adjacent_layout(n);
        bench_held_range(&mut g, &format!("adjacent/range/{n}"), &lock, &l);
        bench_held_naive(&mut g, &format!("adjacent/naive_btree/{n}"), &naive, &l);
    }
    for n in HELD_COUNTS {
        let l = random_layout(n);
        bench_held_range(&mut g, &format!("random/range/{n}"), &lock, &l);
        bench_held_naive(&mut g, &format!("random/naive_btree/{n}"), &naive, &l);
    }
    // The same random layout with the lock sized as `GuestRam` sizes it for a 1 GiB
    // guest (one bucket per 64 KiB granule): the geometry rangevm actually runs with.
    let sized = RangeLock::for_memory(LockMode::Range, GIB, PAGE);
    for n in HELD_COUNTS {
        let l = random_layout(n);
        bench_held_range(&mut g, &format!("random_sized_1g/range/{n}"), &sized, &l);
    }
    for n in HELD_COUNTS {
        let l = aliased_layout(n, &lock);
        bench_held_range(&mut g, &format!("aliased_worst/range/{n}"), &lock, &l);
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------
// 3. two_threads
// ---------------------------------------------------------------------------------------

type Job = Box<dyn FnOnce() + Send>;

/// Start/stop flags between the measuring thread and the helper.
#[derive(Default)]
struct Flags {
    ready: AtomicBool,
    go: AtomicBool,
    done: AtomicBool,
}

/// One long-lived helper thread; the calling thread is the other participant. A run
/// hands the helper its job over a channel, then both start on a spinning flag (so
/// neither a spawn nor a futex wake-up delays either thread's start) and the caller
/// spins until the helper is done.
struct Helper {
    tx: Option<mpsc::Sender<Job>>,
    flags: Arc<Flags>,
    handle: Option<JoinHandle<()>>,
}

fn spin_until(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

impl Helper {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let flags = Arc::new(Flags::default());
        let f = Arc::clone(&flags);
        let handle = std::thread::spawn(move || {
            while let Ok(job) = rx.recv() {
                f.ready.store(true, Ordering::Release);
                spin_until(&f.go);
                job();
                f.done.store(true, Ordering::Release);
            }
        });
        Helper {
            tx: Some(tx),
            flags,
            handle: Some(handle),
        }
    }

    /// Runs `helper_job` on the helper and `own` here, started together; returns the
    /// wall time until both are done.
    fn run(&self, helper_job: Job, own: impl FnOnce()) -> Duration {
        let f = &self.flags;
        f.go.store(false, Ordering::Relaxed);
        f.done.store(false, Ordering::Relaxed);
        self.tx
            .as_ref()
            .expect("helper alive")
            .send(helper_job)
            .expect("helper thread alive");
        spin_until(&f.ready);
        f.ready.store(false, Ordering::Relaxed);
        let start = Instant::now();
        f.go.store(true, Ordering::Release);
        own();
        spin_until(&f.done);
        start.elapsed()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            h.join().expect("helper thread panicked");
        }
    }
}

/// `ops` write acquire/release pairs: on page `first` every time if `same`, else
/// stepping through the GiB of pages starting at `first`.
fn page_ops(lock: &RangeLock, first: u64, ops: u64, same: bool) {
    for i in 0..ops {
        let page = if same {
            first
        } else {
            first + i % PAGES_PER_GIB
        };
        range_write(lock, page_range(page));
    }
}

/// `ops` write lock/unlock pairs of one `std::sync::RwLock<()>`.
fn rwlock_ops(lock: &std::sync::RwLock<()>, ops: u64) {
    for _ in 0..ops {
        drop(black_box(lock.write().expect("unpoisoned")));
    }
}

/// A two-thread workload: `run(ops)` does `ops` operations on this thread (and, if
/// `two`, `ops` more on the helper), returning the wall time.
type Workload<'a> = Box<dyn Fn(u64) -> Duration + 'a>;

fn range_workload<'a>(
    helper: &'a Helper,
    l0: &Arc<RangeLock>,
    l1: Option<(&Arc<RangeLock>, u64)>,
    same: bool,
) -> Workload<'a> {
    let l0 = Arc::clone(l0);
    match l1 {
        None => Box::new(move |ops| {
            let start = Instant::now();
            page_ops(&l0, 0, ops, same);
            start.elapsed()
        }),
        Some((l1, first)) => {
            let l1 = Arc::clone(l1);
            Box::new(move |ops| {
                let l = Arc::clone(&l1);
                helper.run(Box::new(move || page_ops(&l, first, ops, same)), || {
                    page_ops(&l0, 0, ops, same)
                })
            })
        }
    }
}

fn rwlock_workload(helper: &Helper, two: bool) -> Workload<'_> {
    let lock = Arc::new(std::sync::RwLock::new(()));
    if two {
        Box::new(move |ops| {
            let l = Arc::clone(&lock);
            helper.run(Box::new(move || rwlock_ops(&l, ops)), || {
                rwlock_ops(&lock, ops)
            })
        })
    } else {
        Box::new(move |ops| {
            let start = Instant::now();
            rwlock_ops(&lock, ops);
            start.elapsed()
        })
    }
}

/// Operations per thread such that `w` takes about `target`.
fn size_run(w: &Workload<'_>, target: Duration) -> u64 {
    let probe = 2000;
    let t = w(probe).as_nanos().max(1);
    u64::try_from(target.as_nanos() * u128::from(probe) / t)
        .unwrap_or(u64::MAX)
        .clamp(1000, 1_000_000)
}

fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_threads");
    configure(&mut g, 30);
    let helper = Helper::new();
    let range = Arc::new(RangeLock::new(LockMode::Range));
    let global = Arc::new(RangeLock::new(LockMode::Global));
    let private = Arc::new(RangeLock::new(LockMode::Range));
    // Thread 1's GiB starts at 1 GiB, a multiple of `granule * buckets` (64 MiB), so
    // while the two threads run in step they hit the same bucket; "staggered" starts
    // thread 1 half a bucket cycle (32 MiB) later. "private_locks" gives each thread its
    // own lock: nothing shared, the most two threads can do with this code.
    let cycle = range.granule() * range.buckets() as u64 / PAGE;
    let staggered = PAGES_PER_GIB + cycle / 2;

    // (name, threads, workload); each 2-thread line is compared with the 1-thread line
    // of the same lock.
    let cases: Vec<(&str, u64, Workload<'_>)> = vec![
        (
            "range/1_thread",
            1,
            range_workload(&helper, &range, None, false),
        ),
        (
            "range/disjoint_2_threads",
            2,
            range_workload(&helper, &range, Some((&range, PAGES_PER_GIB)), false),
        ),
        (
            "range/overlap_2_threads",
            2,
            range_workload(&helper, &range, Some((&range, 0)), true),
        ),
        (
            "global/1_thread",
            1,
            range_workload(&helper, &global, None, false),
        ),
        (
            "global/disjoint_2_threads",
            2,
            range_workload(&helper, &global, Some((&global, PAGES_PER_GIB)), false),
        ),
        (
            "global/overlap_2_threads",
            2,
            range_workload(&helper, &global, Some((&global, 0)), true),
        ),
        (
            "range/disjoint_2_threads_staggered",
            2,
            range_workload(&helper, &range, Some((&range, staggered)), false),
        ),
        (
            "range/private_locks_2_threads",
            2,
            range_workload(&helper, &range, Some((&private, PAGES_PER_GIB)), false),
        ),
        ("std_rwlock/1_thread", 1, rwlock_workload(&helper, false)),
        ("std_rwlock/2_threads", 2, rwlock_workload(&helper, true)),
    ];
    for (name, threads, w) in &cases {
        g.throughput(Throughput::Elements(*threads));
        g.bench_function(*name, |b| b.iter_custom(w));
    }
    g.finish();
    assert!(range.is_idle() && global.is_idle() && private.is_idle());

    if selected("two_threads") {
        // 2-thread / 1-thread throughput from alternating back-to-back runs (1-thread
        // runs of ~2 ms, 2-thread runs capped at ~40 ms), robust to slow drifts.
        let one = |prefix: &str| {
            cases
                .iter()
                .find(|(n, t, _)| *t == 1 && n.starts_with(prefix))
                .map(|(_, _, w)| w)
                .expect("1-thread case")
        };
        for (name, _, w2) in cases.iter().filter(|(_, t, _)| *t == 2) {
            let prefix = name.split('/').next().unwrap_or_default();
            let w1 = one(prefix);
            let ops =
                size_run(w1, Duration::from_millis(2)).min(size_run(w2, Duration::from_millis(40)));
            let [q1, med, q3] = paired_ratio(31, || w1(ops), || w2(ops));
            // Throughput ratio = 2 * t(1 thread) / t(2 threads) = 2 / time ratio.
            eprintln!(
                "paired two_threads/{name}: 2-thread / 1-thread throughput = {:.3}x \
                 (quartiles {:.3}x..{:.3}x; {ops} ops per thread per run)",
                2.0 / med,
                2.0 / q3,
                2.0 / q1
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. fault_path
// ---------------------------------------------------------------------------------------

const GUEST_SIZE: usize = 64 << 20;
const PAGE_USIZE: usize = 4096;
const PRESENT: u8 = 1;

/// 64 MiB of "guest memory", its per-page state and a source page.
struct FaultSim {
    guest: Vec<u8>,
    state: Vec<AtomicU8>,
    src: Vec<u8>,
    next: usize,
}

impl FaultSim {
    fn new() -> Self {
        let pages = GUEST_SIZE / PAGE_USIZE;
        assert!(pages.is_power_of_two());
        FaultSim {
            // Non-zero fill so every page is really allocated before measuring.
            guest: vec![0x5a; GUEST_SIZE],
            state: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            src: (0..PAGE_USIZE)
                .map(|i| u8::try_from(i % 251).unwrap_or(0))
                .collect(),
            next: 0,
        }
    }

    /// One fault on the next page (sequential, wrapping): state lookup, page write lock,
    /// copy (if `copy`), PRESENT set, unlock.
    #[inline]
    fn fault<G>(&mut self, copy: bool, lock: impl FnOnce(Range<u64>) -> G) {
        let page = self.next;
        // The page count is a power of two: a mask, not a division, so that the next
        // address is not behind a 40-cycle divide (a real fault path reads it from the
        // userfaultfd message).
        self.next = (page + 1) & (self.state.len() - 1);
        let st = self.state[page].load(Ordering::Acquire);
        let off = page * PAGE_USIZE;
        let guard = lock(off as u64..(off + PAGE_USIZE) as u64);
        if copy {
            self.guest[off..off + PAGE_USIZE].copy_from_slice(&self.src);
        }
        self.state[page].store(black_box(st) | PRESENT, Ordering::Release);
        drop(guard);
    }
}

fn fault_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_path");
    configure(&mut g, 40);
    let mut sim = FaultSim::new();
    let range = RangeLock::new(LockMode::Range);
    let global = RangeLock::new(LockMode::Global);
    let std_rw = std::sync::RwLock::new(());

    for (label, copy) in [("copy", true), ("no_copy", false)] {
        g.bench_function(format!("{label}/range"), |b| {
            b.iter(|| sim.fault(copy, |r| range.write(r).expect("valid range")))
        });
        g.bench_function(format!("{label}/std_rwlock"), |b| {
            b.iter(|| sim.fault(copy, |_| std_rw.write().expect("unpoisoned")))
        });
        g.bench_function(format!("{label}/global"), |b| {
            b.iter(|| sim.fault(copy, |r| global.write(r).expect("valid range")))
        });
    }
    g.finish();

    if selected("fault_path") {
        // Range / RwLock time of whole passes over the 64 MiB, in alternating pairs.
        let pages = sim.state.len();
        for (label, copy, passes) in [("copy", true, 1), ("no_copy", false, 8)] {
            let n = pages * passes;
            let t_rw = |sim: &mut FaultSim| {
                let start = Instant::now();
                for _ in 0..n {
                    sim.fault(copy, |_| std_rw.write().expect("unpoisoned"));
                }
                start.elapsed()
            };
            let t_range = |sim: &mut FaultSim, lock: &RangeLock| {
                let start = Instant::now();
                for _ in 0..n {
                    sim.fault(copy, |r| lock.write(r).expect("valid range"));
                }
                start.elapsed()
            };
            for (name, lock) in [("range", &range), ("global", &global)] {
                let sim = std::cell::RefCell::new(&mut sim);
                let [q1, med, q3] = paired_ratio(
                    41,
                    || t_rw(&mut sim.borrow_mut()),
                    || t_range(&mut sim.borrow_mut(), lock),
                );
                eprintln!(
                    "paired fault_path/{label}: {name} / std_rwlock time = {med:.3}x \
                     (quartiles {q1:.3}x..{q3:.3}x)"
                );
            }
        }
    }
    black_box(&sim.guest);
}

criterion_group!(benches, uncontended, held, two_threads, fault_path);

fn main() {
    print_sizes();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
