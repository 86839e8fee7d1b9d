//! Missing-page faults: guest RAM registered with a userfaultfd, and the resolution of
//! one fault under the write lock of its page (DESIGN.md, "who locks what").

use std::io;
use std::ops::Range;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{usize_of, GuestRam, GuestRamError, Result};
use crate::uffd::{Filled, Userfaultfd};

/// What a page's content is, as a [`PageSource`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContent {
    /// The buffer now holds the page.
    Data,
    /// The page is all zeros (the buffer was not touched): mapped with a zero page.
    Zero,
}

/// Where missing pages come from: zero fill, a memory image, the migration source.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (one host page) with the page at guest-physical `gpa`.
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent>;
}

/// Every page is zero (a fresh guest whose memory is populated lazily).
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    fn read_page(&self, _gpa: u64, _buf: &mut [u8]) -> io::Result<PageContent> {
        Ok(PageContent::Zero)
    }
}

/// What `resolve_fault` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Copied from the source.
    Copied,
    /// Mapped as a zero page (the source said zero, or the balloon had discarded it:
    /// a ballooned page is never fetched).
    Zeroed,
    /// Already present (a racing resolution won, or the kernel reported EEXIST):
    /// waiters were woken, nothing was populated twice.
    AlreadyPresent,
}

/// Whether a resolution may believe the page's present bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    /// Under the page's write lock the bit is exact: a present page only needs a wake.
    PresentBit,
    /// Without the lock it can be stale: always fill, and let EEXIST say it was there.
    Kernel,
}

impl GuestRam {
    /// Registers every region with `uffd` for missing-page faults.
    pub fn register_missing(&self, uffd: &Userfaultfd) -> Result<()> {
        self.register_missing_range(uffd, 0..u64::MAX)
    }

    /// Registers the guest RAM inside `gpa` (page-aligned) with `uffd`: several
    /// userfaultfds can share the guest's memory, each serving its own part.
    pub fn register_missing_range(&self, uffd: &Userfaultfd, gpa: Range<u64>) -> Result<()> {
        self.check_aligned("Registration start", gpa.start)?;
        if gpa.end != u64::MAX {
            self.check_aligned("Registration end", gpa.end)?;
        }
        let map = self.map.load();
        for region in map.mem.iter() {
            let r_start = region.start_addr().0;
            let start = gpa.start.max(r_start);
            let end = gpa.end.min(r_start + region.len());
            if start < end {
                let host = region.get_mmap().as_ptr() as u64 + (start - r_start);
                uffd.register(host, end - start)?;
            }
        }
        Ok(())
    }

    /// The guest-physical address behind a faulting host address, if it is guest RAM.
    pub fn fault_gpa(&self, host_addr: u64) -> Option<u64> {
        let map = self.map.load();
        let gpa = map.mem.iter().find_map(|region| {
            let base = region.get_mmap().as_ptr() as u64;
            let offset = host_addr.checked_sub(base)?;
            (offset < region.len()).then(|| region.start_addr().0 + offset)
        });
        gpa
    }

    /// Resolves the missing page containing `gpa` under the write lock of that page:
    /// a ballooned or discarded page gets a zero page (never the source's copy, so a
    /// late fetch cannot resurrect it), a present one only wakes its waiters, any other is filled
    /// from `source` with `UFFDIO_COPY`. EEXIST from a racing resolution is normal.
    pub fn resolve_fault(
        &self,
        uffd: &Userfaultfd,
        gpa: u64,
        source: &dyn PageSource,
    ) -> Result<Resolution> {
        let page = self.fault_page(gpa)?;
        let _guard = self.lock.write(page.clone())?;
        self.fill_page(uffd, page, source, Trust::PresentBit)
    }

    /// **Benchmark baseline only.** Resolves the fault at `gpa` exactly as
    /// [`Self::resolve_fault`] does, but takes no lock at all: the same engine with no
    /// range lock, so `rangevm stress --mem-lock none` can measure what the lock adds to a
    /// fault's round trip.
    ///
    /// Nothing excludes a balloon discard, a reclaim, device DMA or a region change of
    /// the same page while it is being resolved, so a late copy can resurrect a
    /// discarded page and the page's state bits can go stale. Never use it while
    /// anything but the faulting workers themselves touches guest memory (the stress
    /// tool refuses `--balloon-churn` with it).
    ///
    /// Because the present bit can be stale here (a worker that gives its page back as
    /// soon as it is woken may clear it before we set it), the kernel is the judge: a
    /// page is always filled, and EEXIST means it was there. On a fault of a missing
    /// page, the only case a round-trip benchmark sees, that is the same work as the
    /// locked path.
    pub(crate) fn resolve_fault_unlocked(
        &self,
        uffd: &Userfaultfd,
        gpa: u64,
        source: &dyn PageSource,
    ) -> Result<Resolution> {
        let page = self.fault_page(gpa)?;
        self.fill_page(uffd, page, source, Trust::Kernel)
    }

