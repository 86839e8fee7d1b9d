//! x86_64 on KVM.

mod vcpu;
mod vm;

pub use vcpu::{KvmVcpu, VcpuStop};
pub use vm::KvmVm;

/// Errors of the x86_64 back end.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// /dev/kvm could not be opened or a VM not created.
    #[error("Cannot create a KVM virtual machine")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A guest RAM region could not become a KVM memory slot.
    #[error("Cannot map guest RAM [{gpa:#x}, +{size:#x}) into the VM")]
    MemorySlot {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM has no host mapping for a region (a bug).
    #[error("Guest RAM region at {0:#x} has no host mapping")]
    NoMapping(u64),
    /// Too many regions for KVM's slots.
    #[error("Guest RAM has more regions than KVM memory slots")]
    TooManySlots,
    /// A vCPU could not be created or set up.
    #[error("Cannot set up vCPU {id}")]
    Vcpu {
        /// vCPU index.
        id: u64,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}
