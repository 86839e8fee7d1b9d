//! The ACPI tables of the x86_64 machine: RSDP, XSDT, FADT, MADT and DSDT, laid out one
//! after the other from [`layout::ACPI_START`] (the RSDP first, where Linux also finds it
//! by scanning 0xe0000..0x100000).
//!
//! The machine is a hardware-reduced ACPI platform (no PM1 event/control blocks, no SCI,
//! no GPEs, no FACS): power-off and reset go through the FADT's sleep control and reset
//! registers in the ACPI PM port block. The DSDT declares the devices a stock kernel can
//! only find through ACPI: COM1, pvpanic and every virtio-mmio device (`LNRO0005`).
//!
//! The tables come from rust-vmm's `acpi_tables` crate where it has a builder (RSDP,
//! XSDT, FADT, the AML objects, the MADT's local APIC and IOAPIC entries); the MADT itself
//! is assembled here because the crate's MADT builder can neither set the `PCAT_COMPAT`
//! flag nor add interrupt source overrides or local APIC NMI entries.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
    ONE, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use rangevm_memory::{GuestRam, GuestRamError};

use super::layout;

/// The OEM ID of every table.
const OEM_ID: [u8; 6] = *b"RANGVM";
/// The OEM table ID of every table.
const OEM_TABLE_ID: [u8; 8] = *b"RANGEVM ";
/// The OEM revision of every table.
const OEM_REVISION: u32 = 1;

/// Most vCPUs the MADT describes: local APIC IDs are 8 bits, 0xff is the broadcast ID,
/// and one more ID is left for the IOAPIC in the MP table.
pub const MAX_CPUS: u8 = 254;
/// Most virtio-mmio devices the DSDT names (`VR00`..`VRFF`).
pub const MAX_MMIO_DEVICES: usize = 256;

/// The GSI (IOAPIC input) that ISA IRQ 0, the PIT, is connected to. KVM's default GSI
/// routing (the VM sets no other) sends the in-kernel PIT's GSI 0 to IOAPIC pin 0, not
/// to pin 2 as on PCs, so the MADT's override says IRQ 0 -> GSI 0 and the MP table the
/// same. Linux in hardware-reduced ACPI mode does not use the PIT's interrupt anyway.
pub const PIT_GSI: u32 = 0;

/// Tables start on this alignment.
const TABLE_ALIGN: u64 = 16;
/// Size of a table header (signature to creator revision).
const HEADER_LEN: u32 = 36;

/// IAPC_BOOT_ARCH flags (FADT offset 109). Set: LEGACY_DEVICES (bit 0: COM1 and pvpanic
/// sit on ISA ports), VGA_NOT_PRESENT (bit 2: no VGA, so the kernel does not probe the
/// legacy VGA ranges) and CMOS_RTC_NOT_PRESENT (bit 5: no MC146818 at ports 0x70/0x71, so
/// Linux registers no rtc_cmos device; wall-clock time comes from kvmclock). Not set:
/// 8042 (bit 1): the i8042 model only implements the reset command (0xfe to port 0x64),
/// which Linux's reboot path writes whatever this flag says; without the flag the i8042
/// keyboard driver does not probe the controller and waits for no timeouts. MSI (bit 3)
/// and ASPM (bit 4) concern PCI, which this machine has not.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 2) | (1 << 5);

/// MADT flag: the machine also has a PC/AT dual-8259 PIC (KVM's in-kernel irqchip).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT structure type: interrupt source override.
const MADT_INT_SRC_OVERRIDE: u8 = 2;
/// MADT structure type: local APIC NMI.
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT processor UID that means "all processors".
const ALL_PROCESSORS: u8 = 0xff;
/// MPS INTI flags: polarity and trigger mode conform to the bus (ISA: edge, active high).
const MPS_INTI_CONFORMS: u16 = 0;

