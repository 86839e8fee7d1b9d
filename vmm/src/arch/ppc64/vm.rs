//! An sPAPR KVM VM: guest RAM as memory slots, the dirty log, the in-kernel XICS and
//! the platform state ([`Spapr`]) its vCPUs share.

use std::sync::{Arc, OnceLock};

use rangevm_memory::{DirtyLog, GuestRam, RegionInfo};

use super::kvm::{self, cap, DeviceFd, Kvm, UserMemoryRegion, VmFd};
use super::layout::{PHB_INTA_IRQ, XICS_IRQ_BASE};
use super::spapr::{MmuControl, Spapr, MAX_CPUS};
use super::{ArchError, KvmVcpu};

/// Interrupt sources the VMM creates in the XICS (from [`XICS_IRQ_BASE`]): enough for
/// the console and the virtio-mmio devices.
pub(super) const XICS_SOURCES: u32 = 16;
/// XICS source attribute bits (`KVM_XICS_*`): priority field, masked.
const XICS_PRIORITY_SHIFT: u32 = 32;
const XICS_MASKED: u64 = 1 << 41;
/// The RTAS calls the in-kernel XICS answers.
const XICS_RTAS: [(&str, u32); 4] = [
    ("ibm,set-xive", super::layout::rtas::IBM_SET_XIVE),
    ("ibm,get-xive", super::layout::rtas::IBM_GET_XIVE),
    ("ibm,int-off", super::layout::rtas::IBM_INT_OFF),
    ("ibm,int-on", super::layout::rtas::IBM_INT_ON),
];

const _: () = assert!(PHB_INTA_IRQ < XICS_IRQ_BASE + XICS_SOURCES);

/// A VM: the KVM file descriptors and the guest RAM they map.
#[derive(Debug)]
pub struct KvmVm {
    // Declared before `ram`: the VM (and its memory slots) goes before the mapping.
    xics: OnceLock<DeviceFd>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    spapr: Arc<Spapr>,
    ram: Arc<GuestRam>,
    manual_protect: bool,
}

