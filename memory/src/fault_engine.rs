//! The fault engine: handler threads that resolve missing-page faults of guest RAM.
//!
//! Guest RAM is split into `shards` contiguous, page-aligned parts, each registered
//! with a userfaultfd of its own, and `handlers` threads serve them (handler `i` serves
//! shard `i mod shards`). One userfaultfd for all of guest memory puts every fault of
//! every vCPU behind one queue (one file, one wait queue, one lock in the kernel); the
//! shards spread them. Each resolution takes the write lock of its page only
//! (`GuestRam::resolve_fault`), so faults on different pages are resolved in parallel.
//!
//! [`FaultEngine::start_with`] can also run the same engine with no lock at all around
//! the resolution ([`Locking::None`]): a benchmark baseline that tells what the range
//! lock adds to a fault's round trip, and nothing else.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::guest_ram::faults::{PageSource, Resolution};
use crate::guest_ram::{GuestRam, GuestRamError};
use crate::uffd::{UffdError, Userfaultfd};

/// Errors of the fault engine.
#[derive(Debug, thiserror::Error)]
pub enum FaultEngineError {
    /// A userfaultfd could not be created.
    #[error("Cannot create the fault engine's userfaultfd")]
    Uffd(#[from] UffdError),
    /// Guest RAM could not be registered.
    #[error("Cannot register guest RAM for missing-page faults")]
    Register(#[from] GuestRamError),
    /// Zero handlers or shards.
    #[error(
        "The fault engine needs at least one handler and one shard (got {handlers} and {shards})"
    )]
    Config {
        /// Handlers asked for.
        handlers: usize,
        /// Shards asked for.
        shards: usize,
    },
    /// A handler thread could not be started.
    #[error("Cannot start a fault handler thread")]
    Spawn(#[source] std::io::Error),
}

/// How many handler threads and userfaultfds.
#[derive(Debug, Clone, Copy)]
pub struct FaultEngineConfig {
    /// Handler threads.
    pub handlers: usize,
    /// Userfaultfds, each serving a contiguous part of guest RAM.
    pub shards: usize,
}

impl Default for FaultEngineConfig {
    fn default() -> Self {
        FaultEngineConfig {
            handlers: 2,
            shards: 2,
        }
    }
}

/// What a resolution locks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Locking {
    /// The write lock of the faulting page, as DESIGN.md says (in the guest RAM's own
    /// lock mode, range or global). What everything but a benchmark uses.
    #[default]
    Range,
    /// **Benchmark baseline only**: no lock at all. Nothing then excludes balloon
    /// discards, reclaims, DMA or region changes of a page being resolved (a late copy
    /// can resurrect a discarded page), so it must never run alongside any of them; only
    /// the faulting workers themselves may touch guest memory.
    None,
}

impl std::fmt::Display for Locking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Locking::Range => "range",
            Locking::None => "none",
        })
    }
}

/// Counters, summed over handlers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    /// Pages copied from the source.
    pub copied: u64,
    /// Pages mapped as zero pages (zero in the source, or ballooned).
    pub zeroed: u64,
    /// Faults on pages that were already present (racing faults; EEXIST).
    pub already_present: u64,
    /// Faults that could not be resolved (logged).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    copied: AtomicU64,
    zeroed: AtomicU64,
    already_present: AtomicU64,
    errors: AtomicU64,
}

/// Running handler threads; stopped and joined on [`FaultEngine::stop`] or drop.
#[derive(Debug)]
pub struct FaultEngine {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Kept open for as long as the engine runs: closing a userfaultfd unregisters its
    /// ranges, and their pages would then silently fill with zeros.
    uffds: Vec<Arc<Userfaultfd>>,
    /// The guest-physical range each userfaultfd serves.
    shard_ranges: Vec<std::ops::Range<u64>>,
    ram: Arc<GuestRam>,
}

/// How long a handler sleeps in poll(2) before it looks at the stop flag.
const POLL_MS: i32 = 20;

impl FaultEngine {
    /// Registers `ram` with `config.shards` userfaultfds and starts the handlers; each
    /// resolution takes its page's write lock.
    pub fn start(
        ram: Arc<GuestRam>,
        source: Arc<dyn PageSource>,
        config: FaultEngineConfig,
    ) -> Result<Self, FaultEngineError> {
        Self::start_with(ram, source, config, Locking::Range)
    }