/// The IOAPIC's address as the MADT (and the MP table) store it (32 bits).
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
pub(super) const IOAPIC_ADDR: u32 = {
    assert!(layout::IOAPIC_START <= u32::MAX as u64);
    layout::IOAPIC_START as u32
};
/// The local APICs' address as the MADT (and the MP table) store it (32 bits).
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
pub(super) const LAPIC_ADDR: u32 = {
    assert!(layout::LAPIC_START <= u32::MAX as u64);
    layout::LAPIC_START as u32
};
/// The COM1 port count as the IO resource descriptor stores it (8 bits).
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
const COM1_PORT_LEN: u8 = {
    assert!(layout::COM1_PORT_LEN <= u8::MAX as u16);
    layout::COM1_PORT_LEN as u8
};

/// A virtio-mmio device for the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical address of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt (an IOAPIC input).
    pub gsi: u32,
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (local APIC IDs 0..cpus).
    pub cpus: u8,
    /// The virtio-mmio devices, in the order of their `_UID`s.
    pub mmio_devices: Vec<MmioDevice>,
}

/// Errors of building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is 0 or more than [`MAX_CPUS`].
    #[error("Cannot describe {0} vCPUs in the ACPI tables (1 to {MAX_CPUS} are supported)")]
    CpuCount(u8),
    /// More virtio-mmio devices than the DSDT can name.
    #[error("Cannot describe {0} virtio-mmio devices in the DSDT (at most {MAX_MMIO_DEVICES})")]
    TooManyMmioDevices(usize),
    /// A virtio-mmio window is empty or not below 4 GiB.
    #[error("Virtio-mmio device window [{base:#x}, +{size:#x}) is empty or not below 4 GiB")]
    MmioWindow {
        /// Base of the window.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// A virtio-mmio device's GSI is not an IOAPIC input.
    #[error(
        "Virtio-mmio device at {base:#x} has GSI {gsi}, beyond the IOAPIC's {} inputs",
        layout::IOAPIC_PINS
    )]
    MmioGsi {
        /// Base of the device's window.
        base: u64,
        /// Its GSI.
        gsi: u32,
    },
    /// The tables do not fit in [`layout::ACPI_START`, `layout::ACPI_END`).
    #[error(
        "ACPI tables would end at {end:#x}, beyond the ACPI area's end {:#x}",
        layout::ACPI_END
    )]
    TooLarge {
        /// Where the last table would end.
        end: u64,
    },
    /// A table could not be written into guest memory.
    #[error("Cannot write the ACPI table at {gpa:#x} into guest memory")]
    GuestMemory {
        /// Where the table goes.
        gpa: u64,
        /// The cause.
        #[source]
        source: GuestRamError,
    },
}

/// Writes the tables into guest memory; returns the RSDP's guest-physical address.
pub fn create_acpi_tables(ram: &GuestRam, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build_acpi_tables(cfg)?;
    for (gpa, bytes) in &tables {
        ram.write(*gpa, bytes)
            .map_err(|source| AcpiError::GuestMemory { gpa: *gpa, source })?;
    }
    Ok(layout::ACPI_START)
}

/// Builds the tables: `(guest-physical address, bytes)` of the RSDP (first, at
/// [`layout::ACPI_START`]), XSDT, FADT, DSDT and MADT, all in [`layout::ACPI_START`,
/// `layout::ACPI_END`) and not overlapping.
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cfg.cpus));
    }
    let dsdt = build_dsdt(&cfg.mmio_devices)?;
    let madt = build_madt(cfg.cpus);

    // Two XSDT entries (FADT and MADT), the FADT's fixed size.
    let xsdt_len = u64::from(HEADER_LEN) + 2 * 8;
    let fadt_len = len_u64(acpi_tables::fadt::FADT::len());

    let rsdp_addr = layout::ACPI_START;
    let xsdt_addr = next_table(rsdp_addr, len_u64(Rsdp::len()));
    let fadt_addr = next_table(xsdt_addr, xsdt_len);
    let dsdt_addr = next_table(fadt_addr, fadt_len);
    let madt_addr = next_table(dsdt_addr, len_u64(dsdt.len()));
    let end = madt_addr.saturating_add(len_u64(madt.len()));
    if end > layout::ACPI_END {
        return Err(AcpiError::TooLarge { end });
    }

    let fadt = aml_bytes(&build_fadt(dsdt_addr));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    debug_assert_eq!(len_u64(xsdt.len()), xsdt_len);
    debug_assert_eq!(len_u64(fadt.len()), fadt_len);

    Ok(vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
    ])
}

