//! Loading an ELF64 PowerPC kernel (a `vmlinux`, or a tiny test guest) into guest RAM.
//!
//! linux-loader's ELF loader is x86-only, and a PowerPC loader needs little: read the
//! ELF header and program headers, copy each `PT_LOAD` segment to its physical address
//! (`p_paddr`; a vmlinux links at 0xc000_0000_0000_0000 virtual and 0 physical), zero
//! its `.bss` tail, and turn the virtual entry point into a physical one through the
//! segment that holds it. Every offset and size from the file is checked before use.

use rangevm_memory::GuestRam;

/// Errors of loading an ELF kernel.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("Cannot read the kernel {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF64 PowerPC executable, or is malformed.
    #[error("The kernel is not a loadable ELF64 PowerPC image: {0}")]
    Format(String),
    /// A segment does not fit in guest RAM.
    #[error("Kernel segment [{start:#x}, +{size:#x}) does not fit in guest RAM of {ram:#x} bytes")]
    DoesNotFit {
        /// Physical start.
        start: u64,
        /// Bytes in memory.
        size: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// A segment could not be written.
    #[error("Cannot write a kernel segment into guest RAM")]
    Write(#[from] rangevm_memory::GuestRamError),
}

const EM_PPC64: u16 = 21;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_LOAD: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// Most program headers accepted (a vmlinux has a handful).
const MAX_PHDRS: usize = 64;

/// Byte order of the image (and so of the guest at entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    /// Little-endian (ppc64le).
    Little,
    /// Big-endian (ppc64).
    Big,
}

/// What a loaded kernel tells the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Guest-physical entry point.
    pub entry: u64,
    /// Lowest guest-physical byte loaded.
    pub low: u64,
    /// One past the highest guest-physical byte loaded (bss included).
    pub high: u64,
    /// Byte order.
    pub endian: Endian,
}

/// A program header's loadable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn format(why: impl Into<String>) -> ElfError {
    ElfError::Format(why.into())
}

struct Reader<'a> {
    data: &'a [u8],
    endian: Endian,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> Result<[u8; N], ElfError> {
        self.data
            .get(
                off..off
                    .checked_add(N)
                    .ok_or_else(|| format("offset overflow"))?,
            )
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format(format!("truncated at byte {off}")))
    }
    fn u16(&self, off: usize) -> Result<u16, ElfError> {
        let b = self.bytes::<2>(off)?;
        Ok(match self.endian {
            Endian::Little => u16::from_le_bytes(b),
            Endian::Big => u16::from_be_bytes(b),
        })
    }
    fn u32(&self, off: usize) -> Result<u32, ElfError> {
        let b = self.bytes::<4>(off)?;
        Ok(match self.endian {
            Endian::Little => u32::from_le_bytes(b),
            Endian::Big => u32::from_be_bytes(b),
        })
    }
    fn u64(&self, off: usize) -> Result<u64, ElfError> {
        let b = self.bytes::<8>(off)?;
        Ok(match self.endian {
            Endian::Little => u64::from_le_bytes(b),
            Endian::Big => u64::from_be_bytes(b),
        })
    }
}

