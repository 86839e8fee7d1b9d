use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::*;

const PAGE: u64 = 4096;

fn small(mode: LockMode) -> RangeLock {
    // 4 buckets of 4 KiB: small enough that wrapping and wide ranges are easy to reach.
    RangeLock::with_geometry(mode, PAGE, 4).unwrap()
}

#[test]
fn adjacent_ranges_do_not_conflict() {
    let lock = RangeLock::new(LockMode::Range);
    let a = lock.write(0..4096).unwrap();
    let b = lock.try_write(4096..8192).unwrap();
    assert!(b.is_some(), "[0,4096) and [4096,8192) must not conflict");
    // One byte of overlap does conflict.
    assert!(lock.try_read(4095..4097).unwrap().is_none());
    drop(a);
    drop(b);
    assert!(lock.is_idle());
}

#[test]
fn empty_and_inverted_ranges_are_errors() {
    let lock = RangeLock::new(LockMode::Range);
    assert_eq!(
        lock.write(10..10).unwrap_err(),
        RangeLockError::EmptyRange { start: 10, end: 10 }
    );
    #[allow(clippy::reversed_empty_ranges)]
    let inverted = 20..10;
    assert_eq!(
        lock.try_read(inverted).unwrap_err(),
        RangeLockError::InvertedRange { start: 20, end: 10 }
    );
    assert!(lock.is_idle());
}

#[test]
fn bad_geometry_is_an_error() {
    assert!(RangeLock::with_geometry(LockMode::Range, 3000, 4).is_err());
    assert!(RangeLock::with_geometry(LockMode::Range, 4096, 6).is_err());
    assert!(RangeLock::with_geometry(LockMode::Range, 1, 4).is_err());
}

#[test]
fn readers_share_writers_exclude() {
    let lock = small(LockMode::Range);
    let r1 = lock.read(0..8192).unwrap();
    let r2 = lock.try_read(4096..12288).unwrap();
    assert!(r2.is_some());
    assert!(lock.try_write(8000..8001).unwrap().is_none());
    assert!(lock.try_write(12288..16384).unwrap().is_some());
    drop(r1);
    assert!(lock.try_write(0..4096).unwrap().is_some());
    assert!(lock.try_write(8191..8192).unwrap().is_none());
    drop(r2);
    assert!(lock.is_idle());
}

#[test]
fn ranges_at_the_top_of_the_address_space() {
    let lock = small(LockMode::Range);
    let top = lock.write(u64::MAX - 10..u64::MAX).unwrap();
    assert!(lock.try_write(u64::MAX - 1..u64::MAX).unwrap().is_none());
    assert!(lock
        .try_write(u64::MAX - 4096 * 3..u64::MAX - 10)
        .unwrap()
        .is_some());
    drop(top);
    let all = lock.write(0..u64::MAX).unwrap();
    assert!(lock.try_read(1 << 40..(1 << 40) + 1).unwrap().is_none());
    drop(all);
    assert!(lock.is_idle());
}

#[test]
fn wrapping_and_wide_ranges_conflict_exactly() {
    let lock = small(LockMode::Range);
    // Granules 3, 4, 5 -> buckets 3, 0, 1 (wraps).
    let wrap = lock.write(3 * PAGE + 100..5 * PAGE + 100).unwrap();
    // Granule 0 aliases bucket 0 with granule 4 but does not overlap.
    assert!(lock.try_write(0..PAGE).unwrap().is_some());
    assert!(lock.try_write(5 * PAGE + 100..6 * PAGE).unwrap().is_some());
    assert!(lock
        .try_read(5 * PAGE + 99..5 * PAGE + 100)
        .unwrap()
        .is_none());
    assert!(lock.try_read(3 * PAGE..3 * PAGE + 100).unwrap().is_some());
    drop(wrap);
    // Eight granules cover every bucket twice: a wide entry.
    let wide = lock.read(PAGE..9 * PAGE).unwrap();
    assert!(lock.try_read(0..2 * PAGE).unwrap().is_some());
    assert!(lock.try_write(0..PAGE).unwrap().is_some());
    assert!(lock
        .try_write(8 * PAGE + 5..8 * PAGE + 6)
        .unwrap()
        .is_none());
    assert!(lock.try_write(9 * PAGE..20 * PAGE).unwrap().is_some());
    drop(wide);
    assert!(lock.is_idle());
}

