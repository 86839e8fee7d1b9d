//! Postcopy placement: pages that arrive from a migration source are put into guest
//! RAM that userfaultfd serves, under the write lock of their run (DESIGN.md: a
//! background push takes its chunk's write lock), without ever undoing what happened
//! to a page on this side since: a page already present (received on demand, or
//! written by the guest since) is kept, and a page the balloon discarded is dropped, so
//! a late copy can never resurrect it.

use std::ops::Range;
use std::sync::atomic::Ordering;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{usize_of, GuestRam, GuestRamError, Result};
use crate::uffd::{Filled, Userfaultfd};

/// What placing a run of received pages did, page by page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placed {
    /// Copied in (`UFFDIO_COPY`).
    pub copied: u64,
    /// Mapped as zero pages (`UFFDIO_ZEROPAGE`).
    pub zeroed: u64,
    /// Already present: kept as it is.
    pub kept: u64,
    /// Discarded by the balloon: dropped (zero on next touch, never the old content).
    pub dropped: u64,
}

impl Placed {
    /// Adds `other` in.
    pub fn add(&mut self, other: Placed) {
        self.copied += other.copied;
        self.zeroed += other.zeroed;
        self.kept += other.kept;
        self.dropped += other.dropped;
    }

    /// Pages that are now there because of this placement.
    pub fn filled(&self) -> u64 {
        self.copied + self.zeroed
    }
}

impl GuestRam {
    /// Whether this RAM is still served by userfaultfd (a postcopy destination that has
    /// not finished).
    pub fn is_missing(&self) -> bool {
        self.missing.load(Ordering::Acquire)
    }

    /// Places `count` received pages from `gpa` (page aligned, inside one region):
    /// `data` holds their bytes, or `None` for all-zero pages. Takes the write lock of
    /// the whole run. Each page that is missing and not discarded is filled through
    /// `uffd` (which must be the userfaultfd registered for it) and becomes present;
    /// the others are left alone.
    pub fn place_pages(
        &self,
        uffd: &Userfaultfd,
        gpa: u64,
        count: u64,
        data: Option<&[u8]>,
    ) -> Result<Placed> {
        let page = self.page_size;
        self.check_aligned("Placement start", gpa)?;
        let len = count.checked_mul(page).ok_or(GuestRamError::NotMapped {
            start: gpa,
            end: u64::MAX,
        })?;
        let range = Self::range_of(gpa, usize_of(len))?;
        if let Some(d) = data {
            if d.len() as u64 != len {
                return Err(GuestRamError::Unaligned {
                    what: "Placed data length",
                    value: d.len() as u64,
                    page_size: page,
                });
            }
        }
        let _guard = self.lock.write(range.clone())?;
        let map = self.map.load();
        let (_, r) = map.region_of(range.start).ok_or(GuestRamError::NotMapped {
            start: range.start,
            end: range.end,
        })?;
        if range.end > r.start + r.size {
            return Err(GuestRamError::NotMapped {
                start: range.start,
                end: range.end,
            });
        }
        let region =
            map.mem
                .find_region(GuestAddress(range.start))
                .ok_or(GuestRamError::NotMapped {
                    start: range.start,
                    end: range.end,
                })?;
        let base = region.get_mmap().as_ptr() as u64;
        let mut placed = Placed::default();
        // Runs of consecutive pages to fill go in one ioctl each (one UFFDIO_COPY or
        // UFFDIO_ZEROPAGE per run, not per page).
        let mut run: Option<u64> = None;
        for k in 0..=count {
            let fillable = k < count && {
                let index = usize_of((gpa + k * page - r.start) / page);
                if r.states.is_present(index) {
                    placed.kept += 1;
                    false
                } else if r.states.is_ballooned(index) || r.states.is_discarded(index) {
                    placed.dropped += 1;
                    false
                } else {
                    true
                }
            };
            match (fillable, run) {
                (true, None) => run = Some(k),
                (true, Some(_)) => {}
                (false, Some(first)) => {
                    run = None;
                    self.fill_run(uffd, r, base, gpa, first, k, data, &mut placed)?;
                }
                (false, None) => {}
            }
        }
        Ok(placed)
    }

    /// Postcopy after precopy rounds: the pages of `range` hold stale copies (written
    /// on the source after they were sent). Under the range's write lock they are
    /// given back to the kernel and become missing again, so the next touch faults and
    /// fetches the current copy. Only for userfaultfd-served RAM.
    pub fn forget(&self, range: Range<u64>) -> Result<()> {
        self.check_aligned("Forget start", range.start)?;
        self.check_aligned("Forget end", range.end)?;
        if !self.is_missing() {
            return Err(GuestRamError::NotPresent(range.start));
        }
        let _guard = self.lock.write(range.clone())?;
        let map = self.map.load();
        map.for_each_piece(range.start, range.end, |i, r, s, e| {
            super::madvise_discard(&map.mem, i, s, e)?;
            let page = self.page_size;
            r.states
                .clear_present(usize_of((s - r.start) / page)..usize_of((e - r.start) / page));
            Ok(())
        })
    }

