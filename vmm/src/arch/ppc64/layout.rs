//! The sPAPR ("pseries") machine's guest-physical layout and the fixed numbers the
//! guest and the VMM agree on: where the kernel, the RTAS blob, the initrd and the
//! flattened device tree go, the console's terminal number, the RTAS tokens, and the
//! hypercall numbers the VMM handles. One place, so the loader, the device tree, the
//! hypercall handler and the tiny test guests agree.
//!
//! ```text
//! 0x0000_0000  the kernel (vmlinux's PT_LOAD segments at their p_paddr; Linux runs at 0)
//!   ...        RAM; the initrd goes below the device tree
//! top - 1 MiB  the flattened device tree (at most FDT_MAX_SIZE bytes), then the RTAS blob
//! ```
//!
//! RAM is one region from 0; there is no MMIO hole: the PCI host bridge's memory
//! window sits far above RAM, at `PHB_MEM_CPU`.

/// Guest RAM starts here.
pub const RAM_START: u64 = 0;
/// Where a vmlinux is entered when its ELF header gives no usable entry: 0.
pub const KERNEL_START: u64 = 0;
/// Room kept at the top of the RAM the boot vCPU can reach early for the device tree
/// and the RTAS blob.
pub const BOOT_AREA_SIZE: u64 = 1 << 20;
/// Largest flattened device tree.
pub const FDT_MAX_SIZE: usize = 0xf_0000;
/// Bytes of the RTAS blob area (the blob is 20 bytes; Linux reserves `rtas-size`).
pub const RTAS_SIZE: u64 = 0x1_0000;
/// The early boot code runs in real mode from the first 256 MiB at most (the smallest
/// real-mode area of a hash guest); the device tree, RTAS and initrd stay below this.
pub const RMA_SIZE: u64 = 256 << 20;
/// Longest kernel command line, terminating NUL included (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The virtual terminal's unit address (`/vdevice/vty@30000000`), which is also the
/// terminal number the guest passes in r4 to H_PUT_TERM_CHAR / H_GET_TERM_CHAR.
pub const VTY_TERMNO: u64 = 0x3000_0000;

/// The port-bus address of the console's 16550 registers. No guest instruction reaches
/// the port bus on PowerPC: only the console hypercalls do, through this port, so the
/// console's buffering, input and saved state are the x86 machine's serial port's.
pub const CONSOLE_PORT: u16 = 0;
/// Bytes of the console's register window.
pub const CONSOLE_PORT_LEN: u16 = 8;

/// The PCI host bridge's bus unit ID (how RTAS configuration calls name it; QEMU's
/// first PHB has the same).
pub const PHB_BUID: u64 = 0x0800_0000_2000_0000;
/// The PHB's 32-bit memory window as the CPU sees it (above any RAM the machine
/// offers, where QEMU's spapr puts its PHB windows).
pub const PHB_MEM_CPU: u64 = 0x2000_8000_0000;
/// The same window as a PCI bus address.
pub const PHB_MEM_PCI: u32 = 0x8000_0000;
/// Bytes of the window.
pub const PHB_MEM_SIZE: u64 = 0x1000_0000;
/// The XICS source of the PHB's INTA line (the only PCI interrupt: one function).
pub const PHB_INTA_IRQ: u32 = 0x1001;
/// The PCI device number of the virtio balloon on the PHB's bus 0.
pub const BALLOON_PCI_DEVICE: u8 = 0;
/// Where BAR 0 of the balloon is assigned (PCI bus address, inside the window).
pub const BALLOON_BAR: u32 = PHB_MEM_PCI;
/// XICS interrupt source numbers start here (QEMU's spapr uses the same base).
pub const XICS_IRQ_BASE: u32 = 0x1000;
/// Interrupt sources the in-kernel XICS offers.
pub const XICS_IRQS: u32 = 0x400;

/// Hypercall numbers (PAPR, plus the QEMU/KVM private range 0xf000..).
pub mod hcall {
    /// Read up to 16 bytes from a virtual terminal.
    pub const H_GET_TERM_CHAR: u64 = 0x54;
    /// Write up to 16 bytes to a virtual terminal.
    pub const H_PUT_TERM_CHAR: u64 = 0x58;
    /// Cache-inhibited load from a physical address.
    pub const H_LOGICAL_CI_LOAD: u64 = 0x3c;
    /// Cache-inhibited store to a physical address.
    pub const H_LOGICAL_CI_STORE: u64 = 0x40;
    /// Give up the vCPU until an interrupt (KVM handles it in the kernel).
    pub const H_CEDE: u64 = 0xe0;
    /// Set a processor mode: endianness of interrupts, address translation mode, ...
    pub const H_SET_MODE: u64 = 0x31c;
    /// The processor's speculation characteristics.
    pub const H_GET_CPU_CHARACTERISTICS: u64 = 0x1c8;
    /// Read a translation-control entry of a DMA window.
    pub const H_GET_TCE: u64 = 0x1c;
    /// Write one.
    pub const H_PUT_TCE: u64 = 0x20;
    /// Write a run of them with one value.
    pub const H_STUFF_TCE: u64 = 0x138;
    /// The guest tells the hypervisor where its (radix) process table is.
    pub const H_REGISTER_PROC_TBL: u64 = 0x37c;
    /// RTAS call: r4 = guest-physical address of the big-endian `rtas_args`. The RTAS
    /// blob's only instruction besides the return: QEMU's and KVM's private number.
    pub const H_RTAS: u64 = 0xf000;

