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
//! served by bucket `(g ^ g >> log2(buckets)) mod buckets`. A bucket is one cache line
//! pair with two parts:
//!
//! - a *fast word*: a page-aligned request inside one granule that finds the bucket
//!   empty stores itself (start, length, mode) in the word with one compare-and-swap,
//!   and leaves with one more. This is the uncontended vCPU fault, DMA or harvest of one
//!   page: two atomic operations on a line no other granule's requests touch.
//! - a small mutex over a list of the other requests (held or queued) whose ranges
//!   touch the bucket's granules, sorted by start. A request that does not fit the fast
//!   word, or finds the bucket in use, takes the mutexes of the buckets it touches in
//!   ascending bucket order, sets their `SLOW` bit (which closes the fast path until the
//!   list is empty again), counts the earlier conflicting requests (the fast holder,
//!   held entries *and queued ones*) and either enters as held (none) or queues with
//!   that count and waits until the releases of those requests bring it to zero.
//!   Waiters spin, then yield, then sleep; a release only makes a wake-up system call
//!   for a waiter that really went to sleep.
//! - a blocking request that would fit the fast word but finds it taken by a
//!   conflicting holder, with nothing queued in the bucket, first spins a bounded while
//!   for the word to free up: a hand-over then costs a cache-line transfer (about what
//!   `std::sync::RwLock` pays) instead of a trip through the list. After the bound it
//!   queues like everybody else, and it never spins while anything is queued, so FIFO
//!   among queued requests holds.
//!
//! Hence:
//!
//! - Requests on different granules (the common case: vCPUs faulting on different
//!   pages, a harvest of one chunk beside a balloon run elsewhere) touch different
//!   buckets, i.e. different cache lines: they never meet on a shared mutex or counter.
//! - The cost of an acquisition depends on what shares its *bucket*, not on how many
//!   ranges the whole lock holds (sub-linear; see `benches/range_lock.rs`).
//! - Fairness is FIFO among overlapping requests: a request waits only for requests
//!   that arrived before it, so no reader or writer waits forever while others keep
//!   coming; the fast path cannot overtake a queue either, as it needs an empty bucket.
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

use bucket::{Bucket, Conflicts, Entry, Locked, Piece, Waiter, SLOW};
use sync::{Arc, Ordering};

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
/// Default bucket count: 1024 buckets of 64 KiB granules cover 64 MiB before two
/// granules share a bucket. `RangeLock::for_memory` sizes the count to the guest.
pub const DEFAULT_BUCKETS: usize = 1024;

/// The range lock. See the module documentation.
#[derive(Debug)]
pub struct RangeLock {
    mode: LockMode,
    granule_shift: u32,
    /// Fast words count in units of 1/32 granule; requests not aligned to one take the
    /// lists. With granules under 32 bytes the mask is all ones (no fast path).
    fast_unit_shift: u32,
    fast_unit_mask: u64,
    /// `FAST_PRESENT`, plus `FAST_GLOBAL` in `LockMode::Global`.
    fast_flags: u64,
    /// Highest start a fast word can encode.
    fast_max_start: u64,
    bucket_mask: u64,
    buckets: Box<[Bucket]>,
    stats: WaitStats,
}

/// What blocking requests have waited for (see [`RangeLock::stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LockStats {
    /// Blocking acquisitions that had to wait (spin or queue).
    pub waits: u64,
    /// Of those, waits for requests whose asked-for ranges did not overlap: always 0 in
    /// `LockMode::Range`, the price of the one big lock in `LockMode::Global`.
    pub disjoint_waits: u64,
    /// Total time spent waiting, in nanoseconds.
    pub wait_ns: u64,
}

/// Counters written only by requests that waited (already off the fast path), on a
/// line of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WaitStats {
    waits: std::sync::atomic::AtomicU64,
    disjoint_waits: std::sync::atomic::AtomicU64,
    wait_ns: std::sync::atomic::AtomicU64,
}

