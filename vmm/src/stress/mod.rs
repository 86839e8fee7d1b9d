//! `rangevm stress`: concurrent faulting on userfaultfd-backed guest memory, with the
//! range lock or one global lock.
//!
//! Two engines drive the faults:
//! - `threads` (`threads.rs`): host threads touch the memory directly, which measures
//!   the memory manager alone, at host speed;
//! - `kvm` (`kvm.rs`, x86_64 only): one real KVM vCPU per worker runs a tiny guest that
//!   walks its memory, so each fault goes guest → KVM → userfaultfd → handler → back.
//!
//! Either way a touched page is given back (balloon discard + reclaim, both under the
//! write lock) so the next touch faults again. Optional churn: a thread discarding and
//! reclaiming random 64 KiB runs, and a thread harvesting the dirty bitmap in 2 MiB
//! chunks under read locks. Latencies go into HDR histograms; `--plot` draws them.
//!
//! `--mem-lock none` runs the same fault engine with no lock around the resolution
//! ([`Locking::None`]), the baseline for what the range lock costs a fault's round trip.
//! It is stress-only and refuses balloon churn (nothing would exclude a discard from a
//! racing resolution). `--compare none,range,global` runs the listed modes back to back
//! on the same work, `--rounds` times, and prints them side by side with their ratios;
//! `--paired` runs them at once instead, touch by touch (`threads.rs`).

mod compare;
#[cfg(target_arch = "x86_64")]
mod kvm;
mod plot;
mod report;
mod threads;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rangevm_memory::fault_engine::Locking;
use rangevm_memory::{
    FaultEngineError, GuestRam, GuestRamError, LockMode, PageContent, PageSource,
};

pub use report::Report;

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
    /// The KVM VM or one of its vCPUs could not be set up or run.
    #[cfg(target_arch = "x86_64")]
    #[error("KVM engine")]
    Kvm(#[from] crate::arch::ArchError),
    /// A vCPU's guest stopped instead of walking its memory.
    #[error("The stress guest on vCPU {vcpu} stopped: {why}")]
    GuestStopped {
        /// vCPU index.
        vcpu: u64,
        /// How it stopped.
        why: String,
    },
    /// The latency plot could not be drawn or written.
    #[error("Cannot draw the latency plot {}", path.display())]
    Plot {
        /// The file asked for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How workers pick pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Each worker walks its own slice of memory.
    Disjoint,
    /// All workers walk the same pages in the same order.
    Shared,
    /// Each worker picks pages at random in all of memory (kvm engine: a fixed
    /// pseudo-random stride through all of memory).
    Random,
    /// Each worker walks all of memory in order, starting at its own offset.
    Sequential,
}

/// What touches the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Host threads touch the memory directly: the memory manager alone.
    Threads,
    /// One KVM vCPU per worker runs a tiny guest walking its memory (x86_64).
    Kvm,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Threads => "threads",
            Engine::Kvm => "kvm",
        })
    }
}

/// How the stress run locks guest memory: the two modes of the range lock, or (a
/// benchmark baseline only) no lock at all around fault resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MemLock {
    /// No lock around fault resolution: the baseline for the lock's cost. Refuses
    /// --balloon-churn (nothing would exclude a discard from a racing resolution).
    None,
    /// Each operation locks only the guest-physical range it touches.
    Range,
    /// One lock for all of guest memory.
    Global,
}

impl MemLock {
    /// The lock mode guest RAM is built with. With `none` the workers' own give-backs
    /// (outside the timed touch) still lock their page in range mode; only the fault
    /// engine skips the lock.
    pub fn ram_mode(self) -> LockMode {
        match self {
            MemLock::None | MemLock::Range => LockMode::Range,
            MemLock::Global => LockMode::Global,
        }
    }

    /// What the fault engine locks around each resolution.
    pub fn locking(self) -> Locking {
        match self {
            MemLock::None => Locking::None,
            MemLock::Range | MemLock::Global => Locking::Range,
        }
    }
}

impl std::fmt::Display for MemLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemLock::None => "none",
            MemLock::Range => "range",
            MemLock::Global => "global",
        })
    }
}

