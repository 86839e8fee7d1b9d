//! A KVM VM whose memory slots are guest RAM's regions.

use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use rangevm_memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;

use super::{ArchError, KvmVcpu};

/// Where KVM's TSS for real-mode emulation goes (unused guest-physical space).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM: the KVM file descriptors and the guest RAM they map.
#[derive(Debug)]
pub struct KvmVm {
    // Declared before `ram`: the VM (and its memory slots) is torn down before the
    // mapping they point into is unmapped.
    vm: VmFd,
    _kvm: Kvm,
    ram: Arc<GuestRam>,
}

impl KvmVm {
    /// Creates a VM and maps every region of `ram` as a memory slot.
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, ArchError> {
        let kvm = Kvm::new().map_err(ArchError::CreateVm)?;
        let vm = kvm.create_vm().map_err(ArchError::CreateVm)?;
        for (slot, region) in ram.regions().iter().enumerate() {
            let host = ram
                .host_address(region.start)
                .map_err(|_| ArchError::NoMapping(region.start))?;
            let slot = u32::try_from(slot).map_err(|_| ArchError::TooManySlots)?;
            let mem = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start,
                memory_size: region.size,
                userspace_addr: host,
            };
            // SAFETY: `host .. host + size` is the live mapping of this guest RAM
            // region, and it outlives the slot: `self.ram` keeps the mapping alive and
            // is dropped after `self.vm` (field order), which tears the slots down.
            // Region removal at run time is not supported while a VM maps the RAM.
            unsafe { vm.set_user_memory_region(mem) }.map_err(|source| ArchError::MemorySlot {
                gpa: region.start,
                size: region.size,
                source,
            })?;
        }
        Ok(KvmVm { vm, _kvm: kvm, ram })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, one LAPIC per vCPU)
    /// and the in-kernel PIT. Before any vCPU is created.
    pub fn create_irqchip(&self) -> Result<(), ArchError> {
        let err = |what| move |source| ArchError::Irqchip { what, source };
        // The TSS KVM needs for real-mode emulation on Intel: three pages just below
        // the BIOS area at the top of the 32-bit space, inside the MMIO hole.
        self.vm
            .set_tss_address(TSS_ADDRESS)
            .map_err(err("the TSS address"))?;
        self.vm
            .create_irq_chip()
            .map_err(err("the interrupt controller"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm.create_pit2(pit).map_err(err("the PIT"))?;
        Ok(())
    }

    /// Makes a write to `evt` raise interrupt `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), ArchError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(|source| ArchError::Irqchip {
                what: "an interrupt eventfd",
                source,
            })
    }

    /// The CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, ArchError> {
        self._kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| ArchError::Irqchip {
                what: "the supported CPUID",
                source,
            })
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, ArchError> {
        let fd = self
            .vm
            .create_vcpu(id)
            .map_err(|source| ArchError::Vcpu { id, source })?;
        Ok(KvmVcpu::new(id, fd))
    }
}