impl WaitStats {
    fn record(&self, waited: std::time::Duration, disjoint: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.waits.fetch_add(1, Relaxed);
        if disjoint {
            self.disjoint_waits.fetch_add(1, Relaxed);
        }
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.wait_ns.fetch_add(ns, Relaxed);
    }

    fn snapshot(&self) -> LockStats {
        use std::sync::atomic::Ordering::Relaxed;
        LockStats {
            waits: self.waits.load(Relaxed),
            disjoint_waits: self.disjoint_waits.load(Relaxed),
            wait_ns: self.wait_ns.load(Relaxed),
        }
    }
}

/// The buckets a request touches.
#[derive(Debug, Clone, Copy)]
enum Span {
    /// Granules `first .. first + count`, `count < buckets`: one piece per granule.
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

    /// A lock sized for `bytes` of guest memory on a host with `page_size`-byte pages:
    /// granules of 64 KiB (or one host page, if larger) and enough buckets that the
    /// memory's granules do not alias (one granule per bucket), within [64, 16384].
    pub fn for_memory(mode: LockMode, bytes: u64, page_size: u64) -> Self {
        let granule = DEFAULT_GRANULE.max(page_size.next_power_of_two());
        let buckets = (bytes / granule).clamp(64, 16384).next_power_of_two();
        Self::with_geometry(mode, granule, usize::try_from(buckets).unwrap_or(16384))
            .unwrap_or_else(|_| Self::new(mode))
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
        let granule_shift = granule.trailing_zeros();
        let (fast_unit_shift, fast_unit_mask) = match granule_shift.checked_sub(FAST_UNITS_LOG2) {
            Some(shift) => (shift, (1 << shift) - 1),
            None => (0, u64::MAX),
        };
        let fast_flags = match mode {
            LockMode::Range => FAST_PRESENT,
            LockMode::Global => FAST_PRESENT | FAST_GLOBAL,
        };
        let fast_max_start = 1u64
            .checked_shl(fast_unit_shift + FAST_START_BITS)
            .map_or(u64::MAX, |limit| limit - 1);
        Ok(RangeLock {
            mode,
            granule_shift,
            fast_max_start,
            fast_unit_shift,
            fast_unit_mask,
            fast_flags,
            bucket_mask: buckets as u64 - 1,
            buckets: (0..buckets).map(|_| Bucket::default()).collect(),
            stats: WaitStats::default(),
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
    #[inline(always)]
    pub fn read(&self, range: Range<u64>) -> Result<RangeGuard<'_>, RangeLockError> {
        self.lock(range, Access::Read)
    }

    /// Blocks until `range` is held exclusively.
    #[inline(always)]
    pub fn write(&self, range: Range<u64>) -> Result<RangeGuard<'_>, RangeLockError> {
        self.lock(range, Access::Write)
    }

    /// Blocks until `range` is held with `access`.
    #[inline(always)]
    pub fn lock(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<RangeGuard<'_>, RangeLockError> {
        if let Some(guard) = self.try_fast(range.start, range.end, access) {
            return Ok(guard);
        }
        self.lock_slow(range, access)
    }

    /// Everything after a failed fast attempt, with the wait accounted in `stats`.
    #[inline(never)]
    fn lock_slow(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<RangeGuard<'_>, RangeLockError> {
        let started = std::time::Instant::now();
        if let Some((guard, disjoint)) = self.spin_fast(range.start, range.end, access) {
            self.stats.record(started.elapsed(), disjoint);
            return Ok(guard);
        }
        let pending = self.enqueue_listed(range, access)?;
        if pending.is_granted() {
            return Ok(pending.wait());
        }
        let guard = pending.wait();
        self.stats
            .record(started.elapsed(), guard.disjoint_blockers() > 0);
        Ok(guard)
    }

    /// What blocking requests have waited for so far.
    pub fn stats(&self) -> LockStats {
        self.stats.snapshot()
    }

    /// When the bucket's only occupant is a conflicting fast holder, spins a little for
    /// it to leave and takes the word then: a hand-over costs a cache-line transfer
    /// instead of a trip through the list. Bounded, and never while anything is queued
    /// in the bucket (`SLOW`), so it cannot overtake a queue; after the bound the caller
    /// queues in FIFO order like everybody else.
    #[cfg(not(loom))]
    #[inline(never)]
    fn spin_fast(
        &self,
        req_start: u64,
        req_end: u64,
        access: Access,
    ) -> Option<(RangeGuard<'_>, bool)> {
        let (bucket, word) = self.fast_word(req_start, req_end, access)?;
        let mut disjoint = false;
        let me = self.decode_fast(word)?;
        let fast = &self.buckets[bucket].fast;
        for round in 0..FAST_SPIN_ROUNDS {
            let current = fast.load(Ordering::Relaxed);
            if current == 0 {
                if fast
                    .compare_exchange(0, word, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    let guard = RangeGuard {
                        lock: self,
                        word,
                        bucket,
                        listed: Listed::default(),
                    };
                    return Some((guard, disjoint));
                }
                continue;
            }
            // Something is queued, or the holder does not conflict with us (the list
            // grants at once): no point in spinning.
            let holder = self.decode_fast(current & !SLOW)?;
            if current & SLOW != 0 || !holder.conflicts_with(&me) {
                return None;
            }
            disjoint = !(holder.req_start < req_end && req_start < holder.req_end);
            for _ in 0..(1u32 << (round / 8).min(6)) {
                std::hint::spin_loop();
            }
        }
        None
    }

    #[cfg(loom)]
    fn spin_fast(&self, _: u64, _: u64, _: Access) -> Option<(RangeGuard<'_>, bool)> {
        None
    }

    /// Takes `range` shared if nothing conflicting is held or queued; `Ok(None)` if it
    /// would have to wait.
    #[inline]
    pub fn try_read(&self, range: Range<u64>) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        self.try_lock(range, Access::Read)
    }

