//! The Intel MultiProcessor Specification 1.4 table: the MP floating pointer structure at
//! [`layout::EBDA_START`] (the last KiB of base memory, which Linux scans), followed by
//! the MP configuration table it points at, all inside the EBDA's KiB.
//!
//! Linux reads this table only when it finds no ACPI MADT (for example with `acpi=off`);
//! it says the same as the MADT: one enabled processor per vCPU (APIC ID = index, vCPU 0
//! the bootstrap processor), an ISA bus, the IOAPIC, ISA IRQs on the IOAPIC pins of the
//! same number (IRQ 0, the PIT, on pin [`PIT_GSI`]: 0 under KVM's default GSI routing),
//! 8259 ExtINT on LINT0 and NMI on LINT1.
//!
//! Written by explicit little-endian serialization: no unsafe, no layout assumptions.

use rangevm_memory::{GuestRam, GuestRamError};

use super::acpi::{IOAPIC_ADDR, LAPIC_ADDR, PIT_GSI};
use super::layout;

/// End of the EBDA KiB the tables must fit in.
const EBDA_END: u64 = 0xa0000;
/// Size of the MP floating pointer structure.
const FLOATING_LEN: usize = 16;
/// Size of the MP configuration table header.
const HEADER_LEN: usize = 44;
/// Size of a processor entry.
const PROCESSOR_LEN: usize = 20;
/// Size of every other base table entry.
const ENTRY_LEN: usize = 8;
/// ISA IRQs with an I/O interrupt assignment entry: 0..16 without IRQ 2 (the 8259
/// cascade, never raised; its IOAPIC pin carries IRQ 0).
const ISA_IRQS: usize = 15;
/// Bytes of everything but the processor entries: floating pointer, header, the bus,
/// the IOAPIC, the ISA interrupts and the two local interrupts.
const FIXED_LEN: usize = FLOATING_LEN + HEADER_LEN + ENTRY_LEN * (2 + ISA_IRQS + 2);

/// Most vCPUs whose MP table fits in the EBDA's KiB.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
pub const MAX_CPUS: u8 = {
    let n = (EBDA_END - layout::EBDA_START) as usize;
    let n = (n - FIXED_LEN) / PROCESSOR_LEN;
    assert!(n <= u8::MAX as usize);
    n as u8
};

/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types of interrupt assignment entries.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Interrupt flags: polarity and trigger conform to the bus (ISA: edge, active high).
const INT_FLAGS_CONFORM: u16 = 0;
/// Processor flags: enabled, bootstrap processor.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Local APIC version of KVM's in-kernel local APICs (an integrated xAPIC).
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature: family 6, model 0, stepping 0 (CPUID.1 EAX layout). Linux ignores it.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPU feature flags (CPUID.1 EDX layout): FPU (bit 0) and an on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// The ISA bus's ID.
const ISA_BUS_ID: u8 = 0;
/// IOAPIC version of KVM's in-kernel IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC flags: enabled.
const IOAPIC_ENABLED: u8 = 1;
/// Destination local APIC ID meaning "all local APICs".
const ALL_LAPICS: u8 = 0xff;

/// Where the configuration table goes (right after the floating pointer), 32 bits.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
const CONFIG_ADDR: u32 = {
    let addr = layout::EBDA_START + FLOATING_LEN as u64;
    assert!(addr <= u32::MAX as u64);
    addr as u32
};
/// The IOAPIC pin IRQ 0 arrives on, as the table stores it.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
const PIT_PIN: u8 = {
    assert!(PIT_GSI < layout::IOAPIC_PINS && PIT_GSI < 16);
    PIT_GSI as u8
};

/// Errors of building or writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is 0 or too large for the table to fit in the EBDA.
    #[error("Cannot describe {0} vCPUs in the MP table (1 to {MAX_CPUS} fit in the EBDA)")]
    CpuCount(u8),
    /// The table could not be written into guest memory.
    #[error("Cannot write the MP table into guest memory")]
    GuestMemory(#[source] GuestRamError),
}