    /// Fills pages `first..end` of a placement (relative to `gpa`, all missing and not
    /// discarded, the run's write lock held) with one ioctl, or page by page if the
    /// kernel already had one of them.
    #[allow(clippy::too_many_arguments)]
    fn fill_run(
        &self,
        uffd: &Userfaultfd,
        r: &super::Region,
        base: u64,
        gpa: u64,
        first: u64,
        end: u64,
        data: Option<&[u8]>,
        placed: &mut Placed,
    ) -> Result<()> {
        let page = self.page_size;
        let at = gpa + first * page;
        let host = base + (at - r.start);
        let len = (end - first) * page;
        let bytes =
            |from: u64, to: u64| data.map(|d| &d[usize_of(from * page)..usize_of(to * page)]);
        let filled = match bytes(first, end) {
            // SAFETY: `host .. host + len` is whole host pages inside this region's
            // live mapping (the run was checked to lie inside the region), registered
            // with `uffd` by the caller. No Rust reference into userfaultfd-served
            // memory exists (this crate reaches it only through vm-memory's volatile
            // accesses and the kernel), and the run's write lock keeps every other
            // accessor of the crate off it.
            Some(b) => unsafe { uffd.copy(host, b) }?,
            // SAFETY: as above.
            None => unsafe { uffd.zero(host, len) }?,
        };
        let index = usize_of((at - r.start) / page);
        let pages = usize_of(end - first);
        if filled == Filled::Now {
            r.states.set_present(index..index + pages);
            if data.is_some() {
                placed.copied += end - first;
            } else {
                placed.zeroed += end - first;
            }
            return Ok(());
        }
        // The kernel had one of them (EEXIST, part of the run may be in): page by page.
        for k in first..end {
            let one = base + (gpa + k * page - r.start);
            let f = match bytes(k, k + 1) {
                // SAFETY: as above, one host page of the run.
                Some(b) => unsafe { uffd.copy(one, b) }?,
                // SAFETY: as above.
                None => unsafe { uffd.zero(one, page) }?,
            };
            let i = usize_of((gpa + k * page - r.start) / page);
            r.states.set_present(i..i + 1);
            match (f, data) {
                (Filled::AlreadyThere, _) => placed.kept += 1,
                (Filled::Now, Some(_)) => placed.copied += 1,
                (Filled::Now, None) => placed.zeroed += 1,
            }
        }
        Ok(())
    }

    /// Whether the page containing `gpa` still has to come from a postcopy source:
    /// neither present nor discarded by the balloon (false outside guest RAM).
    pub fn is_fetchable(&self, gpa: u64) -> bool {
        let map = self.map.load();
        map.region_of(gpa).is_some_and(|(_, r)| {
            let p = usize_of((gpa - r.start) / self.page_size);
            !r.states.is_present(p) && !r.states.is_discarded(p)
        })
    }

    /// Whether the page containing `gpa` is present (received, filled or written).
    pub fn is_present(&self, gpa: u64) -> bool {
        self.page_state(gpa).is_ok_and(|s| s.present)
    }

    /// Pages neither present nor discarded: what a postcopy destination still needs
    /// from its source.
    pub fn missing_pages(&self) -> u64 {
        let map = self.map.load();
        let mut n = 0u64;
        for r in &map.regions {
            let pages = usize_of(r.size / self.page_size);
            n += (0..pages)
                .filter(|&p| !r.states.is_present(p) && !r.states.is_discarded(p))
                .count() as u64;
        }
        n
    }

    /// The guest-physical ranges of the pages [`Self::missing_pages`] counts, merged
    /// into runs, in address order.
    pub fn missing_ranges(&self) -> Vec<Range<u64>> {
        let map = self.map.load();
        let page = self.page_size;
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in &map.regions {
            let pages = usize_of(r.size / page);
            for p in 0..pages {
                if !r.states.is_present(p) && !r.states.is_discarded(p) {
                    let at = r.start + p as u64 * page;
                    match out.last_mut() {
                        Some(last) if last.end == at => last.end = at + page,
                        _ => out.push(at..at + page),
                    }
                }
            }
        }
        out
    }

    /// The balloon's invariant, checked: how many pages the balloon holds, and how many
    /// of them do not read as zero (a discarded page that came back with old content
    /// would be one). Pages still missing (postcopy) are zero on touch and count as
    /// zero without being touched.
    pub fn check_ballooned(&self) -> Result<(u64, u64)> {
        let map = self.map.load();
        let page = self.page_size;
        let mut buf = vec![0u8; usize_of(page)];
        let (mut ballooned, mut nonzero) = (0u64, 0u64);
        for r in &map.regions {
            let pages = usize_of(r.size / page);
            for p in 0..pages {
                if !r.states.is_ballooned(p) {
                    continue;
                }
                ballooned += 1;
                if !r.states.is_present(p) {
                    continue;
                }
                let gpa = r.start + p as u64 * page;
                self.read(gpa, &mut buf)?;
                if buf.iter().any(|&b| b != 0) {
                    nonzero += 1;
                }
            }
        }
        Ok((ballooned, nonzero))
    }

