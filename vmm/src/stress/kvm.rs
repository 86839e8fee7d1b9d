//! The `kvm` engine: one real KVM vCPU per worker runs a tiny 32-bit guest that walks
//! its memory, so every first touch of a page faults guest → KVM → userfaultfd →
//! handler → back.
//!
//! Guest page 0 holds the program (served by the page source like any other page, and
//! kept out of the walk and of balloon churn). The guest reads its walk from port
//! [`PARAM_PORT`] (start, low and high bounds, stride, pages per report), then forever
//! increments the first byte of each page of the walk, and after every
//! `pages per report` pages writes its position to [`PROGRESS_PORT`]. On that exit the
//! vCPU thread times the batch (per page, as the host sees it), checks the pages'
//! content, and gives them back so the next pass faults again. This machine's KVM runs
//! guest code in its instruction emulator, so the loop is five instructions a page.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rangevm_memory::{FaultEngine, FaultEngineConfig, GuestRam, PageContent, PageSource};

use super::report::{latency_histogram, merge, Report};
use super::{expected, Engine, MemLock, Pattern, Shared, StressArgs, StressError};
use crate::arch::{IoHandler, KvmVcpu, KvmVm, VcpuStop};

/// The guest reads its parameters here, one 32-bit IN each.
const PARAM_PORT: u16 = 0x510;
/// The guest writes its position here after each batch.
const PROGRESS_PORT: u16 = 0x514;
/// Pages the guest touches between two progress reports.
const PAGES_PER_REPORT: u32 = 16;
/// The guest's addresses are 32-bit and its walk adds a stride to an address below the
/// top of memory: 2 GiB keeps that sum below 4 GiB.
const MAX_MEMORY: u64 = 2 << 30;

/// The guest program, 32-bit code at guest address 0. Parameters come in over
/// [`PARAM_PORT`] in this order: start address (ebx), low bound (esi), high bound
/// (edi), stride (ebp), pages per report (esp, unused as a stack).
fn program() -> Vec<u8> {
    let param = u32::from(PARAM_PORT).to_le_bytes();
    let progress = u32::from(PROGRESS_PORT).to_le_bytes();
    let mut code = vec![0xBA]; // mov edx, PARAM_PORT
    code.extend(param);
    code.extend([
        0xED, 0x89, 0xC3, // in eax, dx; mov ebx, eax
        0xED, 0x89, 0xC6, // in eax, dx; mov esi, eax
        0xED, 0x89, 0xC7, // in eax, dx; mov edi, eax
        0xED, 0x89, 0xC5, // in eax, dx; mov ebp, eax
        0xED, 0x89, 0xC4, // in eax, dx; mov esp, eax
        0xBA, // mov edx, PROGRESS_PORT
    ]);
    code.extend(progress);
    code.extend([
        // outer:
        0x89, 0xE1, // mov ecx, esp
        // inner:
        0xFE, 0x03, // inc byte [ebx]
        0x01, 0xEB, // add ebx, ebp
        0x39, 0xFB, // cmp ebx, edi
        0x72, 0x04, // jb nowrap
        0x29, 0xFB, // sub ebx, edi
        0x01, 0xF3, // add ebx, esi
        // nowrap:
        0xE2, 0xF2, // loop inner
        0x89, 0xD8, // mov eax, ebx
        0xEF, // out dx, eax
        0xEB, 0xEB, // jmp outer
    ]);
    code
}

/// HLT: what the rest of the code page holds, so a stray jump stops the vCPU.
const HLT: u8 = 0xF4;

/// Page 0 is the program; page `p` of the rest is filled with [`expected`]`(p)`.
struct GuestSource {
    page_size: u64,
    code: Vec<u8>,
}

impl PageSource for GuestSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<PageContent> {
        if gpa < self.page_size {
            buf.fill(HLT);
            buf[..self.code.len()].copy_from_slice(&self.code);
        } else {
            buf.fill(expected(gpa / self.page_size));
        }
        Ok(PageContent::Data)
    }
}

/// One vCPU's walk, in guest-physical bytes: from `start`, `stride` at a time, within
/// `[lo, hi)` (wrapping by `hi - lo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Walk {
    start: u64,
    lo: u64,
    hi: u64,
    stride: u64,
}

