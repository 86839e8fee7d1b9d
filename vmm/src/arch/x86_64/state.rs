//! A vCPU's and a VM's KVM state, saved at switch-over and restored on the destination,
//! and their byte form for the migration stream.
//!
//! [`VcpuState`] holds what KVM keeps per vCPU: CPUID, general and special registers,
//! FPU and XSAVE areas, XCRs, debug registers, the LAPIC page, a selected set of MSRs,
//! the MP state, pending events and the TSC frequency. [`VmState`] holds the in-kernel
//! irqchip (both PICs, the IOAPIC), the PIT and the kvm clock.
//!
//! # Byte form
//!
//! Both encode to an explicit little-endian layout, field by field (the padding and
//! reserved fields of the kernel structs are not sent and read back as zero):
//!
//! ```text
//! magic [4] | version u16 | reserved u16 (0) | payload length u32 | payload | CRC-32 u32
//! ```
//!
//! The magic is `RVCS` for a vCPU, `RVVS` for a VM. The CRC-32 (IEEE) covers everything
//! before it. Every variable-length list carries a u32 count checked against a bound
//! before anything is allocated, and decoding checks every length, so bad bytes give a
//! [`StateError`], never a panic. Any change of the payload bumps [`STATE_VERSION`].
//! Version 1 payloads, each struct's fields in the kernel's order (`flag` is a u8,
//! 0 or 1, saying whether the optional part follows):
//!
//! ```text
//! vCPU: CPUID count u32 (<= 256), entries (function index flags eax ebx ecx edx: u32)
//!       | regs: 18 x u64 (rax..r15, rip, rflags)
//!       | sregs: 8 segments (base u64, limit u32, selector u16, type present dpl db s l
//!         g avl unusable: u8), gdt idt (base u64, limit u16), cr0 cr2 cr3 cr4 cr8 efer
//!         apic_base u64, interrupt_bitmap 4 x u64
//!       | fpu: fpr 8 x 16 bytes, fcw u16, fsw u16, ftwx u8, last_opcode u16, last_ip
//!         u64, last_dp u64, xmm 16 x 16 bytes, mxcsr u32
//!       | flag, XSAVE word count u32 (1024..=262144), words u32
//!       | flag, XCR count u32 (<= 16), flags u32, (xcr u32, value u64) per XCR
//!       | flag, debug registers db0..db3 dr6 dr7 flags: u64
//!       | LAPIC page 1024 bytes
//!       | MSR count u32 (<= 256), (index u32, data u64) per MSR
//!       | mp_state u32
//!       | events: exception (injected nr has_error_code pending u8, error_code u32),
//!         interrupt (injected nr soft shadow u8), nmi (injected pending masked u8),
//!         sipi_vector u32, flags u32, smi (smm pending smm_inside_nmi latched_init u8),
//!         triple_fault pending u8, exception_has_payload u8, exception_payload u64
//!       | flag, TSC kHz u32 (0 when absent)
//! VM:   master PIC, slave PIC: 16 x u8 each (kvm_pic_state's order)
//!       | IOAPIC: base_address u64, ioregsel u32, id u32, irr u32, 24 x u64 entries
//!       | PIT: 3 channels (count u32, latched_count u16, count_latched status_latched
//!         status read_state write_state write_latch rw_mode mode bcd gate u8,
//!         count_load_time i64), flags u32
//!       | clock: clock u64, flags u32, realtime u64, host_tsc u64
//! ```

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::arch::codec::CodecError;

mod bytes;

/// The version of the byte layout written by `to_bytes`, the only one `from_bytes` reads.
pub const STATE_VERSION: u16 = 1;

/// Words (u32) of the legacy 4 KiB XSAVE area: the least an XSAVE blob may hold.
const XSAVE_LEGACY_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;
/// The most XSAVE words a blob may hold (1 MiB; AMX needs about 11 KiB).
const XSAVE_MAX_WORDS: usize = 1 << 18;
/// The XCR slots in `kvm_xcrs`.
const MAX_XCRS: usize = 16;
/// Bytes of the LAPIC register page.
const LAPIC_BYTES: usize = 1024;
/// IOAPIC redirection-table entries in `kvm_ioapic_state`.
const IOAPIC_PINS: usize = 24;

