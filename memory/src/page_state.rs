//! Per-page state of guest memory, one atomic byte per host page.
//!
//! `present` (postcopy: the page has been received or zero-filled; always set for a
//! guest that was not migrated in) and `ballooned` (the guest's balloon discarded it:
//! it is zero on next touch and never fetched from a migration source). The third state
//! of DESIGN.md, `dirty`, is the region's `AtomicBitmap` (vm-memory marks it on every
//! VMM-side write), so there is one source of truth for it.

use std::sync::atomic::{AtomicU8, Ordering};

const PRESENT: u8 = 1 << 0;
const BALLOONED: u8 = 1 << 1;
/// Given back to the host (madvise) and not filled since: zero on next touch, never
/// fetched. Survives a balloon deflate, which only ends the balloon's claim.
const DISCARDED: u8 = 1 << 2;

/// A snapshot of one page's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageState {
    /// Received or zero-filled (postcopy), or simply there (no migration).
    pub present: bool,
    /// Discarded by the balloon.
    pub ballooned: bool,
    /// Written by the VMM since the last harvest.
    pub dirty: bool,
}

/// The state bytes of one region.
#[derive(Debug)]
pub(crate) struct PageStates {
    bits: Box<[AtomicU8]>,
}

impl PageStates {
    /// `pages` pages, all present or all missing.
    pub(crate) fn new(pages: usize, present: bool) -> Self {
        let init = if present { PRESENT } else { 0 };
        PageStates {
            bits: (0..pages).map(|_| AtomicU8::new(init)).collect(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.bits.len()
    }

    fn load(&self, page: usize) -> u8 {
        self.bits.get(page).map_or(0, |b| b.load(Ordering::Acquire))
    }

    pub(crate) fn is_present(&self, page: usize) -> bool {
        self.load(page) & PRESENT != 0
    }

    pub(crate) fn is_ballooned(&self, page: usize) -> bool {
        self.load(page) & BALLOONED != 0
    }

    fn update(&self, pages: std::ops::Range<usize>, set: u8, clear: u8) {
        for b in self.bits.get(pages).unwrap_or(&[]) {
            b.fetch_or(set, Ordering::AcqRel);
            b.fetch_and(!clear, Ordering::AcqRel);
        }
    }

    pub(crate) fn is_discarded(&self, page: usize) -> bool {
        self.load(page) & DISCARDED != 0
    }

    /// The pages were discarded by the balloon. With `missing` (memory served by
    /// userfaultfd) they are no longer present: the next touch faults and is zero-filled.
    pub(crate) fn set_ballooned(&self, pages: std::ops::Range<usize>, missing: bool) {
        let clear = if missing { PRESENT } else { 0 };
        self.update(pages, BALLOONED | DISCARDED, clear);
    }

    /// The balloon gave the pages back (deflate).
    pub(crate) fn clear_ballooned(&self, pages: std::ops::Range<usize>) {
        self.update(pages, 0, BALLOONED);
    }

    /// The pages are there, whatever the balloon holds (the end of postcopy: a page
    /// still missing was discarded and reads as zero once userfaultfd is gone).
    pub(crate) fn set_present_keep_balloon(&self, pages: std::ops::Range<usize>) {
        self.update(pages, PRESENT, 0);
    }

    /// The pages are missing again (postcopy: a stale copy was dropped); the balloon's
    /// bits stay.
    pub(crate) fn clear_present(&self, pages: std::ops::Range<usize>) {
        self.update(pages, 0, PRESENT);
    }

    /// The pages now hold data (received, zero-filled, or written by the VMM).
    pub(crate) fn set_present(&self, pages: std::ops::Range<usize>) {
        self.update(pages, PRESENT, BALLOONED | DISCARDED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_set_and_clear_independently() {
        let s = PageStates::new(4, false);
        assert!(!s.is_present(0));
        s.set_ballooned(1..3, false);
        assert!(s.is_ballooned(1) && s.is_ballooned(2) && !s.is_ballooned(3));
        s.set_present(2..4);
        assert!(
            s.is_present(2) && !s.is_ballooned(2),
            "data clears ballooned"
        );
        assert!(s.is_ballooned(1) && !s.is_present(1));
        s.clear_ballooned(0..4);
        assert!(!s.is_ballooned(1));
        assert!(s.is_discarded(1), "zero on touch until filled");
        // Userfaultfd-served memory: a discarded page is missing again.
        s.set_ballooned(2..3, true);
        assert!(!s.is_present(2) && s.is_ballooned(2) && s.is_discarded(2));
        // Out of range is ignored, never a panic.
        assert!(!s.is_present(100));
        s.set_present(3..100);
        assert_eq!(s.len(), 4);
    }
}
