//! Guest pages numbered across all memory regions, for the per-page maps a migration
//! keeps (pages written, pages sent, the source's digests).

use rangevm_memory::GuestRam;

use super::protocol::Region;

/// Maps a guest-physical address to its page's index in `0..pages()`.
#[derive(Debug, Clone)]
pub struct PageIndex {
    /// (start, end, index of the first page) per region, in address order.
    regions: Vec<(u64, u64, usize)>,
    page_shift: u32,
    pages: usize,
}

impl PageIndex {
    /// The pages of `regions` at `1 << page_shift` bytes each.
    pub fn new(regions: &[Region], page_shift: u8) -> Self {
        let shift = u32::from(page_shift);
        let mut out = Vec::with_capacity(regions.len());
        let mut index = 0usize;
        for r in regions {
            out.push((r.gpa, r.gpa.saturating_add(r.size), index));
            index += usize::try_from(r.size >> shift).unwrap_or(0);
        }
        PageIndex {
            regions: out,
            page_shift: shift,
            pages: index,
        }
    }

    /// The pages of `ram`'s regions at its page size.
    pub fn of(ram: &GuestRam) -> Self {
        let regions: Vec<Region> = ram
            .regions()
            .iter()
            .map(|r| Region {
                gpa: r.start,
                size: r.size,
            })
            .collect();
        Self::new(
            &regions,
            u8::try_from(ram.page_size().trailing_zeros()).unwrap_or(12),
        )
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The index of the page holding `gpa`, if it is guest RAM.
    pub fn index(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|(s, e, _)| *s <= gpa && gpa < *e)
            .and_then(|(s, _, i)| {
                usize::try_from((gpa - s) >> self.page_shift)
                    .ok()
                    .map(|o| i + o)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_numbered_across_regions() {
        let idx = PageIndex::new(
            &[
                Region {
                    gpa: 0,
                    size: 0x3000,
                },
                Region {
                    gpa: 0x1_0000_0000,
                    size: 0x2000,
                },
            ],
            12,
        );
        assert_eq!(idx.pages(), 5);
        assert_eq!(idx.index(0), Some(0));
        assert_eq!(idx.index(0x2fff), Some(2));
        assert_eq!(idx.index(0x3000), None);
        assert_eq!(idx.index(0x1_0000_1000), Some(4));
        assert_eq!(idx.index(0x1_0000_2000), None);
    }
}
