//! A [`PageSource`] that reads guest pages from a file: a raw guest memory image, such
//! as the memory file of a snapshot.
//!
//! Where a guest page lives in the file is the [`ImageLayout`]'s choice:
//! - [`ImageLayout::Flat`]: at file offset = guest-physical address. Holes between
//!   regions are holes in the file too (sparse on any file system that has them); the
//!   simplest image to write with `dd` or `pwrite`.
//! - [`ImageLayout::Packed`]: the regions back to back in address order, with no gaps
//!   (a region's bytes start at the sum of the sizes of the regions below it), the way
//!   snapshot tools dump guest memory region by region.
//!
//! Pages are read with `pread` (`FileExt::read_at`), so one open file serves every
//! handler thread at once with no shared file position. A file shorter than the
//! memory it describes is zero-filled past its end: a page wholly past EOF, or one that
//! reads as all zeros, is reported as [`PageContent::Zero`], so the fault engine maps
//! the zero page instead of copying 4 KiB (or 64 KiB) of zeros. I/O errors come back as
//! `std::io::Error`, never as a panic.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::guest_ram::faults::{PageContent, PageSource};
use crate::guest_ram::RegionInfo;

/// Errors of opening a memory image.
#[derive(Debug, thiserror::Error)]
pub enum ImageSourceError {
    /// The image file could not be opened.
    #[error("Cannot open memory image {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The regions of a packed layout are empty, unsorted, overlapping, or wrap.
    #[error("Region [{start:#x}, +{size:#x}) of a packed memory image is empty, out of order, overlaps the one before, or wraps")]
    Layout {
        /// Start of the offending region.
        start: u64,
        /// Its size.
        size: u64,
    },
}

/// Where guest pages are in the image file (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLayout {
    /// File offset = guest-physical address.
    Flat,
    /// The regions, in address order, stored back to back from offset 0.
    Packed(Vec<RegionInfo>),
}

/// A page source reading a guest memory image (see the module documentation).
#[derive(Debug)]
pub struct ImageSource {
    file: File,
    /// For `Packed`: each region with the file offset of its first byte.
    packed: Option<Vec<(RegionInfo, u64)>>,
}

