//! Putting an sPAPR machine together: the kernel, initrd, RTAS blob and device tree in
//! guest memory, and the devices on the buses.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rangevm_devices::virtio::pci::VIRTIO_PCI_BAR_SIZE;
use rangevm_devices::{
    Balloon, BalloonConfig, Bus, GuestRequests, PciIdentity, PciTransport, Serial,
};
use rangevm_memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::elf::{self, Endian};
use super::fdt::{create_fdt, FdtConfig, PciNode};
use super::layout::{
    fdt_start, rtas_start, BALLOON_BAR, BALLOON_PCI_DEVICE, CONSOLE_PORT, CONSOLE_PORT_LEN,
    PHB_INTA_IRQ, PHB_MEM_CPU, PHB_MEM_SIZE, RTAS_SIZE,
};
use super::phb::{BalloonPci, Phb};
use super::{ArchError, KvmVm};

/// What to boot, and on how many vCPUs.
#[derive(Debug, Clone)]
pub struct SystemConfig<'a> {
    /// The kernel (an ELF vmlinux).
    pub kernel: &'a Path,
    /// The initrd.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub cpus: u8,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest-physical entry (real mode).
    pub pc: u64,
    /// The device tree (r3).
    pub fdt: u64,
    /// The kernel's lowest loaded address (r4).
    pub kernel_base: u64,
    /// The kernel is little-endian (MSR bit LE at entry).
    pub little_endian: bool,
}

/// The RTAS blob: the guest calls it (big-endian, real mode) with r3 = its
/// `rtas_args`; it makes the H_RTAS hypercall with r4 = that address and returns.
const RTAS_BLOB: [u32; 5] = [
    0x7c64_1b78, // mr   r4,r3
    0x3c60_0000, // lis  r3,0
    0x6063_f000, // ori  r3,r3,0xf000 (H_RTAS)
    0x4400_0022, // sc   1
    0x4e80_0020, // blr
];
/// Alignment of the initrd (the largest host page).
const INITRD_ALIGN: u64 = 64 << 10;
/// Timebase frequency when the host does not say (POWER8 and later use this one).
const DEFAULT_TIMEBASE_HZ: u32 = 512_000_000;
/// Largest kernel file read.
const MAX_KERNEL_BYTES: u64 = 1 << 30;

/// The host's timebase frequency from /proc/cpuinfo (`timebase : 512000000`); the guest
/// runs on the host's timebase.
fn host_timebase_hz() -> u32 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| parse_timebase(&text))
        .unwrap_or(DEFAULT_TIMEBASE_HZ)
}

fn parse_timebase(cpuinfo: &str) -> Option<u32> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "timebase")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, std::io::Error> {
    let len = std::fs::metadata(path)?.len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "{len} bytes is more than the {max} accepted"
        )));
    }
    std::fs::read(path)
}

/// The functions on the PCI host bridge: the virtio balloon, with its BAR where the
/// layout puts it and INTA on the PHB's interrupt. The device tree and the device setup
/// both read it.
fn pci_functions() -> [PciNode; 1] {
    [PciNode {
        device: BALLOON_PCI_DEVICE,
        identity: PciIdentity::of_virtio(rangevm_devices::virtio::balloon::VIRTIO_ID_BALLOON),
        bar: BALLOON_BAR,
        bar_size: VIRTIO_PCI_BAR_SIZE,
        irq: PHB_INTA_IRQ,
    }]
}

