//! The PHB's DMA window: a translation-control-entry (TCE) table the guest fills with
//! H_PUT_TCE / H_STUFF_TCE and reads with H_GET_TCE.
//!
//! pseries Linux insists on a DMA window (`ibm,dma-window`) for every PCI bus and
//! clears its table at boot. No device of this machine translates through it: virtio
//! devices that do not negotiate `VIRTIO_F_ACCESS_PLATFORM` use guest-physical
//! addresses. So the table is only kept, bounds-checked, to answer the guest
//! consistently; it is small ([`DMA_WINDOW_SIZE`]) so that clearing it costs a few
//! thousand hypercalls, and it is not part of the migrated state (a destination starts
//! with an empty table, which is what the guest put there for every device we have).

use std::sync::Mutex;

use super::layout::hcall::{H_P2, H_P3, H_P4, H_PARAMETER, H_SUCCESS};

/// The logical I/O bus number of the PHB's window (QEMU's first PHB has the same).
pub const PHB_LIOBN: u32 = 0x8000_0000;
/// Bytes of the window, from bus address 0.
pub const DMA_WINDOW_SIZE: u64 = 8 << 20;
/// The IOMMU page a TCE maps (what Linux uses for the default window).
pub const TCE_PAGE: u64 = 4096;
/// The largest count one H_STUFF_TCE may cover (PAPR: 512).
const STUFF_MAX: u64 = 512;

/// The table. See the module documentation.
#[derive(Debug)]
pub(super) struct TceTable {
    entries: Mutex<Vec<u64>>,
}

impl Default for TceTable {
    fn default() -> Self {
        let n = usize::try_from(DMA_WINDOW_SIZE / TCE_PAGE).unwrap_or(0);
        TceTable {
            entries: Mutex::new(vec![0; n]),
        }
    }
}

impl TceTable {
    /// The entry index of `ioba` in window `liobn`, or the hypercall error.
    fn index(liobn: u64, ioba: u64) -> Result<usize, u64> {
        if liobn != u64::from(PHB_LIOBN) {
            return Err(H_PARAMETER);
        }
        if ioba % TCE_PAGE != 0 || ioba >= DMA_WINDOW_SIZE {
            return Err(H_P2);
        }
        usize::try_from(ioba / TCE_PAGE).map_err(|_| H_P2)
    }

    /// H_PUT_TCE(liobn, ioba, tce).
    pub fn put(&self, liobn: u64, ioba: u64, tce: u64) -> u64 {
        self.stuff(liobn, ioba, tce, 1)
    }

    /// H_STUFF_TCE(liobn, ioba, tce, count): `count` entries from `ioba` set to `tce`.
    pub fn stuff(&self, liobn: u64, ioba: u64, tce: u64, count: u64) -> u64 {
        let first = match Self::index(liobn, ioba) {
            Ok(i) => i,
            Err(e) => return e,
        };
        // Permission bits 0-1, the page number above bit 12; the rest must be 0.
        if tce & (TCE_PAGE - 1) & !3 != 0 {
            return H_P3;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return H_PARAMETER;
        };
        let Some(end) = usize::try_from(count)
            .ok()
            .filter(|_| count <= STUFF_MAX)
            .and_then(|n| first.checked_add(n))
            .filter(|&end| end <= entries.len())
        else {
            return H_P4;
        };
        entries[first..end].fill(tce);
        H_SUCCESS
    }

    /// H_GET_TCE(liobn, ioba): the hypercall status and the entry.
    pub fn get(&self, liobn: u64, ioba: u64) -> (u64, u64) {
        match Self::index(liobn, ioba) {
            Ok(i) => match self.entries.lock() {
                Ok(e) => (H_SUCCESS, e.get(i).copied().unwrap_or(0)),
                Err(_) => (H_PARAMETER, 0),
            },
            Err(e) => (e, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_kept_and_bounds_checked() {
        let t = TceTable::default();
        let l = u64::from(PHB_LIOBN);
        assert_eq!(t.put(l, 0x3000, 0x1234_5003), H_SUCCESS);
        assert_eq!(t.get(l, 0x3000), (H_SUCCESS, 0x1234_5003));
        assert_eq!(t.get(l, 0x4000), (H_SUCCESS, 0));
        assert_eq!(t.stuff(l, 0x2000, 0, 2), H_SUCCESS);
        assert_eq!(t.get(l, 0x3000), (H_SUCCESS, 0));
        // Other window, misaligned, past the end, bad bits, too many.
        assert_eq!(t.put(l + 1, 0, 0), H_PARAMETER);
        assert_eq!(t.put(l, 0x10, 0), H_P2);
        assert_eq!(t.put(l, DMA_WINDOW_SIZE, 0), H_P2);
        assert_eq!(t.put(l, 0, 0x10), H_P3);
        assert_eq!(t.stuff(l, 0, 0, STUFF_MAX + 1), H_P4);
        assert_eq!(t.stuff(l, DMA_WINDOW_SIZE - TCE_PAGE, 0, 2), H_P4);
        assert_eq!(t.get(l, DMA_WINDOW_SIZE).0, H_P2);
    }
}
