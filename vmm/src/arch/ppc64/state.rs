//! A PowerPC64 vCPU's and VM's state, saved at switch-over and restored on the
//! destination, and their byte form for the migration stream.
//!
//! [`VcpuState`] holds the general registers (`kvm_regs`), the ONE_REG registers
//! listed in [`SAVED_REGS`] that this host's KVM has (FP/VSX and Altivec registers,
//! the SPRs a Linux guest uses, LPCR, the decrementer's expiry, the XICS presentation
//! state), the guest's timebase at the save, and whether the vCPU was started. The
//! timebase offset is not carried as is: the destination sets the offset that makes the
//! guest's timebase go on from the saved value (KVM rounds it up to a multiple of
//! 2^24 ticks, so the guest may see its clock jump forward by up to that, never back).
//! [`VmState`] holds the platform's state (H_SET_MODE modes, the registered process
//! table, the time-of-day offset) and the XICS interrupt sources.
//!
//! # Byte form
//!
//! The shared framing of [`crate::arch::codec`] (magic `RVPC` for a vCPU, `RVPV` for a
//! VM), version [`STATE_VERSION`]; payloads, little-endian:
//!
//! ```text
//! vCPU: regs 49 x u64 (pc cr ctr lr xer msr srr0 srr1 pid sprg0..7 gpr0..31)
//!       | running flag u8 | guest timebase u64
//!       | register count u32 (<= 128), (id u64, length u8 (= the id's size, <= 16), bytes)
//! VM:   ile flag u8 | ail u64 | process table flags u64, entry u64 | time offset i64
//!       | source count u32 (<= 1024), (irq u32, state u64)
//! ```

use crate::arch::codec::{CodecError, Reader, Writer};

use super::kvm::{reg, Regs};
use super::layout::XICS_IRQ_BASE;
use super::spapr::{CpuRun, ProcessTable};
use super::vcpu::KvmVcpu;
use super::vm::{KvmVm, XICS_SOURCES};

/// The version of the byte layout written by `to_bytes`, the only one `from_bytes` reads.
pub const STATE_VERSION: u16 = 1;

const VCPU_MAGIC: [u8; 4] = *b"RVPC";
const VM_MAGIC: [u8; 4] = *b"RVPV";
/// Most ONE_REG registers a vCPU state holds.
const MAX_REGS: usize = 128;
/// Most XICS sources a VM state holds.
const MAX_SOURCES: usize = 1024;

/// Errors of saving, restoring, encoding and decoding state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM state ioctl failed.
    #[error("Cannot {op} the {what}")]
    Kvm {
        /// "read" or "write".
        op: &'static str,
        /// Which state.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a valid state.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The ONE_REG registers saved, in restore order where it matters: the XICS
/// presentation state after everything else, LPCR before the decrementer.
fn saved_regs() -> Vec<(u64, &'static str)> {
    let mut regs: Vec<(u64, &'static str)> = vec![
        (reg::DAR, "DAR"),
        (reg::DSISR, "DSISR"),
        (reg::AMR, "AMR"),
        (reg::UAMOR, "UAMOR"),
        (reg::DSCR, "DSCR"),
        (reg::PURR, "PURR"),
        (reg::SPURR, "SPURR"),
        (reg::FPSCR, "FPSCR"),
        (reg::VSCR, "VSCR"),
        (reg::VRSAVE, "VRSAVE"),
        (reg::IAMR, "IAMR"),
        (reg::FSCR, "FSCR"),
        (reg::TAR, "TAR"),
        (reg::PID, "PID"),
        (reg::PPR, "PPR"),
        (reg::TIDR, "TIDR"),
        (reg::PSSCR, "PSSCR"),
        (reg::VPA_ADDR, "VPA address"),
        (reg::LPCR_64, "LPCR"),
    ];
    regs.extend((0..32).map(|n| (reg::vsr(n), "a VSX register")));
    regs.extend((0..32).map(|n| (reg::vr(n), "an Altivec register")));
    regs.push((reg::DEC_EXPIRY, "decrementer expiry"));
    regs.push((reg::ICP_STATE, "XICS presentation state"));
    regs
}

/// The names of the saved registers, for error messages.
fn reg_name(id: u64) -> &'static str {
    saved_regs()
        .into_iter()
        .find(|(r, _)| *r == id)
        .map(|(_, n)| n)
        .unwrap_or("register")
}

