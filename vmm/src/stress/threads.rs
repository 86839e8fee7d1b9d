//! The `threads` engine: host threads stand in for vCPUs and touch guest RAM directly.
//!
//! Each touch writes one byte of a missing page: the thread blocks in the kernel until
//! a fault handler has filled the page under the page's write lock. The worker then
//! gives the page back (balloon discard + reclaim), so the next touch faults again.
//!
//! It gives each page back [`GIVE_BACK_LAG`] touches later rather than at once: the
//! touch returns as soon as the handler's `UFFDIO_COPY` wakes it, while the handler
//! still holds the page's write lock, so an immediate give-back would queue on the
//! very page being resolved and make the handler hand the lock over (a futex wake)
//! before it can serve the next fault. A vCPU does not discard the page it has just
//! faulted in; the lag keeps that artefact of the harness out of the measured round
//! trip, so `none` vs `range` compares what the lock itself costs.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rangevm_memory::{FaultEngine, FaultEngineConfig, GuestRam};

use super::report::{latency_histogram, merge, Report};
use super::{expected, Engine, MemLock, Pattern, PatternSource, Shared, StressArgs, StressError};

/// How many touches later a worker gives a page back (fewer when its slice is smaller).
pub(super) const GIVE_BACK_LAG: usize = 8;

/// One run of the threads engine in lock mode `mode`.
pub(super) fn run_one(args: &StressArgs, mode: MemLock) -> Result<Report, StressError> {
    let page = rangevm_memory::host_page_size();
    let memory = args.memory - args.memory % page;
    let pages = memory / page;
    if pages < u64::from(args.workers) {
        return Err(StressError::Option(format!(
            "--memory {} gives {pages} host page(s) for {} workers: give each at least one",
            args.memory, args.workers
        )));
    }
    let ram = Arc::new(GuestRam::new_missing(mode.ram_mode(), &[(0, memory)])?);
    let engine = FaultEngine::start_with(
        Arc::clone(&ram),
        Arc::new(PatternSource { page_size: page }),
        FaultEngineConfig {
            handlers: args.handlers as usize,
            shards: args.shards.unwrap_or(args.handlers) as usize,
        },
        mode.locking(),
    )?;
    let shards = engine.shards();
    let base = ram.host_address(0)?;
    let shared = Shared::default();
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let latency = std::thread::scope(|s| {
        let workers: Vec<_> = (0..u64::from(args.workers))
            .map(|w| {
                let (ram, shared) = (&ram, &shared);
                s.spawn(move || worker(ram, base, pages, w, args, shared))
            })
            .collect();
        super::spawn_churn(s, &ram, 0..memory, args, &shared);
        super::wait_with_progress(started, duration, &mode.to_string(), args, &shared);
        let mut all = latency_histogram();
        for w in workers {
            match w.join() {
                Ok(h) => merge(&mut all, &h),
                Err(_) => log::error!("A stress worker panicked"),
            }
        }
        all
    });
    let seconds = started.elapsed().as_secs_f64();
    let faults = engine.stop();
    let lock = ram.range_lock().stats();
    Ok(Report {
        engine: Engine::Threads,
        mode,
        round: 1,
        shards,
        seconds,
        touches: shared.touches.load(Ordering::Relaxed),
        faults: faults.copied + faults.zeroed + faults.already_present,
        wrong_content: shared.wrong.load(Ordering::Relaxed),
        latency,
        lock_waits: lock.waits,
        lock_wait_ms: lock.wait_ns as f64 / 1e6,
        disjoint_waits: lock.disjoint_waits,
        churn_ops: shared.churn_ops.load(Ordering::Relaxed),
        harvests: shared.harvests.load(Ordering::Relaxed),
    })
}

/// One worker: touch a page (a write: it faults while the page is missing), check its
/// content, give it back; until `stop`. Returns the touch latencies in nanoseconds.
fn worker(
    ram: &GuestRam,
    base: u64,
    pages: u64,
    w: u64,
    args: &StressArgs,
    shared: &Shared,
) -> Histogram<u64> {
    let page = ram.page_size();
    let workers = u64::from(args.workers);
    let (first, count) = match args.pattern {
        Pattern::Disjoint => (
            w * pages / workers,
            (w + 1) * pages / workers - w * pages / workers,
        ),
        Pattern::Shared => (0, pages),
        Pattern::Random | Pattern::Sequential => (w * pages / workers, pages),
    };
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w + 1);
    let mut latency = latency_histogram();
    // A page stays out of the lag queue's way only if the walk has more pages.
    let lag = GIVE_BACK_LAG.min(usize::try_from(count.saturating_sub(1)).unwrap_or(0));
    let mut lagging: VecDeque<u64> = VecDeque::with_capacity(lag + 1);
    let mut i = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let p = match args.pattern {
            Pattern::Random => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % pages
            }
            _ => (first + i % count) % pages,
        };
        i += 1;
        let gpa = p * page;
        let ptr = (base + gpa) as *mut u8;
        let t = Instant::now();
        // SAFETY: `ptr` is inside guest RAM's live mapping (p < pages); a volatile
        // read-modify-write of one byte stands for a vCPU's store: it may fault and
        // block until a handler fills the page.
        let seen = unsafe {
            let v = std::ptr::read_volatile(ptr);
            std::ptr::write_volatile(ptr, v);
            v
        };
        latency.saturating_record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        shared.touches.fetch_add(1, Ordering::Relaxed);
        // A page this worker or another just gave back reads zero until refilled.
        if seen != expected(p) && seen != 0 {
            shared.wrong.fetch_add(1, Ordering::Relaxed);
        }
        // Give the page touched `lag` touches ago back, so its next touch faults again.
        lagging.push_back(gpa);
        if lagging.len() > lag {
            if let Some(old) = lagging.pop_front() {
                give_back(ram, old, page);
            }
        }
    }
    for old in lagging {
        give_back(ram, old, page);
    }
    latency
}

/// Balloon discard + reclaim of the page at `gpa`: it is missing again.
fn give_back(ram: &GuestRam, gpa: u64, page: u64) {
    if let Err(e) = ram
        .discard(gpa..gpa + page)
        .and_then(|()| ram.reclaim(gpa..gpa + page))
    {
        log::error!("Giving back page {gpa:#x} failed: {e}");
    }
}
