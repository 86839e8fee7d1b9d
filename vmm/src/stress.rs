//! `rangevm stress`: concurrent faulting on userfaultfd-backed guest memory, with the
//! range lock or one global lock.
//!
//! Workers are host threads (the memory manager alone, at host speed). Each touch
//! writes one byte of a missing page: the thread blocks in the kernel until a fault
//! handler has filled the page under the page's write lock. The worker then gives the
//! page back (balloon discard + reclaim, both under the write lock), so the next touch
//! faults again. Optional churn: a thread discarding and reclaiming random 64 KiB runs,
//! and a thread harvesting the dirty bitmap in 2 MiB chunks under read locks.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rangevm_memory::{
    FaultEngine, FaultEngineConfig, FaultEngineError, GuestRam, GuestRamError, LockMode,
    PageContent, PageSource,
};

/// Errors of the stress tool.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// Guest memory could not be set up or an operation on it failed.
    #[error("Guest memory")]
    Memory(#[from] GuestRamError),
    /// The fault engine could not start.
    #[error("Fault engine")]
    Engine(#[from] FaultEngineError),
    /// An option makes no sense.
    #[error("{0}")]
    Option(String),
}

/// How workers pick pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Each worker walks its own slice of memory.
    Disjoint,
    /// All workers walk the same pages in the same order.
    Shared,
    /// Each worker picks pages at random in all of memory.
    Random,
    /// Each worker walks all of memory in order, starting at its own offset.
    Sequential,
}

/// Options of `rangevm stress`.
#[derive(Debug, Clone, Args)]
pub struct StressArgs {
    /// Faulting worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Guest memory size (bytes, or with a K, M or G suffix).
    #[arg(long, default_value = "256M", value_parser = crate::cli::parse_size)]
    pub memory: u64,
    /// How workers pick the pages they touch.
    #[arg(long, value_enum, default_value = "disjoint")]
    pub pattern: Pattern,
    /// Lock guest memory by range, or with one lock for all of it.
    #[arg(long, default_value = "range", value_parser = parse_mode)]
    pub mem_lock: LockMode,
    /// Fault handler threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub handlers: u32,
    /// Userfaultfds the memory is split over (default: one per handler).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: Option<u32>,
    /// Seconds to run (per mode with --compare).
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Also discard and reclaim random 64 KiB runs in a churn thread (balloon).
    #[arg(long)]
    pub balloon_churn: bool,
    /// Also harvest the dirty bitmap every N milliseconds, in 2 MiB chunks (0: off).
    #[arg(long, default_value_t = 0)]
    pub harvest_interval: u64,
    /// Run range mode and global mode back to back on the same work; print the ratio.
    #[arg(long)]
    pub compare: bool,
    /// Print one JSON object per run instead of text.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn parse_mode(s: &str) -> Result<LockMode, String> {
    s.parse()
        .map_err(|e: rangevm_memory::RangeLockError| e.to_string())
}

/// Page `p` of the source is filled with `p mod 251 + 1`, so a worker can check it got
/// the right page.
struct PatternSource {
    page_size: u64,
}

impl PageSource for PatternSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<PageContent> {
        buf.fill(expected(gpa / self.page_size));
        Ok(PageContent::Data)
    }
}