    /// Success.
    pub const H_SUCCESS: u64 = 0;
    /// Hardware error (also: "not supported" for unknown calls, as QEMU answers).
    pub const H_HARDWARE: u64 = 1u64.wrapping_neg();
    /// Bad function (the call is not implemented).
    pub const H_FUNCTION: u64 = 2u64.wrapping_neg();
    /// Bad parameter.
    pub const H_PARAMETER: u64 = 4u64.wrapping_neg();
    /// Parameter 2 is invalid.
    pub const H_P2: u64 = 55u64.wrapping_neg();
    /// Parameter 3 is invalid.
    pub const H_P3: u64 = 56u64.wrapping_neg();
    /// Parameter 4 is invalid.
    pub const H_P4: u64 = 57u64.wrapping_neg();
    /// The requested mode is not supported.
    pub const H_UNSUPPORTED_FLAG: u64 = 256u64.wrapping_neg();
}

/// RTAS tokens: the numbers the device tree's `/rtas` node gives each call and the
/// guest passes as `rtas_args.token`. Fixed, so tiny guests need no device tree.
pub mod rtas {
    /// `display-character`.
    pub const DISPLAY_CHARACTER: u32 = 0x2001;
    /// `get-time-of-day`.
    pub const GET_TIME_OF_DAY: u32 = 0x2002;
    /// `set-time-of-day`.
    pub const SET_TIME_OF_DAY: u32 = 0x2003;
    /// `power-off`.
    pub const POWER_OFF: u32 = 0x2004;
    /// `system-reboot`.
    pub const SYSTEM_REBOOT: u32 = 0x2005;
    /// `query-cpu-stopped-state`.
    pub const QUERY_CPU_STOPPED_STATE: u32 = 0x2006;
    /// `start-cpu`.
    pub const START_CPU: u32 = 0x2007;
    /// `stop-self`.
    pub const STOP_SELF: u32 = 0x2008;
    /// `ibm,os-term`.
    pub const IBM_OS_TERM: u32 = 0x2009;
    /// `event-scan`.
    pub const EVENT_SCAN: u32 = 0x200a;
    /// `ibm,set-xive` (in-kernel XICS).
    pub const IBM_SET_XIVE: u32 = 0x2010;
    /// `ibm,get-xive` (in-kernel XICS).
    pub const IBM_GET_XIVE: u32 = 0x2011;
    /// `ibm,int-off` (in-kernel XICS).
    pub const IBM_INT_OFF: u32 = 0x2012;
    /// `ibm,int-on` (in-kernel XICS).
    pub const IBM_INT_ON: u32 = 0x2013;
    /// `ibm,read-pci-config`: (config address, BUID high, BUID low, size) -> value.
    pub const IBM_READ_PCI_CONFIG: u32 = 0x2020;
    /// `ibm,write-pci-config`: (config address, BUID high, BUID low, size, value).
    pub const IBM_WRITE_PCI_CONFIG: u32 = 0x2021;
}

/// Where the device tree goes for `memory` bytes of RAM: `BOOT_AREA_SIZE` below the top
/// of the real-mode area (or of RAM, if smaller).
pub fn fdt_start(memory: u64) -> u64 {
    memory.min(RMA_SIZE) - BOOT_AREA_SIZE
}

/// Where the RTAS blob goes: right after the device tree's room.
pub fn rtas_start(memory: u64) -> u64 {
    fdt_start(memory) + FDT_MAX_SIZE as u64
}

/// The guest-physical RAM regions `(start, size)` for `memory` bytes: one, from 0.
pub fn ram_regions(memory: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, memory)]
}

const _: () = assert!(FDT_MAX_SIZE as u64 + RTAS_SIZE <= BOOT_AREA_SIZE);
const _: () = assert!(
    BALLOON_BAR as u64 >= PHB_MEM_PCI as u64
        && BALLOON_BAR as u64 + rangevm_devices::virtio::pci::VIRTIO_PCI_BAR_SIZE
            <= PHB_MEM_PCI as u64 + PHB_MEM_SIZE
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_area_sits_below_the_real_mode_limit() {
        assert_eq!(fdt_start(512 << 20), RMA_SIZE - BOOT_AREA_SIZE);
        assert_eq!(fdt_start(64 << 20), (64 << 20) - BOOT_AREA_SIZE);
        assert!(rtas_start(64 << 20) + RTAS_SIZE <= 64 << 20);
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
    }
}
