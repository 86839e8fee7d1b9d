//! Loading a kernel, its initrd and command line into guest memory, and the boot
//! structures that describe the machine to it: Linux's `boot_params` with its e820 map
//! (bzImage, or an ELF vmlinux entered at its 64-bit entry) or PVH's `hvm_start_info`
//! with its memory map (an ELF with a PVH note).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use rangevm_memory::{GuestRam, GuestRamError};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_END, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, HIMEM_START,
    LOW_RAM_END, MMIO_32_START, PVH_INFO_START, ZERO_PAGE_START,
};

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// `boot_params.hdr.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `boot_params.hdr.header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: an undefined boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// `loadflags` bit: the protected-mode code is loaded at 1 MiB.
const LOADED_HIGH: u8 = 0x1;
/// The magic number of `hvm_start_info`.
const PVH_MAGIC: u32 = 0x336e_c578;
/// Highest initrd address when the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors of loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("Cannot read {what} {path}")]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is empty.
    #[error("Kernel {0} is an empty file")]
    EmptyKernel(PathBuf),
    /// The kernel is neither an ELF file nor a bzImage.
    #[error("Kernel {0} is neither an ELF kernel nor a bzImage")]
    UnknownFormat(PathBuf),
    /// The kernel has the right magic number but could not be loaded.
    #[error(
        "Cannot load kernel {path} ({format}); is it complete and does it fit in guest memory?"
    )]
    Load {
        /// Its path.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// The cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel is larger than the guest memory it would be loaded into.
    #[error(
        "Kernel {path} ({size} bytes) does not fit in guest memory above 1 MiB ({room} bytes)"
    )]
    KernelTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room for it.
        room: u64,
    },
    /// The kernel needs more memory than the guest has to decompress itself.
    #[error("Kernel {path} needs the first {needed_mib} MiB of guest memory to decompress itself; give the guest more memory (--memory)")]
    KernelMemory {
        /// Its path.
        path: PathBuf,
        /// Guest memory it needs below 3 GiB, in MiB.
        needed_mib: u64,
    },
    /// The command line is too long or has characters Linux cannot take.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is longer than the kernel accepts.
    #[error("The kernel command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The initrd does not fit in guest memory between the kernel and its limit.
    #[error("Initrd {path} ({size} bytes) does not fit in guest memory: {room} bytes are free between the kernel and the initrd limit")]
    InitrdTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room for it.
        room: u64,
    },
    /// Guest memory could not be written.
    #[error("Cannot write the boot structures into guest memory")]
    Memory(#[from] GuestRamError),
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit long mode at `entry`, RSI = the `boot_params` address.
    Linux64 {
        /// Guest-physical entry address.
        entry: u64,
    },
    /// 32-bit protected mode, paging off, at `entry`, EBX = the `hvm_start_info` address.
    Pvh {
        /// Guest-physical entry address.
        entry: u64,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootConfig<'a> {
    /// The kernel: bzImage or ELF.
    pub kernel: &'a Path,
    /// An initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The guest-physical address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Loads the kernel, initrd and command line into `ram` and writes the boot structures
/// the kernel's entry protocol wants. Returns where the vCPU starts.
pub fn load_kernel(ram: &mut GuestRam, cfg: &BootConfig<'_>) -> Result<EntryPoint, BootError> {
    let open = |what, path: &Path| {
        File::open(path).map_err(|source| BootError::File {
            what,
            path: path.to_path_buf(),
            source,
        })
    };
    let mut kernel = open("kernel", cfg.kernel)?;
    let kernel_err = |source| BootError::File {
        what: "kernel",
        path: cfg.kernel.to_path_buf(),
        source,
    };
    let size = kernel.metadata().map_err(kernel_err)?.len();
    if size == 0 {
        return Err(BootError::EmptyKernel(cfg.kernel.to_path_buf()));
    }
    let low_end = low_ram_end(ram);
    let room = low_end.saturating_sub(HIMEM_START);
    if size > room {
        return Err(BootError::KernelTooLarge {
            path: cfg.kernel.to_path_buf(),
            size,
            room,
        });
    }
    let mut magic = [0u8; 4];
    let got = kernel.read(&mut magic).map_err(kernel_err)?;
    kernel.seek(SeekFrom::Start(0)).map_err(kernel_err)?;
    let elf = got == 4 && magic == *b"\x7fELF";
    let format = if elf { "ELF" } else { "bzImage" };
    if !elf && !is_bzimage(&mut kernel).map_err(kernel_err)? {
        return Err(BootError::UnknownFormat(cfg.kernel.to_path_buf()));
    }
    let loaded = ram.load_with(
        |mem| -> Result<KernelLoaderResult, linux_loader::loader::Error> {
            if elf {
                Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            } else {
                BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            }
        },
    )?;
    let loaded = loaded.map_err(|source| BootError::Load {
        path: cfg.kernel.to_path_buf(),
        format,
        source,
    })?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(cfg.cmdline)
        .map_err(BootError::Cmdline)?;
    let cmdline = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let cmdline = cmdline.as_bytes_with_nul();
    if let Some(hdr) = loaded.setup_header {
        let max = usize::try_from(hdr.cmdline_size).unwrap_or(usize::MAX);
        // cmdline_size excludes the terminating NUL; 0 means 255 (boot protocol < 2.06).
        let max = if max == 0 { 255 } else { max };
        if cmdline.len() - 1 > max {
            return Err(BootError::CmdlineTooLong {
                len: cmdline.len() - 1,
                max,
            });
        }
    }
    ram.write(CMDLINE_START, cmdline)?;

    // linux-loader's kernel_end is an absolute guest-physical address. A bzImage
    // decompresses into [max(load address, pref_address), + init_size) (boot protocol
    // 2.10+): that area must be RAM, and the initrd must stay above it.
    let mut kernel_end = loaded.kernel_end;
    if let Some(hdr) = loaded.setup_header.filter(|h| h.version >= 0x020a) {
        let start = loaded.kernel_load.0.max(hdr.pref_address);
        let needed = start.saturating_add(u64::from(hdr.init_size));
        if needed > low_end {
            return Err(BootError::KernelMemory {
                path: cfg.kernel.to_path_buf(),
                needed_mib: needed.div_ceil(1 << 20),
            });
        }
        kernel_end = kernel_end.max(needed);
    }
    let initrd_limit = match loaded.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max) + 1,
        _ => DEFAULT_INITRD_ADDR_MAX + 1,
    };
    let initrd = match cfg.initrd {
        Some(path) => Some(load_initrd(
            ram,
            path,
            kernel_end,
            low_end.min(initrd_limit),
        )?),
        None => None,
    };

    let e820 = e820_map(ram);
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_info(ram, &e820, initrd, cfg.rsdp)?;
            Ok(EntryPoint::Pvh { entry: entry.0 })
        }
        _ => {
            let entry = match loaded.setup_header {
                // The 64-bit entry is 0x200 past the protected-mode code's start.
                Some(_) => loaded.kernel_load.0 + 0x200,
                // For an ELF, linux-loader reports e_entry as the load address.
                None => loaded.kernel_load.0,
            };
            write_boot_params(ram, &loaded, &e820, initrd, cmdline.len() - 1, cfg.rsdp)?;
            Ok(EntryPoint::Linux64 { entry })
        }
    }
}