// The layout below assumes the kernel's sizes; a kvm-bindings change would show here.
const _: () = assert!(std::mem::size_of::<kvm_xsave>() == 4096);
const _: () = assert!(std::mem::size_of::<kvm_lapic_state>() == LAPIC_BYTES);
const _: () = assert!(std::mem::size_of::<kvm_pic_state>() == 16);
const _: () = assert!(std::mem::size_of::<kvm_ioapic_state>() == 24 + 8 * IOAPIC_PINS);

/// Errors of saving, restoring, encoding and decoding state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM state ioctl failed.
    #[error("Cannot {op} the {what}")]
    Kvm {
        /// "read" or "write".
        op: &'static str,
        /// Which state.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// /dev/kvm could not be opened to query the host's capabilities.
    #[error("Cannot query this host's KVM")]
    Host(#[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped early.
    #[error("KVM accepted {set} of {wanted} MSRs and refused MSR {index:#x}")]
    MsrRejected {
        /// The MSR it refused.
        index: u32,
        /// How many it set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// Saving or restoring needs something this host's KVM does not have.
    #[error("This host's KVM lacks {0}")]
    Unsupported(&'static str),
    /// Completing the vCPU's last exit ended in another exit the VMM must handle (a
    /// string I/O instruction in flight): run the vCPU on and pause it again.
    #[error("The vCPU has an I/O access in flight")]
    IoInFlight,
    /// The bytes are not a valid state.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// A vCPU's KVM state.
#[derive(Debug, Clone)]
pub struct VcpuState {
    /// The CPUID the vCPU shows (set first on restore, so the destination shows the same).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The legacy FPU/SSE state (used alone where the host has no XSAVE).
    pub fpu: kvm_fpu,
    /// The XSAVE area as u32 words (at least 1024), where the host has XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// The extended control registers (XCR0), where the host has them.
    pub xcrs: Option<kvm_xcrs>,
    /// DR0-3, DR6, DR7, where the host has KVM_GET_DEBUGREGS.
    pub debugregs: Option<kvm_debugregs>,
    /// The LAPIC register page.
    pub lapic: kvm_lapic_state,
    /// The saved MSRs (index, value).
    pub msrs: Vec<kvm_msr_entry>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending and injected exceptions, interrupts, NMI, SMI, SIPI vector.
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency in kHz, where the host reports it.
    pub tsc_khz: Option<u32>,
}

/// A VM's in-kernel device state: PICs, IOAPIC, PIT, kvm clock.
#[derive(Debug, Clone)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_pic_state,
    /// The slave 8259.
    pub pic_slave: kvm_pic_state,
    /// The IOAPIC.
    pub ioapic: kvm_ioapic_state,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvm clock (`clock` in ns; restored without the host-time flags, so the
    /// guest's clock goes on from the saved value).
    pub clock: kvm_clock_data,
}

// ---------------------------------------------------------------------------------------
// The host: capabilities and the MSRs worth saving, found once per process.

#[derive(Debug)]
struct Host {
    /// Bytes KVM_GET/SET_XSAVE use (KVM_CAP_XSAVE2, or 4096), or None without XSAVE.
    xsave_bytes: Option<usize>,
    /// The candidates for saving, in order.
    msrs: Vec<u32>,
    /// KVM_CAP_IMMEDIATE_EXIT (Linux 4.11): KVM_RUN can finish an exit without running.
    immediate_exit: bool,
}

fn host() -> Result<&'static Host, StateError> {
    static HOST: OnceLock<Host> = OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host);
    }
    let kvm = Kvm::new().map_err(StateError::Host)?;
    let xsave_bytes = if kvm.check_extension(Cap::Xsave) {
        let xsave2 = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Some(xsave2.max(std::mem::size_of::<kvm_xsave>()))
    } else {
        None
    };
    let listed = kvm.get_msr_index_list().map_err(StateError::Host)?;
    let immediate_exit = kvm.check_extension(Cap::ImmediateExit);
    Ok(HOST.get_or_init(|| Host {
        xsave_bytes,
        msrs: msr_candidates(listed.as_slice()),
        immediate_exit,
    }))
}

/// MSRs saved when KVM lists them in KVM_GET_MSR_INDEX_LIST.
const LISTED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x3a,        // IA32_FEATURE_CONTROL
    0x3b,        // IA32_TSC_ADJUST
    0x48,        // IA32_SPEC_CTRL
    0x140,       // MISC_FEATURES_ENABLES
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0x6e0,       // IA32_TSC_DEADLINE
    0xda0,       // IA32_XSS
    0xc000_0080, // EFER
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK (FMASK)
    0xc000_0100, // FS_BASE
    0xc000_0101, // GS_BASE
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x11,        // kvm-clock: MSR_KVM_WALL_CLOCK
    0x12,        // kvm-clock: MSR_KVM_SYSTEM_TIME
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d05, // MSR_KVM_POLL_CONTROL
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
    0x4b56_4d07, // MSR_KVM_ASYNC_PF_ACK
    0x17a,       // IA32_MCG_STATUS
    0x17b,       // IA32_MCG_CTL
    0x1d9,       // IA32_DEBUGCTL
    // Feature MSRs the VMM may have set; the destination must show the same.
    0x8b,  // IA32_UCODE_REV
    0x10a, // IA32_ARCH_CAPABILITIES
    0x345, // IA32_PERF_CAPABILITIES
];