/// Options of `rangevm stress`.
#[derive(Debug, Clone, Args)]
pub struct StressArgs {
    /// Faulting workers (host threads, or vCPUs with --engine kvm).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Guest memory size (bytes, or with a K, M or G suffix).
    #[arg(long, default_value = "256M", value_parser = crate::cli::parse_size)]
    pub memory: u64,
    /// How workers pick the pages they touch.
    #[arg(long, value_enum, default_value = "disjoint")]
    pub pattern: Pattern,
    /// Lock guest memory by range, with one lock for all of it, or (`none`, stress only:
    /// a benchmark baseline) take no lock around fault resolution at all.
    #[arg(long, value_enum, default_value = "range")]
    pub mem_lock: MemLock,
    /// What touches the memory: host threads, or KVM vCPUs running a tiny guest.
    #[arg(long, value_enum, default_value = "threads")]
    pub engine: Engine,
    /// Fault handler threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub handlers: u32,
    /// Userfaultfds the memory is split over (default: one per handler).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: Option<u32>,
    /// Seconds to run (per mode with --compare; per round, all modes at once, with
    /// --paired).
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Threads engine: give each touched page back this many touches later (0: at once,
    /// while its handler may still hold the page's lock; fewer if a worker's slice is
    /// smaller). The default keeps give-backs two 64 KiB lock granules (4 KiB pages)
    /// behind the fault, off the lock word being resolved. The kvm engine gives pages
    /// back after each batch of its guest.
    #[arg(long, value_name = "TOUCHES", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub give_back_lag: u32,
    /// Also discard and reclaim random 64 KiB runs in a churn thread (balloon).
    #[arg(long)]
    pub balloon_churn: bool,
    /// Also harvest the dirty bitmap every N milliseconds, in 2 MiB chunks (0: off).
    #[arg(long, default_value_t = 0)]
    pub harvest_interval: u64,
    /// Run these lock modes back to back on the same work (comma-separated; alone:
    /// range,global) and print them side by side with range's ratios to the others,
    /// e.g. `--compare none,range,global`. Overrides --mem-lock.
    #[arg(long, value_enum, value_name = "MODES", num_args = 0..=1, value_delimiter = ',',
          default_missing_value = "range,global")]
    pub compare: Option<Vec<MemLock>>,
    /// With --compare (threads engine, no churn or harvest): run the modes at once,
    /// each with its own guest memory and fault engine, every worker touching the same
    /// page in each mode in turn, so the host's noise hits all modes alike.
    #[arg(long)]
    pub paired: bool,
    /// Repeat the whole comparison this many times, modes interleaved, and print each
    /// round's ratios and their medians (noisy hosts).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Print one JSON object per run instead of text.
    #[arg(long)]
    pub json: bool,
    /// Draw the touch latency distribution of each run (a CDF) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
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

/// The byte the source fills page `page` with.
fn expected(page: u64) -> u8 {
    u8::try_from(page % 251).unwrap_or(0) + 1
}

/// Runs the stress test (twice with `--compare`).
pub fn run(args: &StressArgs) -> Result<(), StressError> {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err(StressError::Option(format!(
            "--duration must be between 0 and 3600 seconds, not {}",
            args.duration
        )));
    }
    if let Some(path) = &args.plot {
        if path.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(StressError::Option(format!(
                "--plot writes SVG: give a file name ending in .svg, not {}",
                path.display()
            )));
        }
    }
    let modes = modes(args)?;
    let mut reports = Vec::new();
    let mut all_ratios = Vec::new();
    for round in 1..=args.rounds {
        let mut this_round = if args.paired {
            threads::run_paired(args, &modes)?
        } else {
            let mut reports = Vec::with_capacity(modes.len());
            for &mode in &modes {
                reports.push(run_one(args, mode)?);
            }
            reports
        };
        for report in &mut this_round {
            report.round = round;
            report.print(args);
        }
        if !args.json && modes.len() > 1 {
            compare::print_round(&this_round, round, args.rounds, args.paired);
        }
        all_ratios.push(compare::ratios(&this_round));
        reports.extend(this_round);
    }
    if !args.json && modes.len() > 1 && args.rounds > 1 {
        compare::print_medians(&all_ratios);
    }
    if let Some(path) = &args.plot {
        plot::latency_cdf(path, args, &reports).map_err(|source| StressError::Plot {
            path: path.clone(),
            source,
        })?;
        if !args.json {
            println!("latency plot: {}", path.display());
        }
    }
    Ok(())
}

