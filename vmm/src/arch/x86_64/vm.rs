//! A KVM VM whose memory slots are guest RAM's regions.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use rangevm_memory::GuestRam;

use super::{ArchError, KvmVcpu};

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

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, ArchError> {
        let fd = self
            .vm
            .create_vcpu(id)
            .map_err(|source| ArchError::Vcpu { id, source })?;
        Ok(KvmVcpu::new(id, fd))
    }
}
