//! One bucket of the range lock.
//!
//! A bucket has two parts:
//!
//! - `fast`, one atomic word that can hold a single request on its own: the common
//!   case of a page-aligned request within one granule when nothing else is in the
//!   bucket. Taking it is one compare-and-swap from 0; giving it back is one
//!   compare-and-swap back to 0, which fails only if somebody joined the bucket
//!   meanwhile (they set the `SLOW` bit).
//! - `state`, a small mutex over the other requests (held or queued) whose ranges touch
//!   the bucket's granules. Entries are kept in two lists. `narrow` holds pieces
//!   clipped to one granule, sorted by `(start, seq)`, so an overlap query is a binary
//!   search plus a short scan of the window `[start - max_len, end)`. `wide` holds
//!   requests that cover every bucket; those are rare and are scanned in full.
//!
//! Invariant: `state` is non-empty, or a thread holds its mutex and announced itself,
//! only while `SLOW` is set; and the fast holder, if any, arrived before every entry of
//! `state` (it could only get in while the bucket was empty). So the fast holder is the
//! oldest request of its bucket, and every entry that conflicts with it counted it.

use super::sync::{lock, Arc, AtomicU64, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};
use super::Access;

/// Set in `Bucket::fast` while the bucket's mutex-protected list is in use.
pub(crate) const SLOW: u64 = 1 << 62;

/// A request's range(s) as the conflict checks see them: `start..end` is what it locks
/// in this bucket (the whole space in `LockMode::Global`), `req_*` what it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) access: Access,
    pub(crate) req_start: u64,
    pub(crate) req_end: u64,
}

impl Piece {
    fn overlaps(&self, other: &Piece) -> bool {
        self.start < other.end && other.start < self.end
    }

    pub(crate) fn conflicts_with(&self, other: &Piece) -> bool {
        (self.access == Access::Write || other.access == Access::Write) && self.overlaps(other)
    }

    fn requests_overlap(&self, other: &Piece) -> bool {
        self.req_start < other.req_end && other.req_start < self.req_end
    }
}

/// A request that had to wait: how many earlier conflicting entries it still waits for.
#[derive(Debug)]
pub(crate) struct Waiter {
    pending: AtomicUsize,
    state: Mutex<WaitState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct WaitState {
    granted: bool,
    /// The owner sleeps (or is about to) on `cv`: only then is a wake-up, a futex
    /// system call, needed.
    parked: bool,
}

impl Waiter {
    /// A waiter for a request that found `blockers` earlier conflicting requests, or
    /// `None` if it found none (it holds its range at once).
    pub(crate) fn for_blockers(blockers: usize) -> Option<Arc<Self>> {
        (blockers > 0).then(|| Arc::new(Waiter::new(blockers)))
    }

    pub(crate) fn new(pending: usize) -> Self {
        Waiter {
            pending: AtomicUsize::new(pending),
            state: Mutex::new(WaitState::default()),
            cv: Condvar::new(),
        }
    }

    /// One earlier conflicting entry went away; on the last one, wakes the owner if it
    /// went to sleep.
    fn release_one(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut state = lock(&self.state);
            state.granted = true;
            if state.parked {
                self.cv.notify_one();
            }
        }
    }