/// MSRs KVM handles without listing them (the MTRRs); saved where they read.
const UNLISTED_MSRS: &[u32] = &[
    0x2ff, // MTRRdefType
    0x250, 0x258, 0x259, // fixed-range MTRRs
    0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// Variable-range MTRR pairs 0x200..0x210.
const MTRR_VAR: std::ops::Range<u32> = 0x200..0x210;

fn msr_candidates(listed: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = LISTED_MSRS
        .iter()
        .copied()
        .filter(|m| listed.contains(m))
        .collect();
    out.extend(UNLISTED_MSRS);
    out.extend(MTRR_VAR);
    out
}

fn kvm_err(op: &'static str, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, what, source }
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, StateError> {
    Msrs::from_entries(entries).map_err(|_| {
        StateError::Codec(CodecError::TooMany {
            what: "MSRs",
            len: entries.len(),
            max: KVM_MAX_MSR_ENTRIES,
        })
    })
}

/// Reads the candidate MSRs; KVM_GET_MSRS stops at the first it cannot read, which is
/// then left out.
fn read_msrs(fd: &VcpuFd, candidates: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut saved = Vec::with_capacity(candidates.len());
    let mut rest = candidates;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm_err("read", "MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..read.min(rest.len())]);
        // Skip the one that failed, if any.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

/// Whether an ioctl's error means "this KVM has no such ioctl".
fn missing(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
}

// ---------------------------------------------------------------------------------------
// Save and restore.

/// Saves a paused vCPU. First re-enters KVM_RUN with `immediate_exit` set, which
/// completes an I/O or MMIO exit the vCPU last took (its instruction is finished only
/// on the next KVM_RUN; without this the destination would run it a second time) and
/// returns at once without running guest code.
pub(super) fn save_vcpu(fd: &mut VcpuFd) -> Result<VcpuState, StateError> {
    let host = host()?;
    if !host.immediate_exit {
        // KVM_RUN would run the guest on; an IN or MMIO read still in flight would be
        // repeated on the destination.
        return Err(StateError::Unsupported(
            "KVM_CAP_IMMEDIATE_EXIT, needed to finish an exit in flight",
        ));
    }
    fd.set_kvm_immediate_exit(1);
    let completed = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(StateError::Kvm {
            op: "complete",
            what: "vCPU's last exit",
            source: e,
        }),
        Ok(_) => Err(StateError::IoInFlight),
    };
    fd.set_kvm_immediate_exit(0);
    completed?;

    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read", "CPUID"))?;
    let xsave = match host.xsave_bytes {
        Some(bytes) if bytes > std::mem::size_of::<kvm_xsave>() => {
            let extra = (bytes - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
            let mut xsave = Xsave::new(extra).map_err(|_| {
                StateError::Codec(CodecError::TooMany {
                    what: "XSAVE words",
                    len: extra,
                    max: XSAVE_MAX_WORDS,
                })
            })?;
            // SAFETY: `xsave` holds the 4 KiB header plus `extra` words, which is at
            // least KVM_CAP_XSAVE2 bytes, the most KVM_GET_XSAVE2 writes for this
            // process (no XSTATE feature is enabled later by arch_prctl here).
            unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("read", "XSAVE area"))?;
            let fam = xsave.as_fam_struct_ref();
            let mut words = fam.xsave.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            Some(words)
        }
        Some(_) => Some(
            fd.get_xsave()
                .map_err(kvm_err("read", "XSAVE area"))?
                .region
                .to_vec(),
        ),
        None => None,
    };
    let xcrs = match fd.get_xcrs() {
        Ok(x) => Some(x),
        Err(e) if missing(&e) || host.xsave_bytes.is_none() => None,
        Err(e) => return Err(kvm_err("read", "XCRs")(e)),
    };
    let debugregs = match fd.get_debug_regs() {
        Ok(d) => Some(d),
        Err(e) if missing(&e) => None,
        Err(e) => return Err(kvm_err("read", "debug registers")(e)),
    };
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        regs: fd
            .get_regs()
            .map_err(kvm_err("read", "general registers"))?,
        sregs: fd
            .get_sregs()
            .map_err(kvm_err("read", "special registers"))?,
        fpu: fd.get_fpu().map_err(kvm_err("read", "FPU state"))?,
        xsave,
        xcrs,
        debugregs,
        lapic: fd.get_lapic().map_err(kvm_err("read", "LAPIC"))?,
        msrs: read_msrs(fd, &host.msrs)?,
        mp_state: fd.get_mp_state().map_err(kvm_err("read", "MP state"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("read", "vCPU events"))?,
        tsc_khz,
    })
}

/// Restores a vCPU that has not run yet, in the order KVM needs: CPUID first (it
/// decides which MSRs and XSAVE features exist), the TSC frequency, registers, special
/// registers (EFER, CR4 before the MSRs and XSAVE that depend on them), FPU then XSAVE
/// (XSAVE overrides the legacy part), XCRs, debug registers, the LAPIC, the MSRs after
/// it (the TSC deadline needs the LAPIC's timer mode), the MP state, and the events
/// last (they refer to the MP and SMM state set before).
pub(super) fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let host = host()?;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| {
        StateError::Codec(CodecError::TooMany {
            what: "CPUID entries",
            len: state.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        })
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("write", "CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .map_err(kvm_err("write", "TSC frequency"))?;
        }
    }
    fd.set_regs(&state.regs)
        .map_err(kvm_err("write", "general registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("write", "special registers"))?;
    fd.set_fpu(&state.fpu)
        .map_err(kvm_err("write", "FPU state"))?;
    if let Some(words) = &state.xsave {
        let bytes = host
            .xsave_bytes
            .ok_or(StateError::Unsupported("XSAVE, which the saved state uses"))?;
        set_xsave(fd, words, bytes)?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm_err("write", "XCRs"))?;
    }
    if let Some(debugregs) = &state.debugregs {
        fd.set_debug_regs(debugregs)
            .map_err(kvm_err("write", "debug registers"))?;
    }
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("write", "LAPIC"))?;
    let msrs = msr_list(&state.msrs)?;
    let set = fd.set_msrs(&msrs).map_err(kvm_err("write", "MSRs"))?;
    if set < state.msrs.len() {
        return Err(StateError::MsrRejected {
            index: state.msrs[set].index,
            set,
            wanted: state.msrs.len(),
        });
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("write", "MP state"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err("write", "vCPU events"))?;
    Ok(())
}

/// KVM_SET_XSAVE reads `host_bytes` (KVM_CAP_XSAVE2, at least 4096) from the buffer:
/// give it a buffer of at least that size, the saved words padded with zeros (the XSAVE
/// header's component bitmap says what the padding is: absent components).
fn set_xsave(fd: &VcpuFd, words: &[u32], host_bytes: usize) -> Result<(), StateError> {
    let legacy = std::mem::size_of::<kvm_xsave>();
    if words.len() < XSAVE_LEGACY_WORDS {
        return Err(StateError::Codec(CodecError::Invalid("XSAVE area size")));
    }
    let (region, extra) = words.split_at(XSAVE_LEGACY_WORDS);
    if host_bytes <= legacy {
        if extra.iter().any(|&w| w != 0) {
            // Components beyond 4 KiB that this host cannot take.
            return Err(StateError::Unsupported("XSAVE areas beyond 4 KiB"));
        }
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(region);
        // SAFETY: without KVM_CAP_XSAVE2 above 4096, KVM_SET_XSAVE reads exactly the
        // 4096-byte `kvm_xsave` passed, which is fully initialized.
        return unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err("write", "XSAVE area"));
    }
    let want = (host_bytes - legacy).div_ceil(4).max(extra.len());
    let mut xsave = Xsave::new(want).map_err(|_| {
        StateError::Codec(CodecError::TooMany {
            what: "XSAVE words",
            len: want,
            max: XSAVE_MAX_WORDS,
        })
    })?;
    // SAFETY: only the fixed 4 KiB region is written; the FAM length (`len`), which
    // the wrapper's invariant ties to its allocation, is left untouched.
    unsafe { xsave.as_mut_fam_struct() }
        .xsave
        .region
        .copy_from_slice(region);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: `xsave` holds 4096 + 4 * `want` bytes, at least KVM_CAP_XSAVE2 bytes,
    // the most KVM_SET_XSAVE reads for this process.
    unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("write", "XSAVE area"))
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    // Default zeroes the whole 512-byte union, so every member reads initialized bytes.
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(kvm_err("read", what))?;
    Ok(chip)
}

