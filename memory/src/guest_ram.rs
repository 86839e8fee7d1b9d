//! Guest RAM: vm-memory regions behind the range lock.
//!
//! [`GuestRam`] owns the guest's memory regions (`GuestMemoryMmap<AtomicBitmap>`, one
//! dirty bit per host page), their per-page state, and the [`RangeLock`] over the
//! guest-physical address space. Every method that touches guest memory takes the lock
//! over exactly the range it touches, in the mode of DESIGN.md's "who locks what" table;
//! there is no accessor that hands out the mapping without the lock.
//!
//! The map of regions is an `ArcSwap` snapshot: an operation locks its range first and
//! loads the map second, so a region removal (write lock over the region) waits for
//! everything inside the region and everything after it sees the new map.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Arc;

use arc_swap::ArcSwap;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::host::host_page_size;
use crate::page_state::{PageState, PageStates};
use crate::range_lock::{LockMode, RangeLock, RangeLockError};

/// Errors of guest RAM operations.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    /// The range lock refused the range.
    #[error("Cannot lock guest memory range")]
    Lock(#[from] RangeLockError),
    /// Part of the range is not backed by any region.
    #[error("Guest range [{start:#x}, {end:#x}) is not all guest RAM")]
    NotMapped {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// An address or size is not a multiple of the host page size.
    #[error("{what} {value:#x} is not a multiple of the host page size ({page_size:#x})")]
    Unaligned {
        /// What was unaligned.
        what: &'static str,
        /// The value.
        value: u64,
        /// The host page size.
        page_size: u64,
    },
    /// A new region would overlap an existing one, or wrap the address space.
    #[error("Region [{start:#x}, +{size:#x}) overlaps existing guest RAM or the end of the address space")]
    Overlap {
        /// Start of the new region.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// A region size of zero, or too large for this host.
    #[error("Region size {0:#x} is zero or does not fit in this host's address space")]
    BadSize(u64),
    /// No region starts at this address.
    #[error("No guest RAM region starts at {0:#x}")]
    NoRegion(u64),
    /// mmap of the region failed.
    #[error("Cannot map guest RAM region at {start:#x}")]
    Mmap {
        /// Start of the region.
        start: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory rejected the region set.
    #[error("Invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// A read or write of guest memory failed.
    #[error("Guest memory access at {addr:#x} failed")]
    Access {
        /// Guest-physical address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A page the access needs has not been received yet (postcopy).
    #[error("Guest page {0:#x} is not present yet (postcopy)")]
    NotPresent(u64),
    /// userfaultfd failed.
    #[error("userfaultfd operation failed")]
    Uffd(#[from] crate::uffd::UffdError),
    /// The page source failed.
    #[error("Cannot read guest page {gpa:#x} from its source")]
    Source {
        /// The page.
        gpa: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor's dirty log could not be read or cleared.
    #[error("Cannot read or clear the dirty log of memory slot {slot}")]
    DirtyLog {
        /// The slot (region index).
        slot: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// madvise failed.
    #[error("Cannot release guest pages [{start:#x}, {end:#x}) to the host")]
    Discard {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, GuestRamError>;

/// One region of guest RAM as the rest of the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest-physical start.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RegionInfo {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug)]
struct Region {
    start: u64,
    size: u64,
    states: Arc<PageStates>,
}

/// The current set of regions: vm-memory's collection plus our per-page states, both
/// sorted by start.
#[derive(Debug, Default)]
struct MemoryMap {
    mem: GuestMemoryMmap<AtomicBitmap>,
    regions: Vec<Region>,
}

impl MemoryMap {
    /// The region containing `addr`.
    fn region_of(&self, addr: u64) -> Option<(usize, &Region)> {
        let i = self
            .regions
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (addr - r.start < r.size).then_some((i, r))
    }

    /// Calls `f(region_index, region, [start, end) within the region)` for each region
    /// piece of `[start, end)`. Fails, before calling `f` at all, if any byte of the
    /// range is not guest RAM, so a failed operation changes nothing.
    fn for_each_piece(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(usize, &Region, u64, u64) -> Result<()>,
    ) -> Result<()> {
        self.walk(start, end, |_, _, _, _| Ok(()))?;
        self.walk(start, end, &mut f)
    }

    fn walk(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(usize, &Region, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let mut at = start;
        while at < end {
            let (i, r) = self
                .region_of(at)
                .ok_or(GuestRamError::NotMapped { start, end })?;
            let piece_end = end.min(r.start + r.size);
            f(i, r, at, piece_end)?;
            at = piece_end;
        }
        Ok(())
    }
}

/// Guest RAM behind the range lock. See the module documentation.
#[derive(Debug)]
pub struct GuestRam {
    lock: RangeLock,
    page_size: u64,
    /// Pages start missing and are served by userfaultfd (`new_missing`), until
    /// `finish_missing` (the end of a postcopy migration).
    missing: std::sync::atomic::AtomicBool,
    /// See [`GuestRam::set_fault_in_on_dma`].
    fault_in_on_dma: std::sync::atomic::AtomicBool,
    map: ArcSwap<MemoryMap>,
}

impl GuestRam {
    /// Guest RAM made of anonymous regions `(start, size)`, every page present.
    /// Starts and sizes must be multiples of the host page size.
    pub fn new(mode: LockMode, regions: &[(u64, u64)]) -> Result<Self> {
        Self::build(mode, regions, true)
    }

    /// Guest RAM whose pages are all missing (a postcopy destination): each is filled
    /// on first touch by `resolve_fault` once registered with a userfaultfd.
    pub fn new_missing(mode: LockMode, regions: &[(u64, u64)]) -> Result<Self> {
        Self::build(mode, regions, false)
    }

    fn build(mode: LockMode, regions: &[(u64, u64)], present: bool) -> Result<Self> {
        let page_size = host_page_size();
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let lock = RangeLock::for_memory(mode, total, page_size);
        let ram = GuestRam {
            lock,
            page_size,
            missing: std::sync::atomic::AtomicBool::new(!present),
            fault_in_on_dma: std::sync::atomic::AtomicBool::new(false),
            map: ArcSwap::from_pointee(MemoryMap::default()),
        };
        for &(start, size) in regions {
            ram.insert_region(start, size, present, false)?;
        }
        Ok(ram)
    }

    /// The host page size every page-granular operation uses.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The range lock (for operations that live outside this crate, such as the
    /// userfaultfd fault engine, to lock what they resolve).
    pub fn range_lock(&self) -> &RangeLock {
        &self.lock
    }

    /// The regions, in address order.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.map
            .load()
            .regions
            .iter()
            .map(|r| RegionInfo {
                start: r.start,
                size: r.size,
            })
            .collect()
    }

    /// Total bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.map.load().regions.iter().map(|r| r.size).sum()
    }

    fn check_aligned(&self, what: &'static str, value: u64) -> Result<()> {
        if value % self.page_size == 0 {
            Ok(())
        } else {
            Err(GuestRamError::Unaligned {
                what,
                value,
                page_size: self.page_size,
            })
        }
    }

    fn range_of(addr: u64, len: usize) -> Result<Range<u64>> {
        let len = len as u64;
        let end = addr.checked_add(len).ok_or(GuestRamError::NotMapped {
            start: addr,
            end: u64::MAX,
        })?;
        Ok(addr..end)
    }

    /// Device DMA from guest memory: reads `buf.len()` bytes at `addr` under the read
    /// lock of that range.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.dma(addr, buf.len(), |map, _| {
            map.mem
                .read_slice(buf, GuestAddress(addr))
                .map_err(|source| GuestRamError::Access { addr, source })
        })
    }

    /// Device DMA into guest memory: writes `buf` at `addr` under the read lock of that
    /// range (DMA excludes faults, discards and region changes, not other DMA), and
    /// marks the pages dirty and no longer ballooned.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        let page = self.page_size;
        self.dma(addr, buf.len(), |map, range| {
            map.for_each_piece(range.start, range.end, |_, r, s, e| {
                let first = usize_of((s - r.start) / page);
                let last = usize_of((e - 1 - r.start) / page);
                r.states.set_present(first..last + 1);
                Ok(())
            })?;
            // vm-memory marks the AtomicBitmap dirty for every page it writes.
            map.mem
                .write_slice(buf, GuestAddress(addr))
                .map_err(|source| GuestRamError::Access { addr, source })
        })
    }

    /// The common part of device DMA: `len` bytes at `addr`, under the read lock of
    /// that range, all of it guest RAM and present; `access` does the copy.
    fn dma(
        &self,
        addr: u64,
        len: usize,
        access: impl FnOnce(&MemoryMap, &Range<u64>) -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let range = Self::range_of(addr, len)?;
        // A page still missing (postcopy) is faulted in first, with no lock held, when
        // a fault engine serves this memory; then the DMA goes on under its read lock.
        let mut tries = usize_of(len as u64 / self.page_size) + 2;
        loop {
            let guard = self.lock.read(range.clone())?;
            let map = self.map.load();
            match self.check_present(&map, &range) {
                Ok(()) => return access(&map, &range),
                Err(GuestRamError::NotPresent(page))
                    if tries > 0
                        && self
                            .fault_in_on_dma
                            .load(std::sync::atomic::Ordering::Acquire) =>
                {
                    drop(guard);
                    tries -= 1;
                    // A plain read of one byte: the userfaultfd fault it takes is
                    // resolved by the fault engine under the page's write lock.
                    let _: u8 = map
                        .mem
                        .read_obj(GuestAddress(page))
                        .map_err(|source| GuestRamError::Access { addr: page, source })?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Postcopy: device DMA that meets a missing page faults it in (through the fault
    /// engine, which must be running) instead of failing. Off by default, and off again
    /// once the memory is ordinary.
    pub fn set_fault_in_on_dma(&self, on: bool) {
        self.fault_in_on_dma
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Fails if `range` is not all guest RAM, or if a page of it is missing (postcopy,
    /// not yet received): touching it here, under a read lock, would block this thread
    /// in a userfaultfd fault that the resolver can only serve under the write lock of
    /// the same page. The postcopy issue resolves such pages before the DMA locks.
    fn check_present(&self, map: &MemoryMap, range: &Range<u64>) -> Result<()> {
        let page = self.page_size;
        map.for_each_piece(range.start, range.end, |_, r, s, e| {
            let first = usize_of((s - r.start) / page);
            let last = usize_of((e - 1 - r.start) / page);
            match (first..=last).find(|&p| !r.states.is_present(p)) {
                None => Ok(()),
                Some(p) => Err(GuestRamError::NotPresent(r.start + p as u64 * page)),
            }
        })
    }

    /// Boot-time loading by code that speaks vm-memory (a kernel loader): runs `f` on the
    /// whole guest memory. `&mut self` proves nobody else can reach guest RAM yet (it is
    /// not shared with a VM, a device or a fault handler), so no lock is needed; a
    /// whole-RAM write lock would take every bucket of the range lock, which is most of
    /// the VMM's start-up time. Writes through vm-memory mark the pages dirty. Refused
    /// for userfaultfd-served RAM (`new_missing`): its pages are missing until served.
    pub fn load_with<R>(
        &mut self,
        f: impl FnOnce(&GuestMemoryMmap<AtomicBitmap>) -> R,
    ) -> Result<R> {
        let map = self.map.load();
        let Some(first) = map.regions.first() else {
            return Err(GuestRamError::NotMapped { start: 0, end: 0 });
        };
        if self.is_missing() {
            return Err(GuestRamError::NotPresent(first.start));
        }
        Ok(f(&map.mem))
    }

    /// Reads a plain-data object at `addr` (see [`GuestRam::read`]).
    pub fn read_obj<T: ByteValued + Default>(&self, addr: u64) -> Result<T> {
        let mut value = T::default();
        self.read(addr, value.as_mut_slice())?;
        Ok(value)
    }

    /// Writes a plain-data object at `addr` (see [`GuestRam::write`]).
    pub fn write_obj<T: ByteValued>(&self, addr: u64, value: T) -> Result<()> {
        self.write(addr, value.as_slice())
    }

    /// Balloon inflate: gives the host pages of `range` back to the host under the
    /// write lock of the range. They read as zero afterwards, are marked ballooned (a
    /// migration never fetches them) and dirty (their content changed).
    pub fn discard(&self, range: Range<u64>) -> Result<()> {
        self.check_aligned("Discard start", range.start)?;
        self.check_aligned("Discard end", range.end)?;
        let _guard = self.lock.write(range.clone())?;
        let map = self.map.load();
        map.for_each_piece(range.start, range.end, |i, r, s, e| {
            madvise_discard(&map.mem, i, s, e)?;
            let page = self.page_size;
            let pages = usize_of((s - r.start) / page)..usize_of((e - r.start) / page);
            r.states.set_ballooned(pages, self.is_missing());
            mark_dirty(&map.mem, s, e);
            Ok(())
        })
    }

    /// Balloon deflate: the guest takes the pages of `range` back (write lock). They
    /// stay zero until touched; nothing is fetched for them.
    pub fn reclaim(&self, range: Range<u64>) -> Result<()> {
        self.check_aligned("Reclaim start", range.start)?;
        self.check_aligned("Reclaim end", range.end)?;
        let _guard = self.lock.write(range.clone())?;
        let map = self.map.load();
        let page = self.page_size;
        map.for_each_piece(range.start, range.end, |_, r, s, e| {
            let pages = usize_of((s - r.start) / page)..usize_of((e - r.start) / page);
            r.states.clear_ballooned(pages);
            Ok(())
        })
    }

    /// The state of the page containing `addr`.
    pub fn page_state(&self, addr: u64) -> Result<PageState> {
        let map = self.map.load();
        let (_, r) = map.region_of(addr).ok_or(GuestRamError::NotMapped {
            start: addr,
            end: addr.saturating_add(1),
        })?;
        let page = usize_of((addr - r.start) / self.page_size);
        let dirty = map
            .mem
            .find_region(GuestAddress(addr))
            .is_some_and(|reg| bitmap_of(reg).is_addr_set(usize_of(addr - r.start)));
        Ok(PageState {
            present: r.states.is_present(page),
            ballooned: r.states.is_ballooned(page),
            dirty,
        })
    }

    /// VMM-side dirty harvest of `range` under its read lock: returns the guest-physical
    /// addresses of the dirty pages and clears their bits. Read the pages' content only
    /// after this returns: a write that races with the harvest either set its bit before
    /// the clear (its data is then already in memory) or after it (next harvest).
    pub fn take_dirty(&self, range: Range<u64>) -> Result<Vec<u64>> {
        self.check_aligned("Harvest start", range.start)?;
        self.check_aligned("Harvest end", range.end)?;
        let _guard = self.lock.read(range.clone())?;
        let map = self.map.load();
        let mut dirty = Vec::new();
        map.for_each_piece(range.start, range.end, |_, r, s, e| {
            let Some(reg) = map.mem.find_region(GuestAddress(s)) else {
                return Err(GuestRamError::NotMapped { start: s, end: e });
            };
            let bitmap = bitmap_of(reg);
            let mut addr = s;
            while addr < e {
                let offset = usize_of(addr - r.start);
                if bitmap.is_addr_set(offset) {
                    bitmap.reset_addr_range(offset, usize_of(self.page_size));
                    dirty.push(addr);
                }
                addr += self.page_size;
            }
            Ok(())
        })?;
        Ok(dirty)
    }

    /// Adds an anonymous region of `size` bytes at `start`, under the write lock of its
    /// range. Both must be multiples of the host page size.
    pub fn add_region(&self, start: u64, size: u64) -> Result<()> {
        self.insert_region(start, size, true, true)
    }

    fn insert_region(&self, start: u64, size: u64, present: bool, shared: bool) -> Result<()> {
        self.check_aligned("Region start", start)?;
        self.check_aligned("Region size", size)?;
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or(GuestRamError::BadSize(size))?;
        let end = start
            .checked_add(size)
            .ok_or(GuestRamError::Overlap { start, size })?;
        // While `build` runs nobody else can reach this GuestRam, so the lock (a wide
        // request over every bucket of the region, the bulk of start-up time) is only
        // taken once it is shared.
        let _guard = if shared {
            Some(self.lock.write(start..end)?)
        } else {
            None
        };
        let page_size = usize_of(self.page_size);
        let granule = NonZeroUsize::new(page_size).ok_or(GuestRamError::BadSize(size))?;
        let bitmap = AtomicBitmap::new(len, granule);
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| GuestRamError::Mmap { start, source })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or(GuestRamError::Overlap { start, size })?;
        // Holding the write lock over [start, end) serializes us with any other change
        // touching this range; `rcu` retries if a disjoint change swapped the map
        // meanwhile.
        let region = Arc::new(region);
        let states = Arc::new(PageStates::new(len / page_size, present));
        let mut result = Ok(());
        self.map.rcu(|old| {
            if old
                .regions
                .iter()
                .any(|r| r.start < end && start < r.start + r.size)
            {
                result = Err(GuestRamError::Overlap { start, size });
                return Arc::clone(old);
            }
            match old.mem.insert_region(Arc::clone(&region)) {
                Ok(mem) => {
                    result = Ok(());
                    let mut regions: Vec<Region> = old
                        .regions
                        .iter()
                        .map(|r| Region {
                            start: r.start,
                            size: r.size,
                            states: Arc::clone(&r.states),
                        })
                        .collect();
                    regions.push(Region {
                        start,
                        size,
                        states: Arc::clone(&states),
                    });
                    regions.sort_by_key(|r| r.start);
                    Arc::new(MemoryMap { mem, regions })
                }
                Err(e) => {
                    result = Err(GuestRamError::Layout(e));
                    Arc::clone(old)
                }
            }
        });
        result
    }

    /// Removes the region that starts at `start`, under the write lock of its range:
    /// waits for every operation inside it. Its memory is unmapped once the last
    /// snapshot of the old map is gone.
    pub fn remove_region(&self, start: u64) -> Result<RegionInfo> {
        let info = {
            let map = self.map.load();
            let r = map
                .regions
                .iter()
                .find(|r| r.start == start)
                .ok_or(GuestRamError::NoRegion(start))?;
            RegionInfo {
                start: r.start,
                size: r.size,
            }
        };
        let _guard = self.lock.write(info.start..info.end())?;
        let mut result = Ok(info);
        self.map.rcu(
            |old| match old.mem.remove_region(GuestAddress(info.start), info.size) {
                Ok((mem, _)) => {
                    result = Ok(info);
                    let regions = old
                        .regions
                        .iter()
                        .filter(|r| r.start != info.start)
                        .map(|r| Region {
                            start: r.start,
                            size: r.size,
                            states: Arc::clone(&r.states),
                        })
                        .collect();
                    Arc::new(MemoryMap { mem, regions })
                }
                Err(_) => {
                    result = Err(GuestRamError::NoRegion(start));
                    Arc::clone(old)
                }
            },
        );
        result
    }
}

/// `madvise` the host pages behind `[start, end)` of region `index` away: MADV_REMOVE
/// for shared mappings (a memfd: the page cache must drop them too), MADV_DONTNEED for
/// private anonymous ones (zero on next touch).
fn madvise_discard(
    mem: &GuestMemoryMmap<AtomicBitmap>,
    index: usize,
    start: u64,
    end: u64,
) -> Result<()> {
    let region = mem
        .iter()
        .nth(index)
        .ok_or(GuestRamError::NotMapped { start, end })?;
    let offset = start - region.start_addr().0;
    let mapping = region.get_mmap();
    let advice = if mapping.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let len = usize_of(end - start);
    // `offset + len` lies within the mapping: [start, end) was found inside this
    // region, whose mapping is `region.len()` bytes long.
    let addr = mapping.as_ptr().wrapping_add(usize_of(offset));
    // SAFETY: `addr .. addr + len` lies inside the live mapping owned by `mapping`
    // (checked above), both ends are host-page aligned (the region start and the range
    // ends are checked multiples of the page size, and mmap returns page-aligned
    // addresses), and the caller holds the write lock of the range, so no Rust
    // reference or in-flight access into these pages exists while the kernel replaces
    // them with zero pages. The mapping stays alive: `mapping` is an Arc.
    let ret = unsafe { libc::madvise(addr.cast(), len, advice) };
    if ret != 0 {
        return Err(GuestRamError::Discard {
            start,
            end,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Marks `[start, end)` dirty in its region's bitmap.
fn mark_dirty(mem: &GuestMemoryMmap<AtomicBitmap>, start: u64, end: u64) {
    if let Some(region) = mem.find_region(GuestAddress(start)) {
        let offset = usize_of(start - region.start_addr().0);
        bitmap_of(region).set_addr_range(offset, usize_of(end - start));
    }
}

/// The whole dirty bitmap of a region (vm-memory's trait method gives a slice view).
fn bitmap_of(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// u64 to usize for offsets and counts inside a mapping, which exists in this address
/// space and so fits a usize.
fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

pub mod dirty;
pub mod faults;
pub mod postcopy;
#[cfg(test)]
mod tests;