    /// As [`Self::start`], with resolutions locked as `locking` says: see [`Locking`]
    /// for why [`Locking::None`] is a benchmark baseline only.
    pub fn start_with(
        ram: Arc<GuestRam>,
        source: Arc<dyn PageSource>,
        config: FaultEngineConfig,
        locking: Locking,
    ) -> Result<Self, FaultEngineError> {
        if config.handlers == 0 || config.shards == 0 {
            return Err(FaultEngineError::Config {
                handlers: config.handlers,
                shards: config.shards,
            });
        }
        let (uffds, shard_ranges) = Self::shard(&ram, config.shards)?;
        // From here a missing page that device DMA meets is faulted in and served.
        ram.set_fault_in_on_dma(true);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut engine = FaultEngine {
            stop: Arc::clone(&stop),
            threads: Vec::with_capacity(config.handlers),
            counters: Arc::clone(&counters),
            uffds: uffds.clone(),
            shard_ranges,
            ram: Arc::clone(&ram),
        };
        for i in 0..config.handlers {
            // More handlers than shards: handlers share a shard. Fewer: each handler
            // serves every shard `j` with `j mod handlers == i`.
            let mine: Vec<Arc<Userfaultfd>> = if config.handlers >= uffds.len() {
                vec![Arc::clone(&uffds[i % uffds.len()])]
            } else {
                uffds
                    .iter()
                    .skip(i)
                    .step_by(config.handlers)
                    .cloned()
                    .collect()
            };
            let (ram, source) = (Arc::clone(&ram), Arc::clone(&source));
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            let thread = std::thread::Builder::new()
                .name(format!("uffd-handler-{i}"))
                .spawn(move || {
                    let serve = Serve {
                        ram: &ram,
                        source: source.as_ref(),
                        locking,
                        counters: &counters,
                    };
                    handle(&serve, &mine, &stop);
                })
                .map_err(FaultEngineError::Spawn)?;
            engine.threads.push(thread);
        }
        Ok(engine)
    }

    /// `shards` userfaultfds, each registered for a contiguous, page-aligned part of
    /// guest RAM (shards that would be empty are not created).
    #[allow(clippy::type_complexity)]
    fn shard(
        ram: &GuestRam,
        shards: usize,
    ) -> Result<(Vec<Arc<Userfaultfd>>, Vec<std::ops::Range<u64>>), FaultEngineError> {
        let page = ram.page_size();
        let regions = ram.regions();
        let (Some(first), Some(last)) = (regions.first(), regions.last()) else {
            return Ok((
                vec![Arc::new(Userfaultfd::new()?)],
                std::iter::once(0..0).collect(),
            ));
        };
        let (lo, hi) = (first.start, last.end());
        let pages = (hi - lo) / page;
        let per_shard = pages.div_ceil(shards as u64).max(1) * page;
        let mut uffds = Vec::with_capacity(shards);
        let mut ranges = Vec::with_capacity(shards);
        let mut start = lo;
        while start < hi {
            let end = (start + per_shard).min(hi);
            let uffd = Userfaultfd::new()?;
            ram.register_missing_range(&uffd, start..end)?;
            uffds.push(Arc::new(uffd));
            ranges.push(start..end);
            start = end;
        }
        Ok((uffds, ranges))
    }

    /// Places `count` received pages from `gpa` (one region; `data` their bytes, or
    /// `None` for zero pages) through the userfaultfds that serve them, under the write
    /// lock of each shard's part of the run (see [`GuestRam::place_pages`]).
    pub fn place(
        &self,
        gpa: u64,
        count: u64,
        data: Option<&[u8]>,
    ) -> Result<crate::guest_ram::postcopy::Placed, GuestRamError> {
        let page = self.ram.page_size();
        let mut placed = crate::guest_ram::postcopy::Placed::default();
        let end = gpa.saturating_add(count.saturating_mul(page));
        let mut at = gpa;
        while at < end {
            let Some(i) = self.shard_ranges.iter().position(|r| r.contains(&at)) else {
                return Err(GuestRamError::NotMapped { start: at, end });
            };
            let piece_end = end.min(self.shard_ranges[i].end);
            let n = (piece_end - at) / page;
            let bytes = data.map(|d| {
                let off = usize::try_from((at - gpa) / page * page).unwrap_or(usize::MAX);
                let len = usize::try_from(n * page).unwrap_or(usize::MAX);
                d.get(off..off.saturating_add(len)).unwrap_or(&[])
            });
            placed.add(self.ram.place_pages(&self.uffds[i], at, n, bytes)?);
            at = piece_end;
        }
        Ok(placed)
    }