/// The parsed headers: entry (virtual), loadable segments, byte order.
fn parse(data: &[u8]) -> Result<(u64, Vec<Segment>, Endian), ElfError> {
    if data.len() < EHDR_SIZE || &data[..4] != b"\x7fELF" {
        return Err(format("no ELF magic"));
    }
    if data[4] != 2 {
        return Err(format("not ELF64"));
    }
    let endian = match data[5] {
        1 => Endian::Little,
        2 => Endian::Big,
        other => return Err(format(format!("unknown byte order {other}"))),
    };
    let r = Reader { data, endian };
    let machine = r.u16(18)?;
    if machine != EM_PPC64 {
        return Err(format(format!(
            "machine {machine}, not PowerPC64 ({EM_PPC64})"
        )));
    }
    let kind = r.u16(16)?;
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(format(format!("type {kind} is not an executable")));
    }
    let entry = r.u64(24)?;
    let phoff = usize::try_from(r.u64(32)?).map_err(|_| format("program headers out of range"))?;
    let phentsize = usize::from(r.u16(54)?);
    let phnum = usize::from(r.u16(56)?);
    if phentsize != PHDR_SIZE {
        return Err(format(format!("program header size {phentsize}")));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(format(format!("{phnum} program headers")));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * PHDR_SIZE)
            .ok_or_else(|| format("program headers out of range"))?;
        if r.u32(at)? != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: r.u64(at + 8)?,
            vaddr: r.u64(at + 16)?,
            paddr: r.u64(at + 24)?,
            filesz: r.u64(at + 32)?,
            memsz: r.u64(at + 40)?,
        };
        if seg.filesz > seg.memsz {
            return Err(format(format!("segment {i}: file size above memory size")));
        }
        let end = seg.offset.checked_add(seg.filesz);
        if end.is_none_or(|e| e > data.len() as u64) {
            return Err(format(format!("segment {i} runs past the end of the file")));
        }
        if seg.paddr.checked_add(seg.memsz).is_none() || seg.vaddr.checked_add(seg.memsz).is_none()
        {
            return Err(format(format!("segment {i} wraps around")));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(format("no loadable segment"));
    }
    Ok((entry, segments, endian))
}

/// The physical entry point: `entry` translated through the segment whose virtual
/// range holds it, or taken as physical if one's physical range does.
fn physical_entry(entry: u64, segments: &[Segment]) -> Result<u64, ElfError> {
    if let Some(s) = segments
        .iter()
        .find(|s| (s.vaddr..s.vaddr + s.memsz.max(1)).contains(&entry))
    {
        return Ok(s.paddr + (entry - s.vaddr));
    }
    if segments
        .iter()
        .any(|s| (s.paddr..s.paddr + s.memsz.max(1)).contains(&entry))
    {
        return Ok(entry);
    }
    Err(format(format!(
        "entry point {entry:#x} is outside every segment"
    )))
}

