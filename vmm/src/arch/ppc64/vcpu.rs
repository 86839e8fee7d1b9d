//! A PowerPC64 sPAPR vCPU: its start state and one step of its run loop.
//!
//! KVM runs the guest until it makes a hypercall KVM does not answer itself
//! (KVM_EXIT_PAPR_HCALL), touches MMIO outside RAM, or asks for a system event. The
//! hypercalls go to the VM's [`Spapr`] platform; their answer is written back into
//! `kvm_run` and picked up by the next KVM_RUN. A vCPU other than the first waits,
//! outside KVM_RUN, until the guest starts it with RTAS `start-cpu`.

use std::sync::Arc;
use std::time::Duration;

use super::kvm::{reg, Exit, VcpuFd};
use super::setup::EntryPoint;
use super::spapr::{CpuRun, Effect, Spapr};
use super::ArchError;
use crate::arch::{IoHandler, VcpuStop};

/// MSR bits of the start state.
pub(super) const MSR_SF: u64 = 1 << 63;
pub(super) const MSR_ME: u64 = 1 << 12;
pub(super) const MSR_LE: u64 = 1;

/// How long a stopped vCPU waits for `start-cpu` before giving the VMM a turn.
const START_POLL: Duration = Duration::from_millis(20);

/// A vCPU of a [`super::KvmVm`].
#[derive(Debug)]
pub struct KvmVcpu {
    id: u64,
    fd: VcpuFd,
    spapr: Arc<Spapr>,
    /// The generation of [`Spapr::modes`] this vCPU's LPCR has.
    modes_applied: u64,
}

impl KvmVcpu {
    pub(super) fn new(id: u64, fd: VcpuFd, spapr: Arc<Spapr>) -> Self {
        KvmVcpu {
            id,
            fd,
            spapr,
            modes_applied: 0,
        }
    }

    /// The vCPU's index (also its interrupt server number).
    pub fn id(&self) -> u64 {
        self.id
    }

    fn err(&self, what: &'static str) -> impl Fn(std::io::Error) -> ArchError {
        let id = self.id;
        move |source| ArchError::Vcpu { id, what, source }
    }

    pub(super) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub(super) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    pub(super) fn spapr(&self) -> &Arc<Spapr> {
        &self.spapr
    }

    /// Sets the boot vCPU (index 0) up for the kernel's entry protocol: real mode at
    /// `entry.pc`, 64-bit, in the kernel's byte order, r3 = the device tree, r4 = the
    /// kernel's base, r5 = 0 (no Open Firmware). The others wait for `start-cpu`.
    pub fn configure(
        &mut self,
        _vm: &super::KvmVm,
        entry: EntryPoint,
        _cpus: u8,
    ) -> Result<(), ArchError> {
        if self.id != 0 {
            return Ok(());
        }
        let mut regs = self.fd.get_regs().map_err(self.err("read the registers"))?;
        regs.pc = entry.pc;
        regs.msr = MSR_SF | MSR_ME | if entry.little_endian { MSR_LE } else { 0 };
        regs.gpr = [0; 32];
        regs.gpr[3] = entry.fdt;
        regs.gpr[4] = entry.kernel_base;
        regs.gpr[5] = 0;
        self.fd
            .set_regs(&regs)
            .map_err(self.err("set the start registers"))?;
        Ok(())
    }

    /// Starts a vCPU the guest started with `start-cpu`.
    fn start_at(&mut self, entry: u64, r3: u64) -> Result<(), ArchError> {
        let mut regs = self.fd.get_regs().map_err(self.err("read the registers"))?;
        regs.pc = entry;
        regs.msr = MSR_SF | MSR_ME | if self.spapr.modes().ile { MSR_LE } else { 0 };
        regs.gpr = [0; 32];
        regs.gpr[3] = r3;
        self.fd
            .set_regs(&regs)
            .map_err(self.err("set the start registers"))
    }

