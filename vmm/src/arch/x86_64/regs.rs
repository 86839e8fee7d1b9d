//! The state a vCPU starts in: GDT and identity page tables in guest memory, segment
//! and control registers for 64-bit long mode (Linux's 64-bit boot protocol) or 32-bit
//! protected mode (PVH), general registers, FPU, MSRs and the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use rangevm_memory::{GuestRam, GuestRamError};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};

/// Number of 1 GiB page directories in the identity map (the first 4 GiB).
const IDENTITY_MAP_GIB: u64 = 4;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Page-table entry bits: present, writable, and (in a directory) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x80;

/// GDT selectors.
pub const CODE64_SELECTOR: u16 = 0x08;
/// Flat data.
pub const DATA_SELECTOR: u16 = 0x10;
/// The boot TSS.
pub const TSS_SELECTOR: u16 = 0x18;
/// Flat 32-bit code (PVH entry).
pub const CODE32_SELECTOR: u16 = 0x20;

/// The boot GDT, indexed by selector / 8: null, 64-bit code, data, TSS, 32-bit code.
/// Entries are (flags, base, limit) with flags as in the descriptor's bits 40..56
/// (access byte, then the limit's top nibble's neighbours G, D/B, L, AVL).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
    (0xc09b, 0, 0xfffff),
];
// The IDT is written right after the GDT: it must not cover its last entry (the
// 32-bit code segment PVH enters through).
const _: () = assert!(BOOT_GDT_START + GDT.len() as u64 * 8 <= BOOT_IDT_START);

/// Errors of the start-state setup.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The GDT or page tables could not be written.
    #[error("Cannot write the boot GDT or page tables into guest memory")]
    Memory(#[from] GuestRamError),
    /// A KVM register ioctl failed.
    #[error("Cannot set the vCPU's {what}")]
    Kvm {
        /// Which registers.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM accepted only {set} of the {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
}

/// A GDT descriptor from flags, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// KVM's view of the segment a GDT descriptor describes.
fn segment(selector: u16, entry: u64) -> kvm_segment {
    let bits = |shift: u32, mask: u64| u8::try_from((entry >> shift) & mask).unwrap_or(0);
    let base =
        u32::try_from(((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24)).unwrap_or(0);
    let raw_limit = u32::try_from((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)).unwrap_or(0);
    let g = bits(55, 1);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bits(47, 1);
    kvm_segment {
        base: u64::from(base),
        limit,
        selector,
        type_: bits(40, 0xf),
        present,
        dpl: bits(45, 3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g,
        avl: bits(52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn selector_entry(selector: u16) -> u64 {
    let (flags, base, limit) = GDT[usize::from(selector / 8)];
    gdt_entry(flags, base, limit)
}

/// Writes the boot GDT, an empty IDT and the identity page tables (first 4 GiB, 2 MiB
/// pages) into guest memory. Once per VM, before any vCPU starts.
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), RegsError> {
    let gdt: Vec<u8> = GDT
        .iter()
        .flat_map(|&(f, b, l)| gdt_entry(f, b, l).to_le_bytes())
        .collect();
    ram.write(BOOT_GDT_START, &gdt)?;
    ram.write_obj(BOOT_IDT_START, 0u64)?;

    ram.write_obj(PML4_START, PDPTE_START | PTE_PRESENT_RW)?;
    let mut pdpt = Vec::with_capacity(8 * 4);
    let mut pds = Vec::with_capacity(4096 * 4);
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 0x1000;
        pdpt.extend_from_slice(&(pd | PTE_PRESENT_RW).to_le_bytes());
        for i in 0..512u64 {
            let addr = ((gib << 9) + i) << 21;
            pds.extend_from_slice(&(addr | PTE_PRESENT_RW | PDE_2M_PAGE).to_le_bytes());
        }
    }
    ram.write(PDPTE_START, &pdpt)?;
    ram.write(PDE_START, &pds)?;
    Ok(())
}

/// Segment and control registers for 64-bit long mode with the identity page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    set_flat_segments(sregs, CODE64_SELECTOR);
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Segment and control registers for PVH's 32-bit protected mode, paging off.
pub fn protected_mode_sregs(sregs: &mut kvm_sregs) {
    set_flat_segments(sregs, CODE32_SELECTOR);
    sregs.cr0 = (sregs.cr0 | X86_CR0_PE | X86_CR0_ET) & !X86_CR0_PG;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

fn set_flat_segments(sregs: &mut kvm_sregs, code: u16) {
    let limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = limit;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 0;
    sregs.cs = segment(code, selector_entry(code));
    let data = segment(DATA_SELECTOR, selector_entry(DATA_SELECTOR));
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR, selector_entry(TSS_SELECTOR));
}

/// General registers for Linux's 64-bit entry: RIP at the entry, RSI = boot_params.
pub fn linux64_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// General registers for the PVH entry: EIP at the entry, EBX = hvm_start_info.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: PVH_INFO_START,
        rflags: 0x2,
        ..Default::default()
    }
}

/// The FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;

/// The MSRs a booting kernel expects in a defined state.
pub fn boot_msrs() -> Result<Msrs, RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })
}

