//! An x86_64 vCPU: its start state and one step of the run loop.

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot::EntryPoint;
use super::vm::KvmVm;
use super::{cpuid, regs, ArchError};
use crate::arch::{IoHandler, VcpuStop};

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

    /// The vCPU's index.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn kvm_err(&self) -> impl Fn(kvm_ioctls::Error) -> ArchError {
        let id = self.id;
        move |source| ArchError::Vcpu { id, source }
    }

    fn regs_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> ArchError {
        let id = self.id;
        move |source| ArchError::Regs {
            id,
            source: regs::RegsError::Kvm { what, source },
        }
    }

    /// Sets the vCPU up as vCPU `self.id()` of `cpus` for booting at `entry`: CPUID,
    /// MSRs, FPU, LAPIC LINT pins, and, for the boot vCPU (index 0), the registers of
    /// the entry protocol. The others wait for the guest's INIT/SIPI.
    pub fn configure(&mut self, vm: &KvmVm, entry: EntryPoint, cpus: u8) -> Result<(), ArchError> {
        let index = u8::try_from(self.id).unwrap_or(u8::MAX);
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::filter(&mut cpuid, index, cpus);
        self.fd.set_cpuid2(&cpuid).map_err(self.regs_err("CPUID"))?;

        let msrs = regs::boot_msrs().map_err(|source| ArchError::Regs {
            id: self.id,
            source,
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.regs_err("MSRs"))?;
        let wanted = msrs.as_slice().len();
        if set != wanted {
            return Err(ArchError::Regs {
                id: self.id,
                source: regs::RegsError::Msrs { set, wanted },
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.regs_err("FPU state"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.regs_err("LAPIC"))?;
        regs::set_lint(&mut lapic.regs);
        self.fd.set_lapic(&lapic).map_err(self.regs_err("LAPIC"))?;
        if self.id != 0 {
            return Ok(());
        }
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(self.regs_err("segment registers"))?;
        let regs = match entry {
            EntryPoint::Linux64 { entry } => {
                regs::long_mode_sregs(&mut sregs);
                regs::linux64_regs(entry)
            }
            EntryPoint::Pvh { entry } => {
                regs::protected_mode_sregs(&mut sregs);
                regs::pvh_regs(entry)
            }
        };
        self.fd
            .set_sregs(&sregs)
            .map_err(self.regs_err("segment registers"))?;
        self.fd
            .set_regs(&regs)
            .map_err(self.regs_err("general registers"))?;
        Ok(())
    }

    /// Puts the vCPU in real mode at `cs:ip = 0:entry` (flat segments from 0).
    pub fn setup_real_mode(&mut self, entry: u16) -> Result<(), ArchError> {
        let err = self.kvm_err();
        let mut sregs = self.fd.get_sregs().map_err(&err)?;
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
        self.fd.set_sregs(&sregs).map_err(&err)?;
        let mut regs = self.fd.get_regs().map_err(&err)?;
        regs.rip = u64::from(entry);
        regs.rflags = 0x2;
        regs.rsp = 0;
        self.fd.set_regs(&regs).map_err(&err)?;
        Ok(())
    }

    /// Puts the vCPU in 32-bit protected mode at `eip = entry`, paging off, with flat
    /// 4 GiB code and data segments loaded straight into the segment registers (no GDT
    /// in guest memory: the guest must not reload a segment register) and no IDT (an
    /// exception shuts the vCPU down). For the bare test guests that need more than
    /// real mode's 1 MiB.
    pub fn setup_protected_mode(&mut self, entry: u32) -> Result<(), ArchError> {
        let err = self.kvm_err();
        let mut sregs = self.fd.get_sregs().map_err(&err)?;
        let flat = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        // Execute/read and read/write, both accessed.
        sregs.cs = flat(0x08, 0xb);
        let data = flat(0x10, 0x3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = 0;
        sregs.gdt.limit = 0;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = (sregs.cr0 | 0x1) & !0x8000_0000;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(&err)?;
        let regs = kvm_bindings::kvm_regs {
            rip: u64::from(entry),
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(&err)?;
        Ok(())
    }

    /// Saves the vCPU's state for migration. The vCPU must be paused (not in KVM_RUN on
    /// another thread: `&mut self` sees to that). Re-enters KVM once with
    /// `immediate_exit` set, which finishes an I/O or MMIO exit still in flight without
    /// running guest code; hence `&mut`.
    pub fn save_state(&mut self) -> Result<super::VcpuState, super::StateError> {
        super::state::save_vcpu(&mut self.fd)
    }

    /// Restores a state saved by [`KvmVcpu::save_state`], on a vCPU that has not run,
    /// in the order KVM needs (CPUID first, vCPU events last). The VM needs its
    /// in-kernel irqchip for the LAPIC state.
    pub fn restore_state(&mut self, state: &super::VcpuState) -> Result<(), super::StateError> {
        super::state::restore_vcpu(&self.fd, state)
    }

    /// Enters the guest once: returns `None` when the exit was an I/O access `io`
    /// handled (run again), or why the vCPU stopped.
    pub fn run_once(&mut self, io: &dyn IoHandler) -> Result<Option<VcpuStop>, ArchError> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(Some(VcpuStop::Interrupted));
            }
            Err(e) => return Err(ArchError::Run(e)),
        };
        let stop = match exit {
            VcpuExit::IoOut(port, data) => {
                io.pio_write(port, data);
                return Ok(None);
            }
            VcpuExit::IoIn(port, data) => {
                io.pio_read(port, data);
                return Ok(None);
            }
            VcpuExit::MmioRead(addr, data) => {
                io.mmio_read(addr, data);
                return Ok(None);
            }
            VcpuExit::MmioWrite(addr, data) => {
                io.mmio_write(addr, data);
                return Ok(None);
            }
            VcpuExit::Hlt => VcpuStop::Halted,
            VcpuExit::Shutdown => VcpuStop::TripleFault,
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOffRequested,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuStop::ResetRequested,
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VcpuStop::Crashed,
                other => VcpuStop::Unhandled(format!("KVM system event {other}")),
            },
            VcpuExit::InternalError => {
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
                // member of the exit union, so reading it reads initialized data.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let what = match suberror {
                    1 => " (instruction emulation failed: this host's KVM cannot run this guest code)",
                    2 => " (a fault while delivering a simulated exception)",
                    3 => " (an unknown exit while delivering an event)",
                    _ => "",
                };
                VcpuStop::Unhandled(format!("KVM internal error, suberror {suberror}{what}"))
            }
            VcpuExit::FailEntry(reason, cpu) => VcpuStop::Unhandled(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            )),
            VcpuExit::Intr => VcpuStop::Interrupted,
            other => VcpuStop::Unhandled(format!("unexpected exit {other:?}")),
        };
        Ok(Some(stop))
    }

    /// Runs until the guest halts or stops; port writes go to `out(port, data)`, port
    /// reads see all ones. For the bare real-mode tests, without devices.
    pub fn run(&mut self, out: impl FnMut(u16, &[u8])) -> Result<VcpuStop, ArchError> {
        struct Out<F>(std::cell::RefCell<F>);
        impl<F: FnMut(u16, &[u8])> IoHandler for Out<F> {
            fn pio_read(&self, _: u16, data: &mut [u8]) {
                data.fill(0xff);
            }
            fn pio_write(&self, port: u16, data: &[u8]) {
                (self.0.borrow_mut())(port, data);
            }
            fn mmio_read(&self, _: u64, data: &mut [u8]) {
                data.fill(0xff);
            }
            fn mmio_write(&self, _: u64, _: &[u8]) {}
        }
        let io = Out(std::cell::RefCell::new(out));
        loop {
            if let Some(stop) = self.run_once(&io)? {
                return Ok(stop);
            }
        }
    }
}
