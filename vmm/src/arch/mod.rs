//! Architecture back ends. Each exports the same names; outside this module
//! `cfg(target_arch)` is rare. x86_64 is here: a VM with guest RAM as memory slots, an
//! in-kernel irqchip and PIT, the boot structures (boot params/PVH, e820, page tables,
//! MP and ACPI tables), legacy devices on the port bus, and vCPUs. PowerPC64 (sPAPR) is
//! `ppc64/`, with the same names. The `codec` framing is shared by both states.

mod codec;
mod exit;
#[cfg(target_arch = "powerpc64")]
mod ppc64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use codec::CodecError;
pub use exit::{IoHandler, VcpuStop};

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    configure_system, create_legacy_devices, layout, ArchError, BalloonTransport, EntryPoint,
    KvmVcpu, KvmVm, LegacyDevices, StateError, SystemConfig, VcpuState, VmState, STATE_VERSION,
};

#[cfg(target_arch = "powerpc64")]
pub use self::ppc64::{
    configure_system, create_legacy_devices, kvm, layout, ArchError, BalloonTransport, EntryPoint,
    KvmVcpu, KvmVm, LegacyDevices, StateError, SystemConfig, VcpuState, VmState, STATE_VERSION,
};