impl Walk {
    /// The walk of worker `w` of `workers` over data pages `[first, first + count)`.
    fn new(pattern: Pattern, w: u64, workers: u64, first: u64, count: u64, page: u64) -> Walk {
        let (lo, hi) = (first * page, (first + count) * page);
        match pattern {
            Pattern::Disjoint => {
                let (a, b) = (
                    first + w * count / workers,
                    first + (w + 1) * count / workers,
                );
                Walk {
                    start: a * page,
                    lo: a * page,
                    hi: b * page,
                    stride: page,
                }
            }
            Pattern::Shared => Walk {
                start: lo,
                lo,
                hi,
                stride: page,
            },
            Pattern::Sequential => Walk {
                start: lo + w * count / workers * page,
                lo,
                hi,
                stride: page,
            },
            Pattern::Random => Walk {
                start: lo + w * count / workers * page,
                lo,
                hi,
                stride: coprime_stride(count) * page,
            },
        }
    }

    /// The address after `at`: what the guest computes.
    fn next(&self, at: u64) -> u64 {
        let n = at + self.stride;
        if n < self.hi {
            n
        } else {
            n - (self.hi - self.lo)
        }
    }

    /// The guest's parameters, in the order the program reads them.
    fn params(&self) -> [u32; 5] {
        let u = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        [
            u(self.start),
            u(self.lo),
            u(self.hi),
            u(self.stride),
            PAGES_PER_REPORT,
        ]
    }
}

/// A step through `count` pages that visits each once per pass and jumps far, in the
/// manner of a pseudo-random walk: the first number from about 0.618 × `count` up that
/// has no factor in common with `count`.
fn coprime_stride(count: u64) -> u64 {
    fn gcd(mut a: u64, mut b: u64) -> u64 {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    }
    let mut k = (count * 618 / 1000).max(1);
    while gcd(k, count) != 1 {
        k += 1;
    }
    k.min(count.max(1))
}

/// The vCPU's ports: parameters in, progress out.
struct GuestIo {
    params: [u32; 5],
    next_param: Cell<usize>,
    progress: Cell<Option<u64>>,
    stray: Cell<Option<u16>>,
}