/// Loads the ELF image `data` into `ram` (guest-physical, RAM from 0 to `ram.size()`).
pub fn load(ram: &GuestRam, data: &[u8]) -> Result<LoadedKernel, ElfError> {
    let (entry, segments, endian) = parse(data)?;
    let size = ram.size();
    let mut low = u64::MAX;
    let mut high = 0;
    for s in &segments {
        let end = s.paddr + s.memsz;
        if end > size {
            return Err(ElfError::DoesNotFit {
                start: s.paddr,
                size: s.memsz,
                ram: size,
            });
        }
        // Checked in `parse`: offset + filesz is inside `data`.
        let range = usize::try_from(s.offset)
            .ok()
            .zip(usize::try_from(s.offset + s.filesz).ok())
            .ok_or_else(|| format("segment out of range"))?;
        let file = &data[range.0..range.1];
        ram.write(s.paddr, file)?;
        let mut zero_at = s.paddr + s.filesz;
        let zeros = [0u8; 4096];
        while zero_at < end {
            let n = usize::try_from(end - zero_at).map_or(zeros.len(), |n| n.min(zeros.len()));
            ram.write(zero_at, &zeros[..n])?;
            zero_at += n as u64;
        }
        low = low.min(s.paddr);
        high = high.max(end);
    }
    Ok(LoadedKernel {
        entry: physical_entry(entry, &segments)?,
        low,
        high,
        endian,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rangevm_memory::LockMode;

    /// An ELF64 with one PT_LOAD of `code` at virtual `vaddr`, physical `paddr`, plus
    /// `bss` zero bytes, entered at `entry`.
    fn image(little: bool, vaddr: u64, paddr: u64, entry: u64, code: &[u8], bss: u64) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        let w16 = |f: &mut Vec<u8>, at: usize, v: u16| {
            let b = if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            f[at..at + 2].copy_from_slice(&b);
        };
        let w32 = |f: &mut Vec<u8>, at: usize, v: u32| {
            let b = if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            f[at..at + 4].copy_from_slice(&b);
        };
        let w64 = |f: &mut Vec<u8>, at: usize, v: u64| {
            let b = if little {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            f[at..at + 8].copy_from_slice(&b);
        };
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = if little { 1 } else { 2 };
        f[6] = 1;
        w16(&mut f, 16, ET_EXEC);
        w16(&mut f, 18, EM_PPC64);
        w64(&mut f, 24, entry);
        w64(&mut f, 32, 64);
        w16(&mut f, 54, 56);
        w16(&mut f, 56, 1);
        w32(&mut f, 64, PT_LOAD);
        w64(&mut f, 64 + 8, 0x100);
        w64(&mut f, 64 + 16, vaddr);
        w64(&mut f, 64 + 24, paddr);
        w64(&mut f, 64 + 32, code.len() as u64);
        w64(&mut f, 64 + 40, code.len() as u64 + bss);
        f.extend_from_slice(code);
        f
    }

    fn ram() -> GuestRam {
        GuestRam::new(LockMode::Range, &[(0, 4 << 20)]).unwrap()
    }

    #[test]
    fn a_vmlinux_style_image_loads_at_its_physical_address() {
        let ram = ram();
        ram.write(0x2_0000 + 4, &[0xaa; 8]).unwrap();
        let elf = image(
            true,
            0xc000_0000_0001_0000,
            0x1_0000,
            0xc000_0000_0001_0010,
            b"abcd",
            0x1_0000 + 8,
        );
        let k = load(&ram, &elf).unwrap();
        assert_eq!(k.entry, 0x1_0010);
        assert_eq!((k.low, k.high), (0x1_0000, 0x1_0000 + 4 + 0x1_0008));
        assert_eq!(k.endian, Endian::Little);
        let mut got = [0u8; 4];
        ram.read(0x1_0000, &mut got).unwrap();
        assert_eq!(&got, b"abcd");
        // The bss is zeroed, over what was there before.
        let mut bss = [0xffu8; 8];
        ram.read(0x2_0000 + 4, &mut bss).unwrap();
        assert_eq!(bss, [0; 8]);
    }

    #[test]
    fn a_big_endian_image_with_a_physical_entry_loads() {
        let ram = ram();
        let elf = image(false, 0x4000, 0x4000, 0x4004, &[1, 2, 3, 4, 5, 6, 7, 8], 0);
        let k = load(&ram, &elf).unwrap();
        assert_eq!((k.entry, k.endian), (0x4004, Endian::Big));
    }

    #[test]
    fn malformed_images_are_errors_not_panics() {
        let ram = ram();
        let good = image(true, 0x1000, 0x1000, 0x1000, b"code", 0);
        assert!(load(&ram, &good).is_ok());
        // Every truncation of a good image fails cleanly.
        for n in 0..good.len() {
            assert!(load(&ram, &good[..n]).is_err(), "truncated to {n}");
        }
        let mut x86 = good.clone();
        x86[18] = 62;
        assert!(matches!(load(&ram, &x86), Err(ElfError::Format(m)) if m.contains("machine 62")));
        let too_big = image(true, 0x3f_f000, 0x3f_f000, 0x3f_f000, b"code", 0x2000);
        assert!(matches!(
            load(&ram, &too_big),
            Err(ElfError::DoesNotFit { .. })
        ));
        let wraps = image(true, u64::MAX - 1, u64::MAX - 1, u64::MAX - 1, b"code", 0);
        assert!(load(&ram, &wraps).is_err());
        let outside = image(true, 0x1000, 0x1000, 0x9000, b"code", 0);
        assert!(matches!(load(&ram, &outside), Err(ElfError::Format(m)) if m.contains("entry")));
        // Arbitrary bytes after the magic never panic.
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            let mut f = good.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = usize::from(state.to_le_bytes()[0]);
                f[at] = state.to_le_bytes()[4];
            }
            let _ = load(&ram, &f);
        }
    }
}
