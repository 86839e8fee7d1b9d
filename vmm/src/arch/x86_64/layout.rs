//! The x86_64 machine's guest-physical and port layout: where the boot structures, the
//! kernel, the ACPI tables and the devices live. One place, so the boot code, the ACPI
//! and MP tables, the e820 map and the devices agree.
//!
//! ```text
//! 0x0000_0500  GDT (5 entries), IDT (empty) right after it
//! 0x0000_6000  PVH hvm_start_info, then its memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  boot stack pointer (grows down)
//! 0x0000_9000  identity page tables: PML4, PDPT, 4 page directories (first 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (at most CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00  EBDA: the MP floating pointer and MP configuration table
//! 0x000e_0000  ACPI: RSDP, then XSDT, FADT, MADT, DSDT (up to 1 MiB)
//! 0x0010_0000  the kernel (bzImage protected-mode part or ELF segments)
//!   ...        RAM up to min(memory, 3 GiB); the initrd at its top
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM beyond 3 GiB continues here
//! ```

/// GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18), 32-bit code (0x20); see
/// `regs.rs`.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (limit 0: any exception before the guest sets its own is a triple fault).
pub const BOOT_IDT_START: u64 = 0x528;
/// PVH `hvm_start_info`, followed by its memory map entries.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// The PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages: the first 4 GiB identity-mapped.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, terminating NUL included (the Linux boot protocol's
/// `cmdline_size` may be smaller; the loader checks that too).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA, where the MP table goes; reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the low RAM the e820 map offers below the EBDA.
pub const LOW_RAM_END: u64 = EBDA_START;
/// Where the ACPI tables start (the RSDP first; Linux also scans 0xe0000..0x100000).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_32_START: u64 = 0xc000_0000;
/// RAM beyond `MMIO_32_START` bytes continues here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// First virtio-mmio device; each takes `VIRTIO_MMIO_SIZE` bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (0..4 are legacy ISA interrupts in use).
pub const VIRTIO_MMIO_FIRST_GSI: u32 = 5;
/// The IOAPIC (KVM's in-kernel one).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;

/// COM1, a 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's port count.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's interrupt (ISA IRQ = GSI 4).
pub const COM1_GSI: u32 = 4;
/// The i8042 controller's data port (the command port is `I8042_PORT + 4`).
pub const I8042_PORT: u16 = 0x60;
/// Ports the i8042 covers (0x60..=0x64).
pub const I8042_PORT_LEN: u16 = 5;
/// ACPI power management block: hardware-reduced ACPI's sleep control register at
/// +0, sleep status at +1, reset register at +2 (FADT points at them).
pub const ACPI_PM_PORT: u16 = 0x600;
/// Ports of the ACPI power management block.
pub const ACPI_PM_PORT_LEN: u16 = 4;
/// The value the FADT's reset register takes for a reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The `_S5_` sleep type the DSDT advertises: a write of
/// `(ACPI_S5_SLEEP_TYPE << 2) | 0x20` to the sleep control register powers off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// pvpanic (QEMU's ISA panic device, ACPI `QEMU0001`): the guest writes 1 on panic.
pub const PVPANIC_PORT: u16 = 0x505;

// The stack sits between the zero page and the page tables; the ACPI area ends before
// the kernel; virtio-mmio windows are inside the MMIO hole, below the IOAPIC.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(ACPI_END <= HIMEM_START);
const _: () = assert!(VIRTIO_MMIO_START > MMIO_32_START && VIRTIO_MMIO_START < IOAPIC_START);

/// The guest-physical RAM regions `(start, size)` for `memory` bytes: below the 32-bit
/// MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(memory: u64) -> Vec<(u64, u64)> {
    if memory <= MMIO_32_START {
        vec![(0, memory)]
    } else {
        vec![(0, MMIO_32_START), (HIGH_RAM_START, memory - MMIO_32_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_32_START), vec![(0, MMIO_32_START)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, MMIO_32_START), (HIGH_RAM_START, 1 << 30)]
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        // (start, end) of every fixed structure below the kernel.
        let mut areas = [
            (BOOT_GDT_START, BOOT_IDT_START),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (PVH_INFO_START, ZERO_PAGE_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PDE_START + 4 * 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0xa0000),
            (ACPI_START, ACPI_END),
        ];
        areas.sort_unstable();
        for w in areas.windows(2) {
            assert!(w[0].1 <= w[1].0, "{:#x?} overlaps {:#x?}", w[0], w[1]);
        }
    }
}