#[test]
fn global_mode_serializes_disjoint_writers() {
    let lock = small(LockMode::Global);
    assert_eq!(lock.buckets(), 1);
    let a = lock.write(0..PAGE).unwrap();
    assert_eq!(a.range(), 0..u64::MAX);
    assert!(lock.try_write(1 << 30..(1 << 30) + PAGE).unwrap().is_none());
    // Readers still share in global mode.
    drop(a);
    let r = lock.read(0..1).unwrap();
    assert!(lock.try_read(1 << 20..(1 << 20) + 1).unwrap().is_some());
    drop(r);
    assert!(lock.is_idle());
}

#[test]
fn blocked_writer_is_woken_by_release() {
    let lock = small(LockMode::Range);
    let held = lock.read(0..3 * PAGE).unwrap();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            let g = lock.write(2 * PAGE..5 * PAGE).unwrap();
            tx.send(g.blockers()).unwrap();
        });
        // The writer cannot get in while the read guard is held.
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        drop(held);
        // One blocker per shared bucket the two ranges overlap in: granule 2.
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
    });
    assert!(lock.is_idle());
}

#[test]
fn reader_queues_behind_waiting_writer() {
    // FIFO: a reader that arrives after a queued writer does not overtake it, even
    // though it overlaps only readers that hold the range.
    let lock = small(LockMode::Range);
    let r1 = lock.read(0..PAGE).unwrap();
    let writer = lock.enqueue(0..PAGE, Access::Write).unwrap();
    assert!(!writer.is_granted());
    assert!(lock.try_read(0..PAGE).unwrap().is_none());
    assert!(lock.try_read(PAGE..2 * PAGE).unwrap().is_some());
    drop(r1);
    assert!(writer.is_granted());
    let w = writer.wait();
    assert_eq!(w.blockers(), 1);
    assert!(lock.try_read(0..1).unwrap().is_none());
    drop(w);
    assert!(lock.is_idle());
}

#[test]
fn withdrawn_request_unblocks_later_ones() {
    let lock = small(LockMode::Range);
    let held = lock.write(0..PAGE).unwrap();
    let queued = lock.enqueue(0..2 * PAGE, Access::Write).unwrap();
    let behind = lock.enqueue(PAGE..2 * PAGE, Access::Read).unwrap();
    assert!(!behind.is_granted(), "waits for the queued writer");
    drop(queued);
    assert!(behind.is_granted());
    drop(behind.wait());
    drop(held);
    assert!(lock.is_idle());
}

#[test]
fn disjoint_blockers_counted_only_in_global_mode() {
    for (mode, expect) in [(LockMode::Range, 0), (LockMode::Global, 1)] {
        let lock = small(mode);
        let a = lock.write(0..PAGE).unwrap();
        let overlapping = lock.enqueue(0..PAGE / 2, Access::Write).unwrap();
        drop(a);
        let g = overlapping.wait();
        assert_eq!((g.blockers(), g.disjoint_blockers()), (1, 0), "{mode}");
        // A disjoint request waits only in global mode, and then says so.
        let disjoint = lock.enqueue(5 * PAGE..6 * PAGE, Access::Write).unwrap();
        assert_eq!(disjoint.is_granted(), expect == 0, "{mode}");
        drop(g);
        let g = disjoint.wait();
        assert_eq!(g.disjoint_blockers(), expect, "{mode}");
        drop(g);
        assert!(lock.is_idle());
    }
}

#[test]
fn lock_mode_parses() {
    assert_eq!("range".parse::<LockMode>().unwrap(), LockMode::Range);
    assert_eq!("global".parse::<LockMode>().unwrap(), LockMode::Global);
    assert!("mmap_sem".parse::<LockMode>().is_err());
    assert_eq!(LockMode::Global.to_string(), "global");
}

#[test]
fn footprint_is_reported() {
    let lock = RangeLock::new(LockMode::Range);
    assert_eq!(lock.buckets(), DEFAULT_BUCKETS);
    assert!(lock.footprint() >= DEFAULT_BUCKETS * 64);
    assert!(RangeLock::entry_size() <= 72);
}