    /// The host page containing `gpa`, as a guest-physical range.
    fn fault_page(&self, gpa: u64) -> Result<Range<u64>> {
        let page = self.page_size;
        let start = gpa - gpa % page;
        // The last page of the address space is never RAM (a region's end must fit a
        // u64); say so instead of overflowing.
        let end = start.checked_add(page).ok_or(GuestRamError::NotMapped {
            start,
            end: u64::MAX,
        })?;
        Ok(start..end)
    }

    /// Fills the missing page `page` (one host page): zero if ballooned or discarded,
    /// else from `source`; with [`Trust::PresentBit`], a page our state says is present
    /// only has its waiters woken. The caller holds the page's write lock, except on
    /// the unlocked benchmark path.
    fn fill_page(
        &self,
        uffd: &Userfaultfd,
        page: Range<u64>,
        source: &dyn PageSource,
        trust: Trust,
    ) -> Result<Resolution> {
        let Range { start, end } = page;
        let size = end - start;
        let map = self.map.load();
        let (_, r) = map
            .region_of(start)
            .ok_or(GuestRamError::NotMapped { start, end })?;
        let index = usize_of((start - r.start) / size);
        let region = map
            .mem
            .find_region(GuestAddress(start))
            .ok_or(GuestRamError::NotMapped { start, end })?;
        let host = region.get_mmap().as_ptr() as u64 + (start - r.start);
        if trust == Trust::PresentBit && r.states.is_present(index) {
            uffd.wake(host, size)?;
            return Ok(Resolution::AlreadyPresent);
        }
        let filled = if r.states.is_ballooned(index) || r.states.is_discarded(index) {
            // SAFETY: `host .. host + size` is one host page inside this region's live
            // mapping (the region holds `start`, and regions are page-multiples), which
            // `register_missing` registered. No Rust reference into it exists: this
            // crate reaches userfaultfd-served memory only through vm-memory's volatile
            // accesses and the kernel (madvise, userfaultfd), and hands none out
            // (`load_with` is refused for it). On the locked path the page's write lock
            // also keeps every other accessor off the page meanwhile.
            (unsafe { uffd.zero(host, size) }?, Resolution::Zeroed)
        } else {
            let mut buf = vec![0u8; usize_of(size)];
            let content = source
                .read_page(start, &mut buf)
                .map_err(|source| GuestRamError::Source { gpa: start, source })?;
            match content {
                // SAFETY: as above.
                PageContent::Zero => (unsafe { uffd.zero(host, size) }?, Resolution::Zeroed),
                // SAFETY: as above; `buf` is exactly one page.
                PageContent::Data => (unsafe { uffd.copy(host, &buf) }?, Resolution::Copied),
            }
        };
        r.states.set_present(index..index + 1);
        Ok(match filled {
            (Filled::Now, how) => how,
            (Filled::AlreadyThere, _) => Resolution::AlreadyPresent,
        })
    }

    /// The host virtual address of guest-physical `gpa`, as a number: what a KVM memory
    /// slot maps, and what a stand-in for a vCPU (the stress tool, tests) touches.
    /// Dereferencing it bypasses the range lock, as a vCPU does; that is the caller's
    /// `unsafe` to justify.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        let map = self.map.load();
        let region = map
            .mem
            .find_region(GuestAddress(gpa))
            .ok_or(GuestRamError::NotMapped {
                start: gpa,
                end: gpa.saturating_add(1),
            })?;
        Ok(region.get_mmap().as_ptr() as u64 + (gpa - region.start_addr().0))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::host_page_size;
    use crate::range_lock::LockMode;

    /// Page `p` is filled with the byte `p as u8 + 1`.
    #[derive(Default)]
    struct Pattern {
        reads: AtomicUsize,
    }

