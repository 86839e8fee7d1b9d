//! A reader/writer lock over half-open guest-physical ranges `[start, end)`.
//!
//! # Design
//!
//! Linux's range lock keeps every held and waiting range in one interval tree under one
//! spinlock, so two vCPUs faulting on pages a gigabyte apart still meet on that spinlock.
//! The list-based lock of Kogan, Dice and Issa (EuroSys 2020), which FreeBSD's rangelock
//! follows, removes the spinlock but keeps one sorted list, so every acquisition walks
//! past the ranges already held: its cost grows linearly with them, and every
//! acquisition still touches the list head.
//!
//! Here the address space is cut into *granules* (64 KiB by default) and granule `g` is
//! served by bucket `g mod buckets`. A bucket is a small mutex over the requests whose
//! ranges touch its granules, kept sorted by start. A request takes the mutexes of the
//! buckets it touches in ascending bucket order, counts the earlier conflicting entries
//! (held *or queued*) and either enters as held (none) or queues with that count and
//! sleeps until the releases of those entries bring it to zero. Hence:
//!
//! - Requests on different granules (the common case: vCPUs faulting on different
//!   pages, a harvest of one chunk beside a balloon run elsewhere) touch different
//!   buckets, i.e. different cache lines: they never meet on a shared mutex or counter.
//! - The cost of an acquisition depends on how many entries share its *bucket*, not on
//!   how many ranges the whole lock holds (sub-linear; see `benches/range_lock.rs`).
//! - Fairness is FIFO among overlapping requests: a request waits only for entries that
//!   arrived before it, so no reader or writer waits forever while others keep coming.
//!   Because a request enters all its buckets while holding all their mutexes (two-phase
//!   locking), arrival order is consistent across buckets and waits cannot form a cycle.
//! - A request never waits for one whose range it does not overlap (in `Range` mode).
//!
//! Ranges covering at least `buckets` granules are entered in every bucket as "wide"
//! entries; `LockMode::Global` is one bucket in which every request is widened to the
//! whole address space, i.e. the one-big-lock baseline on the same code path.
//!
//! A thread that holds a range and asks again for an overlapping one may deadlock (like
//! a recursive read of an `RwLock` when a writer queued in between); take several ranges
//! in ascending address order.

mod bucket;
mod sync;

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use bucket::{Bucket, BucketState, Conflicts, Entry, Waiter};
use sync::{Arc, MutexGuard};

/// Errors of the range lock.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeLockError {
    /// `start == end`.
    #[error("Empty range [{start:#x}, {end:#x}): a range lock needs at least one byte")]
    EmptyRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// `start > end`.
    #[error("Inverted range [{start:#x}, {end:#x}): start is above end")]
    InvertedRange {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
    },
    /// Bad granule or bucket count.
    #[error("Bad range lock geometry: granule {granule} and buckets {buckets} must be powers of two, granule at least 2")]
    Geometry {
        /// Requested granule size.
        granule: u64,
        /// Requested bucket count.
        buckets: usize,
    },
    /// Unknown lock mode name.
    #[error("Unknown memory lock mode '{0}' (expected 'range' or 'global')")]
    UnknownMode(String),
}

/// How requests are locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Each request locks only its own range.
    #[default]
    Range,
    /// Every request locks the whole address space: the one-big-lock baseline.
    Global,
}

impl FromStr for LockMode {
    type Err = RangeLockError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "range" => Ok(LockMode::Range),
            "global" => Ok(LockMode::Global),
            other => Err(RangeLockError::UnknownMode(other.to_string())),
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Range => "range",
            LockMode::Global => "global",
        })
    }
}

/// Shared (read) or exclusive (write) access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Shared with overlapping readers.
    Read,
    /// Exclusive of every overlapping holder.
    Write,
}

/// Default granule: 64 KiB, the largest host page we run on (ppc64le), so one host page
/// fault always falls in one bucket.
pub const DEFAULT_GRANULE: u64 = 64 << 10;
/// Default bucket count: 1024 buckets of 64 KiB cover 64 GiB before two granules alias.
pub const DEFAULT_BUCKETS: usize = 1024;

/// The range lock. See the module documentation.
#[derive(Debug)]
pub struct RangeLock {
    mode: LockMode,
    granule_shift: u32,
    bucket_mask: u64,
    buckets: Box<[Bucket]>,
}

/// The buckets a request touches.
#[derive(Debug, Clone, Copy)]
enum Span {
    /// Granules `first .. first + count`, `count < buckets`: one piece per bucket.
    Run { first: u64, count: u64 },
    /// Every bucket, with the whole range as its piece.
    All,
}

impl RangeLock {
    /// A lock with the default geometry.
    pub fn new(mode: LockMode) -> Self {
        // DEFAULT_GRANULE and DEFAULT_BUCKETS are powers of two.
        Self::with_geometry(mode, DEFAULT_GRANULE, DEFAULT_BUCKETS)
            .unwrap_or_else(|_| unreachable!("default geometry is valid"))
    }

