//! virtio-balloon (virtio 1.2 section 5.5): the guest gives memory back to the host
//! (inflate), takes it back (deflate), reports its memory statistics and, with free page
//! reporting, hands over free pages it keeps using later.
//!
//! The balloon speaks in 4 KiB pages ("balloon pages", PFN = guest-physical address >>
//! 12) whatever the host page size is. Host pages may be larger (64 KiB on ppc64le): the
//! device discards a host page only once the guest has given every 4 KiB piece of it,
//! and keeps the pieces seen so far ([`HostPageTracker`]). Each contiguous run of whole
//! host pages goes to `GuestRam::discard` / `GuestRam::reclaim`, which take the write
//! lock of exactly that run, so balloon work runs beside vCPU faults elsewhere.
//!
//! Queues, by index, in the order the driver numbers them (a queue whose feature the
//! driver did not accept takes no index, so the ones after it move down):
//! inflate, deflate, stats (`VIRTIO_BALLOON_F_STATS_VQ`), reporting
//! (`VIRTIO_BALLOON_F_REPORTING`). `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (used only by
//! migration in QEMU) and `VIRTIO_BALLOON_F_PAGE_POISON` are not offered.

mod device;
mod metrics;

pub use device::{
    Balloon, BalloonConfig, BalloonState, BalloonStats, HostPageTracker, MAX_PFN_BUFFER,
};
pub use metrics::BalloonMetrics;

use rangevm_memory::GuestRamError;

use super::queue::QueueError;

/// The virtio device ID of a balloon.
pub const VIRTIO_ID_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

/// The guest tells the host before it reuses ballooned pages.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// The statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest may deflate the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Page poisoning (not offered).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Free page reporting: the reporting queue exists.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The balloon's page: PFNs in the inflate and deflate queues count these.
pub const BALLOON_PAGE_SIZE: u64 = 1 << VIRTIO_BALLOON_PFN_SHIFT;
/// PFN = guest-physical address >> this.
pub const VIRTIO_BALLOON_PFN_SHIFT: u32 = 12;

/// Queue size of every balloon queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the inflate queue.
pub const INFLATE_QUEUE: usize = 0;
/// Index of the deflate queue.
pub const DEFLATE_QUEUE: usize = 1;

/// Size of one statistics entry: `le16 tag, le64 value`, packed.
pub const STAT_ENTRY_SIZE: usize = 10;

/// Statistics tags (section 5.5.6.3), with the names the control API uses.
pub const STAT_TAGS: [(u16, &str); 16] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
    (10, "oom_kills"),
    (11, "alloc_stalls"),
    (12, "async_scans"),
    (13, "direct_scans"),
    (14, "async_reclaims"),
    (15, "direct_reclaims"),
];

/// Errors of the balloon. Those caused by the guest are logged, rate-limited, and the
/// device carries on.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The driver did not enable a queue the balloon cannot work without.
    #[error("The driver did not enable the {0} queue")]
    MissingQueue(&'static str),
    /// The host page size is not a power of two of at least 4 KiB.
    #[error("Host page size {0:#x} is not a power of two of at least 4 KiB")]
    PageSize(u64),
    /// A queue operation failed.
    #[error("Balloon queue error")]
    Queue(#[from] QueueError),
    /// Discarding or reclaiming guest memory failed.
    #[error("Cannot discard or reclaim guest memory [{start:#x}, {end:#x})")]
    Memory {
        /// Start of the run.
        start: u64,
        /// End of the run.
        end: u64,
        /// The cause.
        #[source]
        source: GuestRamError,
    },
    /// A page number outside guest RAM.
    #[error("Balloon page {pfn:#x} (address {addr:#x}) is outside guest RAM")]
    PfnOutsideRam {
        /// The page number.
        pfn: u32,
        /// Its guest-physical address.
        addr: u64,
    },
    /// A buffer the device needs to read is device-writable, or the reverse.
    #[error("Buffer at {addr:#x} has the wrong direction for the {queue} queue")]
    Direction {
        /// The queue.
        queue: &'static str,
        /// The buffer.
        addr: u64,
    },
    /// A buffer whose length is not a whole number of entries (the rest is ignored), or
    /// is too long (the buffer is ignored).
    #[error("Buffer at {addr:#x} of length {len} is too long or not a multiple of {entry} bytes")]
    Length {
        /// The buffer.
        addr: u64,
        /// Its length.
        len: u32,
        /// The entry size.
        entry: usize,
    },
    /// A free page report outside guest RAM.
    #[error("Reported range [{addr:#x}, +{len:#x}) is not all guest RAM")]
    ReportOutsideRam {
        /// Its start.
        addr: u64,
        /// Its length.
        len: u32,
    },
}