/// A vCPU's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers, PC, MSR, SRR0/1, SPRG0..7.
    pub regs: Regs,
    /// Whether the vCPU was started (vCPUs the guest has not started, or that stopped
    /// themselves, wait for `start-cpu` on the destination too).
    pub running: bool,
    /// The guest's timebase when it was saved.
    pub guest_tb: u64,
    /// ONE_REG registers (id, bytes).
    pub one_regs: Vec<(u64, Vec<u8>)>,
}

/// A VM's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    /// Interrupts little-endian (H_SET_MODE).
    pub ile: bool,
    /// Alternate interrupt location (H_SET_MODE).
    pub ail: u64,
    /// KVM_PPC_MMUV3 flags of the registered process table.
    pub mmu_flags: u64,
    /// The registered process table entry (0: none).
    pub process_table: u64,
    /// Guest time-of-day minus host time, seconds.
    pub time_offset: i64,
    /// XICS sources (irq, `KVM_DEV_XICS_GRP_SOURCES` state).
    pub sources: Vec<(u32, u64)>,
}

/// The host's timebase.
fn host_timebase() -> u64 {
    let tb: u64;
    // SAFETY: `mftb` reads the timebase register into a general register; it touches
    // no memory and is allowed in problem state on every 64-bit PowerPC.
    unsafe { std::arch::asm!("mftb {0}", out(reg) tb, options(nomem, nostack)) };
    tb
}

fn kvm_err(op: &'static str, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StateError {
    let what = what.into();
    move |source| StateError::Kvm { op, what, source }
}

/// Whether KVM lacks a register (rather than failing to read one it has).
fn missing(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT))
}

