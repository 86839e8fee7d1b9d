//! What both architectures' vCPUs report: why a vCPU stopped, and where its device
//! accesses go.

/// Why a vCPU stopped running (rather than having an access or call handled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest halted (x86 HLT without an in-kernel LAPIC; not seen on sPAPR, where
    /// H_CEDE is answered in the kernel).
    Halted,
    /// The vCPU cannot go on: an x86 triple fault, or KVM_EXIT_SHUTDOWN on PowerPC.
    TripleFault,
    /// The guest asked for a reset (KVM_SYSTEM_EVENT_RESET, RTAS `system-reboot`).
    ResetRequested,
    /// The guest asked to power off (KVM_SYSTEM_EVENT_SHUTDOWN, RTAS `power-off`).
    PowerOffRequested,
    /// The guest crashed (KVM_SYSTEM_EVENT_CRASH, RTAS `ibm,os-term`).
    Crashed,
    /// KVM_RUN was interrupted by a signal (a kick from the VMM), or a PowerPC vCPU
    /// waiting for `start-cpu` is giving the VMM a turn.
    Interrupted,
    /// The guest did something the VMM does not handle: the exit, described.
    Unhandled(String),
}

/// Where a vCPU's port and MMIO accesses go. On PowerPC no guest instruction reaches
/// the port bus: only the console hypercalls do, at the console's port.
pub trait IoHandler {
    /// A read of port `port`; unclaimed ports read as all ones.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A write of port `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read of MMIO space at `addr`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write of MMIO space at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}
