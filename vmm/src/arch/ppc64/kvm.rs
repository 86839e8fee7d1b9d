//! rangevm's own small KVM ioctl layer for PowerPC64: kvm-ioctls and kvm-bindings have
//! no PowerPC support, and vmm-sys-util's ioctl number macros use the generic encoding,
//! which is wrong here. PowerPC encodes an ioctl number as
//!
//! ```text
//! bits 31..29 direction (NONE = 1, READ = 2, WRITE = 4) | 28..16 size (13 bits) | 15..8 type | 7..0 nr
//! ```
//!
//! Every number below is computed from that encoding and the struct's size, and checked
//! at compile time against the value the kernel's headers give on ppc64le. The structs
//! are the kernel's, field for field; their sizes are checked too.
//!
//! Only what the sPAPR machine needs is here: the system, VM and vCPU fds, memory slots,
//! the dirty log, capabilities, ONE_REG, devices (XICS), irqfds, the radix MMU
//! configuration and RTAS tokens.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// KVM's ioctl type.
const KVMIO: u32 = 0xae;
const IOC_NONE: u32 = 1;
const IOC_READ: u32 = 2;
const IOC_WRITE: u32 = 4;

/// An ioctl number in PowerPC's encoding.
const fn ioc(dir: u32, nr: u32, size: usize) -> libc::c_ulong {
    assert!(size < (1 << 13), "PowerPC ioctl sizes have 13 bits");
    #[allow(clippy::cast_possible_truncation)] // Below 2^13, asserted above.
    let size = size as u32;
    ((dir << 29) | (size << 16) | (KVMIO << 8) | nr) as libc::c_ulong
}
const fn io(nr: u32) -> libc::c_ulong {
    ioc(IOC_NONE, nr, 0)
}
const fn ior<T>(nr: u32) -> libc::c_ulong {
    ioc(IOC_READ, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> libc::c_ulong {
    ioc(IOC_WRITE, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u32) -> libc::c_ulong {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UserMemoryRegion {
    /// Slot number.
    pub slot: u32,
    /// KVM_MEM_* flags.
    pub flags: u32,
    /// Guest-physical start.
    pub guest_phys_addr: u64,
    /// Bytes.
    pub memory_size: u64,
    /// Host virtual start.
    pub userspace_addr: u64,
}

/// `struct kvm_dirty_log` (the bitmap pointer in its union).
#[repr(C)]
#[derive(Debug)]
struct DirtyLogArg {
    slot: u32,
    padding: u32,
    bitmap: u64,
}

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
#[derive(Debug)]
struct ClearDirtyLogArg {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: u64,
}

/// `struct kvm_enable_cap`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct EnableCap {
    cap: u32,
    flags: u32,
    args: [u64; 4],
    pad: [u8; 64],
}

/// `struct kvm_one_reg`.
#[repr(C)]
#[derive(Debug)]
struct OneReg {
    id: u64,
    addr: u64,
}

/// `struct kvm_create_device`.
#[repr(C)]
#[derive(Debug)]
struct CreateDevice {
    type_: u32,
    fd: u32,
    flags: u32,
}

/// `struct kvm_device_attr`.
#[repr(C)]
#[derive(Debug)]
struct DeviceAttr {
    flags: u32,
    group: u32,
    attr: u64,
    addr: u64,
}

/// `struct kvm_irqfd`.
#[repr(C)]
#[derive(Debug)]
struct IrqFd {
    fd: u32,
    gsi: u32,
    flags: u32,
    resamplefd: u32,
    pad: [u8; 16],
}

/// `struct kvm_irq_level`.
#[repr(C)]
#[derive(Debug)]
struct IrqLevel {
    irq: u32,
    level: u32,
}

/// `struct kvm_ppc_mmuv3_cfg`.
#[repr(C)]
#[derive(Debug)]
struct MmuV3Cfg {
    flags: u64,
    process_table: u64,
}

/// `struct kvm_ppc_cpu_char`: the processor's speculation-related characteristics and
/// the behaviour it wants of software, as H_GET_CPU_CHARACTERISTICS reports them.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuChar {
    /// H_CPU_CHAR_* bits.
    pub character: u64,
    /// H_CPU_BEHAV_* bits.
    pub behaviour: u64,
    /// Which `character` bits KVM knows.
    pub character_mask: u64,
    /// Which `behaviour` bits KVM knows.
    pub behaviour_mask: u64,
}

/// `struct kvm_rtas_token_args`.
#[repr(C)]
#[derive(Debug)]
struct RtasTokenArgs {
    name: [u8; 120],
    token: u64,
}

/// `struct kvm_regs` of PowerPC.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    /// Program counter.
    pub pc: u64,
    /// Condition register.
    pub cr: u64,
    /// Count register.
    pub ctr: u64,
    /// Link register.
    pub lr: u64,
    /// Fixed-point exception register.
    pub xer: u64,
    /// Machine state register.
    pub msr: u64,
    /// Save/restore register 0.
    pub srr0: u64,
    /// Save/restore register 1.
    pub srr1: u64,
    /// Process id (BookE; unused on Book3S).
    pub pid: u64,
    /// SPRG0..7.
    pub sprg: [u64; 8],
    /// General-purpose registers.
    pub gpr: [u64; 32],
}

// The structs' sizes as the kernel has them (ppc64le).
const _: () = assert!(std::mem::size_of::<UserMemoryRegion>() == 32);
const _: () = assert!(std::mem::size_of::<DirtyLogArg>() == 16);
const _: () = assert!(std::mem::size_of::<ClearDirtyLogArg>() == 24);
const _: () = assert!(std::mem::size_of::<EnableCap>() == 104);
const _: () = assert!(std::mem::size_of::<OneReg>() == 16);
const _: () = assert!(std::mem::size_of::<CreateDevice>() == 12);
const _: () = assert!(std::mem::size_of::<DeviceAttr>() == 24);
const _: () = assert!(std::mem::size_of::<IrqFd>() == 32);
const _: () = assert!(std::mem::size_of::<IrqLevel>() == 8);
const _: () = assert!(std::mem::size_of::<MmuV3Cfg>() == 16);
const _: () = assert!(std::mem::size_of::<CpuChar>() == 32);
const _: () = assert!(std::mem::size_of::<RtasTokenArgs>() == 128);
const _: () = assert!(std::mem::size_of::<Regs>() == 392);

// System ioctls.
const KVM_GET_API_VERSION: libc::c_ulong = io(0x00);
const KVM_CREATE_VM: libc::c_ulong = io(0x01);
const KVM_CHECK_EXTENSION: libc::c_ulong = io(0x03);
const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = io(0x04);
// VM ioctls.
const KVM_CREATE_VCPU: libc::c_ulong = io(0x41);
const KVM_GET_DIRTY_LOG: libc::c_ulong = iow::<DirtyLogArg>(0x42);
const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = iow::<UserMemoryRegion>(0x46);
const KVM_IRQ_LINE: libc::c_ulong = iow::<IrqLevel>(0x61);
const KVM_IRQFD: libc::c_ulong = iow::<IrqFd>(0x76);
const KVM_ENABLE_CAP: libc::c_ulong = iow::<EnableCap>(0xa3);
const KVM_PPC_RTAS_DEFINE_TOKEN: libc::c_ulong = iow::<RtasTokenArgs>(0xac);
const KVM_PPC_CONFIGURE_V3_MMU: libc::c_ulong = iow::<MmuV3Cfg>(0xaf);
const KVM_PPC_GET_CPU_CHAR: libc::c_ulong = ior::<CpuChar>(0xb1);
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = iowr::<ClearDirtyLogArg>(0xc0);
const KVM_CREATE_DEVICE: libc::c_ulong = iowr::<CreateDevice>(0xe0);
const KVM_SET_DEVICE_ATTR: libc::c_ulong = iow::<DeviceAttr>(0xe1);
const KVM_GET_DEVICE_ATTR: libc::c_ulong = iow::<DeviceAttr>(0xe2);
// vCPU ioctls.
const KVM_RUN: libc::c_ulong = io(0x80);
const KVM_GET_REGS: libc::c_ulong = ior::<Regs>(0x81);
const KVM_SET_REGS: libc::c_ulong = iow::<Regs>(0x82);
const KVM_GET_ONE_REG: libc::c_ulong = iow::<OneReg>(0xab);
const KVM_SET_ONE_REG: libc::c_ulong = iow::<OneReg>(0xac);

// The kernel's numbers on powerpc64le (from <linux/kvm.h> with PowerPC's <asm/ioctl.h>).
const _: () = assert!(KVM_GET_API_VERSION == 0x2000_ae00);
const _: () = assert!(KVM_CREATE_VM == 0x2000_ae01);
const _: () = assert!(KVM_CHECK_EXTENSION == 0x2000_ae03);
const _: () = assert!(KVM_GET_VCPU_MMAP_SIZE == 0x2000_ae04);
const _: () = assert!(KVM_CREATE_VCPU == 0x2000_ae41);
const _: () = assert!(KVM_GET_DIRTY_LOG == 0x8010_ae42);
const _: () = assert!(KVM_SET_USER_MEMORY_REGION == 0x8020_ae46);
const _: () = assert!(KVM_IRQ_LINE == 0x8008_ae61);
const _: () = assert!(KVM_IRQFD == 0x8020_ae76);
const _: () = assert!(KVM_ENABLE_CAP == 0x8068_aea3);
const _: () = assert!(KVM_PPC_RTAS_DEFINE_TOKEN == 0x8080_aeac);
const _: () = assert!(KVM_PPC_CONFIGURE_V3_MMU == 0x8010_aeaf);
const _: () = assert!(KVM_PPC_GET_CPU_CHAR == 0x4020_aeb1);
const _: () = assert!(KVM_CLEAR_DIRTY_LOG == 0xc018_aec0);
const _: () = assert!(KVM_CREATE_DEVICE == 0xc00c_aee0);
const _: () = assert!(KVM_SET_DEVICE_ATTR == 0x8018_aee1);
const _: () = assert!(KVM_GET_DEVICE_ATTR == 0x8018_aee2);
const _: () = assert!(KVM_RUN == 0x2000_ae80);
const _: () = assert!(KVM_GET_REGS == 0x4188_ae81);
const _: () = assert!(KVM_SET_REGS == 0x8188_ae82);
const _: () = assert!(KVM_GET_ONE_REG == 0x8010_aeab);
const _: () = assert!(KVM_SET_ONE_REG == 0x8010_aeac);

/// The KVM API version this layer speaks.
pub const KVM_API_VERSION: i32 = 12;

/// Capabilities (`KVM_CAP_*`).
pub mod cap {
    /// User memory slots.
    pub const USER_MEMORY: u32 = 3;
    /// irqfds.
    pub const IRQFD: u32 = 32;
    /// The most vCPUs a VM may have.
    pub const MAX_VCPUS: u32 = 66;
    /// sPAPR hypercalls exit to userspace (enabled per vCPU; KVM_RUN fails without).
    pub const PPC_PAPR: u32 = 68;
    /// KVM_GET/SET_ONE_REG.
    pub const ONE_REG: u32 = 70;
    /// RTAS tokens handled in the kernel.
    pub const PPC_RTAS: u32 = 91;
    /// KVM_PPC_GET_CPU_CHAR.
    pub const PPC_GET_CPU_CHAR: u32 = 151;
    /// The in-kernel XICS interrupt controller.
    pub const IRQ_XICS: u32 = 92;
    /// Hypercalls the kernel handles, chosen by userspace.
    pub const PPC_ENABLE_HCALL: u32 = 104;
    /// Radix MMU guests.
    pub const PPC_MMU_RADIX: u32 = 134;
    /// ISA v3.00 hash MMU guests.
    pub const PPC_MMU_HASH_V3: u32 = 135;
    /// Nested HV (this host is itself a guest hypervisor).
    pub const PPC_NESTED_HV: u32 = 160;
    /// Manual dirty-log protection (KVM_CLEAR_DIRTY_LOG).
    pub const MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
}

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
pub const DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const MEM_LOG_DIRTY_PAGES: u32 = 1;
/// `KVM_DEV_TYPE_XICS`.
pub const DEV_TYPE_XICS: u32 = 3;
/// `KVM_DEV_XICS_GRP_SOURCES`: one 64-bit attribute per interrupt source.
pub const DEV_XICS_GRP_SOURCES: u32 = 1;
/// `KVM_PPC_MMUV3_RADIX`.
pub const MMUV3_RADIX: u64 = 1;
/// `KVM_PPC_MMUV3_GTSE`.
pub const MMUV3_GTSE: u64 = 2;

/// Exit reasons (`KVM_EXIT_*`) this backend tells apart.
pub mod exit {
    /// Unknown.
    pub const UNKNOWN: u32 = 0;
    /// Debug.
    pub const DEBUG: u32 = 4;
    /// MMIO access.
    pub const MMIO: u32 = 6;
    /// Shutdown.
    pub const SHUTDOWN: u32 = 8;
    /// Entry failed.
    pub const FAIL_ENTRY: u32 = 9;
    /// Interrupted by a signal.
    pub const INTR: u32 = 10;
    /// Internal error.
    pub const INTERNAL_ERROR: u32 = 17;
    /// An sPAPR hypercall.
    pub const PAPR_HCALL: u32 = 19;
    /// A system event (reset, shutdown, crash).
    pub const SYSTEM_EVENT: u32 = 24;
}

/// ONE_REG register ids (`KVM_REG_PPC_*`).
pub mod reg {
    const PPC: u64 = 0x1000_0000_0000_0000;
    const U32: u64 = 0x0020_0000_0000_0000;
    const U64: u64 = 0x0030_0000_0000_0000;
    const U128: u64 = 0x0040_0000_0000_0000;

    /// The size in bytes of register `id`.
    pub const fn size(id: u64) -> usize {
        1 << ((id >> 52) & 0xf)
    }

    /// DAR.
    pub const DAR: u64 = PPC | U64 | 0xc;
    /// DSISR.
    pub const DSISR: u64 = PPC | U32 | 0xd;
    /// AMR.
    pub const AMR: u64 = PPC | U64 | 0xe;
    /// UAMOR.
    pub const UAMOR: u64 = PPC | U64 | 0xf;
    /// DSCR.
    pub const DSCR: u64 = PPC | U64 | 0x9;
    /// PURR.
    pub const PURR: u64 = PPC | U64 | 0xa;
    /// SPURR.
    pub const SPURR: u64 = PPC | U64 | 0xb;
    /// FPR n (n < 32).
    pub const fn fpr(n: u64) -> u64 {
        PPC | U64 | (0x20 + n)
    }
    /// VSR n (n < 32), 128 bits (its high half is FPR n).
    pub const fn vsr(n: u64) -> u64 {
        PPC | U128 | (0x60 + n)
    }
    /// VR n (n < 32), 128 bits.
    pub const fn vr(n: u64) -> u64 {
        PPC | U128 | (0x40 + n)
    }
    /// FPSCR.
    pub const FPSCR: u64 = PPC | U64 | 0x80;
    /// VSCR.
    pub const VSCR: u64 = PPC | U32 | 0x81;
    /// The VPA's address.
    pub const VPA_ADDR: u64 = PPC | U64 | 0x82;
    /// The XICS presentation controller state of this vCPU.
    pub const ICP_STATE: u64 = PPC | U64 | 0x8c;
    /// Timebase offset of the VM.
    pub const TB_OFFSET: u64 = PPC | U64 | 0x9c;
    /// IAMR.
    pub const IAMR: u64 = PPC | U64 | 0x9f;
    /// FSCR.
    pub const FSCR: u64 = PPC | U64 | 0xa3;
    /// TAR.
    pub const TAR: u64 = PPC | U64 | 0xa8;
    /// PID (radix process id).
    pub const PID: u64 = PPC | U64 | 0xb2;
    /// VRSAVE.
    pub const VRSAVE: u64 = PPC | U32 | 0xb4;
    /// LPCR, 64 bits.
    pub const LPCR_64: u64 = PPC | U64 | 0xb5;
    /// PPR.
    pub const PPR: u64 = PPC | U64 | 0xb6;
    /// Architecture compatibility level.
    pub const ARCH_COMPAT: u64 = PPC | U32 | 0xb7;
    /// TIDR.
    pub const TIDR: u64 = PPC | U64 | 0xbc;
    /// PSSCR.
    pub const PSSCR: u64 = PPC | U64 | 0xbd;
    /// When the decrementer expires, in timebase ticks.
    pub const DEC_EXPIRY: u64 = PPC | U64 | 0xbe;

    const _: () = assert!(LPCR_64 == 0x1030_0000_0000_00b5);
    const _: () = assert!(size(LPCR_64) == 8 && size(DSISR) == 4 && size(vsr(0)) == 16);
}

/// LPCR's interrupt little-endian bit (PPC_BIT(38)).
pub const LPCR_ILE: u64 = 1 << (63 - 38);
/// LPCR's alternate interrupt location field (bits 39..40).
pub const LPCR_AIL: u64 = 3 << (63 - 40);

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl taking no argument (or an integer one).
fn ioctl_val(fd: &File, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: `req` is one of this module's numbers whose argument is an integer (or
    // none), so the kernel reads no user memory; `fd` is an open KVM fd.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) })
}

/// An ioctl whose argument is a pointer to `T`.
///
/// # Safety
/// `req` must take a `T` (the kernel reads, and for READ numbers writes, exactly
/// `size_of::<T>()` bytes), and any pointer inside `*arg` must be valid for the access
/// the kernel makes through it for the duration of the call.
unsafe fn ioctl_ptr<T>(fd: &File, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` and `req` match; `fd` is open.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg.cast::<c_void>()) })
}

/// `/dev/kvm`.
#[derive(Debug)]
pub struct Kvm {
    fd: File,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version.
    pub fn new() -> io::Result<Self> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")?;
        let kvm = Kvm { fd };
        let version = ioctl_val(&kvm.fd, KVM_GET_API_VERSION, 0)?;
        if version != KVM_API_VERSION {
            return Err(io::Error::other(format!(
                "KVM API version {version}, rangevm needs {KVM_API_VERSION}"
            )));
        }
        Ok(kvm)
    }

    /// KVM_CHECK_EXTENSION on the system fd.
    pub fn check_extension(&self, cap: u32) -> i32 {
        ioctl_val(&self.fd, KVM_CHECK_EXTENSION, libc::c_ulong::from(cap)).unwrap_or(0)
    }

    /// Creates a VM of `vm_type` (0: the default, HV where kvm-hv is loaded).
    pub fn create_vm(&self, vm_type: u64) -> io::Result<VmFd> {
        let fd = ioctl_val(&self.fd, KVM_CREATE_VM, vm_type)?;
        // SAFETY: KVM_CREATE_VM returned a new fd that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        let run_size = ioctl_val(&self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)?;
        let run_size = usize::try_from(run_size).map_err(io::Error::other)?;
        Ok(VmFd { fd, run_size })
    }
}

/// A VM's fd.
#[derive(Debug)]
pub struct VmFd {
    fd: File,
    run_size: usize,
}

impl VmFd {
    /// KVM_CHECK_EXTENSION on the VM (the answer may differ from the system fd's:
    /// HV and PR VMs support different things).
    pub fn check_extension(&self, cap: u32) -> i32 {
        ioctl_val(&self.fd, KVM_CHECK_EXTENSION, libc::c_ulong::from(cap)).unwrap_or(0)
    }

    /// Creates, moves or deletes a memory slot.
    ///
    /// # Safety
    /// `region.userspace_addr .. + memory_size` must be a mapping of this process that
    /// stays valid until the slot is deleted or the VM destroyed.
    pub unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> io::Result<()> {
        let mut region = region;
        // SAFETY: the number takes a kvm_userspace_memory_region; the mapping it names is
        // valid for the slot's life (the caller's promise).
        unsafe { ioctl_ptr(&self.fd, KVM_SET_USER_MEMORY_REGION, &mut region) }.map(|_| ())
    }

    /// KVM_ENABLE_CAP on the VM.
    pub fn enable_cap(&self, cap: u32, args: [u64; 4]) -> io::Result<()> {
        enable_cap(&self.fd, cap, args)
    }

    /// Creates vCPU `id` and maps its `kvm_run` area.
    pub fn create_vcpu(&self, id: u64) -> io::Result<VcpuFd> {
        let fd = ioctl_val(&self.fd, KVM_CREATE_VCPU, id)?;
        // SAFETY: KVM_CREATE_VCPU returned a new fd that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        // SAFETY: a fresh shared mapping of the vCPU fd's kvm_run area, of the size KVM
        // reports; no existing memory is affected.
        let run = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.run_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if run == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(VcpuFd {
            fd,
            run: run.cast(),
            run_size: self.run_size,
        })
    }

    /// KVM_GET_DIRTY_LOG of `slot` (`size` bytes): one bit per host page.
    pub fn get_dirty_log(&self, slot: u32, size: u64, page: u64) -> io::Result<Vec<u64>> {
        let pages = size.div_ceil(page);
        let words = usize::try_from(pages.div_ceil(64)).map_err(io::Error::other)?;
        let mut bitmap = vec![0u64; words];
        let mut arg = DirtyLogArg {
            slot,
            padding: 0,
            bitmap: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: the number takes a kvm_dirty_log; its bitmap pointer covers one bit per
        // page of the slot (`words` u64s, rounded up to 64 bits as KVM writes them) and
        // lives until the call returns.
        unsafe { ioctl_ptr(&self.fd, KVM_GET_DIRTY_LOG, &mut arg) }?;
        Ok(bitmap)
    }

    /// KVM_CLEAR_DIRTY_LOG: re-protects the pages whose bits are set in `bits`, from
    /// `first_page` (a multiple of 64) of `slot`.
    pub fn clear_dirty_log(&self, slot: u32, first_page: u64, bits: &[u64]) -> io::Result<()> {
        let mut bitmap = bits.to_vec();
        let mut arg = ClearDirtyLogArg {
            slot,
            num_pages: u32::try_from(bits.len() * 64).map_err(io::Error::other)?,
            first_page,
            bitmap: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: the number takes a kvm_clear_dirty_log whose bitmap covers `num_pages`
        // bits of `bitmap`, alive until the call returns.
        unsafe { ioctl_ptr(&self.fd, KVM_CLEAR_DIRTY_LOG, &mut arg) }.map(|_| ())
    }

    /// KVM_IRQFD: a write to `evt` raises interrupt `gsi`.
    pub fn register_irqfd(&self, evt: RawFd, gsi: u32) -> io::Result<()> {
        let mut arg = IrqFd {
            fd: u32::try_from(evt).map_err(io::Error::other)?,
            gsi,
            flags: 0,
            resamplefd: 0,
            pad: [0; 16],
        };
        // SAFETY: the number takes a kvm_irqfd, which holds no pointers.
        unsafe { ioctl_ptr(&self.fd, KVM_IRQFD, &mut arg) }.map(|_| ())
    }

    /// KVM_IRQ_LINE: sets interrupt `irq`'s level.
    pub fn irq_line(&self, irq: u32, level: bool) -> io::Result<()> {
        let mut arg = IrqLevel {
            irq,
            level: u32::from(level),
        };
        // SAFETY: the number takes a kvm_irq_level, which holds no pointers.
        unsafe { ioctl_ptr(&self.fd, KVM_IRQ_LINE, &mut arg) }.map(|_| ())
    }

    /// KVM_PPC_CONFIGURE_V3_MMU: radix or HPT, GTSE, and the process table the guest
    /// registered (the second doubleword of its partition-table entry).
    pub fn configure_v3_mmu(&self, flags: u64, process_table: u64) -> io::Result<()> {
        let mut arg = MmuV3Cfg {
            flags,
            process_table,
        };
        // SAFETY: the number takes a kvm_ppc_mmuv3_cfg, which holds no pointers.
        unsafe { ioctl_ptr(&self.fd, KVM_PPC_CONFIGURE_V3_MMU, &mut arg) }.map(|_| ())
    }

    /// KVM_PPC_GET_CPU_CHAR: what the host processor says of speculation (what a guest
    /// asks with H_GET_CPU_CHARACTERISTICS).
    pub fn cpu_char(&self) -> io::Result<CpuChar> {
        let mut arg = CpuChar::default();
        // SAFETY: the number fills a kvm_ppc_cpu_char (four u64s, no pointers), which
        // `arg` is, and reads nothing from it.
        unsafe { ioctl_ptr(&self.fd, KVM_PPC_GET_CPU_CHAR, &mut arg) }?;
        Ok(arg)
    }

    /// KVM_PPC_RTAS_DEFINE_TOKEN: the kernel answers RTAS call `name` when the guest
    /// passes `token`.
    pub fn rtas_define_token(&self, name: &str, token: u32) -> io::Result<()> {
        let mut arg = RtasTokenArgs {
            name: [0; 120],
            token: u64::from(token),
        };
        let bytes = name.as_bytes();
        if bytes.len() >= arg.name.len() {
            return Err(io::Error::other("RTAS call name too long"));
        }
        arg.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: the number takes a kvm_rtas_token_args, which holds no pointers.
        unsafe { ioctl_ptr(&self.fd, KVM_PPC_RTAS_DEFINE_TOKEN, &mut arg) }.map(|_| ())
    }

    /// KVM_CREATE_DEVICE: an in-kernel device of `type_`; returns its fd.
    pub fn create_device(&self, type_: u32) -> io::Result<DeviceFd> {
        let mut arg = CreateDevice {
            type_,
            fd: 0,
            flags: 0,
        };
        // SAFETY: the number takes a kvm_create_device (no pointers); the kernel writes
        // the new fd into it.
        unsafe { ioctl_ptr(&self.fd, KVM_CREATE_DEVICE, &mut arg) }?;
        let fd = RawFd::try_from(arg.fd).map_err(io::Error::other)?;
        // SAFETY: KVM_CREATE_DEVICE returned a new fd that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(DeviceFd { fd })
    }
}

fn enable_cap(fd: &File, cap: u32, args: [u64; 4]) -> io::Result<()> {
    let mut arg = EnableCap {
        cap,
        flags: 0,
        args,
        pad: [0; 64],
    };
    // SAFETY: the number takes a kvm_enable_cap; no capability this backend enables
    // takes pointers in its args.
    unsafe { ioctl_ptr(fd, KVM_ENABLE_CAP, &mut arg) }.map(|_| ())
}

/// An in-kernel device's fd.
#[derive(Debug)]
pub struct DeviceFd {
    fd: File,
}

impl DeviceFd {
    /// The raw fd (KVM_CAP_IRQ_XICS takes it as an argument).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// KVM_SET_DEVICE_ATTR with a 64-bit value.
    pub fn set_attr_u64(&self, group: u32, attr: u64, value: u64) -> io::Result<()> {
        let mut value = value;
        let mut arg = DeviceAttr {
            flags: 0,
            group,
            attr,
            addr: std::ptr::addr_of_mut!(value) as u64,
        };
        // SAFETY: the number takes a kvm_device_attr whose addr points at a u64 (the
        // size of the attributes this backend sets) alive until the call returns.
        unsafe { ioctl_ptr(&self.fd, KVM_SET_DEVICE_ATTR, &mut arg) }.map(|_| ())
    }

    /// KVM_GET_DEVICE_ATTR of a 64-bit value.
    pub fn get_attr_u64(&self, group: u32, attr: u64) -> io::Result<u64> {
        let mut value = 0u64;
        let mut arg = DeviceAttr {
            flags: 0,
            group,
            attr,
            addr: std::ptr::addr_of_mut!(value) as u64,
        };
        // SAFETY: as in `set_attr_u64`; the kernel writes one u64 through addr.
        unsafe { ioctl_ptr(&self.fd, KVM_GET_DEVICE_ATTR, &mut arg) }?;
        Ok(value)
    }
}

/// Byte offsets in `struct kvm_run`.
mod run_off {
    pub const IMMEDIATE_EXIT: usize = 1;
    pub const EXIT_REASON: usize = 8;
    /// The exit union.
    pub const UNION: usize = 32;
    /// Bytes of the exit union.
    pub const UNION_SIZE: usize = 256;
}

/// A vCPU's fd and its mapped `kvm_run` area.
#[derive(Debug)]
pub struct VcpuFd {
    fd: File,
    run: *mut u8,
    run_size: usize,
}

// SAFETY: the kvm_run mapping belongs to this vCPU fd alone; it is only accessed through
// `&mut self` (or `&self` for reads between runs), so moving the owner to another thread
// (the vCPU thread) is sound. KVM allows a vCPU fd to be used from any one thread at a time.
unsafe impl Send for VcpuFd {}

impl Drop for VcpuFd {
    fn drop(&mut self) {
        // SAFETY: `run` is the mapping made in `create_vcpu` of `run_size` bytes, and no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.run.cast(), self.run_size) };
    }
}

/// What the vCPU exited with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// An sPAPR hypercall: its number and 9 arguments (r4..r12).
    Hcall {
        /// The hypercall number (r3).
        nr: u64,
        /// r4..r12.
        args: [u64; 9],
    },
    /// An MMIO read of `len` bytes at `addr`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes (1..=8).
        len: usize,
    },
    /// An MMIO write.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// The bytes written (`len` of them valid).
        data: [u8; 8],
        /// Bytes (1..=8).
        len: usize,
    },
    /// KVM_EXIT_SYSTEM_EVENT of this type.
    SystemEvent(u32),
    /// Interrupted (signal, or immediate_exit).
    Interrupted,
    /// KVM_EXIT_INTERNAL_ERROR with this suberror.
    InternalError(u32),
    /// KVM_EXIT_SHUTDOWN.
    Shutdown,
    /// Any other exit reason.
    Other(u32),
}

impl VcpuFd {
    fn run_u8(&self, off: usize) -> u8 {
        debug_assert!(off < self.run_size);
        // SAFETY: `off` is inside the kvm_run mapping (offsets of kvm_run's header and
        // its 256-byte union, all below the mapping's size of at least a page); the
        // vCPU is not running (KVM_RUN is only called through `&mut self`).
        unsafe { self.run.add(off).read_volatile() }
    }

    fn run_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(std::array::from_fn(|i| self.run_u8(off + i)))
    }

    fn run_u64(&self, off: usize) -> u64 {
        u64::from_ne_bytes(std::array::from_fn(|i| self.run_u8(off + i)))
    }

    fn set_run_u8(&mut self, off: usize, v: u8) {
        debug_assert!(off < self.run_size);
        // SAFETY: as in `run_u8`; `&mut self` excludes a concurrent KVM_RUN.
        unsafe { self.run.add(off).write_volatile(v) }
    }

    fn set_run_u64(&mut self, off: usize, v: u64) {
        for (i, b) in v.to_ne_bytes().into_iter().enumerate() {
            self.set_run_u8(off + i, b);
        }
    }

    /// Sets or clears `immediate_exit` (KVM_RUN returns EINTR at once when set).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.set_run_u8(run_off::IMMEDIATE_EXIT, u8::from(on));
    }

    /// KVM_RUN, then decodes the exit. EINTR/EAGAIN come back as `Exit::Interrupted`.
    pub fn run(&mut self) -> io::Result<Exit> {
        if let Err(e) = ioctl_val(&self.fd, KVM_RUN, 0) {
            return match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => Ok(Exit::Interrupted),
                _ => Err(e),
            };
        }
        let u = run_off::UNION;
        Ok(match self.run_u32(run_off::EXIT_REASON) {
            exit::PAPR_HCALL => Exit::Hcall {
                nr: self.run_u64(u),
                args: std::array::from_fn(|i| self.run_u64(u + 16 + 8 * i)),
            },
            exit::MMIO => {
                let addr = self.run_u64(u);
                let len = usize::try_from(self.run_u32(u + 16)).unwrap_or(0).min(8);
                if self.run_u8(u + 20) != 0 {
                    Exit::MmioWrite {
                        addr,
                        data: std::array::from_fn(|i| self.run_u8(u + 8 + i)),
                        len,
                    }
                } else {
                    Exit::MmioRead { addr, len }
                }
            }
            exit::SYSTEM_EVENT => Exit::SystemEvent(self.run_u32(u)),
            exit::INTR => Exit::Interrupted,
            exit::INTERNAL_ERROR => Exit::InternalError(self.run_u32(u)),
            exit::SHUTDOWN => Exit::Shutdown,
            other => Exit::Other(other),
        })
    }

    /// Answers the last hypercall: r3 on return to the guest.
    pub fn set_hcall_ret(&mut self, ret: u64) {
        self.set_run_u64(run_off::UNION + 8, ret);
    }

    /// Sets what the guest finds in r4..r12 when the last hypercall returns (KVM copies
    /// `papr_hcall.args` back into them).
    pub fn set_hcall_args(&mut self, args: &[u64]) {
        for (i, &a) in args.iter().take(9).enumerate() {
            self.set_run_u64(run_off::UNION + 16 + 8 * i, a);
        }
    }

    /// Answers the last MMIO read.
    pub fn set_mmio_data(&mut self, data: &[u8]) {
        for (i, &b) in data.iter().take(8).enumerate() {
            self.set_run_u8(run_off::UNION + 8 + i, b);
        }
    }

    /// KVM_GET_REGS.
    pub fn get_regs(&self) -> io::Result<Regs> {
        let mut regs = Regs::default();
        // SAFETY: the number takes a kvm_regs, which `Regs` is (size checked above).
        unsafe { ioctl_ptr(&self.fd, KVM_GET_REGS, &mut regs) }?;
        Ok(regs)
    }

    /// KVM_SET_REGS.
    pub fn set_regs(&self, regs: &Regs) -> io::Result<()> {
        let mut regs = *regs;
        // SAFETY: as in `get_regs`; the kernel only reads it.
        unsafe { ioctl_ptr(&self.fd, KVM_SET_REGS, &mut regs) }.map(|_| ())
    }

    /// KVM_GET_ONE_REG of a register of up to 16 bytes: its bytes, `reg::size(id)` of them.
    pub fn get_one_reg(&self, id: u64) -> io::Result<Vec<u8>> {
        let size = reg::size(id);
        if size > 16 {
            return Err(io::Error::other("register wider than 128 bits"));
        }
        let mut buf = [0u8; 16];
        let mut arg = OneReg {
            id,
            addr: buf.as_mut_ptr() as u64,
        };
        // SAFETY: the number takes a kvm_one_reg whose addr points at 16 bytes, at least
        // the register's size encoded in `id`, alive until the call returns.
        unsafe { ioctl_ptr(&self.fd, KVM_GET_ONE_REG, &mut arg) }?;
        Ok(buf[..size].to_vec())
    }

    /// KVM_SET_ONE_REG; `value` must be `reg::size(id)` bytes.
    pub fn set_one_reg(&self, id: u64, value: &[u8]) -> io::Result<()> {
        if value.len() != reg::size(id) || value.len() > 16 {
            return Err(io::Error::other(format!(
                "register {id:#x} takes {} bytes, not {}",
                reg::size(id),
                value.len()
            )));
        }
        let mut buf = [0u8; 16];
        buf[..value.len()].copy_from_slice(value);
        let mut arg = OneReg {
            id,
            addr: buf.as_mut_ptr() as u64,
        };
        // SAFETY: as in `get_one_reg`; the kernel reads the register's size from addr.
        unsafe { ioctl_ptr(&self.fd, KVM_SET_ONE_REG, &mut arg) }.map(|_| ())
    }

    /// A 64-bit ONE_REG register.
    pub fn get_reg_u64(&self, id: u64) -> io::Result<u64> {
        let b = self.get_one_reg(id)?;
        let mut w = [0u8; 8];
        w[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
        Ok(u64::from_ne_bytes(w))
    }

    /// Sets a 64-bit ONE_REG register.
    pub fn set_reg_u64(&self, id: u64, value: u64) -> io::Result<()> {
        self.set_one_reg(id, &value.to_ne_bytes())
    }

    /// KVM_ENABLE_CAP on the vCPU.
    pub fn enable_cap(&self, cap: u32, args: [u64; 4]) -> io::Result<()> {
        enable_cap(&self.fd, cap, args)
    }
}

const _: () = assert!(run_off::UNION + run_off::UNION_SIZE <= 4096);
