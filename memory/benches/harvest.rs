//! Dirty harvest cost: a 1 GiB guest with 0%, 1% and 100% of its pages dirty in the
//! VMM's bitmap, harvested in 2 MiB chunks (each under its own read lock), without a
//! hypervisor log (that part is a KVM ioctl per slot plus one per dirty chunk). Prints
//! the longest time one chunk held its lock, over all iterations, to stderr.
//!
//!     cargo bench -p rangevm-memory --bench harvest

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rangevm_memory::{host_page_size, GuestRam, LockMode};

const GIB: u64 = 1 << 30;
const CHUNK: u64 = 2 << 20;

fn harvest(c: &mut Criterion) {
    let page = host_page_size();
    let ram = GuestRam::new(LockMode::Range, &[(0, GIB)]).expect("1 GiB of guest RAM");
    // Touch every page once so the harvest does not measure first-touch page faults.
    for addr in (0..GIB / page).map(|p| p * page) {
        ram.write(addr, &[1]).expect("write");
    }
    let mut group = c.benchmark_group("harvest_1GiB_2MiB_chunks");
    group.sample_size(20);
    for percent in [0u64, 1, 100] {
        let pages = GIB / page;
        let every = 100u64.checked_div(percent).unwrap_or(0);
        let mut max_hold = Duration::ZERO;
        let mut holds = Vec::new();
        group.bench_function(format!("{percent}pct_dirty"), |b| {
            b.iter_batched(
                || {
                    ram.harvest_dirty(None, CHUNK).expect("clear");
                    if every > 0 {
                        for p in (0..pages).step_by(usize::try_from(every).unwrap_or(1)) {
                            ram.write(p * page, &[2]).expect("dirty");
                        }
                    }
                },
                |()| {
                    let (dirty, stats) = ram.harvest_dirty(None, CHUNK).expect("harvest");
                    max_hold = max_hold.max(stats.max_lock_hold);
                    holds.push(stats.max_lock_hold);
                    dirty.len()
                },
                BatchSize::PerIteration,
            );
        });
        holds.sort_unstable();
        let median = holds.get(holds.len() / 2).copied().unwrap_or_default();
        // The machine is shared: the maximum includes preemptions while a lock is held;
        // the median over harvests of each harvest's longest hold is the typical figure.
        eprintln!(
            "harvest {percent}% dirty: longest chunk lock hold per harvest, median {median:?}, max {max_hold:?}"
        );
    }
    group.finish();
}

criterion_group!(benches, harvest);
criterion_main!(benches);