impl IoHandler for GuestIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let i = self.next_param.get();
        match self.params.get(i) {
            Some(v) if port == PARAM_PORT => {
                self.next_param.set(i + 1);
                let bytes = v.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            _ => {
                self.stray.set(Some(port));
                data.fill(0xff);
            }
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == PROGRESS_PORT && data.len() == 4 {
            let mut v = [0u8; 4];
            v.copy_from_slice(data);
            self.progress.set(Some(u64::from(u32::from_le_bytes(v))));
        } else {
            self.stray.set(Some(port));
        }
    }

    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// Checks the options the kvm engine cannot serve; returns the memory size in whole
/// host pages.
fn check(args: &StressArgs, page: u64) -> Result<u64, StressError> {
    let memory = args.memory - args.memory % page;
    if memory > MAX_MEMORY {
        return Err(StressError::Option(format!(
            "--engine kvm runs a 32-bit guest that walks at most 2 GiB: --memory {} is too large",
            args.memory
        )));
    }
    // Page 0 is the guest's code.
    let data_pages = (memory / page).saturating_sub(1);
    if data_pages < u64::from(args.workers) {
        return Err(StressError::Option(format!(
            "--memory {} gives {data_pages} host page(s) besides the guest's code page for {} vCPUs: give each at least one",
            args.memory, args.workers
        )));
    }
    Ok(memory)
}

/// One run of the kvm engine in lock mode `mode`.
pub(super) fn run_one(args: &StressArgs, mode: MemLock) -> Result<Report, StressError> {
    let page = rangevm_memory::host_page_size();
    let memory = check(args, page)?;
    let ram = Arc::new(GuestRam::new_missing(mode.ram_mode(), &[(0, memory)])?);
    let engine = FaultEngine::start_with(
        Arc::clone(&ram),
        Arc::new(GuestSource {
            page_size: page,
            code: program(),
        }),
        FaultEngineConfig {
            handlers: args.handlers as usize,
            shards: args.shards.unwrap_or(args.handlers) as usize,
        },
        mode.locking(),
    )?;
    let shards = engine.shards();
    let vm = KvmVm::new(Arc::clone(&ram))?;
    let workers = u64::from(args.workers);
    let mut vcpus = Vec::new();
    for w in 0..workers {
        let mut vcpu = vm.create_vcpu(w)?;
        vcpu.setup_protected_mode(0)?;
        let walk = Walk::new(args.pattern, w, workers, 1, memory / page - 1, page);
        vcpus.push((vcpu, walk));
    }
    let base = ram.host_address(0)?;
    let shared = Shared::default();
    let duration = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let result = std::thread::scope(|s| {
        let threads: Vec<_> = vcpus
            .into_iter()
            .map(|(vcpu, walk)| {
                let (ram, shared) = (&ram, &shared);
                s.spawn(move || vcpu_worker(vcpu, walk, ram, base, args, shared))
            })
            .collect();
        super::spawn_churn(s, &ram, page..memory, args, &shared);
        super::wait_with_progress(started, duration, &format!("kvm/{mode}"), args, &shared);
        let mut all = latency_histogram();
        let mut first_error = None;
        for t in threads {
            match t.join() {
                Ok(Ok(h)) => merge(&mut all, &h),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => log::error!("A stress vCPU thread panicked"),
            }
        }
        first_error.map_or(Ok(all), Err)
    });
    let seconds = started.elapsed().as_secs_f64();
    // The vCPUs are gone; the VM's slots go before the engine stops serving faults.
    drop(vm);
    let faults = engine.stop();
    let latency = result?;
    let lock = ram.range_lock().stats();
    Ok(Report {
        engine: Engine::Kvm,
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

/// Runs one vCPU until `stop`: after each batch, time it, check the pages and give
/// them back. Returns the per-page latencies in nanoseconds.
fn vcpu_worker(
    mut vcpu: KvmVcpu,
    walk: Walk,
    ram: &GuestRam,
    base: u64,
    args: &StressArgs,
    shared: &Shared,
) -> Result<Histogram<u64>, StressError> {
    let io = GuestIo {
        params: walk.params(),
        next_param: Cell::new(0),
        progress: Cell::new(None),
        stray: Cell::new(None),
    };
    let page = ram.page_size();
    // In disjoint walks without churn nothing but this guest touches these pages: each
    // must show exactly one increment. The other walks overlap those of other vCPUs.
    let exact = args.pattern == Pattern::Disjoint && !args.balloon_churn;
    let mut latency = latency_histogram();
    let mut at = walk.start;
    loop {
        let entered = Instant::now();
        let stop = vcpu.run_once(&io)?;
        let elapsed = entered.elapsed();
        if let Some(port) = io.stray.take() {
            return Err(StressError::GuestStopped {
                vcpu: vcpu.id(),
                why: format!("it accessed port {port:#x}"),
            });
        }
        match stop {
            None => {}
            Some(VcpuStop::Interrupted) => continue,
            Some(why) => {
                return Err(StressError::GuestStopped {
                    vcpu: vcpu.id(),
                    why: format!("{why:?}"),
                })
            }
        }
        let Some(reported) = io.progress.take() else {
            continue;
        };
        let per_page =
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / u64::from(PAGES_PER_REPORT);
        latency.saturating_record_n(per_page, u64::from(PAGES_PER_REPORT));
        shared
            .touches
            .fetch_add(u64::from(PAGES_PER_REPORT), Ordering::Relaxed);
        for _ in 0..PAGES_PER_REPORT {
            if !content_ok(base, at, page, exact) {
                shared.wrong.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = ram
                .discard(at..at + page)
                .and_then(|()| ram.reclaim(at..at + page))
            {
                log::error!("Giving back page {at:#x} failed: {e}");
            }
            at = walk.next(at);
        }
        // The guest and the host must agree on where the walk is.
        if reported != at {
            shared.wrong.fetch_add(1, Ordering::Relaxed);
            at = reported;
        }
        if shared.stop.load(Ordering::Acquire) {
            return Ok(latency);
        }
    }
}

/// Whether the page at `gpa` holds what one guest increment of its first byte leaves:
/// the source's page (or a zero page, once given back) with byte 0 one higher than
/// byte 1. `exact` off allows other writers (overlapping walks) and pages given back
/// by another vCPU or discarded by balloon churn since.
fn content_ok(base: u64, gpa: u64, page: u64, exact: bool) -> bool {
    let ptr = (base + gpa) as *const u8;
    // SAFETY: `gpa .. gpa + 2` is inside guest RAM's live mapping (the walk stays
    // below the end of memory, pages are at least 4 KiB); volatile loads read what the
    // guest wrote, and may fault the page back in if churn discarded it meanwhile.
    let (b0, b1) = unsafe {
        (
            std::ptr::read_volatile(ptr),
            std::ptr::read_volatile(ptr.add(1)),
        )
    };
    let source = b1 == expected(gpa / page) || b1 == 0;
    let increments = b0.wrapping_sub(b1);
    source
        && if exact {
            increments == 1
        } else {
            u32::from(increments) <= 64
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_land_on_instruction_starts() {
        let code = program();
        // outer at 25, inner at 27, nowrap at 39; 46 bytes in all.
        assert_eq!(code.len(), 46);
        assert_eq!(&code[25..27], &[0x89, 0xE1]);
        let target = |at: usize| {
            (at + 2)
                .checked_add_signed(isize::from(i8::from_le_bytes([code[at + 1]])))
                .unwrap()
        };
        assert_eq!(code[33], 0x72);
        assert_eq!(target(33), 39);
        assert_eq!(code[39], 0xE2);
        assert_eq!(target(39), 27);
        assert_eq!(code[44], 0xEB);
        assert_eq!(target(44), 25);
        assert_eq!(code.iter().filter(|&&b| b == 0xED).count(), 5);
    }

    #[test]
    fn walks_visit_every_page_of_their_range_once_per_pass() {
        let page = 4096;
        for pattern in [
            Pattern::Disjoint,
            Pattern::Shared,
            Pattern::Sequential,
            Pattern::Random,
        ] {
            for (w, workers, count) in [(0, 1, 1), (1, 3, 10), (2, 3, 100), (0, 2, 64)] {
                let walk = Walk::new(pattern, w, workers, 1, count, page);
                assert!(walk.lo >= page && walk.hi <= (count + 1) * page, "{walk:?}");
                assert!(walk.stride > 0 && walk.stride <= walk.hi - walk.lo);
                let n = (walk.hi - walk.lo) / page;
                let mut seen = std::collections::HashSet::new();
                let mut at = walk.start;
                for _ in 0..n {
                    assert!(at >= walk.lo && at < walk.hi && at % page == 0);
                    assert!(seen.insert(at), "{pattern:?} {walk:?} twice at {at:#x}");
                    at = walk.next(at);
                }
                assert_eq!(at, walk.start, "{pattern:?} {walk:?}");
            }
        }
    }

    #[test]
    fn disjoint_walks_do_not_overlap_and_cover_all_pages() {
        let page = 4096;
        let mut covered = 0;
        let mut prev_hi = page;
        for w in 0..3 {
            let walk = Walk::new(Pattern::Disjoint, w, 3, 1, 100, page);
            assert_eq!(walk.lo, prev_hi);
            covered += (walk.hi - walk.lo) / page;
            prev_hi = walk.hi;
        }
        assert_eq!(covered, 100);
    }

    #[test]
    fn random_stride_is_coprime_and_far() {
        for count in [1u64, 2, 10, 64, 100, 2047, 4096] {
            let k = coprime_stride(count);
            assert!(k >= 1 && k <= count);
            let mut a = k;
            let mut b = count;
            while b != 0 {
                (a, b) = (b, a % b);
            }
            assert_eq!(a, 1, "{count} {k}");
        }
        assert!(coprime_stride(4096) > 2000);
    }

    #[test]
    fn the_guest_gets_its_parameters_in_order_and_strays_are_caught() {
        let walk = Walk::new(Pattern::Disjoint, 0, 1, 1, 4, 4096);
        let io = GuestIo {
            params: walk.params(),
            next_param: Cell::new(0),
            progress: Cell::new(None),
            stray: Cell::new(None),
        };
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut d = [0u8; 4];
            io.pio_read(PARAM_PORT, &mut d);
            got.push(u32::from_le_bytes(d));
        }
        assert_eq!(got, [4096, 4096, 5 * 4096, 4096, PAGES_PER_REPORT]);
        assert_eq!(io.stray.get(), None);
        io.pio_write(PROGRESS_PORT, &0x3000u32.to_le_bytes());
        assert_eq!(io.progress.take(), Some(0x3000));
        let mut d = [0u8; 4];
        io.pio_read(PARAM_PORT, &mut d);
        assert_eq!(io.stray.take(), Some(PARAM_PORT));
        io.pio_write(0x3f8, b"x");
        assert_eq!(io.stray.take(), Some(0x3f8));
    }

    #[test]
    fn too_much_or_too_little_memory_is_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            stress: StressArgs,
        }
        let mut args = <Cli as clap::Parser>::parse_from(["stress", "--engine", "kvm"]).stress;
        assert_eq!(args.engine, Engine::Kvm);
        args.memory = 4 << 30;
        assert!(check(&args, 4096).is_err());
        args.memory = 3 * 4096;
        args.workers = 2;
        assert_eq!(check(&args, 4096).unwrap(), 3 * 4096);
        args.workers = 3;
        let e = check(&args, 4096).unwrap_err().to_string();
        assert!(e.contains("give each at least one"), "{e}");
    }
}