/// Writes the MP floating pointer and configuration table at [`layout::EBDA_START`].
pub fn setup_mptable(ram: &GuestRam, cpus: u8) -> Result<(), MptableError> {
    let bytes = build_mptable(cpus)?;
    ram.write(layout::EBDA_START, &bytes)
        .map_err(MptableError::GuestMemory)
}

/// The bytes to place at [`layout::EBDA_START`]: the 16-byte MP floating pointer, then
/// the configuration table (base table only, no extended entries).
pub fn build_mptable(cpus: u8) -> Result<Vec<u8>, MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::CpuCount(cpus));
    }
    let config = config_table(cpus);

    let mut out = Vec::with_capacity(FLOATING_LEN + config.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&CONFIG_ADDR.to_le_bytes());
    out.push(1); // Length in 16-byte units.
    out.push(SPEC_REV);
    out.push(0); // Checksum, below.
    out.push(0); // Feature 1: a configuration table is present.
    out.push(0); // Feature 2: no IMCR, virtual wire mode.
    out.extend_from_slice(&[0; 3]);
    out[10] = checksum(&out);
    out.extend_from_slice(&config);
    debug_assert!(layout::EBDA_START + out.len() as u64 <= EBDA_END);
    Ok(out)
}

/// The MP configuration table for `cpus` vCPUs (1..=MAX_CPUS).
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    let mut entry = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };

    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        let mut e = vec![ENTRY_PROCESSOR, id, LAPIC_VERSION, flags];
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        entry(&e);
    }

    let mut bus = vec![ENTRY_BUS, ISA_BUS_ID];
    bus.extend_from_slice(b"ISA   ");
    entry(&bus);

    // The IOAPIC's ID follows the local APIC IDs.
    let ioapic_id = cpus;
    let mut ioapic = vec![ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entry(&ioapic);

    // IRQ 2 is the PICs' cascade; it gets an entry only when IRQ 0 does not use pin 2.
    for irq in (0u8..16).filter(|&irq| irq != 2 || PIT_PIN != 2) {
        let pin = if irq == 0 { PIT_PIN } else { irq };
        let [f0, f1] = INT_FLAGS_CONFORM.to_le_bytes();
        entry(&[
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            f0,
            f1,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            pin,
        ]);
    }

    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        let [f0, f1] = INT_FLAGS_CONFORM.to_le_bytes();
        entry(&[
            ENTRY_LOCAL_INTERRUPT,
            kind,
            f0,
            f1,
            ISA_BUS_ID,
            0,
            ALL_LAPICS,
            lint,
        ]);
    }

    let len = HEADER_LEN + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    // At most FIXED_LEN + 255 * PROCESSOR_LEN bytes: fits in 16 bits.
    t.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    t.push(SPEC_REV);
    t.push(0); // Checksum, below.
    t.extend_from_slice(b"RANGEVM ");
    t.extend_from_slice(b"RANGEVM-MP  ");
    t.extend_from_slice(&0u32.to_le_bytes()); // No OEM table.
    t.extend_from_slice(&0u16.to_le_bytes()); // Its size.
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // No extended table.
    t.push(0); // Its checksum.
    t.push(0); // Reserved.
    debug_assert_eq!(t.len(), HEADER_LEN);
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// The byte that makes `bytes` sum to 0 mod 256 (with that byte still 0 in `bytes`).
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use rangevm_memory::LockMode;

    use super::super::test_bytes::{sum, u16_at, u32_at};
    use super::*;

    /// The configuration table's entries: (type, bytes).
    fn entries(config: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut off = HEADER_LEN;
        while off < config.len() {
            let len = if config[off] == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                ENTRY_LEN
            };
            out.push((config[off], &config[off..off + len]));
            off += len;
        }
        assert_eq!(off, config.len());
        out
    }

    #[test]
    fn floating_pointer_points_at_the_configuration_table() {
        let t = build_mptable(1).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..FLOATING_LEN]), 0);
        assert_eq!((t[8], t[9]), (1, 4), "length 16 bytes, revision 1.4");
        assert_eq!(
            &t[11..16],
            &[0; 5],
            "config table present, virtual wire mode"
        );
        let config_addr = u64::from(u32_at(&t, 4));
        assert_eq!(config_addr, layout::EBDA_START + 16);
        let off = usize::try_from(config_addr - layout::EBDA_START).unwrap();
        assert_eq!(&t[off..off + 4], b"PCMP");
    }

    #[test]
    fn configuration_table_describes_the_machine() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let t = build_mptable(cpus).unwrap();
            assert!(layout::EBDA_START + t.len() as u64 <= EBDA_END);
            let config = &t[FLOATING_LEN..];
            assert_eq!(usize::from(u16_at(config, 4)), config.len());
            assert_eq!(config[6], 4, "revision 1.4");
            assert_eq!(sum(config), 0);
            assert_eq!(u32_at(config, 36), LAPIC_ADDR);
            let entries = entries(config);
            assert_eq!(usize::from(u16_at(config, 34)), entries.len());

            let of = |kind: u8| entries.iter().filter(move |e| e.0 == kind).map(|e| e.1);
            let cpu_entries: Vec<_> = of(ENTRY_PROCESSOR).collect();
            assert_eq!(cpu_entries.len(), usize::from(cpus));
            for (i, e) in cpu_entries.iter().enumerate() {
                assert_eq!(usize::from(e[1]), i, "APIC ID");
                assert_eq!(e[2], LAPIC_VERSION);
                let bsp = if i == 0 { CPU_BOOTSTRAP } else { 0 };
                assert_eq!(e[3], CPU_ENABLED | bsp);
            }
            let buses: Vec<_> = of(ENTRY_BUS).collect();
            assert_eq!(buses, vec![b"\x01\x00ISA   ".as_slice()]);
            let ioapics: Vec<_> = of(ENTRY_IOAPIC).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!(&ioapics[0][..4], &[ENTRY_IOAPIC, cpus, 0x11, 1]);
            assert_eq!(u64::from(u32_at(ioapics[0], 4)), layout::IOAPIC_START);

            // (source IRQ, destination pin) of every ISA interrupt, all to the IOAPIC.
            let irqs: Vec<(u8, u8)> = of(ENTRY_IO_INTERRUPT)
                .inspect(|e| assert_eq!(&e[1..5], &[INT_VECTORED, 0, 0, ISA_BUS_ID]))
                .inspect(|e| assert_eq!(e[6], cpus, "destination IOAPIC"))
                .map(|e| (e[5], e[7]))
                .collect();
            // KVM's default routing: GSI n is IOAPIC pin n, the PIT on GSI 0.
            let want: Vec<(u8, u8)> = (0..16).map(|i| (i, i)).collect();
            assert_eq!(irqs, want);
            assert_eq!(PIT_GSI, 0, "the MADT's override agrees");

            let locals: Vec<_> = of(ENTRY_LOCAL_INTERRUPT).collect();
            assert_eq!(
                locals,
                vec![
                    [4, INT_EXTINT, 0, 0, 0, 0, 0xff, 0].as_slice(),
                    [4, INT_NMI, 0, 0, 0, 0, 0xff, 1].as_slice(),
                ]
            );
            assert_eq!(entries.len(), usize::from(cpus) + 1 + 1 + 16 + 2);
            // Entries come sorted by type, as the specification asks.
            assert!(entries.windows(2).all(|w| w[0].0 <= w[1].0));
        }
    }

    #[test]
    fn bad_cpu_counts_are_errors() {
        assert_eq!(MAX_CPUS, 40);
        for cpus in [0, MAX_CPUS + 1, 254, 255] {
            assert!(matches!(
                build_mptable(cpus),
                Err(MptableError::CpuCount(c)) if c == cpus
            ));
        }
    }

    #[test]
    fn table_lands_in_guest_memory() {
        let ram = GuestRam::new(LockMode::Range, &[(0, 1 << 20)]).unwrap();
        setup_mptable(&ram, 2).unwrap();
        let want = build_mptable(2).unwrap();
        let mut buf = vec![0; want.len()];
        ram.read(layout::EBDA_START, &mut buf).unwrap();
        assert_eq!(buf, want);
        let small = GuestRam::new(LockMode::Range, &[(0, 0x80000)]).unwrap();
        assert!(matches!(
            setup_mptable(&small, 1),
            Err(MptableError::GuestMemory(_))
        ));
    }
}