/// Loads the kernel and initrd into `ram`, writes the RTAS blob and the device tree;
/// returns where the boot vCPU starts.
pub fn configure_system(
    ram: &mut GuestRam,
    cfg: &SystemConfig<'_>,
) -> Result<EntryPoint, ArchError> {
    let memory = ram.size();
    let image = read_file(cfg.kernel, MAX_KERNEL_BYTES).map_err(|source| {
        ArchError::Elf(elf::ElfError::Read {
            path: cfg.kernel.display().to_string(),
            source,
        })
    })?;
    let kernel = elf::load(ram, &image)?;
    let fdt_at = fdt_start(memory);
    if kernel.high > fdt_at {
        return Err(ArchError::Elf(elf::ElfError::DoesNotFit {
            start: kernel.low,
            size: kernel.high - kernel.low,
            ram: fdt_at,
        }));
    }
    let initrd = match cfg.initrd {
        None => None,
        Some(path) => {
            let why = |why: String| ArchError::Initrd {
                path: path.display().to_string(),
                why,
            };
            let data = read_file(path, memory).map_err(|e| why(e.to_string()))?;
            let size = data.len() as u64;
            // Highest aligned place below the device tree, above the kernel.
            let start = fdt_at
                .checked_sub(size)
                .map(|s| s & !(INITRD_ALIGN - 1))
                .filter(|&s| s >= kernel.high.next_multiple_of(INITRD_ALIGN))
                .ok_or_else(|| {
                    why(format!(
                        "{size} bytes do not fit between the kernel's end ({:#x}) and the device tree ({fdt_at:#x}) in the first {} MiB",
                        kernel.high,
                        super::layout::RMA_SIZE >> 20
                    ))
                })?;
            ram.write(start, &data)?;
            Some((start, start + size))
        }
    };
    let rtas = rtas_start(memory);
    let blob: Vec<u8> = RTAS_BLOB.iter().flat_map(|w| w.to_be_bytes()).collect();
    ram.write(rtas, &blob)?;
    let fdt = create_fdt(&FdtConfig {
        memory,
        cpus: cfg.cpus,
        cmdline: cfg.cmdline,
        initrd,
        rtas_base: rtas,
        rtas_size: RTAS_SIZE,
        timebase_hz: host_timebase_hz(),
        pci: &pci_functions(),
    })?;
    ram.write(fdt_at, &fdt)?;
    Ok(EntryPoint {
        pc: kernel.entry,
        fdt: fdt_at,
        kernel_base: kernel.low,
        little_endian: kernel.endian == Endian::Little,
    })
}

/// The machine's devices, on the port and MMIO buses.
#[derive(Debug)]
pub struct LegacyDevices {
    /// The port bus: only the console's registers, reached by the console hypercalls.
    pub pio: Bus,
    /// The MMIO bus: the PCI host bridge's memory window.
    pub mmio: Bus,
    /// The console (the event loop feeds it input).
    pub serial: Arc<Mutex<Serial>>,
    /// The virtio balloon.
    pub balloon: BalloonPci,
}

