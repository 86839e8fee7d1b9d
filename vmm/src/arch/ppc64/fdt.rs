//! The flattened device tree an sPAPR guest boots with, written with rust-vmm's
//! `vm-fdt`.
//!
//! A pseries Linux kernel entered with r3 = the tree and r5 = 0 skips Open Firmware
//! (prom_init) and reads everything from here: memory, the CPUs (with their interrupt
//! server numbers and timebase), `/chosen` (command line, initrd, the console path, and
//! `ibm,architecture-vec-5`, which is what the client-architecture-support negotiation
//! would have left: "radix only, with GTSE"), the `/rtas` node (where the RTAS blob is,
//! the tokens of the calls the VMM answers, and `ibm,hypertas-functions`, which tells
//! the kernel which hypercall sets exist), the virtual terminal under `/vdevice`, the
//! XICS interrupt presentation node, and the PCI host bridge with a node for each of its
//! functions (pseries Linux creates its PCI devices from these nodes instead of scanning
//! the bus; see [`super::phb`]).

use vm_fdt::{FdtReserveEntry, FdtWriter};

use rangevm_devices::PciIdentity;

use super::layout::{
    rtas, CMDLINE_MAX_SIZE, FDT_MAX_SIZE, PHB_BUID, PHB_MEM_CPU, PHB_MEM_PCI, PHB_MEM_SIZE,
    VTY_TERMNO,
};
use super::tce::{DMA_WINDOW_SIZE, PHB_LIOBN};

/// Errors of building the device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// vm-fdt refused a node or property.
    #[error("Cannot write the device tree: {0}")]
    Write(String),
    /// The tree is too big for its room in guest memory.
    #[error("The device tree is {0} bytes, more than the {FDT_MAX_SIZE} bytes it has room for")]
    TooBig(usize),
    /// The command line is too long or holds a NUL.
    #[error("The kernel command line is {0} bytes or holds a NUL byte; at most {max} bytes", max = CMDLINE_MAX_SIZE - 1)]
    Cmdline(usize),
}

impl From<vm_fdt::Error> for FdtError {
    fn from(e: vm_fdt::Error) -> Self {
        FdtError::Write(e.to_string())
    }
}

/// A function on the PCI host bridge (bus 0, function 0 of `device`) with one 32-bit
/// memory BAR (BAR 0) and INTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciNode {
    /// Device number (0-31).
    pub device: u8,
    /// Its IDs.
    pub identity: PciIdentity,
    /// BAR 0's PCI bus address, inside the PHB's window.
    pub bar: u32,
    /// BAR 0's size.
    pub bar_size: u64,
    /// The XICS source INTA is routed to.
    pub irq: u32,
}

/// What the tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// Guest RAM in bytes (one region from 0).
    pub memory: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// The initrd as `[start, end)`, if any.
    pub initrd: Option<(u64, u64)>,
    /// Where the RTAS blob is.
    pub rtas_base: u64,
    /// Bytes reserved for RTAS.
    pub rtas_size: u64,
    /// The timebase frequency (Hz) the guest reads its clock by.
    pub timebase_hz: u32,
    /// The functions on the PCI host bridge.
    pub pci: &'a [PciNode],
}