/// The lock modes to run, in order: `--compare`'s list (each once), or `--mem-lock`.
fn modes(args: &StressArgs) -> Result<Vec<MemLock>, StressError> {
    let mut modes = Vec::new();
    match &args.compare {
        Some(list) => {
            for &mode in list {
                if !modes.contains(&mode) {
                    modes.push(mode);
                }
            }
        }
        None => modes.push(args.mem_lock),
    }
    if modes.is_empty() {
        return Err(StressError::Option(
            "--compare needs lock modes to compare, e.g. --compare none,range,global".to_string(),
        ));
    }
    if args.balloon_churn && modes.contains(&MemLock::None) {
        return Err(StressError::Option(
            "Lock mode none (a benchmark baseline) takes no lock around fault resolution, so nothing would keep a balloon discard from racing one: it cannot run with --balloon-churn (compare range and global instead)"
                .to_string(),
        ));
    }
    if args.paired {
        let refuse = if args.compare.is_none() {
            Some("--paired interleaves the modes of --compare: give --compare too")
        } else if args.engine != Engine::Threads {
            Some("--paired runs on the threads engine only")
        } else if args.balloon_churn || args.harvest_interval > 0 {
            Some("--paired runs no churn: drop --balloon-churn and --harvest-interval, or --paired")
        } else {
            None
        };
        if let Some(why) = refuse {
            return Err(StressError::Option(why.to_string()));
        }
    }
    Ok(modes)
}

fn run_one(args: &StressArgs, mode: MemLock) -> Result<Report, StressError> {
    match args.engine {
        Engine::Threads => threads::run_one(args, mode),
        #[cfg(target_arch = "x86_64")]
        Engine::Kvm => kvm::run_one(args, mode),
        #[cfg(not(target_arch = "x86_64"))]
        Engine::Kvm => Err(StressError::Option(
            "--engine kvm runs an x86 guest and needs an x86_64 host: use --engine threads"
                .to_string(),
        )),
    }
}

/// Counters the workers and churn threads of one run share.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    touches: AtomicU64,
    /// Pages with the wrong content; only the kvm engine (x86_64) counts here, the
    /// threads engine keeps its own per-worker count.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    wrong: AtomicU64,
    churn_ops: AtomicU64,
    harvests: AtomicU64,
}

/// Starts the churn threads `args` asks for in `s`, over guest memory `range` (the
/// kvm engine keeps its code page out of it).
fn spawn_churn<'s>(
    s: &'s std::thread::Scope<'s, '_>,
    ram: &'s GuestRam,
    range: std::ops::Range<u64>,
    args: &StressArgs,
    shared: &'s Shared,
) {
    if args.balloon_churn {
        let range = range.clone();
        s.spawn(move || churn(ram, range, &shared.stop, &shared.churn_ops));
    }
    if args.harvest_interval > 0 {
        let every = Duration::from_millis(args.harvest_interval);
        s.spawn(move || harvest(ram, range.end, every, &shared.stop, &shared.harvests));
    }
}

/// Sleeps until `duration` has passed since `started`, showing progress on standard
/// error for runs long enough to wonder about; then tells everyone to stop.
fn wait_with_progress(
    started: Instant,
    duration: Duration,
    label: &str,
    args: &StressArgs,
    shared: &Shared,
) {
    let show = duration >= Duration::from_secs(5) && !args.json;
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration));
        if show {
            let done = shared.touches.load(Ordering::Relaxed);
            eprint!(
                "\r{label}: {:>4.1} / {:.0} s, {done} touches",
                started.elapsed().as_secs_f64(),
                duration.as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    shared.stop.store(true, Ordering::Release);
    if show {
        eprintln!();
    }
}

/// Balloon churn: discard and reclaim random 64 KiB runs of `range` until `stop`.
fn churn(ram: &GuestRam, range: std::ops::Range<u64>, stop: &AtomicBool, ops: &AtomicU64) {
    let page = ram.page_size();
    let size = range.end - range.start;
    let run = (64 << 10).max(page).min(size / page * page);
    if run == 0 {
        return;
    }
    let runs = size / run;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let start = range.start + (rng % runs) * run;
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
