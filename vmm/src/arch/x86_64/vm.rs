//! A KVM VM whose memory slots are guest RAM's regions.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_pit_config,
    kvm_userspace_memory_region, CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use rangevm_memory::{DirtyLog, GuestRam, RegionInfo};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

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
    manual_protect: bool,
}

impl KvmVm {
    /// Creates a VM and maps every region of `ram` as a memory slot (slot `i` = region
    /// `i`). Turns on KVM's manual-protect dirty log mode where the host has it.
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, ArchError> {
        let kvm = Kvm::new().map_err(ArchError::CreateVm)?;
        let vm = kvm.create_vm().map_err(ArchError::CreateVm)?;
        let manual_protect = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
            & i32::try_from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE).unwrap_or(0)
            != 0
            && vm
                .enable_cap(&kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                    ..Default::default()
                })
                .is_ok();
        let this = KvmVm {
            vm,
            _kvm: kvm,
            ram,
            manual_protect,
        };
        for (slot, region) in this.ram.regions().iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| ArchError::TooManySlots)?;
            this.set_slot(slot, region, 0)?;
        }
        Ok(this)
    }

    fn set_slot(&self, slot: u32, region: &RegionInfo, flags: u32) -> Result<(), ArchError> {
        let host = self
            .ram
            .host_address(region.start)
            .map_err(|_| ArchError::NoMapping(region.start))?;
        let mem = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start,
            memory_size: region.size,
            userspace_addr: host,
        };
        // SAFETY: `host .. host + size` is the live mapping of this guest RAM region,
        // and it outlives the slot: `self.ram` keeps the mapping alive and is dropped
        // after `self.vm` (field order), which tears the slots down. Region removal at
        // run time is not supported while a VM maps the RAM.
        unsafe { self.vm.set_user_memory_region(mem) }.map_err(|source| ArchError::MemorySlot {
            gpa: region.start,
            size: region.size,
            source,
        })
    }

    /// Turns KVM's dirty logging on or off for every slot, each under the write lock of
    /// its region (no fault, discard or DMA in the region while its flags change).
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), ArchError> {
        let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (slot, region) in self.ram.regions().iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| ArchError::TooManySlots)?;
            let _guard = self
                .ram
                .range_lock()
                .write(region.start..region.end())
                .map_err(|_| ArchError::NoMapping(region.start))?;
            self.set_slot(slot, region, flags)?;
        }
        Ok(())
    }

    /// Whether KVM keeps dirty bits until told to clear them (KVM_CLEAR_DIRTY_LOG);
    /// without it, reading the log clears it.
    pub fn manual_dirty_protect(&self) -> bool {
        self.manual_protect
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

    /// Saves the in-kernel PICs, IOAPIC, PIT and kvm clock (vCPUs paused).
    pub fn save_state(&self) -> Result<super::VmState, super::StateError> {
        super::state::save_vm(&self.vm)
    }

    /// Restores a state saved by [`KvmVm::save_state`]: after
    /// [`KvmVm::create_irqchip`], before the vCPUs run.
    pub fn restore_state(&self, state: &super::VmState) -> Result<(), super::StateError> {
        super::state::restore_vm(&self.vm, state)
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

/// KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log), which kvm-ioctls
/// does not wrap; checked against the kernel's number.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = {
    let size = std::mem::size_of::<kvm_clear_dirty_log>() as libc::c_ulong;
    (3 << 30) | (size << 16) | (0xae << 8) | 0xc0
};
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xc018_aec0);

impl DirtyLog for KvmVm {
    fn dirty_bitmap(&self, slot: u32, size: u64) -> std::io::Result<Vec<u64>> {
        let size = usize::try_from(size).map_err(std::io::Error::other)?;
        self.vm
            .get_dirty_log(slot, size)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn clear_dirty(&self, slot: u32, first_page: u64, bits: &[u64]) -> std::io::Result<()> {
        if !self.manual_protect {
            // Without manual protect, KVM_GET_DIRTY_LOG already cleared and re-protected.
            return Ok(());
        }
        let mut bitmap = bits.to_vec();
        let clear = kvm_clear_dirty_log {
            slot,
            num_pages: u32::try_from(bits.len() * 64).map_err(std::io::Error::other)?,
            first_page,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `clear` is a valid kvm_clear_dirty_log whose bitmap pointer covers
        // `num_pages` bits of `bitmap`, which lives until the call returns; the kernel
        // reads the bitmap and writes nothing back. The fd is this VM's.
        let ret = unsafe { ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG, &clear) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}
