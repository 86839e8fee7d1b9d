//! The `threads` engine: host threads stand in for vCPUs and touch guest RAM directly.
//!
//! Each touch writes one byte of a missing page: the thread blocks in the kernel until
//! a fault handler has filled the page under the page's write lock. The worker then
//! gives the page back (balloon discard + reclaim), so the next touch faults again.
//!
//! It gives each page back `--give-back-lag` touches later (32 unless told) rather
//! than at once: the touch returns as soon as the handler's `UFFDIO_COPY` wakes it,
//! while the handler still holds the page's write lock, so an immediate give-back would
//! queue on the very page being resolved and make the handler hand the lock over (a
//! futex wake) before it can serve the next fault. A give-back a few pages behind still
//! shares the fault's 64 KiB lock granule, and so the cache line of its fast word,
//! with the resolution. A vCPU does not discard the page it has just faulted in; the
//! lag keeps that artefact of the harness out of the measured round trip, so `none` vs
//! `range` compares what the lock itself costs.
//!
//! With `--paired`, one run serves several lock modes at once, each with its own guest
//! RAM and fault engine (a *lane*), and every worker touches the same page in each
//! lane in turn: each mode gets the same work at the same moments, so the machine's
//! noise hits them alike and their latency ratio is a paired measurement.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rangevm_memory::{FaultEngine, FaultEngineConfig, GuestRam};

use super::report::{latency_histogram, merge, Report};
use super::{expected, Engine, MemLock, Pattern, PatternSource, Shared, StressArgs, StressError};

/// One lock mode's guest RAM and fault engine.
struct Lane {
    mode: MemLock,
    ram: Arc<GuestRam>,
    engine: FaultEngine,
    base: u64,
}

/// What one worker measured in one lane.
struct Measured {
    latency: Histogram<u64>,
    touches: u64,
    wrong: u64,
}

impl Measured {
    /// Nothing measured yet, one per lane.
    fn per_lane(lanes: usize) -> Vec<Measured> {
        (0..lanes)
            .map(|_| Measured {
                latency: latency_histogram(),
                touches: 0,
                wrong: 0,
            })
            .collect()
    }
}

/// One run of the threads engine in lock mode `mode`.
pub(super) fn run_one(args: &StressArgs, mode: MemLock) -> Result<Report, StressError> {
    let mut reports = run_lanes(args, &[mode])?;
    reports
        .pop()
        .ok_or_else(|| StressError::Option("No lock mode to run".to_string()))
}

/// One run with a lane per mode of `modes`, interleaved touch by touch (`--paired`);
/// returns a report per mode, in order.
pub(super) fn run_paired(args: &StressArgs, modes: &[MemLock]) -> Result<Vec<Report>, StressError> {
    run_lanes(args, modes)
}