    /// The end of postcopy: marks guest RAM ordinary ([`GuestRam::finish_missing`]),
    /// then stops the handlers and closes the userfaultfds (a page still missing was
    /// discarded, and reads as zero from now on).
    pub fn finish(self) -> FaultStats {
        self.ram.finish_missing();
        self.stop()
    }

    /// Number of userfaultfds (shards) in use; fewer than asked when guest RAM has
    /// fewer pages than shards.
    pub fn shards(&self) -> usize {
        self.uffds.len()
    }

    /// The counters so far.
    pub fn stats(&self) -> FaultStats {
        let c = &self.counters;
        FaultStats {
            copied: c.copied.load(Ordering::Relaxed),
            zeroed: c.zeroed.load(Ordering::Relaxed),
            already_present: c.already_present.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the handlers, waits for them, and returns the final counters.
    pub fn stop(mut self) -> FaultStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        // Nobody serves faults any more: DMA on a missing page fails again.
        self.ram.set_fault_in_on_dma(false);
        self.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("A fault handler thread panicked");
            }
        }
    }
}

impl Drop for FaultEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a handler resolves faults with.
struct Serve<'a> {
    ram: &'a GuestRam,
    source: &'a dyn PageSource,
    locking: Locking,
    counters: &'a Counters,
}

/// One handler: waits for faults on its userfaultfds and resolves them until `stop`.
fn handle(serve: &Serve<'_>, uffds: &[Arc<Userfaultfd>], stop: &AtomicBool) {
    let mut pfds: Vec<libc::pollfd> = uffds
        .iter()
        .map(|u| libc::pollfd {
            fd: u.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
    while !stop.load(Ordering::Acquire) {
        // SAFETY: `pfds` holds `nfds` valid pollfds whose fds stay open (owned by
        // `uffds`) for the call.
        let ready = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, POLL_MS) };
        if ready <= 0 {
            continue;
        }
        for (pfd, uffd) in pfds.iter().zip(uffds) {
            if pfd.revents & libc::POLLIN != 0 {
                drain(serve, uffd);
            }
        }
    }
}

