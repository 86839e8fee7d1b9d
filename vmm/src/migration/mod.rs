//! Live migration between two rangevm processes (DESIGN.md, "Migration").
//!
//! [`protocol`] is the versioned wire format both sides speak: framed, checksummed
//! messages for precopy rounds, switch-over, vCPU and device state, postcopy demand
//! fetch and the resume handshake after a dropped link. It has no KVM dependency. The
//! byte layout and the message order are in `docs/migration-protocol.md`.

pub mod protocol;
