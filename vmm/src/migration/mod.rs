//! Live migration between two rangevm processes (DESIGN.md, "Migration").
//!
//! - [`protocol`]: the versioned wire format both sides speak: framed, checksummed
//!   messages for precopy rounds, switch-over, vCPU and device state, postcopy demand
//!   fetch and the resume handshake after a dropped link. No KVM dependency; the byte
//!   layout and the message order are in `docs/migration-protocol.md`.
//! - [`transport`]: `tcp:HOST:PORT` and `unix:PATH` addresses and streams.
//! - [`page_index`]: guest pages numbered across regions, for per-page maps.
//! - [`status`]: progress and figures for `migrate status` and the progress bar.
//! - [`control`]: how the migration thread asks the event loop to act on the machine.
//! - [`source`] and [`destination`]: the two sides of a precopy migration; [`slot`]
//!   holds the outgoing one for the control API.

pub mod control;
pub mod destination;
pub mod page_index;
pub mod postcopy_dest;
pub mod postcopy_source;
pub mod protocol;
pub mod slot;
pub mod source;
pub mod status;
pub mod transport;

/// The downtime target when none is given (QEMU's and Cloud Hypervisor's default).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// The round limit when none is given: after it the source switches over anyway.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// An error and its causes, as one sentence.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