/// Where the next table starts after one at `addr` of `len` bytes.
fn next_table(addr: u64, len: u64) -> u64 {
    addr.saturating_add(len).next_multiple_of(TABLE_ALIGN)
}

/// A byte count as u64 (usize is at most 64 bits on every target we build for).
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// The AML (or table) bytes of `aml`.
fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// The FADT of a hardware-reduced ACPI platform whose DSDT is at `dsdt_addr`.
fn build_fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    // The crate's builder writes revision 6, minor version 5 (ACPI 6.5) and the full
    // 276-byte table, so ACPICA reads the sleep control/status registers (FADT >= 5).
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button (hardware-reduced ACPI has none).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = pm_register(2);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // Linux's hardware-reduced S5 writes (SLP_TYP << 2) | SLP_EN (0x20) here, with
    // SLP_TYP from the DSDT's \_S5_ package.
    fadt.sleep_control_reg = pm_register(0);
    // It writes WAK_STS (0x80) here first, and polls it after the sleep write.
    fadt.sleep_status_reg = pm_register(1);
    fadt.finalize()
}

/// The 8-bit I/O register at `offset` in the ACPI PM port block.
fn pm_register(offset: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::ACPI_PM_PORT + offset),
    )
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = ACPI UID = index), the IOAPIC,
/// ISA IRQ 0 overridden to [`PIT_GSI`], and NMI on LINT1 of every processor.
fn build_madt(cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        HEADER_LEN + 8,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_ADDR, 0)));

    // Interrupt source override: bus 0 (ISA), IRQ 0 -> GSI PIT_GSI.
    let mut iso = vec![MADT_INT_SRC_OVERRIDE, 10, 0, 0];
    iso.extend_from_slice(&PIT_GSI.to_le_bytes());
    iso.extend_from_slice(&MPS_INTI_CONFORMS.to_le_bytes());
    madt.append_slice(&iso);

    // Local APIC NMI: all processors, LINT1.
    let mut nmi = vec![MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&MPS_INTI_CONFORMS.to_le_bytes());
    nmi.push(1);
    madt.append_slice(&nmi);

    madt.as_slice().to_vec()
}

/// The DSDT: `\_S5_`, and under `\_SB_` COM1, pvpanic and the virtio-mmio devices.
fn build_dsdt(mmio_devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if mmio_devices.len() > MAX_MMIO_DEVICES {
        return Err(AcpiError::TooManyMmioDevices(mmio_devices.len()));
    }
    let mut sb = Vec::new();
    sb.extend_from_slice(&com1());
    sb.extend_from_slice(&pvpanic());
    for (uid, dev) in (0u32..).zip(mmio_devices) {
        sb.extend_from_slice(&virtio_mmio(uid, dev)?);
    }

    let mut aml = Vec::new();
    // \_S5_: SLP_TYPa, SLP_TYPb and two reserved values. Only SLP_TYPa counts in
    // hardware-reduced mode.
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&layout::ACPI_S5_SLEEP_TYPE, &ZERO, &ZERO, &ZERO]),
    )
    .to_aml_bytes(&mut aml);
    aml.extend_from_slice(&Scope::raw("\\_SB_".into(), sb));

    // Revision 2: integers are 64 bits.
    let mut dsdt = Sdt::new(*b"DSDT", HEADER_LEN, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    Ok(dsdt.as_slice().to_vec())
}