fn expected(page: u64) -> u8 {
    u8::try_from(page % 251).unwrap_or(0) + 1
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Report {
    mode: LockMode,
    seconds: f64,
    touches: u64,
    faults: u64,
    wrong_content: u64,
    latency_ns: [u64; 4],
    lock_waits: u64,
    lock_wait_ms: f64,
    disjoint_waits: u64,
    churn_ops: u64,
    harvests: u64,
}

impl Report {
    fn faults_per_sec(&self) -> f64 {
        self.faults as f64 / self.seconds
    }

    fn print(&self, args: &StressArgs, shards: usize) {
        let [p50, p99, p999, max] = self.latency_ns;
        if args.json {
            println!(
                "{{\"mem_lock\":\"{}\",\"pattern\":\"{:?}\",\"workers\":{},\"handlers\":{},\"shards\":{},\"memory\":{},\"seconds\":{:.3},\"touches\":{},\"faults\":{},\"faults_per_sec\":{:.0},\"latency_ns\":{{\"p50\":{p50},\"p99\":{p99},\"p999\":{p999},\"max\":{max}}},\"lock_waits\":{},\"lock_wait_ms\":{:.3},\"disjoint_waits\":{},\"churn_ops\":{},\"harvests\":{},\"wrong_content\":{}}}",
                self.mode,
                args.pattern,
                args.workers,
                args.handlers,
                shards,
                args.memory,
                self.seconds,
                self.touches,
                self.faults,
                self.faults_per_sec(),
                self.lock_waits,
                self.lock_wait_ms,
                self.disjoint_waits,
                self.churn_ops,
                self.harvests,
                self.wrong_content
            );
            return;
        }
        println!(
            "mem-lock {:<6} {:>10.0} faults/s   touch latency p50 {} p99 {} p99.9 {} max {}",
            self.mode.to_string(),
            self.faults_per_sec(),
            fmt_ns(p50),
            fmt_ns(p99),
            fmt_ns(p999),
            fmt_ns(max)
        );
        println!(
            "                {} faults in {:.2} s; lock: {} waits, {:.1} ms waiting, {} waits between non-overlapping ranges{}{}",
            self.faults,
            self.seconds,
            self.lock_waits,
            self.lock_wait_ms,
            self.disjoint_waits,
            if args.balloon_churn {
                format!("; {} balloon ops", self.churn_ops)
            } else {
                String::new()
            },
            if args.harvest_interval > 0 {
                format!("; {} harvests", self.harvests)
            } else {
                String::new()
            },
        );
        if self.wrong_content > 0 {
            println!(
                "                WARNING: {} touches saw the wrong page content",
                self.wrong_content
            );
        }
    }
}

fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        _ => format!("{:.1} ms", ns as f64 / 1e6),
    }
}

/// Runs the stress test (twice with `--compare`).
pub fn run(args: &StressArgs) -> Result<(), StressError> {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err(StressError::Option(format!(
            "--duration must be between 0 and 3600 seconds, not {}",
            args.duration
        )));
    }
    let modes: Vec<LockMode> = if args.compare {
        vec![LockMode::Range, LockMode::Global]
    } else {
        vec![args.mem_lock]
    };
    let mut reports = Vec::new();
    for mode in modes {
        let (report, shards) = run_one(args, mode)?;
        report.print(args, shards);
        reports.push(report);
    }
    if let [range, global] = reports.as_slice() {
        if !args.json {
            println!(
                "range / global throughput: {:.2}x",
                range.faults_per_sec() / global.faults_per_sec().max(1e-9)
            );
        }
    }
    Ok(())
}

