//! PowerPC64 (little-endian) sPAPR ("pseries") machines on KVM (kvm-hv).
//!
//! - [`kvm`]: rangevm's own ioctl layer (kvm-ioctls has no PowerPC support);
//! - [`layout`]: the guest-physical layout, RTAS tokens and hypercall numbers;
//! - `vm`: guest RAM as memory slots, the dirty log, the in-kernel XICS;
//! - `vcpu`: a vCPU's start state and one step of its run loop;
//! - `spapr`: the hypercalls and RTAS calls the VMM answers (console, H_SET_MODE,
//!   H_REGISTER_PROC_TBL, power-off, CPU start/stop);
//! - `elf` and `fdt`: loading a vmlinux and writing the flattened device tree;
//! - `setup`: putting the machine together;
//! - `state`: vCPU and VM state for migration.

mod elf;
mod fdt;
pub mod kvm;
pub mod layout;
mod phb;
mod setup;
mod spapr;
mod state;
mod tce;
mod vcpu;
mod vm;

pub use phb::BalloonTransport;
pub use setup::{configure_system, create_legacy_devices, EntryPoint, LegacyDevices, SystemConfig};
pub use state::{StateError, VcpuState, VmState, STATE_VERSION};
pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

/// Errors of the PowerPC64 back end.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// /dev/kvm could not be opened or a VM not created.
    #[error("Cannot create a KVM virtual machine")]
    CreateVm(#[source] std::io::Error),
    /// The host's KVM cannot run sPAPR guests.
    #[error("This host's KVM cannot run sPAPR (pseries) guests: {0}")]
    Unsupported(&'static str),
    /// A guest RAM region could not become a KVM memory slot.
    #[error("Cannot map guest RAM [{gpa:#x}, +{size:#x}) into the VM")]
    MemorySlot {
        /// Guest-physical start.
        gpa: u64,
        /// Size.
        size: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Guest RAM has no host mapping for a region (a bug).
    #[error("Guest RAM region at {0:#x} has no host mapping")]
    NoMapping(u64),
    /// Too many regions for KVM's slots.
    #[error("Guest RAM has more regions than KVM memory slots")]
    TooManySlots,
    /// A vCPU could not be created or set up.
    #[error("Cannot set up vCPU {id}: {what}")]
    Vcpu {
        /// vCPU index.
        id: u64,
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The in-kernel interrupt controller or an irqfd could not be set up.
    #[error("Cannot set up {what}")]
    Irqchip {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel could not be loaded.
    #[error("Cannot load the guest kernel")]
    Elf(#[from] elf::ElfError),
    /// The device tree could not be built.
    #[error("Cannot build the device tree")]
    Fdt(#[from] fdt::FdtError),
    /// The initrd could not be read or does not fit.
    #[error("Cannot load the initrd {path}: {why}")]
    Initrd {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// Guest memory could not be written at boot.
    #[error("Cannot write the boot data into guest memory")]
    Memory(#[from] rangevm_memory::GuestRamError),
    /// A device could not be put on a bus.
    #[error("Cannot place a device on a bus")]
    Bus(#[from] rangevm_devices::BusError),
    /// The console could not be created.
    #[error("Cannot create the console")]
    Serial(#[from] rangevm_devices::SerialError),
    /// A virtio PCI device could not be created.
    #[error("Cannot create a virtio PCI device")]
    Pci(#[from] rangevm_devices::PciError),
    /// A device's lock was poisoned by a panic elsewhere.
    #[error("A device is unusable after an earlier failure")]
    DevicePoisoned,
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM_RUN failed.
    #[error("KVM_RUN failed")]
    Run(#[source] std::io::Error),
}