/// COM1: a 16550 (`PNP0501`) on its ISA ports and IRQ.
fn com1() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &ZERO);
    let io = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, COM1_PORT_LEN);
    // ISA interrupt: edge-triggered, active high, exclusive.
    let irq = Interrupt::new(true, true, false, false, layout::COM1_GSI);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq]));
    aml_bytes(&Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// pvpanic (QEMU's ISA panic notifier, `QEMU0001`) at its port; Linux's pvpanic-mmio
/// driver binds to it through ACPI.
fn pvpanic() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"QEMU0001");
    let io = IO::new(layout::PVPANIC_PORT, layout::PVPANIC_PORT, 1, 1);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io]));
    aml_bytes(&Device::new("PEVT".into(), vec![&hid, &crs]))
}

/// Virtio-mmio device `uid` (`LNRO0005`, the ACPI ID Linux's virtio_mmio driver
/// matches): its register window and its edge-triggered, active-high interrupt.
fn virtio_mmio(uid: u32, dev: &MmioDevice) -> Result<Vec<u8>, AcpiError> {
    let window_err = || AcpiError::MmioWindow {
        base: dev.base,
        size: dev.size,
    };
    let base = u32::try_from(dev.base).map_err(|_| window_err())?;
    let size = u32::try_from(dev.size).map_err(|_| window_err())?;
    if size == 0 || dev.base + dev.size > 1 << 32 {
        return Err(window_err());
    }
    if dev.gsi >= layout::IOAPIC_PINS {
        return Err(AcpiError::MmioGsi {
            base: dev.base,
            gsi: dev.gsi,
        });
    }
    let name = format!("VR{uid:02X}");
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &uid);
    // DMA is cache-coherent.
    let cca = Name::new("_CCA".into(), &ONE);
    let mem = Memory32Fixed::new(true, base, size);
    let irq = Interrupt::new(true, true, false, false, dev.gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq]));
    Ok(aml_bytes(&Device::new(
        Path::new(&name),
        vec![&hid, &uid, &cca, &crs],
    )))
}

#[cfg(test)]
mod tests {
    use rangevm_memory::LockMode;