/// The terminal number as the 32-bit cell of its `reg`.
#[allow(clippy::cast_possible_truncation)] // Checked by the assertion.
const VTY_TERMNO_U32: u32 = VTY_TERMNO as u32;
const _: () = assert!(VTY_TERMNO <= u32::MAX as u64);
/// The XICS node's phandle (where the PHB's `interrupt-map` points).
const XICS_PHANDLE: u32 = 0x1111;
/// The sense cell of a message-style (edge) XICS interrupt.
const IRQ_EDGE: u32 = 0;
/// The hypercall sets offered (`ibm,hypertas-functions`): only names whose calls KVM
/// or this VMM answers.
const HYPERTAS: [&str; 9] = [
    "hcall-pft",
    "hcall-term",
    "hcall-dabr",
    "hcall-interrupt",
    "hcall-splpar",
    "hcall-set-mode",
    "hcall-sprg0",
    "hcall-copy",
    "hcall-tce",
];
/// The RTAS calls and their tokens.
pub const RTAS_CALLS: [(&str, u32); 16] = [
    ("display-character", rtas::DISPLAY_CHARACTER),
    ("get-time-of-day", rtas::GET_TIME_OF_DAY),
    ("set-time-of-day", rtas::SET_TIME_OF_DAY),
    ("power-off", rtas::POWER_OFF),
    ("system-reboot", rtas::SYSTEM_REBOOT),
    ("query-cpu-stopped-state", rtas::QUERY_CPU_STOPPED_STATE),
    ("start-cpu", rtas::START_CPU),
    ("stop-self", rtas::STOP_SELF),
    ("ibm,os-term", rtas::IBM_OS_TERM),
    ("event-scan", rtas::EVENT_SCAN),
    ("ibm,set-xive", rtas::IBM_SET_XIVE),
    ("ibm,get-xive", rtas::IBM_GET_XIVE),
    ("ibm,int-off", rtas::IBM_INT_OFF),
    ("ibm,int-on", rtas::IBM_INT_ON),
    ("ibm,read-pci-config", rtas::IBM_READ_PCI_CONFIG),
    ("ibm,write-pci-config", rtas::IBM_WRITE_PCI_CONFIG),
];
/// Open Firmware PCI address space codes (bits 24-25 of `phys.hi`).
const SS_CONFIG: u32 = 0;
const SS_MEM32: u32 = 2 << 24;
/// `phys.hi` bit 31: the address is not relocatable (an assigned address).
const PHYS_NOT_RELOCATABLE: u32 = 1 << 31;
/// `ibm,architecture-vec-5`: byte 24 (OV5_MMU_SUPPORT) = radix only, byte 26
/// (OV5_RADIX_GTSE) = guest translation shootdown: what CAS would have agreed with a
/// POWER9 radix hypervisor.
fn architecture_vec_5() -> [u8; 27] {
    let mut v = [0u8; 27];
    v[24] = 0x40;
    v[26] = 0x40;
    v
}

/// Builds the tree.
pub fn create_fdt(cfg: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    if cfg.cmdline.len() >= CMDLINE_MAX_SIZE || cfg.cmdline.contains('\0') {
        return Err(FdtError::Cmdline(cfg.cmdline.len()));
    }
    // RTAS lives in RAM the kernel must not hand out: without Open Firmware (whose
    // prom_init would reserve it) the reservation block is what keeps it.
    let mut fdt =
        FdtWriter::new_with_mem_reserv(&[FdtReserveEntry::new(cfg.rtas_base, cfg.rtas_size)?])?;
    fdt.set_boot_cpuid_phys(0);
    let root = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_string("device_type", "chrp")?;
    fdt.property_string("compatible", "qemu,pseries")?;
    fdt.property_string("model", "rangevm,pseries")?;

    let memory = fdt.begin_node("memory@0")?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[0, cfg.memory])?;
    fdt.end_node(memory)?;

    cpus_node(&mut fdt, cfg)?;
    chosen_node(&mut fdt, cfg)?;
    rtas_node(&mut fdt, cfg)?;

    let vdevice = fdt.begin_node("vdevice")?;
    fdt.property_string("device_type", "vdevice")?;
    fdt.property_string("compatible", "IBM,vdevice")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    let vty = fdt.begin_node(&format!("vty@{VTY_TERMNO:x}"))?;
    fdt.property_string("name", "vty")?;
    fdt.property_string("device_type", "serial")?;
    fdt.property_string("compatible", "hvterm1")?;
    fdt.property_u32("reg", VTY_TERMNO_U32)?;
    fdt.end_node(vty)?;
    fdt.end_node(vdevice)?;

    let xics = fdt.begin_node("interrupt-controller")?;
    fdt.property_string("device_type", "PowerPC-External-Interrupt-Presentation")?;
    fdt.property_string("compatible", "IBM,ppc-xicp")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_array_u32("ibm,interrupt-server-ranges", &[0, u32::from(cfg.cpus)])?;
    fdt.property_u32("#interrupt-cells", 2)?;
    fdt.property_u32("#address-cells", 0)?;
    fdt.property_phandle(XICS_PHANDLE)?;
    fdt.end_node(xics)?;

    phb_node(&mut fdt, cfg)?;

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() > FDT_MAX_SIZE {
        return Err(FdtError::TooBig(blob.len()));
    }
    Ok(blob)
}