    /// A lock with `buckets` buckets of `granule`-byte granules (both powers of two).
    /// `LockMode::Global` always uses one bucket.
    pub fn with_geometry(
        mode: LockMode,
        granule: u64,
        buckets: usize,
    ) -> Result<Self, RangeLockError> {
        if !granule.is_power_of_two() || granule < 2 || !buckets.is_power_of_two() {
            return Err(RangeLockError::Geometry { granule, buckets });
        }
        let buckets = if mode == LockMode::Global { 1 } else { buckets };
        Ok(RangeLock {
            mode,
            granule_shift: granule.trailing_zeros(),
            bucket_mask: buckets as u64 - 1,
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
        })
    }

    /// The lock's mode.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Size of the granule, in bytes.
    pub fn granule(&self) -> u64 {
        1 << self.granule_shift
    }

    /// Number of buckets.
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Bytes of memory this lock occupies (excluding entries of held ranges).
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>() + std::mem::size_of_val(&*self.buckets)
    }

    /// Bytes one held range occupies in each bucket it touches.
    pub const fn entry_size() -> usize {
        std::mem::size_of::<Entry>()
    }

    /// Blocks until `range` is held shared.
    pub fn read(&self, range: Range<u64>) -> Result<RangeGuard<'_>, RangeLockError> {
        self.lock(range, Access::Read)
    }

    /// Blocks until `range` is held exclusively.
    pub fn write(&self, range: Range<u64>) -> Result<RangeGuard<'_>, RangeLockError> {
        self.lock(range, Access::Write)
    }

    /// Blocks until `range` is held with `access`.
    pub fn lock(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<RangeGuard<'_>, RangeLockError> {
        Ok(self.enqueue(range, access)?.wait())
    }

    /// Takes `range` shared if nothing conflicting is held or queued; `Ok(None)` if it
    /// would have to wait.
    pub fn try_read(&self, range: Range<u64>) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        self.try_lock(range, Access::Read)
    }

    /// Takes `range` exclusively if nothing overlapping is held or queued; `Ok(None)`
    /// if it would have to wait.
    pub fn try_write(&self, range: Range<u64>) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        self.try_lock(range, Access::Write)
    }

    /// Takes `range` with `access` if that needs no waiting; `Ok(None)` otherwise.
    pub fn try_lock(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        Ok(self.acquire(range, access, false)?.map(|p| p.guard))
    }

    /// Queues a request for `range` and returns at once. The request keeps its place
    /// (FIFO among overlapping requests) until [`Pending::wait`] turns it into a guard
    /// or the `Pending` is dropped, which withdraws it. A postcopy fetch can queue on
    /// a page, send its network request, and only then wait.
    pub fn enqueue(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<Pending<'_>, RangeLockError> {
        self.acquire(range, access, true)
            .map(|p| p.unwrap_or_else(|| unreachable!("a blocking request is always queued")))
    }

    /// True if no range is held or queued.
    pub fn is_idle(&self) -> bool {
        self.buckets.iter().all(|b| b.lock().len() == 0)
    }

    fn span(&self, start: u64, end: u64) -> Span {
        if self.mode == LockMode::Global {
            return Span::All;
        }
        let first = start >> self.granule_shift;
        let count = ((end - 1) >> self.granule_shift) - first + 1;
        if count > self.bucket_mask {
            Span::All
        } else {
            Span::Run { first, count }
        }
    }

    /// The piece of `[start, end)` that granule `g` holds.
    fn piece(&self, g: u64, start: u64, end: u64) -> (u64, u64) {
        let g_start = g << self.granule_shift;
        let g_end = g_start.saturating_add(1 << self.granule_shift);
        (start.max(g_start), end.min(g_end))
    }

    /// Bucket index of granule `g`.
    fn bucket_of(&self, g: u64) -> usize {
        // The mask is below `buckets.len()`, a usize.
        usize::try_from(g & self.bucket_mask).unwrap_or(0)
    }

    /// Calls `f(bucket, piece_start, piece_end, wide)` for every bucket the effective
    /// range `[start, end)` touches, in ascending bucket order.
    fn for_each_piece(&self, start: u64, end: u64, mut f: impl FnMut(usize, u64, u64, bool)) {
        match self.span(start, end) {
            Span::All => {
                for b in 0..self.buckets.len() {
                    f(b, start, end, true);
                }
            }
            Span::Run { first, count } => {
                // Granules first..first+count map to consecutive buckets, possibly
                // wrapping past the last one; visit the wrapped part first so bucket
                // indices ascend.
                let first_bucket = first & self.bucket_mask;
                let wrapped = (first_bucket + count).saturating_sub(self.bucket_mask + 1);
                let unwrapped = count - wrapped;
                for i in 0..wrapped {
                    let g = first + unwrapped + i;
                    let (s, e) = self.piece(g, start, end);
                    f(self.bucket_of(g), s, e, false);
                }
                for i in 0..unwrapped {
                    let g = first + i;
                    let (s, e) = self.piece(g, start, end);
                    f(self.bucket_of(g), s, e, false);
                }
            }
        }
    }

    fn acquire(
        &self,
        range: Range<u64>,
        access: Access,
        block: bool,
    ) -> Result<Option<Pending<'_>>, RangeLockError> {
        let (req_start, req_end) = (range.start, range.end);
        if req_start == req_end {
            return Err(RangeLockError::EmptyRange {
                start: req_start,
                end: req_end,
            });
        }
        if req_start > req_end {
            return Err(RangeLockError::InvertedRange {
                start: req_start,
                end: req_end,
            });
        }
        let (start, end) = match self.mode {
            LockMode::Range => (req_start, req_end),
            LockMode::Global => (0, u64::MAX),
        };
        let req = (req_start, req_end);

        // Fast path: one bucket, no allocation.
        let single = match self.span(start, end) {
            Span::Run { first, count: 1 } => {
                Some((self.bucket_of(first), self.piece(first, start, end), false))
            }
            Span::All if self.buckets.len() == 1 => Some((0, (start, end), true)),
            _ => None,
        };
        if let Some((bucket, (s, e), wide)) = single {
            let mut state = self.buckets[bucket].lock();
            let found = state.conflicts(s, e, wide, access, req);
            if found.blockers > 0 && !block {
                return Ok(None);
            }
            let waiter = (found.blockers > 0).then(|| Arc::new(Waiter::new(found.blockers)));
            let seq = state.next_seq();
            state.insert(
                Entry {
                    start: s,
                    end: e,
                    seq,
                    access,
                    req_start,
                    req_end,
                    waiter: waiter.clone(),
                },
                wide,
            );
            drop(state);
            let guard = RangeGuard::new(self, start, end, access, seq, found);
            return Ok(Some(Pending { guard, waiter }));
        }

        // General path: take every bucket's mutex in ascending order.
        let mut held: Vec<(MutexGuard<'_, BucketState>, u64, u64, bool)> = Vec::new();
        let mut found = Conflicts::default();
        let mut seq = 0;
        self.for_each_piece(start, end, |b, s, e, wide| {
            let state = self.buckets[b].lock();
            found += state.conflicts(s, e, wide, access, req);
            seq = seq.max(state.next_seq());
            held.push((state, s, e, wide));
        });
        if found.blockers > 0 && !block {
            return Ok(None);
        }
        let waiter = (found.blockers > 0).then(|| Arc::new(Waiter::new(found.blockers)));
        for (state, s, e, wide) in held.iter_mut() {
            state.insert(
                Entry {
                    start: *s,
                    end: *e,
                    seq,
                    access,
                    req_start,
                    req_end,
                    waiter: waiter.clone(),
                },
                *wide,
            );
        }
        drop(held);
        let guard = RangeGuard::new(self, start, end, access, seq, found);
        Ok(Some(Pending { guard, waiter }))
    }

    fn release(&self, start: u64, end: u64, seq: u64) {
        self.for_each_piece(start, end, |b, s, _e, wide| {
            let removed = self.buckets[b].lock().remove(s, seq, wide);
            debug_assert!(removed, "released range was not in bucket {b}");
        });
    }
}