/// End of the RAM below the 32-bit MMIO hole.
fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.regions()
        .first()
        .map_or(0, |r| r.end().min(MMIO_32_START))
}

/// Whether `file` has the bzImage header magic ("HdrS" at 0x202).
fn is_bzimage(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0x202))?;
    let ok = file.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == HDRS_MAGIC;
    file.seek(SeekFrom::Start(0))?;
    Ok(ok)
}

/// Puts the initrd at the highest host-page-aligned address below `limit` and above
/// `kernel_end`; returns `(address, size)`.
fn load_initrd(
    ram: &mut GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let err = |source| BootError::File {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let page = ram.page_size();
    let kernel_end = kernel_end.div_ceil(page) * page;
    let room = limit.saturating_sub(kernel_end);
    if size > room {
        return Err(BootError::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            room,
        });
    }
    let addr = (limit - size) / page * page;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        room,
    })?;
    ram.load_with(|mem| mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len))?
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// The e820 map: low RAM, the EBDA and BIOS area (MP table, ACPI tables) reserved, RAM
/// from 1 MiB to the MMIO hole, and RAM above 4 GiB.
fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, LOW_RAM_END, E820_RAM),
        (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
    ];
    for r in ram.regions() {
        let start = r.start.max(HIMEM_START);
        if r.end() > start {
            map.push((start, r.end() - start, E820_RAM));
        }
    }
    debug_assert!(map.iter().all(|e| e.0 < HIGH_RAM_START || e.2 == E820_RAM));
    map
}

fn write_boot_params(
    ram: &GuestRam,
    loaded: &KernelLoaderResult,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux has no setup header: fill what the kernel checks.
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = u32_of(CMDLINE_START);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(u32::MAX);
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = u32_of(addr);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(u32::MAX);
    }
    params.acpi_rsdp_addr = rsdp;
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = u8::try_from(e820.len().min(params.e820_table.len())).unwrap_or(0);
    ram.write_obj(ZERO_PAGE_START, params)?;
    Ok(())
}

fn write_pvh_info(
    ram: &GuestRam,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let start_info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist = PVH_INFO_START + start_info_size;
    let memmap = modlist + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap,
        memmap_entries: u32::try_from(e820.len()).unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist;
        ram.write_obj(
            modlist,
            hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            },
        )?;
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    for (i, &(addr, size, type_)) in (0u64..).zip(e820) {
        ram.write_obj(
            memmap + i * entry_size,
            hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            },
        )?;
    }
    ram.write_obj(PVH_INFO_START, info)?;
    Ok(())
}