    /// True once every earlier conflicting entry has been released.
    pub(crate) fn is_granted(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Blocks until every earlier conflicting entry has been released. Spins, then
    /// yields, then sleeps: most waits are a holder's short critical section, and a
    /// sleep/wake round trip costs tens of microseconds.
    pub(crate) fn wait(&self) {
        #[cfg(not(loom))]
        for i in 0..SPIN_ROUNDS + YIELD_ROUNDS {
            if self.is_granted() {
                return;
            }
            if i < SPIN_ROUNDS {
                for _ in 0..(1 << (i / 16).min(5)) {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        let mut state = lock(&self.state);
        // Announced under the mutex: a release that comes after this sees it and
        // notifies; one that came before set `granted`, checked below.
        state.parked = true;
        while !state.granted {
            state = match self.cv.wait(state) {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
        }
    }
}

#[cfg(not(loom))]
const SPIN_ROUNDS: u32 = 96;
#[cfg(not(loom))]
const YIELD_ROUNDS: u32 = 32;

/// A request's presence in one bucket's list.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) piece: Piece,
    /// Arrival order; unique within a bucket and increasing in arrival order.
    pub(crate) seq: u64,
    /// Set when the request had to wait at arrival.
    pub(crate) waiter: Option<Arc<Waiter>>,
}

impl Entry {
    pub(crate) fn new(piece: Piece, seq: u64, waiter: &Option<Arc<Waiter>>) -> Self {
        Entry {
            piece,
            seq,
            waiter: waiter.clone(),
        }
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
    pub(crate) fast: AtomicU64,
    state: Mutex<BucketState>,
}

/// The bucket's list, locked, with the fast holder seen when it was locked.
#[derive(Debug)]
pub(crate) struct Locked<'a> {
    bucket: &'a Bucket,
    pub(crate) state: MutexGuard<'a, BucketState>,
    /// The fast word (without `SLOW`) when the list was locked: 0 if no fast holder.
    pub(crate) fast: u64,
}

impl Bucket {
    /// Locks the bucket's list and sets `SLOW`, so that no fast acquisition happens
    /// until the list is empty again.
    pub(crate) fn lock(&self) -> Locked<'_> {
        let state = lock(&self.state);
        let old = self.fast.fetch_or(SLOW, Ordering::AcqRel);
        Locked {
            bucket: self,
            state,
            fast: old & !SLOW,
        }
    }

    /// Locks the list without announcing anything (for inspection only).
    pub(crate) fn peek(&self) -> (MutexGuard<'_, BucketState>, u64) {
        let state = lock(&self.state);
        let fast = self.fast.load(Ordering::Acquire);
        (state, fast)
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        if self.state.len() == 0 {
            // Nothing left in the list: fast acquisitions may resume.
            self.bucket.fast.fetch_and(!SLOW, Ordering::AcqRel);
        }
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
        self.narrow.partition_point(|e| e.piece.start < lower)
    }

    /// Calls `f` on every entry whose piece overlaps `p`.
    fn for_each_overlapping(&self, p: &Piece, wide: bool, mut f: impl FnMut(&Entry)) {
        for e in &self.wide {
            if e.piece.overlaps(p) {
                f(e);
            }
        }
        let first = if wide { 0 } else { self.window_start(p.start) };
        for e in &self.narrow[first..] {
            if e.piece.start >= p.end {
                break;
            }
            if e.piece.overlaps(p) {
                f(e);
            }
        }
    }

    /// Counts the entries, and the fast holder `fast`, that a new request `p` (its piece
    /// for this bucket) would have to wait for. Everything present arrived earlier, so
    /// FIFO order among conflicting requests falls out of counting queued entries as
    /// well as held ones.
    pub(crate) fn conflicts(&self, p: &Piece, wide: bool, fast: Option<Piece>) -> Conflicts {
        let mut found = Conflicts::default();
        let mut count = |other: &Piece| {
            if other.conflicts_with(p) {
                found.blockers += 1;
                if !other.requests_overlap(p) {
                    found.disjoint += 1;
                }
            }
        };
        if let Some(f) = fast {
            count(&f);
        }
        self.for_each_overlapping(p, wide, |e| count(&e.piece));
        found
    }

    /// Adds an entry. `entry.seq` must be at least the `next_seq()` seen when the
    /// request locked this bucket (a request whose granules alias to one bucket puts
    /// several pieces with the same `seq` here; their starts differ).
    pub(crate) fn insert(&mut self, entry: Entry, wide: bool) {
        debug_assert!(entry.seq + 1 >= self.next_seq);
        self.next_seq = self.next_seq.max(entry.seq + 1);
        if wide {
            self.wide.push(entry);
        } else {
            self.max_len = self.max_len.max(entry.piece.end - entry.piece.start);
            let key = (entry.piece.start, entry.seq);
            let at = self
                .narrow
                .partition_point(|e| (e.piece.start, e.seq) < key);
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
                .binary_search_by(|e| (e.piece.start, e.seq).cmp(&(start, seq)))
            {
                Ok(i) => self.narrow.remove(i),
                Err(_) => return false,
            }
        };
        self.for_each_overlapping(&removed.piece, wide, |e| {
            if e.seq > removed.seq && e.piece.conflicts_with(&removed.piece) {
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

    /// The fast holder `fast` left: signals every entry that conflicts with it (all of
    /// them arrived after it, so all of those counted it).
    pub(crate) fn fast_released(&self, fast: &Piece) {
        self.for_each_overlapping(fast, true, |e| {
            if e.piece.conflicts_with(fast) {
                if let Some(waiter) = &e.waiter {
                    waiter.release_one();
                }
            }
        });
    }

    /// Number of entries (held or queued) in this bucket's list.
    pub(crate) fn len(&self) -> usize {
        self.narrow.len() + self.wide.len()
    }
}