pub(super) fn save_vcpu(vcpu: &mut KvmVcpu) -> Result<VcpuState, StateError> {
    // Let KVM take in the answer to the last exit, then make a pending start real.
    vcpu.complete_exit();
    let running = vcpu
        .take_start(std::time::Duration::ZERO)
        .map_err(|e| StateError::Kvm {
            op: "start",
            what: "vCPU".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let fd = vcpu.fd();
    let regs = fd.get_regs().map_err(kvm_err("read", "registers"))?;
    let mut one_regs = Vec::new();
    for (id, name) in saved_regs() {
        match fd.get_one_reg(id) {
            Ok(bytes) => one_regs.push((id, bytes)),
            Err(e) if missing(&e) => {}
            Err(e) => return Err(kvm_err("read", name)(e)),
        }
    }
    let offset = match fd.get_reg_u64(reg::TB_OFFSET) {
        Ok(v) => v,
        Err(e) if missing(&e) => 0,
        Err(e) => return Err(kvm_err("read", "timebase offset")(e)),
    };
    Ok(VcpuState {
        regs,
        running,
        guest_tb: host_timebase().wrapping_add(offset),
        one_regs,
    })
}

pub(super) fn restore_vcpu(vcpu: &mut KvmVcpu, state: &VcpuState) -> Result<(), StateError> {
    let fd = vcpu.fd_mut();
    // The offset first: the decrementer's expiry is relative to it.
    let offset = state.guest_tb.wrapping_sub(host_timebase());
    match fd.set_reg_u64(reg::TB_OFFSET, offset) {
        Ok(()) => {}
        Err(e) if missing(&e) => {}
        Err(e) => return Err(kvm_err("write", "timebase offset")(e)),
    }
    fd.set_regs(&state.regs)
        .map_err(kvm_err("write", "registers"))?;
    for (id, bytes) in &state.one_regs {
        fd.set_one_reg(*id, bytes)
            .map_err(kvm_err("write", reg_name(*id)))?;
    }
    let run = if state.running {
        CpuRun::Running
    } else {
        CpuRun::Stopped
    };
    vcpu.spapr().set_run(vcpu.id(), run);
    Ok(())
}

pub(super) fn save_vm(vm: &KvmVm) -> Result<VmState, StateError> {
    let spapr = vm.spapr();
    let modes = spapr.modes();
    let table = spapr.process_table();
    let mut sources = Vec::new();
    if let Some(xics) = vm.xics() {
        for irq in XICS_IRQ_BASE..XICS_IRQ_BASE + XICS_SOURCES {
            let v = xics
                .get_attr_u64(super::kvm::DEV_XICS_GRP_SOURCES, u64::from(irq))
                .map_err(kvm_err("read", format!("XICS source {irq:#x}")))?;
            sources.push((irq, v));
        }
    }
    Ok(VmState {
        ile: modes.ile,
        ail: modes.ail,
        mmu_flags: table.flags,
        process_table: table.entry,
        time_offset: spapr.time_offset(),
        sources,
    })
}

pub(super) fn restore_vm(vm: &KvmVm, state: &VmState) -> Result<(), StateError> {
    let spapr = vm.spapr();
    spapr.set_modes(state.ile, state.ail);
    spapr.set_time_offset(state.time_offset);
    spapr
        .restore_process_table(ProcessTable {
            flags: state.mmu_flags,
            entry: state.process_table,
        })
        .map_err(kvm_err("write", "radix MMU configuration"))?;
    if !state.sources.is_empty() {
        let xics = vm.xics().ok_or_else(|| StateError::Kvm {
            op: "write",
            what: "XICS sources".into(),
            source: std::io::Error::other("this host's KVM has no in-kernel XICS"),
        })?;
        for &(irq, v) in &state.sources {
            xics.set_attr_u64(super::kvm::DEV_XICS_GRP_SOURCES, u64::from(irq), v)
                .map_err(kvm_err("write", format!("XICS source {irq:#x}")))?;
        }
    }
    Ok(())
}

fn regs_fields(r: &Regs) -> Vec<u64> {
    let mut v = vec![r.pc, r.cr, r.ctr, r.lr, r.xer, r.msr, r.srr0, r.srr1, r.pid];
    v.extend_from_slice(&r.sprg);
    v.extend_from_slice(&r.gpr);
    v
}

impl VcpuState {
    /// The state in the versioned byte form (module docs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut w = Writer::default();
        for v in regs_fields(&self.regs) {
            w.u64(v);
        }
        w.flag(self.running);
        w.u64(self.guest_tb);
        w.count("ONE_REG registers", self.one_regs.len(), MAX_REGS)?;
        for (id, bytes) in &self.one_regs {
            if bytes.len() != reg::size(*id) || bytes.len() > 16 {
                return Err(CodecError::Invalid("register size").into());
            }
            w.u64(*id);
            w.u8(u8::try_from(bytes.len()).map_err(|_| CodecError::Invalid("register size"))?);
            w.bytes(bytes);
        }
        Ok(w.finish_as(VCPU_MAGIC, STATE_VERSION)?)
    }

    /// Reads the byte form back; any damage, truncation or other version is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::unframe_as(VCPU_MAGIC, STATE_VERSION, "vCPU", bytes)?;
        let mut f = [0u64; 49];
        for v in &mut f {
            *v = r.u64("registers")?;
        }
        let mut regs = Regs {
            pc: f[0],
            cr: f[1],
            ctr: f[2],
            lr: f[3],
            xer: f[4],
            msr: f[5],
            srr0: f[6],
            srr1: f[7],
            pid: f[8],
            ..Regs::default()
        };
        regs.sprg.copy_from_slice(&f[9..17]);
        regs.gpr.copy_from_slice(&f[17..49]);
        let running = r.flag("running flag")?;
        let guest_tb = r.u64("timebase")?;
        let n = r.count("ONE_REG registers", MAX_REGS, 9)?;
        let mut one_regs = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.u64("register id")?;
            let len = usize::from(r.u8("register size")?);
            if len != reg::size(id) || len > 16 {
                return Err(CodecError::Invalid("register size").into());
            }
            one_regs.push((id, r.take(len, "register value")?.to_vec()));
        }
        r.end()?;
        Ok(VcpuState {
            regs,
            running,
            guest_tb,
            one_regs,
        })
    }
}