/// A low guest-physical address as the u32 the boot structures store (all of
/// layout.rs's fixed addresses are below 4 GiB).
fn u32_of(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangevm_memory::LockMode;
    use std::io::Write;

    fn ram(size: u64) -> GuestRam {
        GuestRam::new(LockMode::Range, &super::super::layout::ram_regions(size)).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rangevm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        path
    }

    /// A minimal bzImage: a setup header with HdrS, protocol 2.15, loaded high, and
    /// `payload` as the protected-mode part.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_boot_params_describe_memory_cmdline_and_initrd() {
        let mut ram = ram(64 << 20);
        let kernel = temp_file("bz", &bzimage(&[0x90; 4096]));
        let initrd = temp_file("initrd", &[0xab; 10_000]);
        let entry = load_kernel(
            &mut ram,
            &BootConfig {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "console=ttyS0 panic=1",
                rsdp: 0xe0000,
            },
        )
        .unwrap();
        assert_eq!(entry, EntryPoint::Linux64 { entry: 0x10_0200 });
        let params: boot_params = ram.read_obj(ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_UNDEFINED);
        assert_eq!(u64::from(hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let mut cmd = [0u8; 22];
        ram.read(CMDLINE_START, &mut cmd).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=1\0");
        // The initrd sits page-aligned at the top of RAM.
        let (addr, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, 10_000);
        assert_eq!(addr % ram.page_size(), 0);
        assert!(addr + size <= 64 << 20 && addr + size + ram.page_size() > 64 << 20);
        assert_eq!(ram.read_obj::<u8>(addr + 9_999).unwrap(), 0xab);
        // The kernel's protected-mode part is at 1 MiB.
        assert_eq!(ram.read_obj::<u8>(HIMEM_START).unwrap(), 0x90);
        let e820: Vec<_> = params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            e820,
            vec![
                (0, LOW_RAM_END, E820_RAM),
                (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn a_kernel_that_cannot_decompress_in_guest_memory_is_refused() {
        // Protocol 2.15: pref_address 16 MiB, init_size 40 MiB -> needs the first 56 MiB.
        let mut img = bzimage(&[0x90; 4096]);
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&(40u32 << 20).to_le_bytes());
        let kernel = temp_file("bz-init-size", &img);
        let cfg = BootConfig {
            kernel: &kernel,
            initrd: None,
            cmdline: "",
            rsdp: 0,
        };
        let err = load_kernel(&mut ram(48 << 20), &cfg).unwrap_err();
        assert!(
            matches!(err, BootError::KernelMemory { needed_mib: 56, .. }),
            "{err}"
        );
        assert!(load_kernel(&mut ram(64 << 20), &cfg).is_ok());
        // With 64 MiB, 8 MiB are left above the decompression area: 9 do not fit.
        let initrd = temp_file("initrd-9m", &vec![1u8; 9 << 20]);
        let err = load_kernel(
            &mut ram(64 << 20),
            &BootConfig {
                initrd: Some(&initrd),
                ..cfg
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn e820_has_ram_above_4g_for_large_guests() {
        let ram = ram(MMIO_32_START + (1 << 30));
        let map = e820_map(&ram);
        assert_eq!(map.last(), Some(&(HIGH_RAM_START, 1 << 30, E820_RAM)));
        assert_eq!(map[2], (HIMEM_START, MMIO_32_START - HIMEM_START, E820_RAM));
    }

    #[test]
    fn bad_kernels_and_initrds_get_clear_errors() {
        let mut ram = ram(16 << 20);
        fn cfg(kernel: &Path) -> BootConfig<'_> {
            BootConfig {
                kernel,
                initrd: None,
                cmdline: "",
                rsdp: 0,
            }
        }
        let missing = Path::new("/nonexistent/vmlinuz");
        assert!(matches!(
            load_kernel(&mut ram, &cfg(missing)),
            Err(BootError::File { what: "kernel", .. })
        ));
        let empty = temp_file("empty", b"");
        assert!(matches!(
            load_kernel(&mut ram, &cfg(&empty)),
            Err(BootError::EmptyKernel(_))
        ));
        let garbage = temp_file("garbage", &[0x5a; 8192]);
        assert!(matches!(
            load_kernel(&mut ram, &cfg(&garbage)),
            Err(BootError::UnknownFormat(_))
        ));
        let big = temp_file("big", &vec![0u8; 16 << 20]);
        assert!(matches!(
            load_kernel(&mut ram, &cfg(&big)),
            Err(BootError::KernelTooLarge { .. })
        ));
        // A truncated ELF: the magic and nothing else.
        let elf = temp_file("elf", b"\x7fELF\x02\x01\x01");
        assert!(matches!(
            load_kernel(&mut ram, &cfg(&elf)),
            Err(BootError::Load { format: "ELF", .. })
        ));
        let kernel = temp_file("bz2", &bzimage(&[0x90; 4096]));
        let initrd = temp_file("huge-initrd", &vec![0u8; 16 << 20]);
        let err = load_kernel(
            &mut ram,
            &BootConfig {
                initrd: Some(&initrd),
                ..cfg(&kernel)
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        let long = "x".repeat(3000);
        let err = load_kernel(
            &mut ram,
            &BootConfig {
                cmdline: &long,
                ..cfg(&kernel)
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, BootError::CmdlineTooLong { max: 2048, .. }),
            "{err}"
        );
    }
}
