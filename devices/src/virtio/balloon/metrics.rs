//! Counters of the balloon, kept beside the device and readable without its lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the balloon has done. Shared as `Arc<BalloonMetrics>` ([`Balloon::metrics`]);
/// every counter only grows.
///
/// [`Balloon::metrics`]: super::Balloon::metrics
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Inflate buffers processed.
    pub inflate_buffers: AtomicU64,
    /// Deflate buffers processed.
    pub deflate_buffers: AtomicU64,
    /// 4 KiB pages the guest put in the balloon.
    pub pages_inflated: AtomicU64,
    /// 4 KiB pages the guest took out.
    pub pages_deflated: AtomicU64,
    /// Bytes given back to the host (inflate and free page reporting).
    pub bytes_discarded: AtomicU64,
    /// Bytes the guest took back (deflate).
    pub bytes_reclaimed: AtomicU64,
    /// Free page reports processed.
    pub reports: AtomicU64,
    /// Statistics buffers received.
    pub stats_updates: AtomicU64,
    /// Malformed requests from the guest (bad chains, PFNs outside RAM, bad lengths).
    pub guest_errors: AtomicU64,
    /// Discards or reclaims that failed in the memory crate.
    pub memory_errors: AtomicU64,
}

impl BalloonMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
