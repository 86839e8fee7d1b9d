//! The CPUID a vCPU shows its guest: KVM's supported set, with the topology (APIC IDs,
//! core counts) of this VM and the hypervisor bit filled in per vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 31, "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28, more than one logical processor per package.
const HTT_BIT: u32 = 1 << 28;
/// `kvm_cpuid_entry2.flags`: the leaf has subleaves indexed by ECX.
const SIGNIFICANT_INDEX: u32 = 1;

/// Level types of CPUID.0xB/0x1F:ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Adjusts KVM's supported CPUID for vCPU `index` of `cpus`: one package of `cpus`
/// cores with one thread each, APIC ID = index.
pub fn filter(cpuid: &mut CpuId, index: u8, cpus: u8) {
    let amd = is_amd(cpuid.as_slice());
    for entry in cpuid.as_mut_slice() {
        adjust(entry, index, cpus, amd);
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| [e.ebx, e.edx, e.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163])
}

/// Bits needed to number `n` things (0 for 1).
fn bits_for(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

fn adjust(e: &mut kvm_cpuid_entry2, index: u8, cpus: u8, amd: bool) {
    let (index, cpus) = (u32::from(index), u32::from(cpus));
    match e.function {
        1 => {
            // EBX: APIC ID [31:24], logical processors per package [23:16], CLFLUSH
            // line size in 8-byte units [15:8].
            e.ebx = (index << 24) | (cpus.next_power_of_two() << 16) | (8 << 8);
            e.ecx |= HYPERVISOR_BIT;
            if cpus > 1 {
                e.edx |= HTT_BIT;
            } else {
                e.edx &= !HTT_BIT;
            }
        }
        4 if !amd => {
            // Deterministic cache parameters: cores per package [31:26]; logical
            // processors sharing this cache [25:14] (all of them for the last level).
            let level = (e.eax >> 5) & 0x7;
            if e.eax & 0x1f != 0 {
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
            }
        }
        0xb | 0x1f => {
            e.flags |= SIGNIFICANT_INDEX;
            e.edx = index;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (LEVEL_SMT << 8) | e.index;
                }
                1 => {
                    e.eax = bits_for(cpus);
                    e.ebx = cpus;
                    e.ecx = (LEVEL_CORE << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        0x8000_0008 if amd => {
            // NC: cores per package - 1; ApicIdSize.
            e.ecx = (e.ecx & !0xf0ff) | (bits_for(cpus) << 12) | (cpus - 1);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_leaves_describe_this_vcpu() {
        let mut leaf1 = entry(1, 0);
        leaf1.edx = HTT_BIT;
        adjust(&mut leaf1, 3, 4, false);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(leaf1.edx & HTT_BIT, 0);
        adjust(&mut leaf1, 0, 1, false);
        assert_eq!(leaf1.edx & HTT_BIT, 0);

        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            adjust(e, 2, 3, false);
            assert_eq!(e.edx, 2);
        }
        assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
        assert_eq!((core.eax, core.ebx, core.ecx), (2, 3, 0x201));
        assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));

        // An L3 cache (type 3 = unified, level 3) shared by all cores.
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 3;
        adjust(&mut l3, 0, 4, false);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn vendor_is_read_from_leaf_0() {
        let mut leaf0 = entry(0, 0);
        (leaf0.ebx, leaf0.edx, leaf0.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        assert!(is_amd(&[leaf0]));
        assert!(!is_amd(&[entry(0, 0)]));
        assert_eq!(
            (bits_for(1), bits_for(2), bits_for(3), bits_for(8)),
            (0, 1, 2, 3)
        );
    }
}
