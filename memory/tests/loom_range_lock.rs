//! Model checking of the range lock's acquire/release protocol with loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p rangevm-memory --release --test
//! loom_range_lock` (scripts/test.sh does). Every interleaving of the bucket mutexes,
//! the waiter counts and the condition variables is explored for small cases: requests
//! that span two buckets, wide requests, and a queued request withdrawn before it is
//! granted. In each, holders check a per-cell occupancy word: a writer must be alone on
//! every cell of its range, a reader must see no writer. Loom also reports deadlocks
//! (every thread blocked) and lost wake-ups (a thread never woken).

#![cfg(loom)]

use std::ops::Range;

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;
use rangevm_memory::{Access, LockMode, RangeLock};

/// Granule 64 bytes, 4 buckets, cells of 16 bytes: a 16-byte-aligned range inside one
/// granule can take the fast path (one CAS on the bucket word), a range over two
/// granules takes two bucket lists, one over four or more granules is "wide", and an
/// unaligned range goes through the list of its bucket.
const CELL: u64 = 16;
const CELLS: usize = 24;
const WRITER: usize = 1000;

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

struct Shared {
    lock: RangeLock,
    cells: Vec<AtomicUsize>,
}

impl Shared {
    fn new(mode: LockMode) -> Arc<Self> {
        Arc::new(Shared {
            lock: RangeLock::with_geometry(mode, 64, 4).unwrap(),
            cells: (0..CELLS).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    fn cells(&self, range: &Range<u64>) -> std::ops::Range<usize> {
        idx(range.start / CELL)..idx(range.end.div_ceil(CELL))
    }

    fn occupy(&self, range: &Range<u64>, access: Access) {
        let add = if access == Access::Write { WRITER } else { 1 };
        for c in self.cells(range) {
            let now = self.cells[c].fetch_add(add, Ordering::SeqCst) + add;
            match access {
                Access::Write => assert_eq!(now, WRITER, "writer not alone on cell {c}"),
                Access::Read => assert!(now < WRITER, "reader beside a writer on cell {c}"),
            }
        }
    }

    fn vacate(&self, range: &Range<u64>, access: Access) {
        let sub = if access == Access::Write { WRITER } else { 1 };
        for c in self.cells(range) {
            self.cells[c].fetch_sub(sub, Ordering::SeqCst);
        }
    }

    fn critical_section(&self, range: Range<u64>, access: Access) {
        let guard = self.lock.lock(range.clone(), access).unwrap();
        self.occupy(&range, access);
        self.vacate(&range, access);
        drop(guard);
    }
}

/// Counts model executions, to check that loom really explored interleavings.
static EXECUTIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn run(mode: LockMode, requests: [(Range<u64>, Access); 3]) {
    let before = EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed);
    loom::model(move || {
        EXECUTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = Shared::new(mode);
        let [a, b, c] = requests.clone();
        let s1 = shared.clone();
        let t1 = thread::spawn(move || s1.critical_section(a.0, a.1));
        let s2 = shared.clone();
        let t2 = thread::spawn(move || s2.critical_section(b.0, b.1));
        shared.critical_section(c.0, c.1);
        t1.join().unwrap();
        t2.join().unwrap();
        assert!(shared.lock.is_idle());
    });
    let explored = EXECUTIONS.load(std::sync::atomic::Ordering::Relaxed) - before;
    eprintln!("{mode}: {explored} interleavings explored");
    assert!(explored > 10, "loom explored only {explored} interleavings");
}

#[test]
fn two_bucket_writers_and_a_reader() {
    run(
        LockMode::Range,
        [
            (48..96, Access::Write),
            (80..96, Access::Write),
            (0..32, Access::Read),
        ],
    );
}

#[test]
fn wide_writer_against_narrow_readers() {
    run(
        LockMode::Range,
        [
            (0..320, Access::Write),
            (16..32, Access::Read),
            (128..192, Access::Read),
        ],
    );
}

#[test]
fn fast_holders_and_list_entries_in_one_bucket() {
    run(
        LockMode::Range,
        [
            (0..16, Access::Read),
            (0..64, Access::Write),
            (3..20, Access::Read),
        ],
    );
}

#[test]
fn aliased_granules_share_a_bucket() {
    // Granules 0 and 4 map to the same bucket: disjoint, but they meet in its word.
    run(
        LockMode::Range,
        [
            (0..64, Access::Write),
            (256..272, Access::Write),
            (16..48, Access::Write),
        ],
    );
}

#[test]
fn global_mode_disjoint_writers() {
    run(
        LockMode::Global,
        [
            (0..16, Access::Write),
            (128..144, Access::Write),
            (64..80, Access::Read),
        ],
    );
}

#[test]
fn withdrawn_request_releases_those_queued_behind_it() {
    loom::model(|| {
        let shared = Shared::new(LockMode::Range);
        let held = shared.lock.write(0..64).unwrap();
        let s1 = shared.clone();
        // Queued behind `held`, then behind the withdrawn request as well.
        let t1 = thread::spawn(move || s1.critical_section(32..160, Access::Write));
        let withdrawn = shared.lock.enqueue(0..128, Access::Read).unwrap();
        drop(held);
        drop(withdrawn);
        t1.join().unwrap();
        assert!(shared.lock.is_idle());
    });
}