/// Creates the console (polled by the guest's hvc driver: its interrupt eventfd is not
/// wired), and the virtio balloon as a PCI function behind the sPAPR host bridge: its
/// BAR assigned as firmware would, the bridge's window on the MMIO bus, its RTAS
/// configuration calls connected, INTA through an irqfd on the XICS. (On an incoming
/// migration the restored state then replaces the BAR and command register.)
pub fn create_legacy_devices(
    vm: &KvmVm,
    _requests: &Arc<GuestRequests>,
    serial_out: Box<dyn Write + Send>,
) -> Result<LegacyDevices, ArchError> {
    let interrupt = EventFd::new(EFD_NONBLOCK).map_err(ArchError::EventFd)?;
    let serial = Arc::new(Mutex::new(Serial::new(interrupt, serial_out)?));
    let mut pio = Bus::new();
    pio.insert(
        serial.clone(),
        u64::from(CONSOLE_PORT),
        u64::from(CONSOLE_PORT_LEN),
    )?;
    let mut mmio = Bus::new();
    let [function] = pci_functions();
    let mut transport =
        PciTransport::new(Balloon::new(BalloonConfig::default()), Arc::clone(vm.ram()))?;
    transport.assign_bar(function.bar);
    vm.register_irqfd(transport.interrupt().eventfd(), function.irq)?;
    let balloon = Arc::new(Mutex::new(transport));
    let phb = Arc::new(Mutex::new(Phb::new(Arc::clone(&balloon))));
    mmio.insert(phb, PHB_MEM_CPU, PHB_MEM_SIZE)?;
    // Two handles on the same transport: the bus's (memory accesses) and RTAS's
    // (configuration cycles).
    vm.spapr()
        .attach_pci(Arc::new(Phb::new(Arc::clone(&balloon))));
    Ok(LegacyDevices {
        pio,
        mmio,
        serial,
        balloon,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangevm_memory::LockMode;

    #[test]
    fn the_timebase_comes_from_cpuinfo() {
        let text = "processor\t: 0\ncpu\t\t: POWER9 (architected)\n\ntimebase\t: 512000000\nplatform\t: pSeries\n";
        assert_eq!(parse_timebase(text), Some(512_000_000));
        assert_eq!(parse_timebase("processor : 0\n"), None);
        assert_eq!(parse_timebase("timebase : many\n"), None);
    }

    #[test]
    fn the_rtas_blob_is_big_endian_code_that_makes_h_rtas() {
        let bytes: Vec<u8> = RTAS_BLOB.iter().flat_map(|w| w.to_be_bytes()).collect();
        // `sc 1` and the H_RTAS number in the ori's immediate field.
        assert_eq!(&bytes[12..16], &[0x44, 0, 0, 0x22]);
        assert_eq!(
            u64::from(RTAS_BLOB[2] & 0xffff),
            super::super::layout::hcall::H_RTAS
        );
    }

    /// A minimal little-endian ELF64 PowerPC image: one PT_LOAD of `code` at `addr`.
    fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&21u16.to_le_bytes());
        f[24..32].copy_from_slice(&addr.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        f[64..68].copy_from_slice(&1u32.to_le_bytes());
        f[72..80].copy_from_slice(&0x78u64.to_le_bytes());
        f[80..88].copy_from_slice(&addr.to_le_bytes());
        f[88..96].copy_from_slice(&addr.to_le_bytes());
        f[96..104].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[104..112].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn a_kernel_and_initrd_land_where_the_device_tree_says() {
        let dir = std::env::temp_dir().join(format!("rangevm-ppc-setup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("kernel");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, tiny_elf(0x1_0000, b"\x00\x00\x00\x48")).unwrap();
        std::fs::write(&initrd, vec![0x5a; 100_000]).unwrap();
        let memory = 64 << 20;
        let mut ram = GuestRam::new(LockMode::Range, &[(0, memory)]).unwrap();
        let entry = configure_system(
            &mut ram,
            &SystemConfig {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "console=hvc0",
                cpus: 2,
            },
        )
        .unwrap();
        assert_eq!(entry.pc, 0x1_0000);
        assert_eq!(entry.fdt, fdt_start(memory));
        assert!(entry.little_endian);
        let mut fdt = vec![0u8; 0x1_0000];
        ram.read(entry.fdt, &mut fdt).unwrap();
        let prop = |name| {
            super::super::fdt::find_property(&fdt, "/chosen", name)
                .unwrap()
                .to_vec()
        };
        let be64 = |v: Vec<u8>| u64::from_be_bytes(v.try_into().unwrap());
        let (start, end) = (
            be64(prop("linux,initrd-start")),
            be64(prop("linux,initrd-end")),
        );
        assert_eq!(end - start, 100_000);
        assert_eq!(start % INITRD_ALIGN, 0);
        assert!(end <= entry.fdt);
        let mut got = vec![0u8; 100_000];
        ram.read(start, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
        let mut blob = [0u8; 20];
        ram.read(rtas_start(memory), &mut blob).unwrap();
        assert_eq!(&blob[12..16], &[0x44, 0, 0, 0x22]);

        // An initrd that cannot fit is an error naming the file.
        std::fs::write(&initrd, vec![0u8; 80 << 20]).unwrap();
        let err = configure_system(
            &mut ram,
            &SystemConfig {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "",
                cpus: 1,
            },
        )
        .unwrap_err();
        assert!(matches!(err, ArchError::Initrd { .. }), "{err}");
        // A kernel that is not an ELF is an error too.
        std::fs::write(&kernel, b"MZ not an elf").unwrap();
        let err = configure_system(
            &mut ram,
            &SystemConfig {
                kernel: &kernel,
                initrd: None,
                cmdline: "",
                cpus: 1,
            },
        )
        .unwrap_err();
        assert!(matches!(err, ArchError::Elf(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
