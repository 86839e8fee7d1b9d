//! The range lock against a simple reference model.
//!
//! - Single-threaded: a random sequence of `try_` acquisitions and releases must be
//!   granted exactly when the model (a list of held ranges) says nothing conflicts.
//! - Multi-threaded: several threads take random blocking and `try_` locks; inside each
//!   critical section the thread checks, against a shared model of what is held, that no
//!   conflicting range is held by anyone else, and that the content it wrote into the
//!   pages of its write ranges is still there when it leaves.

#![cfg(not(loom))]

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rangevm_memory::{Access, LockMode, RangeLock};

/// Small geometry so that ranges wrap around the buckets and wide ranges happen.
fn geometries() -> Vec<RangeLock> {
    vec![
        RangeLock::with_geometry(LockMode::Range, 256, 8).unwrap(),
        RangeLock::with_geometry(LockMode::Range, 64, 64).unwrap(),
        RangeLock::new(LockMode::Range),
        RangeLock::with_geometry(LockMode::Global, 256, 8).unwrap(),
    ]
}

fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

fn conflicts(mode: LockMode, a: (&Range<u64>, Access), b: (&Range<u64>, Access)) -> bool {
    let ranges_meet = mode == LockMode::Global || overlaps(a.0, b.0);
    ranges_meet && (a.1 == Access::Write || b.1 == Access::Write)
}

/// A random range in `[0, space)`. Half of them are aligned to `unit` (1/32 granule)
/// and stay inside one granule, so they take the lock's fast path (and, when blocked
/// by a fast holder, its bounded spin) rather than the bucket lists.
fn random_range(rng: &mut SmallRng, space: u64, lock: &RangeLock) -> Range<u64> {
    let granule = lock.granule();
    let unit = (granule / 32).max(1);
    if granule <= space && rng.random_bool(0.5) {
        let g = rng.random_range(0..space / granule);
        let first = rng.random_range(0..32);
        let units = rng.random_range(1..=32 - first);
        let start = g * granule + first * unit;
        return start..start + units * unit;
    }
    let start = rng.random_range(0..space - 1);
    let len = match rng.random_range(0..10) {
        0 => rng.random_range(1..space),
        1..=3 => rng.random_range(1..64),
        _ => rng.random_range(1..600),
    };
    start..(start + len).min(space)
}

#[test]
fn try_locks_match_the_model() {
    for lock in geometries() {
        let mode = lock.mode();
        let mut rng = SmallRng::seed_from_u64(0x5eed);
        let mut held = Vec::new();
        let mut model: Vec<(Range<u64>, Access)> = Vec::new();
        for step in 0..20_000 {
            if !held.is_empty() && rng.random_bool(0.45) {
                let i = rng.random_range(0..held.len());
                drop(held.swap_remove(i));
                model.swap_remove(i);
                continue;
            }
            let range = random_range(&mut rng, 4096, &lock);
            let access = if rng.random_bool(0.5) {
                Access::Read
            } else {
                Access::Write
            };
            let expect = !model
                .iter()
                .any(|(r, a)| conflicts(mode, (r, *a), (&range, access)));
            let got = match access {
                Access::Read => lock.try_read(range.clone()).unwrap(),
                Access::Write => lock.try_write(range.clone()).unwrap(),
            };
            assert_eq!(
                got.is_some(),
                expect,
                "{mode} step {step}: {access:?} {range:?} against {model:?}"
            );
            if let Some(g) = got {
                held.push(g);
                model.push((range, access));
            }
        }
        drop(held);
        assert!(
            lock.is_idle(),
            "{mode}: entries left after every guard dropped"
        );
    }
}

#[test]
fn threads_never_hold_conflicting_ranges() {
    const THREADS: usize = 4;
    const OPS: usize = 4_000;
    const SPACE: u64 = 8192;
    for lock in geometries() {
        let mode = lock.mode();
        let model: Mutex<Vec<(usize, Range<u64>, Access)>> = Mutex::new(Vec::new());
        // A byte of "memory" per address, written by writers, checked on exit.
        let memory: Vec<AtomicU64> = (0..SPACE).map(|_| AtomicU64::new(0)).collect();
        let grants = AtomicU64::new(0);
        thread::scope(|s| {
            for t in 0..THREADS {
                let (lock, model, memory, grants) = (&lock, &model, &memory, &grants);
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t as u64 + 1);
                    for op in 0..OPS {
                        let range = random_range(&mut rng, SPACE, lock);
                        let access = if rng.random_bool(0.4) {
                            Access::Write
                        } else {
                            Access::Read
                        };
                        let guard = if rng.random_bool(0.2) {
                            match access {
                                Access::Read => lock.try_read(range.clone()).unwrap(),
                                Access::Write => lock.try_write(range.clone()).unwrap(),
                            }
                        } else {
                            Some(lock.lock(range.clone(), access).unwrap())
                        };
                        let Some(guard) = guard else { continue };
                        grants.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut m = model.lock().unwrap();
                            for (owner, r, a) in m.iter() {
                                assert!(
                                    !conflicts(mode, (r, *a), (&range, access)),
                                    "{mode}: thread {t} got {access:?} {range:?} while \
                                     thread {owner} holds {a:?} {r:?}"
                                );
                            }
                            m.push((t, range.clone(), access));
                        }
                        let stamp = ((t as u64) << 32) | op as u64;
                        if access == Access::Write {
                            for cell in &memory[idx(range.start)..idx(range.end)] {
                                cell.store(stamp, Ordering::Relaxed);
                            }
                        }
                        thread::yield_now();
                        if access == Access::Write {
                            for cell in &memory[idx(range.start)..idx(range.end)] {
                                assert_eq!(cell.load(Ordering::Relaxed), stamp, "{mode}");
                            }
                        }
                        {
                            let mut m = model.lock().unwrap();
                            let i = m
                                .iter()
                                .position(|(o, r, a)| *o == t && *r == range && *a == access)
                                .unwrap();
                            m.swap_remove(i);
                        }
                        drop(guard);
                    }
                });
            }
        });
        assert!(grants.load(Ordering::Relaxed) > (THREADS * OPS / 2) as u64);
        assert!(
            lock.is_idle(),
            "{mode}: entries left after every guard dropped"
        );
    }
}
