//! Starvation: a writer among a stream of overlapping readers (and a reader among a
//! stream of overlapping writers) gets the lock within a bounded number of grants.
//!
//! The bound is the number of other threads: FIFO among overlapping requests means only
//! requests that were already queued when ours arrived can be granted before it, and
//! each stream thread has at most one request queued at a time. Grants are counted from
//! the moment the probe is queued (`RangeLock::enqueue`) to the moment it is granted. A reader-preferring
//! lock fails the first test (the readers keep the range shared forever), a
//! writer-preferring one the second.

#![cfg(not(loom))]

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

use rangevm_memory::{Access, LockMode, RangeLock};

const STREAM_THREADS: u64 = 3;
const ROUNDS: usize = 50;

/// Runs `STREAM_THREADS` threads taking `stream` ranges with `stream_access` in a loop,
/// then `ROUNDS` times takes `probe` with `probe_access` and returns the largest number
/// of stream grants that happened between asking and getting.
fn max_grants_before_probe(
    mode: LockMode,
    stream: [Range<u64>; 3],
    stream_access: Access,
    probe: Range<u64>,
    probe_access: Access,
) -> u64 {
    let lock = RangeLock::new(mode);
    let grants = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        for range in stream.iter() {
            let (lock, grants, stop) = (&lock, &grants, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let g = lock.lock(range.clone(), stream_access).unwrap();
                    grants.fetch_add(1, Ordering::SeqCst);
                    // Hold a little, so that the holders overlap in time.
                    for _ in 0..50 {
                        std::hint::spin_loop();
                    }
                    drop(g);
                }
            });
        }
        // Let the stream get going.
        while grants.load(Ordering::SeqCst) < 1_000 {
            thread::yield_now();
        }
        let mut worst = 0;
        for _ in 0..ROUNDS {
            // Count from the moment the probe is queued (not from before the call,
            // where the scheduler could let the stream run for a while).
            let pending = lock.enqueue(probe.clone(), probe_access).unwrap();
            let before = grants.load(Ordering::SeqCst);
            let g = pending.wait();
            let after = grants.load(Ordering::SeqCst);
            drop(g);
            worst = worst.max(after - before);
            // Let the stream run between probes.
            let resume = grants.load(Ordering::SeqCst);
            while grants.load(Ordering::SeqCst) < resume + 100 {
                thread::yield_now();
            }
        }
        stop.store(true, Ordering::Relaxed);
        worst
    })
}

#[test]
fn writer_is_not_starved_by_overlapping_readers() {
    for mode in [LockMode::Range, LockMode::Global] {
        let worst = max_grants_before_probe(
            mode,
            [0..8192, 4096..12288, 1..20000],
            Access::Read,
            4096..8192,
            Access::Write,
        );
        assert!(
            worst <= STREAM_THREADS,
            "{mode}: {worst} reader grants went ahead of a waiting writer"
        );
    }
}

#[test]
fn reader_is_not_starved_by_overlapping_writers() {
    for mode in [LockMode::Range, LockMode::Global] {
        let worst = max_grants_before_probe(
            mode,
            [0..8192, 4096..12288, 0..65536],
            Access::Write,
            6000..7000,
            Access::Read,
        );
        assert!(
            worst <= STREAM_THREADS,
            "{mode}: {worst} writer grants went ahead of a waiting reader"
        );
    }
}
