//! The dirty set for migration: the hypervisor's dirty log (KVM's, in manual-protect
//! mode) OR-ed with the VMM's own bitmap (device writes), harvested chunk by chunk,
//! each chunk under the read lock of its range, so that vCPU faults, balloon work and
//! DMA elsewhere never wait for a harvest.

use std::ops::Range;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{bitmap_of, usize_of, GuestRam, GuestRamError, Result};

/// Pages per u64 word of a dirty bitmap.
const WORD_PAGES: u64 = 64;

/// A hypervisor's dirty log of guest RAM, one memory slot per region (region `i` of
/// [`GuestRam::regions`] is slot `i`), one bit per host page from the region's start.
pub trait DirtyLog {
    /// A snapshot of slot `slot`'s dirty bitmap (`size` bytes of RAM). In manual-protect
    /// mode this does not clear or re-protect anything.
    fn dirty_bitmap(&self, slot: u32, size: u64) -> std::io::Result<Vec<u64>>;

    /// Clears the bits set in `bits`, which describe pages `first_page ..` of the slot
    /// (`first_page` a multiple of 64), and write-protects those pages again so the
    /// next write sets the bit anew.
    fn clear_dirty(&self, slot: u32, first_page: u64, bits: &[u64]) -> std::io::Result<()>;
}

/// What a harvest did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Chunks harvested (each under its own read lock).
    pub chunks: u64,
    /// Dirty pages found.
    pub pages: u64,
    /// The longest time one chunk held its read lock.
    pub max_lock_hold: Duration,
    /// The whole harvest.
    pub elapsed: Duration,
}

impl GuestRam {
    /// Harvests the dirty pages of all guest RAM: for each chunk of `chunk` bytes (rounded
    /// up to a multiple of 64 host pages), under the read lock of that chunk, the pages
    /// `log` (if any) reports dirty are cleared in the log and the VMM's own bitmap is
    /// taken, and their union is returned as guest-physical addresses, in order.
    ///
    /// Contract for migration: read a page's content only after the harvest that
    /// reported it; a write racing with the harvest is either in that content or
    /// reported by the next harvest.
    pub fn harvest_dirty(
        &self,
        log: Option<&dyn DirtyLog>,
        chunk: u64,
    ) -> Result<(Vec<u64>, HarvestStats)> {
        let start = Instant::now();
        let page = self.page_size;
        let chunk_pages = chunk.div_ceil(page).div_ceil(WORD_PAGES).max(1) * WORD_PAGES;
        let mut stats = HarvestStats::default();
        let mut dirty = Vec::new();
        for (slot, region) in (0u32..).zip(self.regions()) {
            let kvm = match log {
                Some(log) => log
                    .dirty_bitmap(slot, region.size)
                    .map_err(|source| GuestRamError::DirtyLog { slot, source })?,
                None => Vec::new(),
            };
            let region_pages = region.size / page;
            let mut first = 0;
            while first < region_pages {
                let pages = chunk_pages.min(region_pages - first);
                let range = region.start + first * page..region.start + (first + pages) * page;
                let words =
                    usize_of(first / WORD_PAGES)..usize_of((first + pages).div_ceil(WORD_PAGES));
                let bits = kvm.get(words).unwrap_or(&[]);
                let held = self.harvest_chunk(log, slot, first, bits, range, &mut dirty)?;
                stats.max_lock_hold = stats.max_lock_hold.max(held);
                stats.chunks += 1;
                first += pages;
            }
        }
        stats.pages = dirty.len() as u64;
        stats.elapsed = start.elapsed();
        Ok((dirty, stats))
    }