impl ImageSource {
    /// Opens the image at `path` read-only.
    pub fn open(path: &Path, layout: ImageLayout) -> Result<Self, ImageSourceError> {
        let file = File::open(path).map_err(|source| ImageSourceError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::new(file, layout)
    }

    /// An image read from `file` (which must be open for reading; reads of a file that
    /// is not are I/O errors of [`PageSource::read_page`]).
    pub fn new(file: File, layout: ImageLayout) -> Result<Self, ImageSourceError> {
        let packed = match layout {
            ImageLayout::Flat => None,
            ImageLayout::Packed(regions) => Some(pack(&regions)?),
        };
        Ok(ImageSource { file, packed })
    }

    /// The file offset of the `len` bytes at guest-physical `gpa`.
    fn offset_of(&self, gpa: u64, len: u64) -> io::Result<u64> {
        let end = gpa
            .checked_add(len)
            .ok_or_else(|| invalid(format!("Guest range at {gpa:#x} wraps")))?;
        let Some(packed) = &self.packed else {
            return Ok(gpa);
        };
        let i = packed.partition_point(|(r, _)| r.start <= gpa);
        let (region, base) = i
            .checked_sub(1)
            .map(|i| &packed[i])
            .filter(|(r, _)| end <= r.end())
            .ok_or_else(|| {
                invalid(format!(
                    "Guest range [{gpa:#x}, {end:#x}) is not inside one region of the memory image"
                ))
            })?;
        Ok(base + (gpa - region.start))
    }
}

/// The regions of a packed layout with their file offsets; checks they are non-empty,
/// sorted, disjoint, and that neither their ends nor the file size wrap.
fn pack(regions: &[RegionInfo]) -> Result<Vec<(RegionInfo, u64)>, ImageSourceError> {
    let mut packed = Vec::with_capacity(regions.len());
    let (mut offset, mut floor) = (0u64, 0u64);
    for r in regions {
        let bad = || ImageSourceError::Layout {
            start: r.start,
            size: r.size,
        };
        let end = r.start.checked_add(r.size).ok_or_else(bad)?;
        if r.size == 0 || r.start < floor {
            return Err(bad());
        }
        packed.push((*r, offset));
        offset = offset.checked_add(r.size).ok_or_else(bad)?;
        floor = end;
    }
    Ok(packed)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl PageSource for ImageSource {
    /// Reads `buf.len()` bytes of guest memory at `gpa` from the image; bytes past the
    /// end of the file are zero. Returns [`PageContent::Zero`] when the whole buffer is
    /// zero (its content is then unspecified: the caller maps a zero page).
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let mut offset = self.offset_of(gpa, buf.len() as u64)?;
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read_at(&mut buf[filled..], offset) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if buf[..filled].iter().all(|&b| b == 0) {
            return Ok(PageContent::Zero);
        }
        buf[filled..].fill(0);
        Ok(PageContent::Data)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::host_page_size;

    /// A file under the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with(content: &[u8]) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "rangevm-image-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            let mut file = File::create(&path).unwrap();
            file.write_all(content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn page() -> usize {
        usize::try_from(host_page_size()).unwrap()
    }

    /// `pages` pages, page `i` filled with `i + 1`.
    fn numbered(pages: usize) -> Vec<u8> {
        (0..pages)
            .flat_map(|i| std::iter::repeat_n(u8::try_from(i + 1).unwrap(), page()))
            .collect()
    }

    fn read(source: &ImageSource, gpa: u64) -> io::Result<(PageContent, Vec<u8>)> {
        let mut buf = vec![0xee; page()];
        let content = source.read_page(gpa, &mut buf)?;
        Ok((content, buf))
    }

    #[test]
    fn flat_image_reads_page_at_its_guest_address() {
        let p = page();
        let file = TempFile::with(&numbered(3));
        let source = ImageSource::open(&file.0, ImageLayout::Flat).unwrap();
        for i in 0..3u8 {
            let (content, buf) = read(&source, u64::from(i) * host_page_size()).unwrap();
            assert_eq!(content, PageContent::Data);
            assert!(buf.iter().all(|&b| b == i + 1), "page {i}");
        }
        // Not page-aligned: the bytes at that offset, running into the next page.
        let (_, buf) = read(&source, host_page_size() + 8).unwrap();
        assert_eq!((buf[0], buf[p - 9], buf[p - 8]), (2, 2, 3));
    }

    #[test]
    fn a_short_image_is_zero_past_its_end() {
        let p = page();
        let mut image = numbered(2);
        image.truncate(p + 100);
        let file = TempFile::with(&image);
        let source = ImageSource::open(&file.0, ImageLayout::Flat).unwrap();
        // The page cut by EOF: its first 100 bytes, then zeros.
        let (content, buf) = read(&source, host_page_size()).unwrap();
        assert_eq!(content, PageContent::Data);
        assert!(buf[..100].iter().all(|&b| b == 2));
        assert!(buf[100..].iter().all(|&b| b == 0));
        // Wholly past EOF, even far past: a zero page.
        for gpa in [2 * host_page_size(), 1 << 40] {
            assert_eq!(read(&source, gpa).unwrap().0, PageContent::Zero, "{gpa:#x}");
        }
        assert!(matches!(
            read(&source, u64::MAX - 10),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput
        ));
    }

    #[test]
    fn a_page_of_zeros_in_the_image_is_a_zero_page() {
        let mut image = numbered(3);
        image[page()..2 * page()].fill(0);
        let file = TempFile::with(&image);
        let source = ImageSource::open(&file.0, ImageLayout::Flat).unwrap();
        assert_eq!(
            read(&source, host_page_size()).unwrap().0,
            PageContent::Zero
        );
        assert_eq!(read(&source, 0).unwrap().0, PageContent::Data);
    }

    #[test]
    fn packed_image_stores_regions_back_to_back() {
        let page = host_page_size();
        // Region A: pages 0..2 at offset 0; region B: 2 pages at 16 pages, at offset 2
        // pages.
        let regions = vec![
            RegionInfo {
                start: 0,
                size: 2 * page,
            },
            RegionInfo {
                start: 16 * page,
                size: 2 * page,
            },
        ];
        let file = TempFile::with(&numbered(4));
        let source = ImageSource::open(&file.0, ImageLayout::Packed(regions)).unwrap();
        for (gpa, fill) in [(0, 1u8), (page, 2), (16 * page, 3), (17 * page, 4)] {
            let (content, buf) = read(&source, gpa).unwrap();
            assert_eq!(content, PageContent::Data);
            assert!(buf.iter().all(|&b| b == fill), "{gpa:#x}");
        }
        // In the hole, past the last region, or straddling a region's end: an error.
        for gpa in [2 * page, 15 * page, 18 * page, 17 * page + 1, u64::MAX - 10] {
            let err = read(&source, gpa).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{gpa:#x}");
        }
    }

    #[test]
    fn bad_packed_layouts_are_refused() {
        let file = TempFile::with(&[]);
        let r = |start, size| RegionInfo { start, size };
        for regions in [
            vec![r(0x1000, 0)],
            vec![r(0x2000, 0x1000), r(0x1000, 0x1000)],
            vec![r(0, 0x2000), r(0x1000, 0x1000)],
            vec![r(u64::MAX - 0xfff, 0x2000)],
        ] {
            let layout = ImageLayout::Packed(regions.clone());
            assert!(
                matches!(
                    ImageSource::open(&file.0, layout),
                    Err(ImageSourceError::Layout { .. })
                ),
                "{regions:?}"
            );
        }
        // An empty packed layout is valid; every address is then outside it.
        let source = ImageSource::open(&file.0, ImageLayout::Packed(Vec::new())).unwrap();
        assert!(read(&source, 0).is_err());
    }

    #[test]
    fn io_errors_are_returned_not_panics() {
        let missing = std::env::temp_dir().join("rangevm-image-does-not-exist");
        assert!(matches!(
            ImageSource::open(&missing, ImageLayout::Flat),
            Err(ImageSourceError::Open { .. })
        ));
        // A file open for writing only: every read fails with EBADF.
        let file = TempFile::with(&numbered(1));
        let write_only = std::fs::OpenOptions::new()
            .write(true)
            .open(&file.0)
            .unwrap();
        let source = ImageSource::new(write_only, ImageLayout::Flat).unwrap();
        let err = read(&source, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }
}