impl KvmVm {
    /// Creates a VM and maps every region of `ram` as a memory slot (slot `i` = region
    /// `i`). Needs a KVM that runs sPAPR guests with a radix MMU (kvm-hv on POWER9 or
    /// later).
    pub fn new(ram: Arc<GuestRam>) -> Result<Self, ArchError> {
        let kvm = Kvm::new().map_err(ArchError::CreateVm)?;
        let vm = kvm.create_vm(0).map_err(ArchError::CreateVm)?;
        if vm.check_extension(cap::PPC_PAPR) <= 0 && kvm.check_extension(cap::PPC_PAPR) <= 0 {
            return Err(ArchError::Unsupported("KVM_CAP_PPC_PAPR is missing"));
        }
        if vm.check_extension(cap::PPC_MMU_RADIX) <= 0 {
            return Err(ArchError::Unsupported(
                "no radix MMU for guests (KVM_CAP_PPC_MMU_RADIX); hash-MMU guests (POWER8, \
                 or a POWER9 host booted with disable_radix) are not supported yet",
            ));
        }
        let manual_protect = vm.check_extension(cap::MANUAL_DIRTY_LOG_PROTECT2) > 0
            && vm
                .enable_cap(
                    cap::MANUAL_DIRTY_LOG_PROTECT2,
                    [kvm::DIRTY_LOG_MANUAL_PROTECT_ENABLE, 0, 0, 0],
                )
                .is_ok();
        let vm = Arc::new(vm);
        let mmu: Arc<dyn MmuControl> = vm.clone();
        let spapr = Arc::new(Spapr::new(Arc::clone(&ram), mmu));
        // What H_GET_CPU_CHARACTERISTICS answers: the host's own view, so the guest
        // picks the speculation mitigations this processor needs.
        if vm.check_extension(cap::PPC_GET_CPU_CHAR) > 0 {
            match vm.cpu_char() {
                Ok(c) => spapr.set_cpu_characteristics(
                    c.character & c.character_mask,
                    c.behaviour & c.behaviour_mask,
                ),
                Err(e) => log::warn!("KVM_PPC_GET_CPU_CHAR failed: {e}"),
            }
        }
        let this = KvmVm {
            xics: OnceLock::new(),
            vm,
            _kvm: kvm,
            spapr,
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
        let mem = UserMemoryRegion {
            slot,
            flags,
            guest_phys_addr: region.start,
            memory_size: region.size,
            userspace_addr: host,
        };
        // SAFETY: `host .. host + size` is the live mapping of this guest RAM region, and
        // it outlives the slot: `self.ram` (and every vCPU's Spapr) keeps the mapping
        // alive, and the VM fd that owns the slots is closed before the last of them
        // goes (field order here; vCPUs hold the platform, not the VM fd's slots).
        unsafe { self.vm.set_user_memory_region(mem) }.map_err(|source| ArchError::MemorySlot {
            gpa: region.start,
            size: region.size,
            source,
        })
    }

    /// Turns KVM's dirty logging on or off for every slot, each under the write lock of
    /// its region.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), ArchError> {
        let flags = if enabled { kvm::MEM_LOG_DIRTY_PAGES } else { 0 };
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

    /// Whether KVM keeps dirty bits until told to clear them; without it (PowerPC's
    /// kvm-hv), reading the log clears it.
    pub fn manual_dirty_protect(&self) -> bool {
        self.manual_protect
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub(super) fn spapr(&self) -> &Arc<Spapr> {
        &self.spapr
    }

    /// Creates the in-kernel XICS (interrupt sources masked, its RTAS calls answered by
    /// the kernel). Before any vCPU is created. A host without one gets a warning: the
    /// console is polled and works without interrupts; the balloon does not.
    pub fn create_irqchip(&self) -> Result<(), ArchError> {
        let xics = match self.vm.create_device(kvm::DEV_TYPE_XICS) {
            Ok(xics) => xics,
            Err(e) => {
                log::warn!("No in-kernel XICS interrupt controller ({e}): running without interrupts from devices");
                return Ok(());
            }
        };
        for irq in XICS_IRQ_BASE..XICS_IRQ_BASE + XICS_SOURCES {
            xics.set_attr_u64(
                kvm::DEV_XICS_GRP_SOURCES,
                u64::from(irq),
                (0xff << XICS_PRIORITY_SHIFT) | XICS_MASKED,
            )
            .map_err(|source| ArchError::Irqchip {
                what: "an XICS interrupt source",
                source,
            })?;
        }
        for (name, token) in XICS_RTAS {
            self.vm
                .rtas_define_token(name, token)
                .map_err(|source| ArchError::Irqchip {
                    what: "the XICS RTAS calls",
                    source,
                })?;
        }
        // A second call keeps the first XICS (and drops this one).
        let _ = self.xics.set(xics);
        Ok(())
    }

    /// The in-kernel XICS, if there is one.
    pub(super) fn xics(&self) -> Option<&DeviceFd> {
        self.xics.get()
    }

    /// Saves the platform state and the XICS sources (vCPUs paused).
    pub fn save_state(&self) -> Result<super::VmState, super::StateError> {
        super::state::save_vm(self)
    }

    /// Restores a state saved by [`KvmVm::save_state`], after the vCPUs' (their XICS
    /// presentation state first), before they run.
    pub fn restore_state(&self, state: &super::VmState) -> Result<(), super::StateError> {
        super::state::restore_vm(self, state)
    }

    /// Makes a write to `evt` raise XICS interrupt `irq`.
    pub fn register_irqfd(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        irq: u32,
    ) -> Result<(), ArchError> {
        use std::os::fd::AsRawFd;
        if self.xics.get().is_none() {
            return Ok(());
        }
        self.vm
            .register_irqfd(evt.as_raw_fd(), irq)
            .map_err(|source| ArchError::Irqchip {
                what: "an interrupt eventfd",
                source,
            })
    }

    /// Creates vCPU `id`: sPAPR mode on, connected to the XICS as server `id`.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, ArchError> {
        if id >= MAX_CPUS as u64 {
            return Err(ArchError::Unsupported("more vCPUs than the machine has"));
        }
        let err = |what| move |source| ArchError::Vcpu { id, what, source };
        let fd = self.vm.create_vcpu(id).map_err(err("create it"))?;
        fd.enable_cap(cap::PPC_PAPR, [0; 4])
            .map_err(err("enable sPAPR mode (KVM_CAP_PPC_PAPR)"))?;
        if let Some(xics) = self.xics.get() {
            fd.enable_cap(
                cap::IRQ_XICS,
                [u64::try_from(xics.raw()).unwrap_or(u64::MAX), id, 0, 0],
            )
            .map_err(err("connect it to the XICS"))?;
        }
        Ok(KvmVcpu::new(id, fd, Arc::clone(&self.spapr)))
    }
}

impl DirtyLog for KvmVm {
    fn dirty_bitmap(&self, slot: u32, size: u64) -> std::io::Result<Vec<u64>> {
        self.vm.get_dirty_log(slot, size, self.ram.page_size())
    }

    fn clear_dirty(&self, slot: u32, first_page: u64, bits: &[u64]) -> std::io::Result<()> {
        if !self.manual_protect {
            // KVM_GET_DIRTY_LOG already cleared and re-protected.
            return Ok(());
        }
        self.vm.clear_dirty_log(slot, first_page, bits)
    }
}