/// LAPIC register offsets and delivery modes for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets LINT0 to ExtINT (the PIC) and LINT1 to NMI in a LAPIC register page, as a PC's
/// BIOS leaves them.
pub fn set_lint(regs: &mut [std::os::raw::c_char; 1024]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
            *b = r.to_ne_bytes()[0];
        }
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
            *r = std::os::raw::c_char::from_ne_bytes([b]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangevm_memory::LockMode;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        // Known encodings (Linux's GDT_ENTRY macro): 64-bit code, data, TSS.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        let cs = segment(CODE64_SELECTOR, selector_entry(CODE64_SELECTOR));
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        let cs32 = segment(CODE32_SELECTOR, selector_entry(CODE32_SELECTOR));
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let null = segment(0, selector_entry(0));
        assert_eq!(null.unusable, 1);
        let entry = gdt_entry(0x93, 0x1234_5678, 0xabcde);
        let seg = segment(DATA_SELECTOR, entry);
        assert_eq!((seg.base, seg.limit, seg.g), (0x1234_5678, 0xabcde, 0));
    }

    #[test]
    fn every_gdt_entry_survives_the_idt_written_after_it() {
        let ram = GuestRam::new(LockMode::Range, &[(0, 1 << 20)]).unwrap();
        write_boot_tables(&ram).unwrap();
        for (i, &(f, b, l)) in GDT.iter().enumerate() {
            let entry: u64 = ram.read_obj(BOOT_GDT_START + i as u64 * 8).unwrap();
            assert_eq!(entry, gdt_entry(f, b, l), "GDT entry {i}");
        }
        // The 32-bit code segment PVH enters through is a real descriptor.
        assert_eq!(
            ram.read_obj::<u64>(BOOT_GDT_START + u64::from(CODE32_SELECTOR))
                .unwrap(),
            0x00cf_9b00_0000_ffff
        );
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let ram = GuestRam::new(LockMode::Range, &[(0, 1 << 20)]).unwrap();
        write_boot_tables(&ram).unwrap();
        let pml4: u64 = ram.read_obj(PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // Walk some addresses through the tables.
        for addr in [0u64, 0x20_0000, 0x1234_5678, 0xfee0_0000, 0xffff_ffff] {
            let pdpte: u64 = ram.read_obj(PDPTE_START + (addr >> 30) * 8).unwrap();
            assert_eq!(pdpte & 0x3, 0x3);
            let pde: u64 = ram
                .read_obj((pdpte & !0xfff) + ((addr >> 21) & 511) * 8)
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "{addr:#x}");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
        let gdt_null: u64 = ram.read_obj(BOOT_GDT_START).unwrap();
        assert_eq!(gdt_null, 0);
        let code: u64 = ram
            .read_obj(BOOT_GDT_START + u64::from(CODE64_SELECTOR))
            .unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn mode_registers() {
        let mut sregs = kvm_sregs::default();
        long_mode_sregs(&mut sregs);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.selector, CODE64_SELECTOR);
        protected_mode_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((sregs.efer, sregs.cr4), (0, 0));
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(linux64_regs(0x100_0000).rsi, ZERO_PAGE_START);
        assert_eq!(pvh_regs(0x100_0000).rbx, PVH_INFO_START);
        assert_eq!(boot_msrs().unwrap().as_slice().len(), 10);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x17; // Other bits of the register survive.
        set_lint(&mut regs);
        assert_eq!(regs[APIC_LVT0 + 1].to_ne_bytes(), [0x17 & !0x7 | 0x7]);
        assert_eq!(regs[APIC_LVT1 + 1].to_ne_bytes(), [0x4]);
    }
}