    impl PageSource for Pattern {
        fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let fill = u8::try_from((gpa / host_page_size()) % 255).unwrap_or(0) + 1;
            buf.fill(fill);
            Ok(PageContent::Data)
        }
    }

    fn setup() -> (GuestRam, Userfaultfd, u64) {
        let page = host_page_size();
        let ram = GuestRam::new_missing(LockMode::Range, &[(0, 16 * page)]).unwrap();
        let uffd = Userfaultfd::new().unwrap();
        ram.register_missing(&uffd).unwrap();
        (ram, uffd, page)
    }

    /// Touches `gpa` from another thread as a vCPU would (a plain load from the host
    /// mapping, blocking in the kernel until the page is filled) and serves the fault.
    fn touch_and_serve(
        ram: &GuestRam,
        uffd: &Userfaultfd,
        gpa: u64,
        source: &dyn PageSource,
    ) -> u8 {
        let host = ram.host_address(gpa).unwrap();
        std::thread::scope(|s| {
            let toucher = s.spawn(move || {
                let ptr = host as *const u8;
                // SAFETY: `ptr` points into the guest mapping, which outlives the
                // scope; a volatile byte load has no aliasing requirements beyond the
                // mapping being live.
                unsafe { std::ptr::read_volatile(ptr) }
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(fault) = uffd.read_fault().unwrap() {
                    let gpa = ram.fault_gpa(fault.addr).unwrap();
                    ram.resolve_fault(uffd, gpa, source).unwrap();
                    break;
                }
                assert!(Instant::now() < deadline, "no fault arrived");
                std::thread::sleep(Duration::from_millis(1));
            }
            toucher.join().unwrap()
        })
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn a_touched_page_is_filled_from_the_source() {
        let (ram, uffd, page) = setup();
        let source = Pattern::default();
        assert!(!ram.page_state(3 * page).unwrap().present);
        assert_eq!(touch_and_serve(&ram, &uffd, 3 * page + 17, &source), 4);
        assert!(ram.page_state(3 * page).unwrap().present);
        assert_eq!(source.reads.load(Ordering::Relaxed), 1);
        // DMA works on the present page and is refused on a missing one.
        assert_eq!(ram.read_obj::<u8>(3 * page + 100).unwrap(), 4);
        assert!(matches!(
            ram.read_obj::<u8>(4 * page),
            Err(GuestRamError::NotPresent(p)) if p == 4 * page
        ));
        assert!(matches!(
            ram.write(4 * page - 1, &[1, 2]),
            Err(GuestRamError::NotPresent(_))
        ));
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn a_page_is_never_populated_twice() {
        let (ram, uffd, page) = setup();
        let source = Pattern::default();
        assert_eq!(
            ram.resolve_fault(&uffd, 5 * page, &source).unwrap(),
            Resolution::Copied
        );
        // A second resolution of the same page (a racing handler) only wakes.
        assert_eq!(
            ram.resolve_fault(&uffd, 5 * page + 8, &source).unwrap(),
            Resolution::AlreadyPresent
        );
        assert_eq!(source.reads.load(Ordering::Relaxed), 1);
        // The kernel's own EEXIST, when our state did not know: handled, not an error.
        let host = ram.host_address(5 * page).unwrap();
        let buf = vec![9u8; usize_of(page)];
        // SAFETY: one page of the registered guest mapping; no reference into it.
        let again = unsafe { uffd.copy(host, &buf) }.unwrap();
        assert_eq!(again, Filled::AlreadyThere);
        assert_eq!(ram.read_obj::<u8>(5 * page).unwrap(), 6, "first copy kept");
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn the_unlocked_baseline_fills_like_the_locked_path_and_lets_the_kernel_judge() {
        let (ram, uffd, page) = setup();
        let source = Pattern::default();
        // The page's write lock is held elsewhere: the baseline does not wait for it.
        let guard = ram.range_lock().write(5 * page..6 * page).unwrap();
        assert_eq!(
            ram.resolve_fault_unlocked(&uffd, 5 * page + 3, &source)
                .unwrap(),
            Resolution::Copied
        );
        drop(guard);
        assert!(ram.page_state(5 * page).unwrap().present);
        assert_eq!(ram.read_obj::<u8>(5 * page).unwrap(), 6);
        // It does not trust the present bit: it fills again, and EEXIST says the page
        // was there (the first copy stays).
        assert_eq!(
            ram.resolve_fault_unlocked(&uffd, 5 * page, &source)
                .unwrap(),
            Resolution::AlreadyPresent
        );
        assert_eq!(source.reads.load(Ordering::Relaxed), 2);
        assert_eq!(ram.read_obj::<u8>(5 * page).unwrap(), 6);
        // Ballooned pages are zeroed, never fetched, as on the locked path.
        ram.discard(7 * page..8 * page).unwrap();
        assert_eq!(
            ram.resolve_fault_unlocked(&uffd, 7 * page, &source)
                .unwrap(),
            Resolution::Zeroed
        );
        assert_eq!(source.reads.load(Ordering::Relaxed), 2);
        assert!(matches!(
            ram.resolve_fault_unlocked(&uffd, 100 * page, &source),
            Err(GuestRamError::NotMapped { .. })
        ));
        assert!(matches!(
            ram.resolve_fault_unlocked(&uffd, u64::MAX, &source),
            Err(GuestRamError::NotMapped { .. })
        ));
        assert!(ram.range_lock().is_idle());
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn a_ballooned_page_is_zeroed_not_fetched() {
        let (ram, uffd, page) = setup();
        let source = Pattern::default();
        ram.discard(7 * page..8 * page).unwrap();
        assert_eq!(touch_and_serve(&ram, &uffd, 7 * page, &source), 0);
        assert_eq!(
            source.reads.load(Ordering::Relaxed),
            0,
            "the source was asked"
        );
        let state = ram.page_state(7 * page).unwrap();
        assert!(state.present && !state.ballooned);
        // Inflate then deflate: the page is missing again and still never fetched.
        for _ in 0..3 {
            ram.discard(7 * page..8 * page).unwrap();
            ram.reclaim(7 * page..8 * page).unwrap();
            assert!(!ram.page_state(7 * page).unwrap().present);
            assert_eq!(touch_and_serve(&ram, &uffd, 7 * page, &source), 0);
        }
        assert_eq!(source.reads.load(Ordering::Relaxed), 0);
        assert_eq!(
            ram.resolve_fault(&uffd, 9 * page, &ZeroSource).unwrap(),
            Resolution::Zeroed
        );
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn faults_outside_guest_ram_are_errors() {
        let (ram, uffd, page) = setup();
        assert_eq!(ram.fault_gpa(8), None);
        assert!(matches!(
            ram.resolve_fault(&uffd, 100 * page, &ZeroSource),
            Err(GuestRamError::NotMapped { .. })
        ));
        assert!(ram.range_lock().is_idle());
        // Memory that was never registered: the kernel refuses the copy, the page
        // stays missing in our state, and the error says so.
        let unregistered = GuestRam::new_missing(LockMode::Range, &[(0, 4 * page)]).unwrap();
        let r = unregistered.resolve_fault(&uffd, 2 * page, &Pattern::default());
        assert!(matches!(r, Err(GuestRamError::Uffd(_))), "{r:?}");
        assert!(!unregistered.page_state(2 * page).unwrap().present);
        assert!(unregistered.range_lock().is_idle());
    }

    #[test]
    #[cfg_attr(target_arch = "powerpc64", ignore = "qemu-user has no userfaultfd")]
    fn concurrent_touchers_and_handlers_fetch_each_page_once() {
        const PAGES: u64 = 64;
        let page = host_page_size();
        let ram = GuestRam::new_missing(LockMode::Range, &[(0, PAGES * page)]).unwrap();
        let uffd = Userfaultfd::new().unwrap();
        ram.register_missing(&uffd).unwrap();
        let source = Pattern::default();
        let base = ram.host_address(0).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let touchers: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        let mut sum = 0u64;
                        for i in 0..PAGES {
                            // Each toucher walks the pages in its own order.
                            let p = (i * 13 + t * 7) % PAGES;
                            let ptr = (base + p * page + t) as *const u8;
                            // SAFETY: inside the live guest mapping; a volatile load.
                            let v = unsafe { std::ptr::read_volatile(ptr) };
                            assert_eq!(u64::from(v), p % 255 + 1, "page {p}");
                            sum += u64::from(v);
                        }
                        sum
                    })
                })
                .collect();
            for _ in 0..2 {
                s.spawn(|| {
                    while !done.load(Ordering::Acquire) {
                        match uffd.read_fault().unwrap() {
                            Some(fault) => {
                                let gpa = ram.fault_gpa(fault.addr).unwrap();
                                ram.resolve_fault(&uffd, gpa, &source).unwrap();
                            }
                            None => std::thread::yield_now(),
                        }
                    }
                });
            }
            let sums: Vec<u64> = touchers.into_iter().map(|t| t.join().unwrap()).collect();
            done.store(true, Ordering::Release);
            assert!(sums.iter().all(|&s| s == sums[0]));
        });
        assert_eq!(source.reads.load(Ordering::Relaxed), usize_of(PAGES));
        assert!(ram.range_lock().is_idle());
    }
}