fn run_lanes(args: &StressArgs, modes: &[MemLock]) -> Result<Vec<Report>, StressError> {
    let page = rangevm_memory::host_page_size();
    let memory = args.memory - args.memory % page;
    let pages = memory / page;
    if pages < u64::from(args.workers) {
        return Err(StressError::Option(format!(
            "--memory {} gives {pages} host page(s) for {} workers: give each at least one",
            args.memory, args.workers
        )));
    }
    let mut lanes = Vec::with_capacity(modes.len());
    for &mode in modes {
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
        let base = ram.host_address(0)?;
        lanes.push(Lane {
            mode,
            ram,
            engine,
            base,
        });
    }
    let label = modes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("+");
    let shared = Shared::default();
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let measured = std::thread::scope(|s| {
        let workers: Vec<_> = (0..u64::from(args.workers))
            .map(|w| {
                let (lanes, shared) = (&lanes, &shared);
                s.spawn(move || worker(lanes, pages, w, args, shared))
            })
            .collect();
        // Churn needs the range lock (`modes` refuses it with `none`); `--paired`
        // refuses it, so there is only one lane here when it runs.
        for lane in &lanes {
            super::spawn_churn(s, &lane.ram, 0..memory, args, &shared);
        }
        super::wait_with_progress(started, duration, &label, args, &shared);
        let mut all = Measured::per_lane(lanes.len());
        for w in workers {
            match w.join() {
                Ok(per_lane) => {
                    for (into, from) in all.iter_mut().zip(per_lane) {
                        merge(&mut into.latency, &from.latency);
                        into.touches += from.touches;
                        into.wrong += from.wrong;
                    }
                }
                Err(_) => log::error!("A stress worker panicked"),
            }
        }
        all
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut reports = Vec::with_capacity(lanes.len());
    for (lane, m) in lanes.into_iter().zip(measured) {
        let shards = lane.engine.shards();
        let faults = lane.engine.stop();
        let lock = lane.ram.range_lock().stats();
        reports.push(Report {
            engine: Engine::Threads,
            mode: lane.mode,
            round: 1,
            shards,
            seconds,
            touches: m.touches,
            faults: faults.copied + faults.zeroed + faults.already_present,
            wrong_content: m.wrong,
            latency: m.latency,
            lock_waits: lock.waits,
            lock_wait_ms: lock.wait_ns as f64 / 1e6,
            disjoint_waits: lock.disjoint_waits,
            churn_ops: shared.churn_ops.load(Ordering::Relaxed),
            harvests: shared.harvests.load(Ordering::Relaxed),
        });
    }
    Ok(reports)
}

/// One worker: pick a page, touch it in each lane in turn (a write: it faults while
/// the page is missing), check its content, give back the page it touched
/// `--give-back-lag` touches ago; until `stop`. Returns what it measured per lane.
fn worker(lanes: &[Lane], pages: u64, w: u64, args: &StressArgs, shared: &Shared) -> Vec<Measured> {
    let page = rangevm_memory::host_page_size();
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
    // A page stays out of the lag queue's way only if the walk has more pages.
    let lag =
        usize::try_from(u64::from(args.give_back_lag).min(count.saturating_sub(1))).unwrap_or(0);
    let mut lagging: VecDeque<u64> = VecDeque::with_capacity(lag + 1);
    let mut measured = Measured::per_lane(lanes.len());
    let orders = permutations(lanes.len());
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
        // Page after page the lanes go in every order in turn, so each lane comes in
        // each place, and after each other lane, equally often.
        let order = &orders[usize::try_from(i % orders.len() as u64).unwrap_or(0)];
        for &j in order {
            let (lane, m) = (&lanes[j], &mut measured[j]);
            let ptr = (lane.base + gpa) as *mut u8;
            let t = Instant::now();
            // SAFETY: `ptr` is inside this lane's guest RAM mapping (p < pages), live
            // until its `Lane` is dropped after the workers are joined; a volatile
            // read-modify-write of one byte stands for a vCPU's store: it may fault
            // and block until a handler fills the page.
            let seen = unsafe {
                let v = std::ptr::read_volatile(ptr);
                std::ptr::write_volatile(ptr, v);
                v
            };
            m.latency
                .saturating_record(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            m.touches += 1;
            shared.touches.fetch_add(1, Ordering::Relaxed);
            // A page this worker or another just gave back reads zero until refilled.
            if seen != expected(p) && seen != 0 {
                m.wrong += 1;
            }
        }
        // Give the page touched `lag` touches ago back, so its next touch faults again.
        lagging.push_back(gpa);
        if lagging.len() > lag {
            if let Some(old) = lagging.pop_front() {
                give_back(lanes, old, page);
            }
        }
    }
    for old in lagging {
        give_back(lanes, old, page);
    }
    measured
}

/// Every order of `0..n` (n is at most the three lock modes).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for shorter in permutations(n - 1) {
        for at in 0..n {
            let mut order = shorter.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

/// Balloon discard + reclaim of the page at `gpa` in every lane: it is missing again.
fn give_back(lanes: &[Lane], gpa: u64, page: u64) {
    for lane in lanes {
        if let Err(e) = lane
            .ram
            .discard(gpa..gpa + page)
            .and_then(|()| lane.ram.reclaim(gpa..gpa + page))
        {
            log::error!("Giving back page {gpa:#x} ({} lane) failed: {e}", lane.mode);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_orders_put_every_lane_in_every_place_equally_often() {
        assert_eq!(permutations(1), vec![vec![0]]);
        assert_eq!(permutations(2).len(), 2);
        let orders = permutations(3);
        assert_eq!(orders.len(), 6);
        let mut seen = std::collections::HashSet::new();
        for order in &orders {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2]);
            assert!(seen.insert(order.clone()), "{order:?} twice");
        }
        for lane in 0..3 {
            for place in 0..3 {
                let n = orders.iter().filter(|o| o[place] == lane).count();
                assert_eq!(n, 2, "lane {lane} place {place}");
            }
        }
    }
}