    /// One chunk under its read lock; returns how long the lock was held.
    fn harvest_chunk(
        &self,
        log: Option<&dyn DirtyLog>,
        slot: u32,
        first_page: u64,
        kvm_bits: &[u64],
        range: Range<u64>,
        dirty: &mut Vec<u64>,
    ) -> Result<Duration> {
        let guard = self.lock.read(range.clone())?;
        let locked = Instant::now();
        if let Some(log) = log {
            if kvm_bits.iter().any(|&w| w != 0) {
                log.clear_dirty(slot, first_page, kvm_bits)
                    .map_err(|source| GuestRamError::DirtyLog { slot, source })?;
            }
        }
        let map = self.map.load();
        let Some(reg) = map.mem.find_region(GuestAddress(range.start)) else {
            return Err(GuestRamError::NotMapped {
                start: range.start,
                end: range.end,
            });
        };
        let bitmap = bitmap_of(reg);
        let region_start = range.start - first_page * self.page_size;
        let mut addr = range.start;
        let mut index = 0usize;
        while addr < range.end {
            let offset = usize_of(addr - region_start);
            let in_log = kvm_bits
                .get(index / 64)
                .is_some_and(|w| w & (1 << (index % 64)) != 0);
            let in_vmm = bitmap.is_addr_set(offset);
            if in_vmm {
                bitmap.reset_addr_range(offset, usize_of(self.page_size));
            }
            if in_log || in_vmm {
                dirty.push(addr);
            }
            addr += self.page_size;
            index += 1;
        }
        let held = locked.elapsed();
        drop(guard);
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LockMode;
    use std::sync::Mutex;

    /// A dirty log over fixed bitmaps, recording the clears.
    struct FakeLog {
        bitmaps: Vec<Vec<u64>>,
        clears: Mutex<Vec<(u32, u64, Vec<u64>)>>,
    }

    impl DirtyLog for FakeLog {
        fn dirty_bitmap(&self, slot: u32, _size: u64) -> std::io::Result<Vec<u64>> {
            Ok(self.bitmaps[slot as usize].clone())
        }
        fn clear_dirty(&self, slot: u32, first_page: u64, bits: &[u64]) -> std::io::Result<()> {
            self.clears
                .lock()
                .unwrap()
                .push((slot, first_page, bits.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn harvest_is_the_union_of_the_log_and_the_vmm_bitmap() {
        let page = crate::host_page_size();
        // Two regions of 256 pages; the second starts at page 1024.
        let ram = GuestRam::new(
            LockMode::Range,
            &[(0, 256 * page), (1024 * page, 256 * page)],
        )
        .unwrap();
        // Forget the pages the constructor's zeroing may have marked.
        ram.harvest_dirty(None, 64 * page).unwrap();
        // The "hypervisor" saw pages 3 and 130 of region 0 and 0 of region 1 written.
        let mut r0 = vec![0u64; 4];
        r0[0] = 1 << 3;
        r0[2] = 1 << 2;
        let mut r1 = vec![0u64; 4];
        r1[0] = 1;
        let log = FakeLog {
            bitmaps: vec![r0, r1],
            clears: Mutex::new(Vec::new()),
        };
        // A device wrote page 5 and page 3 (already in the log).
        ram.write(5 * page, &[1]).unwrap();
        ram.write(3 * page + 7, &[1]).unwrap();
        let (dirty, stats) = ram.harvest_dirty(Some(&log), 64 * page).unwrap();
        assert_eq!(dirty, vec![3 * page, 5 * page, 130 * page, 1024 * page]);
        assert_eq!(stats.pages, 4);
        assert_eq!(stats.chunks, 8, "4 chunks of 64 pages per region");
        // Only chunks with log bits were cleared, with their own first page.
        let clears = log.clears.lock().unwrap().clone();
        assert_eq!(
            clears,
            vec![
                (0, 0, vec![1 << 3]),
                (0, 128, vec![1 << 2]),
                (1, 0, vec![1])
            ]
        );
        // The VMM bitmap was taken: without the log nothing is left.
        assert_eq!(
            ram.harvest_dirty(None, 64 * page).unwrap().0,
            Vec::<u64>::new()
        );
    }

    #[test]
    fn chunks_are_rounded_to_whole_bitmap_words() {
        let page = crate::host_page_size();
        let ram = GuestRam::new(LockMode::Range, &[(0, 200 * page)]).unwrap();
        let (_, stats) = ram.harvest_dirty(None, page).unwrap();
        // 1 page rounds up to 64: 200 pages are 4 chunks (64, 64, 64, 8).
        assert_eq!(stats.chunks, 4);
    }
}