    /// Takes `range` exclusively if nothing overlapping is held or queued; `Ok(None)`
    /// if it would have to wait.
    #[inline]
    pub fn try_write(&self, range: Range<u64>) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        self.try_lock(range, Access::Write)
    }

    /// Takes `range` with `access` if that needs no waiting; `Ok(None)` otherwise.
    #[inline]
    pub fn try_lock(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<Option<RangeGuard<'_>>, RangeLockError> {
        match self.try_fast(range.start, range.end, access) {
            Some(guard) => Ok(Some(guard)),
            None => Ok(self.acquire_listed(range, access, false)?.map(|p| p.guard)),
        }
    }

    /// Queues a request for `range` and returns at once. The request keeps its place
    /// (FIFO among overlapping requests) until [`Pending::wait`] turns it into a guard
    /// or the `Pending` is dropped, which withdraws it. A postcopy fetch can queue on
    /// a page, send its network request, and only then wait.
    #[inline]
    pub fn enqueue(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<Pending<'_>, RangeLockError> {
        match self.try_fast(range.start, range.end, access) {
            Some(guard) => Ok(Pending {
                guard,
                waiter: None,
            }),
            None => self.enqueue_listed(range, access),
        }
    }

    fn enqueue_listed(
        &self,
        range: Range<u64>,
        access: Access,
    ) -> Result<Pending<'_>, RangeLockError> {
        self.acquire_listed(range, access, true)
            .map(|p| p.unwrap_or_else(|| unreachable!("a blocking request is always queued")))
    }

    /// True if no range is held or queued.
    pub fn is_idle(&self) -> bool {
        self.buckets.iter().all(|b| {
            let (state, fast) = b.peek();
            state.len() == 0 && fast == 0
        })
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

    /// The part of `[start, end)` that lies in granule `g`.
    fn clip(&self, g: u64, start: u64, end: u64) -> (u64, u64) {
        let g_start = g << self.granule_shift;
        let g_end = g_start.saturating_add(1 << self.granule_shift);
        (start.max(g_start), end.min(g_end))
    }

    /// Bucket index of granule `g`. The high bits are folded in so that granules a
    /// multiple of `buckets` apart (1 GiB strides with the default geometry) do not
    /// all land in one bucket; within an aligned block of `buckets` granules the
    /// mapping is a bijection, so a run of granules spreads over distinct buckets.
    #[inline(always)]
    fn bucket_of(&self, g: u64) -> usize {
        let folded = g ^ (g >> self.bucket_mask.count_ones());
        // Masked below `buckets.len()`, a usize.
        usize::try_from(folded & self.bucket_mask).unwrap_or(0)
    }

    /// Calls `f(bucket, piece, wide)` for each piece of the effective range of `p`.
    fn for_each_piece(&self, p: Piece, mut f: impl FnMut(usize, Piece, bool)) {
        match self.span(p.start, p.end) {
            Span::All => (0..self.buckets.len()).for_each(|b| f(b, p, true)),
            Span::Run { first, count } => {
                for g in first..first + count {
                    let (start, end) = self.clip(g, p.start, p.end);
                    f(self.bucket_of(g), Piece { start, end, ..p }, false);
                }
            }
        }
    }

    /// The fast word for a request, if it can take the fast path: the requested range
    /// lies in one granule `g < 2^48` and starts and ends on a 1/32 granule boundary
    /// (page-aligned requests always do). Returns the bucket and the word.
    #[inline(always)]
    fn fast_word(&self, req_start: u64, req_end: u64, access: Access) -> Option<(usize, u64)> {
        let unit_mask = self.fast_unit_mask;
        // Non-empty, in one granule, unit-aligned, and its start fits the word.
        if req_start >= req_end
            || (req_start ^ (req_end - 1)) >> self.granule_shift != 0
            || (req_start | req_end) & unit_mask != 0
            || req_start > self.fast_max_start
        {
            return None;
        }
        let units = (req_end - req_start) >> self.fast_unit_shift;
        let word = self.fast_flags
            | if access == Access::Write {
                FAST_WRITE
            } else {
                0
            }
            | (units - 1) << FAST_LEN_SHIFT
            | (req_start >> self.fast_unit_shift) << FAST_START_SHIFT;
        Some((self.bucket_of(req_start >> self.granule_shift), word))
    }

    /// The request a fast word (without `SLOW`) stands for; `None` for 0.
    fn decode_fast(&self, word: u64) -> Option<Piece> {
        if word & FAST_PRESENT == 0 {
            return None;
        }
        let start_units = (word >> FAST_START_SHIFT) & ((1 << FAST_START_BITS) - 1);
        let len_units = ((word >> FAST_LEN_SHIFT) & ((1 << FAST_UNITS_LOG2) - 1)) + 1;
        let req_start = start_units << self.fast_unit_shift;
        let req_end = req_start + (len_units << self.fast_unit_shift);
        let (start, end) = if word & FAST_GLOBAL != 0 {
            (0, u64::MAX)
        } else {
            (req_start, req_end)
        };
        let access = if word & FAST_WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        Some(Piece {
            start,
            end,
            access,
            req_start,
            req_end,
        })
    }

    /// The fast path: an empty bucket takes a page-aligned single-granule request in
    /// its word with one CAS. `None` if the request does not qualify (including empty
    /// and inverted ranges, which the general path reports) or the bucket is in use.
    #[inline(always)]
    fn try_fast(&self, req_start: u64, req_end: u64, access: Access) -> Option<RangeGuard<'_>> {
        let (bucket, word) = self.fast_word(req_start, req_end, access)?;
        self.buckets[bucket]
            .fast
            .compare_exchange(0, word, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        Some(RangeGuard {
            lock: self,
            word,
            bucket,
            listed: Listed::default(),
        })
    }

    /// The general path: the request goes into the lists of the buckets it touches.
    #[inline(never)]
    fn acquire_listed(
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
        let request = Piece {
            start,
            end,
            access,
            req_start,
            req_end,
        };
        let (seq, found, waiter) = match self.single_piece(request) {
            Some(piece) => match self.enter_one(piece, block) {
                Some(entered) => entered,
                None => return Ok(None),
            },
            None => match self.enter_many(request, block) {
                Some(entered) => entered,
                None => return Ok(None),
            },
        };
        let guard = RangeGuard {
            lock: self,
            word: 0,
            bucket: 0,
            listed: Listed {
                start,
                end,
                seq,
                blockers: u32::try_from(found.blockers).unwrap_or(u32::MAX),
                disjoint: u32::try_from(found.disjoint).unwrap_or(u32::MAX),
                access,
            },
        };
        Ok(Some(Pending { guard, waiter }))
    }

    /// The one `(bucket, piece, wide)` of a request that touches a single granule.
    fn single_piece(&self, p: Piece) -> Option<(usize, Piece, bool)> {
        match self.span(p.start, p.end) {
            Span::Run { first, count: 1 } => Some((self.bucket_of(first), p, false)),
            Span::All if self.buckets.len() == 1 => Some((0, p, true)),
            _ => None,
        }
    }

    /// Enters a single-bucket request in its bucket's list; `None` if `!block` and it
    /// would have to wait. No allocation unless it has to wait.
    fn enter_one(
        &self,
        (bucket, piece, wide): (usize, Piece, bool),
        block: bool,
    ) -> Option<(u64, Conflicts, Option<Arc<Waiter>>)> {
        let mut l = self.buckets[bucket].lock();
        let found = l.state.conflicts(&piece, wide, self.decode_fast(l.fast));
        if found.blockers > 0 && !block {
            return None;
        }
        let waiter = Waiter::for_blockers(found.blockers);
        let seq = l.state.next_seq();
        l.state.insert(Entry::new(piece, seq, &waiter), wide);
        Some((seq, found, waiter))
    }

    /// Enters a request in the lists of all its buckets. They are locked in ascending
    /// bucket order and all held while it enters (two-phase locking), so the request
    /// arrives at one instant in every bucket: arrival order is the same everywhere
    /// and waits cannot form a cycle.
    fn enter_many(
        &self,
        request: Piece,
        block: bool,
    ) -> Option<(u64, Conflicts, Option<Arc<Waiter>>)> {
        let mut pieces = Vec::new();
        self.for_each_piece(request, |b, piece, wide| pieces.push((b, piece, wide)));
        pieces.sort_by_key(|&(b, _, _)| b);
        let mut locked: Vec<(usize, Locked<'_>)> = Vec::with_capacity(pieces.len());
        let mut found = Conflicts::default();
        let mut seq = 0;
        for (b, piece, wide) in &pieces {
            if locked.last().is_none_or(|(last, _)| last != b) {
                let l = self.buckets[*b].lock();
                seq = seq.max(l.state.next_seq());
                locked.push((*b, l));
            }
            if let Some((_, l)) = locked.last() {
                found += l.state.conflicts(piece, *wide, self.decode_fast(l.fast));
            }
        }
        if found.blockers > 0 && !block {
            return None;
        }
        let waiter = Waiter::for_blockers(found.blockers);
        let mut li = 0;
        for (b, piece, wide) in pieces {
            while locked[li].0 != b {
                li += 1;
            }
            locked[li]
                .1
                .state
                .insert(Entry::new(piece, seq, &waiter), wide);
        }
        Some((seq, found, waiter))
    }

    /// Releases a guard that could not give its range back with one CAS.
    #[inline(never)]
    fn release_slow(&self, guard: &RangeGuard<'_>) {
        match guard.word {
            0 => {
                let listed = &guard.listed;
                let request = Piece {
                    start: listed.start,
                    end: listed.end,
                    access: listed.access,
                    req_start: listed.start,
                    req_end: listed.end,
                };
                self.for_each_piece(request, |b, piece, wide| {
                    let mut l = self.buckets[b].lock();
                    let removed = l.state.remove(piece.start, listed.seq, wide);
                    debug_assert!(removed, "released range was not in bucket {b}");
                });
            }
            _ => {
                // Others joined the bucket (SLOW is set): leave under its mutex and
                // signal those that counted us.
                let b = &self.buckets[guard.bucket];
                let l = b.lock();
                let old = b.fast.fetch_and(SLOW, Ordering::AcqRel);
                debug_assert_eq!(
                    old & !SLOW,
                    guard.word,
                    "fast word changed under its holder"
                );
                if let Some(me) = self.decode_fast(guard.word) {
                    l.state.fast_released(&me);
                }
                drop(l);
            }
        }
    }
}

/// Fast word layout: bit 0 present, 1 write, 2 global (the request stands for the
/// whole space), 3..8 length in units of 1/32 granule, minus one, 8..61 start in units,
/// 62 `SLOW`.
/// Rounds `spin_fast` waits for a conflicting fast holder (a few microseconds at most).
#[cfg(not(loom))]
const FAST_SPIN_ROUNDS: u32 = 64;
const FAST_PRESENT: u64 = 1 << 0;
const FAST_WRITE: u64 = 1 << 1;
const FAST_GLOBAL: u64 = 1 << 2;
const FAST_UNITS_LOG2: u32 = 5;
const FAST_LEN_SHIFT: u32 = 3;
const FAST_START_SHIFT: u32 = 8;
const FAST_START_BITS: u32 = 54;
const _: () = assert!(FAST_START_SHIFT + FAST_START_BITS <= SLOW.trailing_zeros());

/// What a guard of a request that went through the buckets' lists keeps (kept inline:
/// the list path allocates nothing unless it has to wait).
#[derive(Debug, Clone, Copy)]
struct Listed {
    /// The effective range (the whole space in `LockMode::Global`).
    start: u64,
    end: u64,
    seq: u64,
    blockers: u32,
    disjoint: u32,
    access: Access,
}

impl Default for Listed {
    fn default() -> Self {
        Listed {
            start: 0,
            end: 0,
            seq: 0,
            blockers: 0,
            disjoint: 0,
            access: Access::Read,
        }
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
    #[inline]
    pub fn is_granted(&self) -> bool {
        self.waiter.as_ref().is_none_or(|w| w.is_granted())
    }

    /// Blocks until the range is held.
    #[inline]
    pub fn wait(self) -> RangeGuard<'a> {
        if let Some(w) = &self.waiter {
            w.wait();
        }
        self.guard
    }
}

/// A held range; released on drop.
///
/// A fast holder (`word` is not 0) is the request in `word` of bucket `bucket`;
/// otherwise the request is in the lists of its buckets, as `listed` says.
#[must_use = "the range is released as soon as the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    word: u64,
    bucket: usize,
    listed: Listed,
}