impl VmState {
    /// The state in the versioned byte form (module docs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut w = Writer::default();
        w.flag(self.ile);
        w.u64(self.ail);
        w.u64(self.mmu_flags);
        w.u64(self.process_table);
        w.u64(u64::from_ne_bytes(self.time_offset.to_ne_bytes()));
        w.count("XICS sources", self.sources.len(), MAX_SOURCES)?;
        for &(irq, v) in &self.sources {
            w.u32(irq);
            w.u64(v);
        }
        Ok(w.finish_as(VM_MAGIC, STATE_VERSION)?)
    }

    /// Reads the byte form back; any damage, truncation or other version is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::unframe_as(VM_MAGIC, STATE_VERSION, "VM", bytes)?;
        let ile = r.flag("ILE flag")?;
        let ail = r.u64("AIL")?;
        if ail > 3 {
            return Err(CodecError::Invalid("AIL").into());
        }
        let mmu_flags = r.u64("MMU flags")?;
        let process_table = r.u64("process table")?;
        let time_offset = i64::from_ne_bytes(r.u64("time offset")?.to_ne_bytes());
        let n = r.count("XICS sources", MAX_SOURCES, 12)?;
        let mut sources = Vec::with_capacity(n);
        for _ in 0..n {
            sources.push((r.u32("XICS source")?, r.u64("XICS source state")?));
        }
        r.end()?;
        Ok(VmState {
            ile,
            ail,
            mmu_flags,
            process_table,
            time_offset,
            sources,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_vcpu() -> VcpuState {
        let mut regs = Regs {
            pc: 0xc000_0000_0000_1234,
            msr: 0x8000_0000_0000_1033,
            ..Regs::default()
        };
        regs.gpr[1] = 0xc000_0000_0100_0000;
        regs.gpr[31] = 31;
        regs.sprg[7] = 7;
        VcpuState {
            regs,
            running: true,
            guest_tb: 0x1234_5678_9abc,
            one_regs: vec![
                (
                    reg::LPCR_64,
                    0x0004_0000_0000_0000u64.to_ne_bytes().to_vec(),
                ),
                (reg::DSISR, vec![1, 2, 3, 4]),
                (reg::vsr(5), (0..16).collect()),
            ],
        }
    }

    fn sample_vm() -> VmState {
        VmState {
            ile: true,
            ail: 3,
            mmu_flags: 3,
            process_table: (1 << 63) | 0x1_0000 | 8,
            time_offset: -42,
            sources: vec![(0x1001, 0xff << 32 | 1 << 41)],
        }
    }

    #[test]
    fn states_read_back_as_written() {
        let v = sample_vcpu();
        assert_eq!(VcpuState::from_bytes(&v.to_bytes().unwrap()).unwrap(), v);
        let m = sample_vm();
        assert_eq!(VmState::from_bytes(&m.to_bytes().unwrap()).unwrap(), m);
    }

    #[test]
    fn damaged_states_are_refused() {
        for bytes in [
            sample_vcpu().to_bytes().unwrap(),
            sample_vm().to_bytes().unwrap(),
        ] {
            for len in 0..bytes.len() {
                assert!(VcpuState::from_bytes(&bytes[..len]).is_err());
                assert!(VmState::from_bytes(&bytes[..len]).is_err());
            }
            let mut bad = bytes.clone();
            for at in 0..bad.len() {
                bad[at] ^= 0x04;
                assert!(VcpuState::from_bytes(&bad).is_err() && VmState::from_bytes(&bad).is_err());
                bad[at] ^= 0x04;
            }
        }
        assert!(matches!(
            VmState::from_bytes(&sample_vcpu().to_bytes().unwrap()),
            Err(StateError::Codec(CodecError::Magic("VM")))
        ));
        // A register whose bytes do not match its id's size is refused on both sides.
        let mut v = sample_vcpu();
        v.one_regs.push((reg::LPCR_64, vec![0; 4]));
        assert!(v.to_bytes().is_err());
    }

    #[test]
    fn every_saved_register_fits_the_byte_form() {
        let regs = saved_regs();
        assert!(regs.len() <= MAX_REGS);
        assert!(regs.iter().all(|(id, _)| reg::size(*id) <= 16));
        // LPCR before the decrementer, the XICS state last.
        let pos = |id| regs.iter().position(|(r, _)| *r == id).unwrap();
        assert!(pos(reg::LPCR_64) < pos(reg::DEC_EXPIRY));
        assert_eq!(pos(reg::ICP_STATE), regs.len() - 1);
    }
}
