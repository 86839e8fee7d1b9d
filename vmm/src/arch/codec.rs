//! The framing and field codec of every architecture's vCPU and VM state: the one the
//! devices' state uses (`rangevm_devices::persist`), with the state's own magic and
//! layout version.
//!
//! ```text
//! magic [4] | version u16 | reserved u16 (0) | payload length u32 | payload | CRC-32 u32
//! ```
//!
//! Lists carry a u32 count checked against a bound, and against the bytes left, before
//! anything is allocated, so bad bytes give a [`CodecError`], never a panic.

/// Errors of encoding and decoding state bytes.
pub use rangevm_devices::persist::PersistError as CodecError;
pub(crate) use rangevm_devices::persist::{Reader, Writer};