#[test]
fn fast_words_round_trip() {
    for (granule, buckets) in [(PAGE, 4), (DEFAULT_GRANULE, DEFAULT_BUCKETS), (64, 2)] {
        for mode in [LockMode::Range, LockMode::Global] {
            let lock = RangeLock::with_geometry(mode, granule, buckets).unwrap();
            let unit = granule / 32;
            for (start, end) in [
                (0, unit),
                (0, granule),
                (granule * 7 + unit * 3, granule * 8),
                ((1 << 50) + unit, (1 << 50) + 2 * unit),
            ] {
                for access in [Access::Read, Access::Write] {
                    let (_, word) = lock.fast_word(start, end, access).unwrap();
                    let p = lock.decode_fast(word).unwrap();
                    assert_eq!((p.req_start, p.req_end, p.access), (start, end, access));
                    let effective = match mode {
                        LockMode::Range => (start, end),
                        LockMode::Global => (0, u64::MAX),
                    };
                    assert_eq!((p.start, p.end), effective);
                }
            }
            // Not eligible: across granules, unaligned, empty, at the very top.
            assert!(lock
                .fast_word(granule - unit, granule + unit, Access::Read)
                .is_none());
            assert!(lock.fast_word(1, unit, Access::Read).is_none());
            assert!(lock.fast_word(unit, unit, Access::Read).is_none());
            assert!(lock
                .fast_word(u64::MAX - unit, u64::MAX, Access::Read)
                .is_none());
        }
    }
}

#[test]
fn fast_holder_and_listed_requests_meet_in_a_bucket() {
    let lock = small(LockMode::Range);
    // Page 0 is taken through the bucket word.
    let fast = lock.write(0..PAGE).unwrap();
    // An unaligned request in the same granule goes to the list and must see it.
    assert!(lock.try_read(10..20).unwrap().is_none());
    // Granule 4 aliases bucket 0 (4 buckets) but does not overlap: listed, granted.
    let aliased = lock.try_write(4 * PAGE + 1..4 * PAGE + 2).unwrap().unwrap();
    let queued = lock.enqueue(100..200, Access::Read).unwrap();
    assert!(!queued.is_granted());
    // The fast holder leaves through the list and wakes the queued reader.
    drop(fast);
    assert!(queued.is_granted());
    drop(queued.wait());
    drop(aliased);
    assert!(lock.is_idle());
    // Once the bucket is empty the fast path is available again.
    let again = lock.write(0..PAGE).unwrap();
    assert_eq!(again.blockers(), 0);
    drop(again);
    assert!(lock.is_idle());
}

#[test]
fn for_memory_sizes_buckets_to_the_memory() {
    let lock = RangeLock::for_memory(LockMode::Range, 1 << 30, 4096);
    assert_eq!(lock.granule(), DEFAULT_GRANULE);
    assert_eq!(lock.buckets(), 16384);
    let small = RangeLock::for_memory(LockMode::Range, 1 << 20, 65536);
    assert_eq!(small.buckets(), 64);
    let huge_pages = RangeLock::for_memory(LockMode::Range, 1 << 40, 1 << 21);
    assert_eq!(huge_pages.granule(), 1 << 21);
    assert_eq!(huge_pages.buckets(), 16384);
    assert_eq!(
        RangeLock::for_memory(LockMode::Global, 1 << 30, 4096).buckets(),
        1
    );
}

#[test]
fn waits_are_counted_and_disjoint_ones_only_in_global_mode() {
    for (mode, other, disjoint) in [
        (LockMode::Range, 0..PAGE / 2, 0),
        (LockMode::Global, 10 * PAGE..11 * PAGE, 1),
    ] {
        let lock = small(mode);
        let holder = lock.write(0..PAGE).unwrap();
        assert_eq!(lock.stats(), LockStats::default());
        thread::scope(|s| {
            let waiter = s.spawn(|| drop(lock.write(other.clone()).unwrap()));
            // Once the waiter has queued, the holder's bucket is in list mode.
            let bucket = &lock.buckets[lock.fast_word(0, PAGE, Access::Write).unwrap().0];
            while bucket.fast.load(Ordering::Acquire) & SLOW == 0 {
                thread::yield_now();
            }
            drop(holder);
            waiter.join().unwrap();
        });
        let stats = lock.stats();
        assert_eq!((stats.waits, stats.disjoint_waits), (1, disjoint), "{mode}");
        assert!(stats.wait_ns > 0);
        assert!(lock.is_idle());
    }
}
