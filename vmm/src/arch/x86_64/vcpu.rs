//! An x86_64 vCPU: register setup and the run loop.

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::ArchError;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest executed HLT.
    Halted,
    /// The guest did something the VMM does not handle (yet): the exit, described.
    Unhandled(String),
}

/// A vCPU of a [`super::KvmVm`].
#[derive(Debug)]
pub struct KvmVcpu {
    id: u64,
    fd: VcpuFd,
}

impl KvmVcpu {
    pub(super) fn new(id: u64, fd: VcpuFd) -> Self {
        KvmVcpu { id, fd }
    }

    /// Puts the vCPU in real mode at `cs:ip = 0:entry` (flat segments from 0).
    pub fn setup_real_mode(&mut self, entry: u16) -> Result<(), ArchError> {
        let id = self.id;
        let err = |source| ArchError::Vcpu { id, source };
        let mut sregs = self.fd.get_sregs().map_err(err)?;
        for seg in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            seg.base = 0;
            seg.selector = 0;
        }
        self.fd.set_sregs(&sregs).map_err(err)?;
        let mut regs = self.fd.get_regs().map_err(err)?;
        regs.rip = u64::from(entry);
        regs.rflags = 0x2;
        regs.rsp = 0;
        self.fd.set_regs(&regs).map_err(err)?;
        Ok(())
    }

    /// Runs until the guest halts or does something unhandled; port writes go to
    /// `out(port, data)`.
    pub fn run(&mut self, mut out: impl FnMut(u16, &[u8])) -> Result<VcpuStop, ArchError> {
        loop {
            match self.fd.run().map_err(ArchError::Run)? {
                VcpuExit::IoOut(port, data) => out(port, data),
                VcpuExit::Hlt => return Ok(VcpuStop::Halted),
                other => return Ok(VcpuStop::Unhandled(format!("{other:?}"))),
            }
        }
    }
}