/// Resolves every pending fault of `uffd`.
fn drain(serve: &Serve<'_>, uffd: &Userfaultfd) {
    let Serve {
        ram,
        source,
        locking,
        counters,
    } = *serve;
    loop {
        let fault = match uffd.read_fault() {
            Ok(Some(fault)) => fault,
            Ok(None) => break,
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                log::error!("Reading a userfaultfd event failed: {e}");
                break;
            }
        };
        let Some(gpa) = ram.fault_gpa(fault.addr) else {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            log::error!("Fault at {:#x} is not guest RAM", fault.addr);
            continue;
        };
        let resolved = match locking {
            Locking::Range => ram.resolve_fault(uffd, gpa, source),
            Locking::None => ram.resolve_fault_unlocked(uffd, gpa, source),
        };
        match resolved {
            Ok(Resolution::Copied) => counters.copied.fetch_add(1, Ordering::Relaxed),
            Ok(Resolution::Zeroed) => counters.zeroed.fetch_add(1, Ordering::Relaxed),
            Ok(Resolution::AlreadyPresent) => {
                counters.already_present.fetch_add(1, Ordering::Relaxed)
            }
            Err(e) => {
                log::error!("Cannot resolve the fault at guest {gpa:#x}: {e}");
                counters.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::guest_ram::faults::PageContent;
    use crate::host_page_size;
    use crate::range_lock::LockMode;

    struct Pattern;

    impl PageSource for Pattern {
        fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
            buf.fill(u8::try_from((gpa / host_page_size()) % 251).unwrap_or(0) + 1);
            Ok(PageContent::Data)
        }
    }

    #[test]
    fn bad_config_is_an_error() {
        let page = host_page_size();
        let ram = Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, 4 * page)]).unwrap());
        let config = FaultEngineConfig {
            handlers: 0,
            shards: 1,
        };
        assert!(matches!(
            FaultEngine::start(ram, Arc::new(Pattern), config),
            Err(FaultEngineError::Config { .. })
        ));
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn device_dma_on_a_missing_page_faults_it_in_while_an_engine_serves_the_memory() {
        let page = host_page_size();
        let ram = Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, 8 * page)]).unwrap());
        let mut buf = vec![0u8; usize::try_from(2 * page).unwrap()];
        // No engine: refused, never a hang.
        assert!(matches!(
            ram.read(page, &mut buf),
            Err(GuestRamError::NotPresent(_))
        ));
        let engine = FaultEngine::start(
            Arc::clone(&ram),
            Arc::new(Pattern),
            FaultEngineConfig::default(),
        )
        .unwrap();
        // Two missing pages across the DMA buffer: both are fetched, then read.
        ram.read(page, &mut buf).unwrap();
        let (a, b) = buf.split_at(usize::try_from(page).unwrap());
        assert!(a.iter().all(|&x| x == 2) && b.iter().all(|&x| x == 3));
        ram.write(5 * page, &[9u8; 16]).unwrap();
        assert!(ram.is_present(5 * page));
        let stats = engine.stop();
        assert_eq!(stats.copied, 3, "{stats:?}");
        // The engine is gone: DMA on a missing page is refused again.
        assert!(matches!(
            ram.read(7 * page, &mut buf[..16]),
            Err(GuestRamError::NotPresent(_))
        ));
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn the_unlocked_baseline_takes_no_lock_and_fills_every_page_right() {
        const PAGES: u64 = 64;
        let page = host_page_size();
        let ram = Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, PAGES * page)]).unwrap());
        let engine = FaultEngine::start_with(
            Arc::clone(&ram),
            Arc::new(Pattern),
            FaultEngineConfig {
                handlers: 2,
                shards: 2,
            },
            Locking::None,
        )
        .unwrap();
        let base = ram.host_address(0).unwrap();
        // All of guest RAM is write-locked: a locked resolution would wait for ever,
        // the baseline does not look at the lock.
        let guard = ram.range_lock().write(0..PAGES * page).unwrap();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                s.spawn(move || {
                    for i in 0..PAGES {
                        let p = (i * 5 + t * 3) % PAGES;
                        // SAFETY: inside the live guest mapping; a volatile load.
                        let v = unsafe { std::ptr::read_volatile((base + p * page) as *const u8) };
                        assert_eq!(u64::from(v), p % 251 + 1, "page {p}");
                    }
                });
            }
        });
        drop(guard);
        let stats = engine.stop();
        assert_eq!(stats.copied, PAGES, "{stats:?}");
        assert_eq!(stats.errors, 0);
        assert_eq!(ram.range_lock().stats().waits, 0);
        assert!(ram.range_lock().is_idle());
        assert_eq!(Locking::default(), Locking::Range);
        assert_eq!(Locking::None.to_string(), "none");
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn sharded_handlers_serve_every_page_once() {
        const PAGES: u64 = 256;
        let page = host_page_size();
        for (handlers, shards) in [(1, 1), (3, 2), (2, 5)] {
            // Two regions with a hole, so shards straddle region boundaries.
            let ram = Arc::new(
                GuestRam::new_missing(
                    LockMode::Range,
                    &[(0, PAGES / 2 * page), (PAGES * page, PAGES / 2 * page)],
                )
                .unwrap(),
            );
            let engine = FaultEngine::start(
                Arc::clone(&ram),
                Arc::new(Pattern),
                FaultEngineConfig { handlers, shards },
            )
            .unwrap();
            let gpas: Vec<u64> = ram
                .regions()
                .iter()
                .flat_map(|r| (r.start..r.end()).step_by(usize::try_from(page).unwrap()))
                .collect();
            let hosts: Vec<u64> = gpas.iter().map(|&g| ram.host_address(g).unwrap()).collect();
            std::thread::scope(|s| {
                for t in 0..4usize {
                    let (gpas, hosts) = (&gpas, &hosts);
                    s.spawn(move || {
                        for i in 0..gpas.len() {
                            let j = (i * 7 + t * 31) % gpas.len();
                            // SAFETY: inside the live guest mapping; a volatile load.
                            let v = unsafe { std::ptr::read_volatile(hosts[j] as *const u8) };
                            let want = u8::try_from((gpas[j] / page) % 251).unwrap() + 1;
                            assert_eq!(v, want, "{handlers}x{shards} page {:#x}", gpas[j]);
                        }
                    });
                }
            });
            let stats = engine.stop();
            assert_eq!(stats.copied, PAGES, "{handlers}x{shards}: {stats:?}");
            assert_eq!(stats.errors, 0);
            assert!(ram.range_lock().is_idle());
        }
    }
}