impl<'a> RangeGuard<'a> {
    fn piece(&self) -> Piece {
        match self.lock.decode_fast(self.word) {
            Some(p) => p,
            None => Piece {
                start: self.listed.start,
                end: self.listed.end,
                access: self.listed.access,
                req_start: self.listed.start,
                req_end: self.listed.end,
            },
        }
    }

    /// The locked range (the whole address space in `LockMode::Global`).
    pub fn range(&self) -> Range<u64> {
        let p = self.piece();
        p.start..p.end
    }

    /// Shared or exclusive.
    pub fn access(&self) -> Access {
        self.piece().access
    }

    /// How many earlier conflicting requests this one waited for (0: uncontended).
    pub fn blockers(&self) -> usize {
        self.listed.blockers as usize
    }

    /// How many of those did not overlap the range asked for: always 0 in
    /// `LockMode::Range`, the cost of the one big lock in `LockMode::Global`.
    pub fn disjoint_blockers(&self) -> usize {
        self.listed.disjoint as usize
    }
}

impl fmt::Debug for RangeGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.piece();
        f.debug_struct("RangeGuard")
            .field("range", &(p.start..p.end))
            .field("access", &p.access)
            .finish()
    }
}

impl Drop for RangeGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if self.word != 0
            && self.lock.buckets[self.bucket]
                .fast
                .compare_exchange(self.word, 0, Ordering::Release, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        self.lock.release_slow(self);
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