    /// Brings this vCPU's LPCR to the modes the guest set with H_SET_MODE.
    fn apply_modes(&mut self) -> Result<(), ArchError> {
        let modes = self.spapr.modes();
        if modes.generation == self.modes_applied {
            return Ok(());
        }
        let lpcr = self
            .fd
            .get_reg_u64(reg::LPCR_64)
            .map_err(self.err("read LPCR"))?;
        self.fd
            .set_reg_u64(reg::LPCR_64, modes.apply(lpcr))
            .map_err(self.err("set LPCR"))?;
        self.modes_applied = modes.generation;
        Ok(())
    }

    /// Lets KVM take in the answer to the last exit without running guest code
    /// (KVM_RUN with `immediate_exit`), so the registers read or written next are the
    /// guest's own.
    pub(super) fn complete_exit(&mut self) {
        self.fd.set_immediate_exit(true);
        // EINTR is the expected answer; anything else leaves nothing pending either.
        let _ = self.fd.run();
        self.fd.set_immediate_exit(false);
    }

    /// Gets the vCPU ready to run if `start-cpu` asked for it; false while stopped.
    pub(super) fn take_start(&mut self, wait: Duration) -> Result<bool, ArchError> {
        match self.spapr.gate(self.id, wait) {
            CpuRun::Running => Ok(true),
            CpuRun::Start { entry, r3 } => {
                self.start_at(entry, r3)?;
                Ok(true)
            }
            CpuRun::Stopped => Ok(false),
        }
    }

    /// Saves the vCPU's state for migration (the vCPU paused: `&mut self` sees to it).
    pub fn save_state(&mut self) -> Result<super::VcpuState, super::StateError> {
        super::state::save_vcpu(self)
    }

    /// Restores a state saved by [`KvmVcpu::save_state`], on a vCPU that has not run.
    pub fn restore_state(&mut self, state: &super::VcpuState) -> Result<(), super::StateError> {
        super::state::restore_vcpu(self, state)
    }

    /// Enters the guest once: returns `None` when the exit was handled (run again), or
    /// why the vCPU stopped.
    pub fn run_once(&mut self, io: &dyn IoHandler) -> Result<Option<VcpuStop>, ArchError> {
        if !self.take_start(START_POLL)? {
            return Ok(Some(VcpuStop::Interrupted));
        }
        self.apply_modes()?;
        let exit = self.fd.run().map_err(ArchError::Run)?;
        let stop = match exit {
            Exit::Hcall { nr, args } => {
                let answer = self.spapr.hcall(self.id, nr, &args, io);
                self.fd.set_hcall_ret(answer.ret);
                if let Some(out) = &answer.outputs {
                    self.fd.set_hcall_args(out);
                }
                match answer.effect {
                    Effect::None => return Ok(None),
                    Effect::StoppedSelf => {
                        // Finish the call now: a later start-cpu sets fresh registers,
                        // which a pending answer would overwrite on entry.
                        self.complete_exit();
                        return Ok(None);
                    }
                    Effect::Stop(stop) => stop,
                }
            }
            Exit::MmioRead { addr, len } => {
                let mut data = [0u8; 8];
                io.mmio_read(addr, &mut data[..len]);
                self.fd.set_mmio_data(&data[..len]);
                return Ok(None);
            }
            Exit::MmioWrite { addr, data, len } => {
                io.mmio_write(addr, &data[..len]);
                return Ok(None);
            }
            Exit::SystemEvent(kind) => match kind {
                1 => VcpuStop::PowerOffRequested,
                2 => VcpuStop::ResetRequested,
                3 => VcpuStop::Crashed,
                other => VcpuStop::Unhandled(format!("KVM system event {other}")),
            },
            Exit::Interrupted => VcpuStop::Interrupted,
            Exit::InternalError(sub) => {
                VcpuStop::Unhandled(format!("KVM internal error, suberror {sub}"))
            }
            Exit::Shutdown => VcpuStop::TripleFault,
            Exit::Other(reason) => {
                let pc = self.fd.get_regs().map(|r| r.pc).unwrap_or(0);
                VcpuStop::Unhandled(format!("unexpected KVM exit {reason} at pc {pc:#x}"))
            }
        };
        Ok(Some(stop))
    }
}