/// A queued request; see [`RangeLock::enqueue`]. Dropping it withdraws the request.
#[must_use = "the request is withdrawn as soon as it is dropped"]
#[derive(Debug)]
pub struct Pending<'a> {
    guard: RangeGuard<'a>,
    waiter: Option<Arc<Waiter>>,
}

impl<'a> Pending<'a> {
    /// True once every earlier conflicting request has been released.
    pub fn is_granted(&self) -> bool {
        self.waiter.as_ref().is_none_or(|w| w.is_granted())
    }

    /// Blocks until the range is held.
    pub fn wait(self) -> RangeGuard<'a> {
        if let Some(w) = &self.waiter {
            w.wait();
        }
        self.guard
    }
}

/// A held range; released on drop.
#[must_use = "the range is released as soon as the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    start: u64,
    end: u64,
    access: Access,
    seq: u64,
    found: Conflicts,
}

impl<'a> RangeGuard<'a> {
    fn new(
        lock: &'a RangeLock,
        start: u64,
        end: u64,
        access: Access,
        seq: u64,
        found: Conflicts,
    ) -> Self {
        RangeGuard {
            lock,
            start,
            end,
            access,
            seq,
            found,
        }
    }

    /// The locked range (the whole address space in `LockMode::Global`).
    pub fn range(&self) -> Range<u64> {
        self.start..self.end
    }

    /// Shared or exclusive.
    pub fn access(&self) -> Access {
        self.access
    }

    /// How many earlier conflicting requests this one waited for (0: uncontended).
    pub fn blockers(&self) -> usize {
        self.found.blockers
    }

    /// How many of those did not overlap the range asked for: always 0 in
    /// `LockMode::Range`, the cost of the one big lock in `LockMode::Global`.
    pub fn disjoint_blockers(&self) -> usize {
        self.found.disjoint
    }
}

impl fmt::Debug for RangeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RangeGuard")
            .field("range", &(self.start..self.end))
            .field("access", &self.access)
            .finish()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.start, self.end, self.seq);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
