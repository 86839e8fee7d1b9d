//! x86_64 on KVM.

pub mod acpi;
mod boot;
mod cpuid;
pub mod layout;
pub mod mptable;
mod regs;
mod setup;
mod state;
#[cfg(test)]
mod test_bytes;
mod vcpu;
mod vm;

pub use boot::EntryPoint;
pub use setup::{
    configure_system, create_legacy_devices, BalloonTransport, LegacyDevices, SystemConfig,
};
pub use state::{StateError, VcpuState, VmState, STATE_VERSION};
pub use vcpu::KvmVcpu;
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
    /// The in-kernel interrupt controller, PIT or an irqfd could not be set up.
    #[error("Cannot set up {what}")]
    Irqchip {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Setting a vCPU's start state failed.
    #[error("Cannot set up the start state of vCPU {id}")]
    Regs {
        /// vCPU index.
        id: u64,
        /// The cause.
        #[source]
        source: regs::RegsError,
    },
    /// The ACPI tables could not be built.
    #[error("Cannot build the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    /// The MP table could not be built.
    #[error("Cannot build the MP table")]
    Mptable(#[from] mptable::MptableError),
    /// The kernel could not be loaded.
    #[error("Cannot load the guest kernel")]
    Boot(#[from] boot::BootError),
    /// A device could not be put on the bus.
    #[error("Cannot place a device on the port bus")]
    Bus(#[from] rangevm_devices::BusError),
    /// The serial port could not be created.
    #[error("Cannot create the serial port")]
    Serial(#[from] rangevm_devices::SerialError),
    /// The ACPI power-management device could not be created.
    #[error("Cannot create the ACPI power-management device")]
    AcpiPm(#[from] rangevm_devices::AcpiPmError),
    /// A virtio-mmio device could not be created.
    #[error("Cannot create a virtio-mmio device")]
    Mmio(#[from] rangevm_devices::MmioError),
    /// A device's lock was poisoned by a panic elsewhere.
    #[error("A device is unusable after an earlier failure")]
    DevicePoisoned,
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}
