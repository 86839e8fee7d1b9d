//! Guest memory for rangevm.
//!
//! Everything that touches guest memory goes through this crate, and every operation
//! takes the [`range_lock::RangeLock`] over the guest-physical range it touches, in the
//! mode DESIGN.md's "who locks what" table gives.

pub mod fault_engine;
pub mod guest_ram;
pub mod host;
pub mod image_source;
mod page_state;
pub mod range_lock;
pub mod uffd;

pub use fault_engine::{FaultEngine, FaultEngineConfig, FaultEngineError, FaultStats};
pub use guest_ram::dirty::{DirtyLog, HarvestStats};
pub use guest_ram::faults::{PageContent, PageSource, Resolution, ZeroSource};
pub use guest_ram::postcopy::Placed;
pub use guest_ram::{GuestRam, GuestRamError, RegionInfo};
pub use host::host_page_size;
pub use image_source::{ImageLayout, ImageSource, ImageSourceError};
pub use page_state::PageState;
pub use range_lock::{Access, LockMode, LockStats, Pending, RangeGuard, RangeLock, RangeLockError};