    /// The end of postcopy: nothing more comes from the source. Every page still
    /// missing was discarded by the balloon and reads as zero once the userfaultfds
    /// are closed, so every page is marked present (the balloon keeps its claim) and
    /// the memory behaves as ordinary RAM from now on. Call with the userfaultfds
    /// still open, then close them.
    pub fn finish_missing(&self) {
        let map = self.map.load();
        for r in &map.regions {
            let pages = usize_of(r.size / self.page_size);
            r.states.set_present_keep_balloon(0..pages);
        }
        self.missing.store(false, Ordering::Release);
        self.set_fault_in_on_dma(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_page_size;
    use crate::range_lock::LockMode;

    fn ram(pages: u64) -> (GuestRam, Userfaultfd, u64) {
        let page = host_page_size();
        let ram = GuestRam::new_missing(LockMode::Range, &[(0, pages * page)]).unwrap();
        let uffd = Userfaultfd::new().unwrap();
        ram.register_missing(&uffd).unwrap();
        (ram, uffd, page)
    }

    #[test]
    #[cfg_attr(
        not(target_arch = "x86_64"),
        ignore = "userfaultfd is not emulated by qemu-user"
    )]
    fn received_pages_fill_missing_ones_and_keep_or_drop_the_rest() {
        let (ram, uffd, page) = ram(8);
        let p = usize_of(page);
        // Page 1 arrives on demand first; page 3 is discarded by the balloon.
        ram.place_pages(&uffd, page, 1, Some(&vec![0x11; p]))
            .unwrap();
        ram.discard(3 * page..4 * page).unwrap();
        assert_eq!(ram.missing_pages(), 6);
        assert_eq!(
            ram.missing_ranges(),
            vec![0..page, 2 * page..3 * page, 4 * page..8 * page]
        );
        // The background stream brings pages 0..4 with old contents.
        let placed = ram
            .place_pages(&uffd, 0, 4, Some(&vec![0x22; 4 * p]))
            .unwrap();
        assert_eq!(
            placed,
            Placed {
                copied: 2,
                zeroed: 0,
                kept: 1,
                dropped: 1
            }
        );
        let mut b = vec![0u8; p];
        ram.read(page, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x11),
            "a page received first is kept"
        );
        ram.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x22));
        // The discarded page never got the late copy: it is still missing (zero on
        // touch), not present with old content.
        assert!(!ram.is_present(3 * page));
        // Zero runs map zero pages.
        let placed = ram.place_pages(&uffd, 4 * page, 4, None).unwrap();
        assert_eq!(placed.zeroed, 4);
        ram.read(5 * page, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(ram.missing_pages(), 0);
        ram.finish_missing();
        assert!(!ram.is_missing());
        assert!(ram.is_present(3 * page));
        assert!(
            ram.page_state(3 * page).unwrap().ballooned,
            "the balloon keeps its claim"
        );
    }

    #[test]
    #[cfg_attr(
        not(target_arch = "x86_64"),
        ignore = "userfaultfd is not emulated by qemu-user"
    )]
    fn forgotten_pages_are_missing_again_and_take_the_next_copy() {
        let (ram, uffd, page) = ram(4);
        let p = usize_of(page);
        ram.place_pages(&uffd, 0, 4, Some(&vec![0x33; 4 * p]))
            .unwrap();
        assert_eq!(ram.missing_pages(), 0);
        ram.forget(page..3 * page).unwrap();
        assert_eq!(ram.missing_ranges(), vec![page..3 * page]);
        let placed = ram
            .place_pages(&uffd, 0, 4, Some(&vec![0x44; 4 * p]))
            .unwrap();
        assert_eq!((placed.copied, placed.kept), (2, 2));
        let mut b = vec![0u8; p];
        ram.read(page, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x44), "the new copy");
        ram.read(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x33), "kept");
    }

    #[test]
    #[cfg_attr(
        not(target_arch = "x86_64"),
        ignore = "userfaultfd is not emulated by qemu-user"
    )]
    fn placement_checks_its_arguments() {
        let page = host_page_size();
        let ram = GuestRam::new_missing(LockMode::Range, &[(0, 4 * page)]).unwrap();
        let uffd = Userfaultfd::new().unwrap();
        let p = usize_of(page);
        assert!(ram.place_pages(&uffd, 1, 1, None).is_err(), "unaligned");
        assert!(
            ram.place_pages(&uffd, 0, 1, Some(&vec![0; p - 1])).is_err(),
            "short"
        );
        assert!(
            ram.place_pages(&uffd, 3 * page, 2, None).is_err(),
            "past the end"
        );
        assert!(
            ram.place_pages(&uffd, 0, u64::MAX, None).is_err(),
            "overflow"
        );
    }
}