fn cpus_node(fdt: &mut FdtWriter, cfg: &FdtConfig<'_>) -> Result<(), FdtError> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for id in 0..u32::from(cfg.cpus) {
        let cpu = fdt.begin_node(&format!("PowerPC,POWER9@{id:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_u32("reg", id)?;
        // One thread per core: the server number is the vCPU id.
        fdt.property_array_u32("ibm,ppc-interrupt-server#s", &[id])?;
        fdt.property_u32("timebase-frequency", cfg.timebase_hz)?;
        fdt.property_u32("clock-frequency", 1_000_000_000)?;
        for name in [
            "d-cache-block-size",
            "i-cache-block-size",
            "d-cache-line-size",
            "i-cache-line-size",
        ] {
            fdt.property_u32(name, 128)?;
        }
        fdt.property_null("64-bit")?;
        // What Linux reads to turn on Altivec and VSX (`ibm,vmx` = 2), decimal floating
        // point and the PURR/SPURR: the POWER9 CPU table leaves them to the device tree.
        fdt.property_u32("ibm,vmx", 2)?;
        fdt.property_u32("ibm,dfp", 1)?;
        fdt.property_u32("ibm,purr", 1)?;
        fdt.property_u32("ibm,spurr", 1)?;
        fdt.property_u32("ibm,slb-size", 32)?;
        // No `ibm,processor-radix-AP-encodings`: its 32-character name is one more than
        // the device-tree spec (and vm-fdt) allow; without it Linux uses 4K and 64K
        // radix pages, which is what the host backs guest RAM with anyway.
        fdt.property_string("status", "okay")?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;
    Ok(())
}

fn chosen_node(fdt: &mut FdtWriter, cfg: &FdtConfig<'_>) -> Result<(), FdtError> {
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    if let Some((start, end)) = cfg.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    let console = format!("/vdevice/vty@{VTY_TERMNO:x}");
    fdt.property_string("linux,stdout-path", &console)?;
    fdt.property_string("stdout-path", &console)?;
    fdt.property("ibm,architecture-vec-5", &architecture_vec_5())?;
    fdt.end_node(chosen)?;
    Ok(())
}

/// The PHB (child of the root, as `pSeries_discover_phbs` looks for it): its BUID in
/// `reg`, bus 0 only, one 32-bit memory window, INTA of each function routed to the
/// XICS; then one node per function with its IDs, config address, BAR (`reg` gives the
/// size, `assigned-addresses` where it is) and interrupt pin.
fn phb_node(fdt: &mut FdtWriter, cfg: &FdtConfig<'_>) -> Result<(), FdtError> {
    let hi = |v: u64| u32::try_from(v >> 32).unwrap_or(0);
    let lo = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
    let node = fdt.begin_node(&format!("pci@{PHB_BUID:x}"))?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_string("compatible", "IBM,Logical_PHB")?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_null("used-by-rtas")?;
    fdt.property_array_u32("bus-range", &[0, 0])?;
    // The DMA window Linux requires of every PCI bus: (LIOBN, bus address, size).
    fdt.property_u32("ibm,#dma-address-cells", 2)?;
    fdt.property_u32("ibm,#dma-size-cells", 2)?;
    fdt.property_array_u32(
        "ibm,dma-window",
        &[PHB_LIOBN, 0, 0, hi(DMA_WINDOW_SIZE), lo(DMA_WINDOW_SIZE)],
    )?;
    fdt.property_array_u64("reg", &[PHB_BUID, 0])?;
    // (phys.hi, PCI address) -> (CPU address) for size bytes.
    fdt.property_array_u32(
        "ranges",
        &[
            SS_MEM32,
            0,
            PHB_MEM_PCI,
            hi(PHB_MEM_CPU),
            lo(PHB_MEM_CPU),
            hi(PHB_MEM_SIZE),
            lo(PHB_MEM_SIZE),
        ],
    )?;
    // Match on the device number and the pin; each entry: child unit address (3
    // cells), pin, XICS phandle, source, sense.
    fdt.property_array_u32("interrupt-map-mask", &[0x1f << 11, 0, 0, 7])?;
    let map: Vec<u32> = cfg
        .pci
        .iter()
        .flat_map(|f| {
            let pin = u32::from(f.identity.interrupt_pin);
            [
                u32::from(f.device) << 11,
                0,
                0,
                pin,
                XICS_PHANDLE,
                f.irq,
                IRQ_EDGE,
            ]
        })
        .collect();
    fdt.property_array_u32("interrupt-map", &map)?;
    for f in cfg.pci {
        let devfn = u32::from(f.device) << 11;
        let child = fdt.begin_node(&format!("pci@{:x}", f.device))?;
        let id = &f.identity;
        fdt.property_u32("vendor-id", id.vendor.into())?;
        fdt.property_u32("device-id", id.device.into())?;
        fdt.property_u32("revision-id", id.revision.into())?;
        fdt.property_u32("class-code", id.class_code)?;
        fdt.property_u32("subsystem-vendor-id", id.subsystem_vendor.into())?;
        fdt.property_u32("subsystem-id", id.subsystem.into())?;
        fdt.property_u32("interrupts", id.interrupt_pin.into())?;
        let bar0 = devfn | 0x10;
        fdt.property_array_u32(
            "reg",
            &[
                SS_CONFIG | devfn,
                0,
                0,
                0,
                0,
                SS_MEM32 | bar0,
                0,
                0,
                hi(f.bar_size),
                lo(f.bar_size),
            ],
        )?;
        fdt.property_array_u32(
            "assigned-addresses",
            &[
                PHYS_NOT_RELOCATABLE | SS_MEM32 | bar0,
                0,
                f.bar,
                hi(f.bar_size),
                lo(f.bar_size),
            ],
        )?;
        fdt.end_node(child)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

fn rtas_node(fdt: &mut FdtWriter, cfg: &FdtConfig<'_>) -> Result<(), FdtError> {
    let node = fdt.begin_node("rtas")?;
    // 32-bit cells: RTAS lives below 4 GiB (the layout keeps it below 256 MiB).
    let cell = |v: u64| {
        u32::try_from(v).map_err(|_| FdtError::Write(format!("RTAS at {v:#x} is above 4 GiB")))
    };
    fdt.property_u32("linux,rtas-base", cell(cfg.rtas_base)?)?;
    fdt.property_u32("linux,rtas-entry", cell(cfg.rtas_base)?)?;
    fdt.property_u32("rtas-size", cell(cfg.rtas_size)?)?;
    fdt.property_u32("rtas-version", 1)?;
    fdt.property_u32("rtas-event-scan-rate", 1)?;
    fdt.property_u32("rtas-error-log-max", 2048)?;
    fdt.property_string_list(
        "ibm,hypertas-functions",
        HYPERTAS.iter().map(|s| s.to_string()).collect(),
    )?;
    for (name, token) in RTAS_CALLS {
        fdt.property_u32(name, token)?;
    }
    fdt.end_node(node)?;
    Ok(())
}

/// A minimal flattened-device-tree reader for the tests: the value of `prop` in the node
/// at `path` ("/" separated, unit addresses included).
#[cfg(test)]
pub(super) fn find_property<'a>(blob: &'a [u8], path: &str, prop: &str) -> Option<&'a [u8]> {
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(blob.get(at..at + 4)?.try_into().ok()?))
    };
    let struct_off = be32(8)? as usize;
    let strings_off = be32(12)? as usize;
    let want: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut stack: Vec<String> = Vec::new();
    let mut at = struct_off;
    loop {
        let token = be32(at)?;
        at += 4;
        match token {
            1 => {
                let end = at + blob[at..].iter().position(|&b| b == 0)?;
                let name = std::str::from_utf8(&blob[at..end]).ok()?.to_string();
                at = (end + 1).div_ceil(4) * 4;
                stack.push(name);
            }
            2 => {
                stack.pop();
            }
            3 => {
                let len = be32(at)? as usize;
                let name_off = be32(at + 4)? as usize;
                let value = blob.get(at + 8..at + 8 + len)?;
                at = (at + 8 + len).div_ceil(4) * 4;
                let name_at = strings_off + name_off;
                let name_end = name_at + blob[name_at..].iter().position(|&b| b == 0)?;
                let name = std::str::from_utf8(&blob[name_at..name_end]).ok()?;
                let here: Vec<&str> = stack.iter().skip(1).map(String::as_str).collect();
                if name == prop && here == want {
                    return Some(value);
                }
            }
            4 => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg<'a>(cmdline: &'a str, pci: &'a [PciNode]) -> FdtConfig<'a> {
        FdtConfig {
            memory: 512 << 20,
            cpus: 2,
            cmdline,
            initrd: Some((0x800_0000, 0x900_0000)),
            rtas_base: 0xf0f_0000,
            rtas_size: 0x1_0000,
            timebase_hz: 512_000_000,
            pci,
        }
    }

    fn be32s(v: &[u8]) -> Vec<u32> {
        v.chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_tree_holds_what_a_pseries_kernel_reads() {
        let pci = [PciNode {
            device: 0,
            identity: PciIdentity::of_virtio(5),
            bar: 0x8000_0000,
            bar_size: 0x4000,
            irq: 0x1001,
        }];
        let blob = create_fdt(&cfg("console=hvc0 quiet", &pci)).unwrap();
        assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
        // The memory reservation block holds RTAS, then the terminating empty entry.
        let rsv = u32::from_be_bytes(blob[16..20].try_into().unwrap()) as usize;
        let be64 = |at: usize| u64::from_be_bytes(blob[at..at + 8].try_into().unwrap());
        assert_eq!((be64(rsv), be64(rsv + 8)), (0xf0f_0000, 0x1_0000));
        assert_eq!((be64(rsv + 16), be64(rsv + 24)), (0, 0));
        let p = |path, name| {
            find_property(&blob, path, name).unwrap_or_else(|| panic!("{path} {name}"))
        };
        assert_eq!(p("/chosen", "bootargs"), b"console=hvc0 quiet\0");
        assert_eq!(be32s(p("/chosen", "linux,initrd-start")), [0, 0x800_0000]);
        assert_eq!(be32s(p("/chosen", "linux,initrd-end")), [0, 0x900_0000]);
        let vec5 = p("/chosen", "ibm,architecture-vec-5");
        assert_eq!((vec5.len(), vec5[24], vec5[26]), (27, 0x40, 0x40));
        assert_eq!(
            p("/chosen", "linux,stdout-path"),
            b"/vdevice/vty@30000000\0"
        );
        assert_eq!(be32s(p("/memory@0", "reg")), [0, 0, 0, 512 << 20]);
        assert_eq!(
            be32s(p("/cpus/PowerPC,POWER9@1", "ibm,ppc-interrupt-server#s")),
            [1]
        );
        assert_eq!(
            be32s(p("/cpus/PowerPC,POWER9@0", "timebase-frequency")),
            [512_000_000]
        );
        assert_eq!(be32s(p("/rtas", "linux,rtas-base")), [0xf0f_0000]);
        assert_eq!(be32s(p("/rtas", "power-off")), [rtas::POWER_OFF]);
        assert_eq!(be32s(p("/rtas", "start-cpu")), [rtas::START_CPU]);
        let hypertas = p("/rtas", "ibm,hypertas-functions");
        assert!(hypertas.split(|&b| b == 0).any(|s| s == b"hcall-set-mode"));
        assert_eq!(p("/vdevice/vty@30000000", "compatible"), b"hvterm1\0");
        assert_eq!(be32s(p("/vdevice/vty@30000000", "reg")), [VTY_TERMNO_U32]);
        assert_eq!(
            be32s(p("/interrupt-controller", "ibm,interrupt-server-ranges")),
            [0, 2]
        );
        let phb = "/pci@800000020000000";
        assert_eq!(p(phb, "device_type"), b"pci\0");
        assert_eq!(be32s(p(phb, "reg")), [0x0800_0000, 0x2000_0000, 0, 0]);
        assert_eq!(
            be32s(p(phb, "ranges")),
            [
                0x0200_0000,
                0,
                0x8000_0000,
                0x2000,
                0x8000_0000,
                0,
                0x1000_0000
            ]
        );
        assert_eq!(
            be32s(p(phb, "interrupt-map")),
            [0, 0, 0, 1, XICS_PHANDLE, 0x1001, IRQ_EDGE]
        );
        assert_eq!(
            be32s(p("/rtas", "ibm,read-pci-config")),
            [rtas::IBM_READ_PCI_CONFIG]
        );
        assert_eq!(
            be32s(p(phb, "ibm,dma-window")),
            [PHB_LIOBN, 0, 0, 0, 8 << 20]
        );
        let f = "/pci@800000020000000/pci@0";
        assert_eq!(be32s(p(f, "vendor-id")), [0x1af4]);
        assert_eq!(be32s(p(f, "device-id")), [0x1045]);
        assert_eq!(be32s(p(f, "interrupts")), [1]);
        assert!(
            find_property(&blob, f, "device_type").is_none(),
            "not a bridge"
        );
        assert_eq!(
            be32s(p(f, "assigned-addresses")),
            [0x8200_0010, 0, 0x8000_0000, 0, 0x4000]
        );
        assert_eq!(be32s(p(f, "reg")).len(), 10, "config space, then BAR 0");
        // No initrd, no initrd properties.
        let mut c = cfg("", &[]);
        c.initrd = None;
        let blob = create_fdt(&c).unwrap();
        assert!(find_property(&blob, "/chosen", "linux,initrd-start").is_none());
        assert!(find_property(&blob, "/chosen", "bootargs").is_some());
    }

    #[test]
    fn a_bad_command_line_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            create_fdt(&cfg(&long, &[])),
            Err(FdtError::Cmdline(_))
        ));
        assert!(matches!(
            create_fdt(&cfg("a\0b", &[])),
            Err(FdtError::Cmdline(3))
        ));
        let just_fits = "y".repeat(CMDLINE_MAX_SIZE - 1);
        assert!(create_fdt(&cfg(&just_fits, &[])).is_ok());
    }
}
