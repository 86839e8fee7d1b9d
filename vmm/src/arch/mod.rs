//! Architecture back ends. Each exports the same names; outside this module
//! `cfg(target_arch)` is rare. x86_64 is here: a VM with guest RAM as memory slots, an
//! in-kernel irqchip and PIT, the boot structures (boot params/PVH, e820, page tables,
//! MP and ACPI tables), legacy devices on the port bus, and vCPUs. The PowerPC issue adds
//! `ppc64/` with the same names.

#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    configure_system, create_legacy_devices, layout, ArchError, EntryPoint, IoHandler, KvmVcpu,
    KvmVm, LegacyDevices, StateError, SystemConfig, VcpuState, VcpuStop, VmState, STATE_VERSION,
};
