//! Architecture back ends. Each exports the same names; outside this module
//! `cfg(target_arch)` is rare. Only x86_64's first pieces exist yet (a VM with guest RAM
//! as memory slots, and a vCPU that runs real-mode code until it halts); the boot issue
//! grows them into `rangevm run`, and the PowerPC issue adds `ppc64/`.

#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{ArchError, KvmVcpu, KvmVm, VcpuStop};
