//! Guest memory for rangevm.
//!
//! Everything that touches guest memory goes through this crate, and every operation
//! takes the [`range_lock::RangeLock`] over the guest-physical range it touches, in the
//! mode DESIGN.md's "who locks what" table gives.

pub mod range_lock;

pub use range_lock::{Access, LockMode, Pending, RangeGuard, RangeLock, RangeLockError};