fn run_one(args: &StressArgs, mode: LockMode) -> Result<(Report, usize), StressError> {
    let page = rangevm_memory::host_page_size();
    let memory = args.memory - args.memory % page;
    let pages = memory / page;
    if pages < u64::from(args.workers) {
        return Err(StressError::Option(format!(
            "--memory {} gives {pages} host page(s) for {} workers: give each at least one",
            args.memory, args.workers
        )));
    }
    let ram = Arc::new(GuestRam::new_missing(mode, &[(0, memory)])?);
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::new(PatternSource { page_size: page }),
        FaultEngineConfig {
            handlers: args.handlers as usize,
            shards: args.shards.unwrap_or(args.handlers) as usize,
        },
    )?;
    let shards = engine.shards();
    let base = ram.host_address(0)?;
    let stop = AtomicBool::new(false);
    let touches = AtomicU64::new(0);
    let wrong = AtomicU64::new(0);
    let churn_ops = AtomicU64::new(0);
    let harvests = AtomicU64::new(0);
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let mut samples: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..u64::from(args.workers))
            .map(|w| {
                let (ram, stop, touches, wrong) = (&ram, &stop, &touches, &wrong);
                s.spawn(move || worker(ram, base, pages, w, args, stop, touches, wrong))
            })
            .collect();
        if args.balloon_churn {
            let (ram, stop, churn_ops) = (&ram, &stop, &churn_ops);
            s.spawn(move || churn(ram, memory, stop, churn_ops));
        }
        if args.harvest_interval > 0 {
            let (ram, stop, harvests) = (&ram, &stop, &harvests);
            let every = Duration::from_millis(args.harvest_interval);
            s.spawn(move || harvest(ram, memory, every, stop, harvests));
        }
        // Progress on standard error for runs long enough to wonder about.
        while started.elapsed() < duration {
            std::thread::sleep(Duration::from_millis(100).min(duration));
            if duration >= Duration::from_secs(5) && !args.json {
                let done = touches.load(Ordering::Relaxed);
                eprint!(
                    "\r{mode}: {:>4.1} / {:.0} s, {done} touches",
                    started.elapsed().as_secs_f64(),
                    duration.as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        }
        stop.store(true, Ordering::Release);
        if duration >= Duration::from_secs(5) && !args.json {
            eprintln!();
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let faults = engine.stop();
    samples.sort_unstable();
    // Nearest-rank percentile, q in permille.
    let pick = |permille: usize| -> u64 {
        match samples.len() {
            0 => 0,
            n => samples[((n - 1) * permille).div_ceil(1000).min(n - 1)],
        }
    };
    let lock = ram.range_lock().stats();
    let report = Report {
        mode,
        seconds,
        touches: touches.load(Ordering::Relaxed),
        faults: faults.copied + faults.zeroed + faults.already_present,
        wrong_content: wrong.load(Ordering::Relaxed),
        latency_ns: [pick(500), pick(990), pick(999), pick(1000)],
        lock_waits: lock.waits,
        lock_wait_ms: lock.wait_ns as f64 / 1e6,
        disjoint_waits: lock.disjoint_waits,
        churn_ops: churn_ops.load(Ordering::Relaxed),
        harvests: harvests.load(Ordering::Relaxed),
    };
    Ok((report, shards))
}

/// Most touch latencies a worker keeps (every touch is counted, the first ones timed).
const MAX_SAMPLES: usize = 1 << 20;

/// One worker: touch a page (a write: it faults while the page is missing), check its
/// content, give it back; until `stop`. Returns the touch latencies in nanoseconds.
#[allow(clippy::too_many_arguments)]
fn worker(
    ram: &GuestRam,
    base: u64,
    pages: u64,
    w: u64,
    args: &StressArgs,
    stop: &AtomicBool,
    touches: &AtomicU64,
    wrong: &AtomicU64,
) -> Vec<u64> {
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
    let mut samples = Vec::with_capacity(MAX_SAMPLES.min(1 << 16));
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let p = match args.pattern {
            Pattern::Random => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % pages
            }
            _ => first + (i % count) % pages,
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
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if samples.len() < MAX_SAMPLES {
            samples.push(ns);
        }
        touches.fetch_add(1, Ordering::Relaxed);
        // A page this worker or another just gave back reads zero until refilled.
        if seen != expected(p) && seen != 0 {
            wrong.fetch_add(1, Ordering::Relaxed);
        }
        // Give the page back so the next touch faults again.
        if let Err(e) = ram
            .discard(gpa..gpa + page)
            .and_then(|()| ram.reclaim(gpa..gpa + page))
        {
            log::error!("Giving back page {gpa:#x} failed: {e}");
        }
    }
    samples
}

/// Balloon churn: discard and reclaim random 64 KiB runs until `stop`.
fn churn(ram: &GuestRam, memory: u64, stop: &AtomicBool, ops: &AtomicU64) {
    let run = (64 << 10).max(ram.page_size()).min(memory);
    let runs = memory / run;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let start = (rng % runs) * run;
        match ram
            .discard(start..start + run)
            .and_then(|()| ram.reclaim(start..start + run))
        {
            Ok(()) => {
                ops.fetch_add(2, Ordering::Relaxed);
            }
            Err(e) => log::error!("Balloon churn on {start:#x} failed: {e}"),
        }
    }
}

/// Dirty harvest of all memory in 2 MiB chunks every `every`, until `stop`.
fn harvest(ram: &GuestRam, memory: u64, every: Duration, stop: &AtomicBool, done: &AtomicU64) {
    let chunk = (2 << 20).max(ram.page_size()).min(memory);
    while !stop.load(Ordering::Relaxed) {
        let mut at = 0;
        while at < memory {
            let end = (at + chunk).min(memory);
            if let Err(e) = ram.take_dirty(at..end) {
                log::error!("Harvest of {at:#x} failed: {e}");
            }
            at = end;
        }
        done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(every);
    }
}
