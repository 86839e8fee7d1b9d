//! rangevm: a KVM virtual machine monitor whose guest memory is locked by guest-physical
//! range. This crate holds the KVM glue, the CLI and (as they land) the VM builder,
//! vCPU threads, migration and the stress tool. Guest memory lives in
//! `rangevm-memory`, devices in `rangevm-devices`.

pub mod api;
pub mod arch;
pub mod cli;
pub mod event_loop;
pub mod host_check;
pub mod machine;
pub mod migration;
pub mod run;
pub mod stress;
pub mod vcpu;
