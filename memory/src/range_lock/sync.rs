//! Synchronization primitives used by the range lock: `std`'s normally, loom's when the
//! crate is built with `--cfg loom` so the acquire/release protocol can be model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

/// Locks `mutex`, ignoring poisoning: no code of the range lock panics while holding a
/// bucket mutex (the only operations under it are comparisons and `Vec` edits), so the
/// protected state is consistent even if some unrelated panic unwound through a guard.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