/// Saves the in-kernel irqchip, PIT and kvm clock of a VM whose vCPUs are paused.
pub(super) fn save_vm(fd: &VmFd) -> Result<VmState, StateError> {
    let master = get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "master PIC")?;
    let slave = get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?;
    let ioapic = get_chip(fd, KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
    // SAFETY: the unions were zeroed whole and then filled by the kernel with the chip
    // asked for; `kvm_pic_state` and `kvm_ioapic_state` are plain integers (every bit
    // pattern valid) and lie inside the initialized union.
    let (pic_master, pic_slave, ioapic) =
        unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit: fd.get_pit2().map_err(kvm_err("read", "PIT"))?,
        clock: fd.get_clock().map_err(kvm_err("read", "kvm clock"))?,
    })
}

/// Restores a VM's in-kernel devices; after `create_irqchip`, before vCPUs run.
pub(super) fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), StateError> {
    for (chip_id, what, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, "master PIC", state.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, "slave PIC", state.pic_slave),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic;
        fd.set_irqchip(&chip).map_err(kvm_err("write", what))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    chip.chip.ioapic = state.ioapic;
    fd.set_irqchip(&chip).map_err(kvm_err("write", "IOAPIC"))?;
    fd.set_pit2(&state.pit).map_err(kvm_err("write", "PIT"))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(kvm_err("write", "kvm clock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_candidates_keep_the_listed_ones_in_order_and_the_mtrrs() {
        let listed = [0xc000_0082, 0x10, 0x1234, 0x6e0];
        let c = msr_candidates(&listed);
        assert_eq!(&c[..3], &[0x10, 0x6e0, 0xc000_0082]);
        assert!(!c.contains(&0x1234));
        assert!(c.contains(&0x2ff) && c.contains(&0x20f));
    }
}
