//! One bucket of the range lock: the requests (held or queued) whose ranges touch the
//! granules that hash to this bucket, under the bucket's own small mutex.
//!
//! Entries are kept in two lists. `narrow` holds pieces clipped to one granule, sorted
//! by `(start, seq)`, so an overlap query is a binary search plus a short scan of the
//! window `[start - max_len, end)`. `wide` holds requests that cover every bucket
//! (ranges of at least `buckets` granules, and every request in `LockMode::Global`);
//! those are rare and are scanned in full.

use super::sync::{lock, Arc, Condvar, Mutex, MutexGuard, Ordering};
use super::Access;
use crate::range_lock::sync::AtomicUsize;

/// A request that had to wait: how many earlier conflicting entries it still waits for.
#[derive(Debug)]
pub(crate) struct Waiter {
    pending: AtomicUsize,
    granted: Mutex<bool>,
    cv: Condvar,
}

impl Waiter {
    pub(crate) fn new(pending: usize) -> Self {
        Waiter {
            pending: AtomicUsize::new(pending),
            granted: Mutex::new(false),
            cv: Condvar::new(),
        }
    }

    /// One earlier conflicting entry went away; wakes the owner on the last one.
    fn release_one(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut granted = lock(&self.granted);
            *granted = true;
            self.cv.notify_one();
        }
    }

    /// True once every earlier conflicting entry has been released.
    pub(crate) fn is_granted(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Blocks until every earlier conflicting entry has been released.
    pub(crate) fn wait(&self) {
        let mut granted = lock(&self.granted);
        while !*granted {
            granted = match self.cv.wait(granted) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

/// A request's presence in one bucket.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The part of the request's (effective) range this bucket is responsible for.
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Arrival order; unique within a bucket and increasing in arrival order.
    pub(crate) seq: u64,
    pub(crate) access: Access,
    /// The range the caller asked for (before `Global` widening), for accounting
    /// waits between requests that did not really overlap.
    pub(crate) req_start: u64,
    pub(crate) req_end: u64,
    /// Set when the request had to wait at arrival.
    pub(crate) waiter: Option<Arc<Waiter>>,
}

impl Entry {
    fn conflicts_with(&self, start: u64, end: u64, access: Access) -> bool {
        (self.access == Access::Write || access == Access::Write)
            && self.start < end
            && start < self.end
    }
}

/// What a new request found in one bucket.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Conflicts {
    /// Earlier entries (held or queued) it must wait for.
    pub(crate) blockers: usize,
    /// Of those, entries whose requested range does not overlap the new one (only
    /// possible in `LockMode::Global`, where every range is widened).
    pub(crate) disjoint: usize,
}

impl std::ops::AddAssign for Conflicts {
    fn add_assign(&mut self, other: Self) {
        self.blockers += other.blockers;
        self.disjoint += other.disjoint;
    }
}

/// The state behind one bucket mutex.
#[derive(Debug, Default)]
pub(crate) struct BucketState {
    narrow: Vec<Entry>,
    wide: Vec<Entry>,
    /// Upper bound on `end - start` of every entry in `narrow`; reset when it empties.
    max_len: u64,
    next_seq: u64,
}

/// A bucket, aligned so that two buckets never share a cache line (nor the adjacent
/// line that x86 prefetches in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Bucket {
    state: Mutex<BucketState>,
}

impl Bucket {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BucketState> {
        lock(&self.state)
    }
}

impl BucketState {
    /// The first sequence number this bucket would hand out.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Index of the first narrow entry that could overlap a range starting at `start`.
    fn window_start(&self, start: u64) -> usize {
        let lower = start.saturating_sub(self.max_len);
        self.narrow.partition_point(|e| e.start < lower)
    }

    /// Calls `f` on every entry whose piece overlaps `[start, end)`.
    fn for_each_overlapping(&self, start: u64, end: u64, wide: bool, mut f: impl FnMut(&Entry)) {
        for e in &self.wide {
            if e.start < end && start < e.end {
                f(e);
            }
        }
        let first = if wide { 0 } else { self.window_start(start) };
        for e in &self.narrow[first..] {
            if e.start >= end {
                break;
            }
            if start < e.end {
                f(e);
            }
        }
    }

    /// Counts the entries a new request `[start, end)` (its piece for this bucket)
    /// would have to wait for. Every entry present arrived earlier, so FIFO order among
    /// conflicting requests falls out of counting queued entries as well as held ones.
    pub(crate) fn conflicts(
        &self,
        start: u64,
        end: u64,
        wide: bool,
        access: Access,
        req: (u64, u64),
    ) -> Conflicts {
        let mut found = Conflicts::default();
        self.for_each_overlapping(start, end, wide, |e| {
            if e.conflicts_with(start, end, access) {
                found.blockers += 1;
                if !(e.req_start < req.1 && req.0 < e.req_end) {
                    found.disjoint += 1;
                }
            }
        });
        found
    }

    /// Adds an entry. `entry.seq` must be at least `next_seq()`.
    pub(crate) fn insert(&mut self, entry: Entry, wide: bool) {
        debug_assert!(entry.seq >= self.next_seq);
        self.next_seq = entry.seq + 1;
        if wide {
            self.wide.push(entry);
        } else {
            self.max_len = self.max_len.max(entry.end - entry.start);
            let key = (entry.start, entry.seq);
            let at = self.narrow.partition_point(|e| (e.start, e.seq) < key);
            self.narrow.insert(at, entry);
        }
    }

    /// Removes the entry `(start, seq)` and signals every later conflicting entry that
    /// was counting on it. Returns false if there was no such entry (a bug).
    pub(crate) fn remove(&mut self, start: u64, seq: u64, wide: bool) -> bool {
        let removed = if wide {
            match self.wide.iter().position(|e| e.seq == seq) {
                Some(i) => self.wide.swap_remove(i),
                None => return false,
            }
        } else {
            match self
                .narrow
                .binary_search_by(|e| (e.start, e.seq).cmp(&(start, seq)))
            {
                Ok(i) => self.narrow.remove(i),
                Err(_) => return false,
            }
        };
        self.for_each_overlapping(removed.start, removed.end, wide, |e| {
            if e.seq > removed.seq && e.conflicts_with(removed.start, removed.end, removed.access) {
                if let Some(waiter) = &e.waiter {
                    waiter.release_one();
                }
            }
        });
        if self.narrow.is_empty() {
            self.max_len = 0;
        }
        true
    }

    /// Number of entries (held or queued) in this bucket.
    pub(crate) fn len(&self) -> usize {
        self.narrow.len() + self.wide.len()
    }
}