    use super::super::test_bytes::{sum, u16_at, u32_at, u64_at};
    use super::*;

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    fn mmio_devices(n: u32) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: layout::VIRTIO_MMIO_START + u64::from(i) * layout::VIRTIO_MMIO_SIZE,
                size: layout::VIRTIO_MMIO_SIZE,
                gsi: layout::VIRTIO_MMIO_FIRST_GSI + i,
            })
            .collect()
    }

    fn cfg(cpus: u8, mmio: u32) -> AcpiConfig {
        AcpiConfig {
            cpus,
            mmio_devices: mmio_devices(mmio),
        }
    }

    /// The tables by signature, checked for placement, checksum and header length.
    fn tables(cfg: &AcpiConfig) -> Vec<(u64, Vec<u8>)> {
        let tables = build_acpi_tables(cfg).unwrap();
        assert_eq!(tables[0].0, layout::ACPI_START);
        let mut end = layout::ACPI_START;
        for (gpa, bytes) in &tables {
            assert!(*gpa >= end, "table at {gpa:#x} overlaps the one before");
            end = gpa + bytes.len() as u64;
            assert!(end <= layout::ACPI_END);
            assert_eq!(sum(bytes), 0, "checksum of the table at {gpa:#x}");
            if &bytes[..8] != b"RSD PTR " {
                assert_eq!(u32_at(bytes, 4) as usize, bytes.len());
            }
        }
        tables
    }

    fn find<'a>(tables: &'a [(u64, Vec<u8>)], sig: &[u8]) -> (u64, &'a [u8]) {
        let (gpa, bytes) = tables
            .iter()
            .find(|(_, b)| b.starts_with(sig))
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)));
        (*gpa, bytes)
    }

    #[test]
    fn rsdp_xsdt_fadt_dsdt_point_at_each_other() {
        let t = tables(&cfg(2, 3));
        let (rsdp_addr, rsdp) = find(&t, b"RSD PTR ");
        assert_eq!(rsdp_addr, layout::ACPI_START);
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(rsdp, 20), 36, "length");

        let (xsdt_addr, xsdt) = find(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let (fadt_addr, fadt) = find(&t, b"FACP");
        let (madt_addr, _) = find(&t, b"APIC");
        assert_eq!(entries, vec![fadt_addr, madt_addr]);

        let (dsdt_addr, _) = find(&t, b"DSDT");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = tables(&cfg(1, 0));
        let (_, fadt) = find(&t, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "revision");
        assert_eq!(fadt[131], 5, "minor version");
        assert_eq!(u16_at(fadt, 109), IAPC_BOOT_ARCH);
        assert_eq!(u16_at(fadt, 109) & (1 << 1), 0, "no 8042 flag");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // A GAS: space 1 (I/O), 8 bits, offset 0, byte access, address.
        let gas = |off: usize, port: u16| {
            assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(fadt, off + 4), u64::from(port), "GAS at {off}");
        };
        gas(116, layout::ACPI_PM_PORT + 2);
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        gas(244, layout::ACPI_PM_PORT);
        gas(256, layout::ACPI_PM_PORT + 1);
        assert_eq!(u32_at(fadt, 36), 0, "no FACS");
        assert_eq!(u64_at(fadt, 132), 0, "no X_FACS");
    }

    /// The MADT's interrupt controller structures: (type, bytes).
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut entries = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = usize::from(madt[off + 1]);
            assert!(len >= 2 && off + len <= madt.len());
            entries.push((madt[off], &madt[off..off + len]));
            off += len;
        }
        entries
    }

    #[test]
    fn madt_describes_every_cpu_the_ioapic_and_the_overrides() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let t = tables(&cfg(cpus, 1));
            let (_, madt) = find(&t, b"APIC");
            assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
            assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
            let entries = madt_entries(madt);
            let lapics: Vec<_> = entries.iter().filter(|e| e.0 == 0).collect();
            assert_eq!(lapics.len(), usize::from(cpus));
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(usize::from(e[2]), i, "ACPI processor UID");
                assert_eq!(usize::from(e[3]), i, "APIC ID");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == 1).collect();
            assert_eq!(ioapics.len(), 1);
            let ioapic = ioapics[0].1;
            assert_eq!(ioapic.len(), 12);
            assert_eq!(ioapic[2], 0, "IOAPIC ID");
            assert_eq!(u64::from(u32_at(ioapic, 4)), layout::IOAPIC_START);
            assert_eq!(u32_at(ioapic, 8), 0, "GSI base");
            let isos: Vec<_> = entries.iter().filter(|e| e.0 == 2).collect();
            assert_eq!(isos.len(), 1);
            let iso = isos[0].1;
            assert_eq!((iso.len(), iso[2], iso[3]), (10, 0, 0), "bus 0, IRQ 0");
            assert_eq!(u32_at(iso, 4), PIT_GSI);
            let nmis: Vec<_> = entries.iter().filter(|e| e.0 == 4).collect();
            assert_eq!(nmis.len(), 1);
            assert_eq!(nmis[0].1, &[4, 6, 0xff, 0, 0, 1], "all CPUs, LINT1");
            assert_eq!(entries.len(), usize::from(cpus) + 3);
        }
    }

    #[test]
    fn dsdt_names_s5_com1_pvpanic_and_each_virtio_mmio_device() {
        for n in [0, 1, 8] {
            let t = tables(&cfg(1, n));
            let (_, dsdt) = find(&t, b"DSDT");
            assert_eq!(dsdt[8], 2, "revision");
            // Name(_S5_, Package(4) {5, 0, 0, 0})
            let s5 = [
                0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 4, 0x0a, 5, 0, 0, 0,
            ];
            assert_eq!(count(dsdt, &s5), 1);
            assert_eq!(layout::ACPI_S5_SLEEP_TYPE, 5);
            assert_eq!(count(dsdt, b"\\_SB_"), 1);
            // PNP0501 as an EISA ID: DWordPrefix, 0x0105D041.
            assert_eq!(count(dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
            // COM1's IO descriptor: decode16, 0x3f8..0x3f8, 8 ports; its IRQ 4.
            assert_eq!(count(dsdt, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]), 1);
            assert_eq!(count(dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]), 1);
            assert_eq!(count(dsdt, b"\x0dQEMU0001\0"), 1);
            assert_eq!(count(dsdt, &[0x47, 1, 0x05, 0x05, 0x05, 0x05, 1, 1]), 1);
            assert_eq!(count(dsdt, b"\x0dLNRO0005\0"), n as usize);
            assert_eq!(count(dsdt, b"_CCA"), n as usize);
            for (i, dev) in mmio_devices(n).iter().enumerate() {
                // Device(VRxx)
                assert_eq!(count(dsdt, format!("VR{i:02X}").as_bytes()), 1);
                // Memory32Fixed(ReadWrite, base, size)
                let mut mem = vec![0x86, 9, 0, 1];
                mem.extend_from_slice(&u32::try_from(dev.base).unwrap().to_le_bytes());
                mem.extend_from_slice(&u32::try_from(dev.size).unwrap().to_le_bytes());
                assert_eq!(count(dsdt, &mem), 1);
                // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}
                let mut irq = vec![0x89, 6, 0, 0x03, 1];
                irq.extend_from_slice(&dev.gsi.to_le_bytes());
                assert_eq!(count(dsdt, &irq), 1);
            }
        }
    }

    #[test]
    fn the_largest_machine_fits() {
        let t = tables(&cfg(MAX_CPUS, 8));
        let (gpa, last) = t.last().unwrap();
        assert!(gpa + last.len() as u64 <= layout::ACPI_END);
        // Even the most devices the DSDT can name fit.
        let many = AcpiConfig {
            cpus: MAX_CPUS,
            mmio_devices: (0..MAX_MMIO_DEVICES as u64)
                .map(|i| MmioDevice {
                    base: layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE,
                    size: layout::VIRTIO_MMIO_SIZE,
                    gsi: 5 + (i % 19) as u32,
                })
                .collect(),
        };
        tables(&many);
    }

    #[test]
    fn bad_configurations_are_errors() {
        assert!(matches!(
            build_acpi_tables(&cfg(0, 0)),
            Err(AcpiError::CpuCount(0))
        ));
        assert!(matches!(
            build_acpi_tables(&cfg(255, 0)),
            Err(AcpiError::CpuCount(255))
        ));
        let with = |dev: MmioDevice| AcpiConfig {
            cpus: 1,
            mmio_devices: vec![dev],
        };
        let ok = mmio_devices(1)[0];
        for bad in [
            MmioDevice { size: 0, ..ok },
            MmioDevice {
                base: 1 << 32,
                ..ok
            },
            MmioDevice {
                base: 0xffff_f000,
                size: 0x2000,
                ..ok
            },
            MmioDevice {
                base: u64::MAX,
                size: u64::MAX,
                ..ok
            },
        ] {
            assert!(matches!(
                build_acpi_tables(&with(bad)),
                Err(AcpiError::MmioWindow { .. })
            ));
        }
        assert!(matches!(
            build_acpi_tables(&with(MmioDevice { gsi: 24, ..ok })),
            Err(AcpiError::MmioGsi { gsi: 24, .. })
        ));
        let too_many = AcpiConfig {
            cpus: 1,
            mmio_devices: vec![ok; MAX_MMIO_DEVICES + 1],
        };
        assert!(matches!(
            build_acpi_tables(&too_many),
            Err(AcpiError::TooManyMmioDevices(_))
        ));
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let ram = GuestRam::new(LockMode::Range, &[(0, 2 << 20)]).unwrap();
        let c = cfg(4, 2);
        assert_eq!(create_acpi_tables(&ram, &c).unwrap(), layout::ACPI_START);
        for (gpa, bytes) in build_acpi_tables(&c).unwrap() {
            let mut buf = vec![0; bytes.len()];
            ram.read(gpa, &mut buf).unwrap();
            assert_eq!(buf, bytes);
        }
        // Guest RAM that stops short of the ACPI area.
        let small = GuestRam::new(LockMode::Range, &[(0, 0x80000)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&small, &c),
            Err(AcpiError::GuestMemory { .. })
        ));
    }
}
