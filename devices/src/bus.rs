//! A bus of port-I/O (or MMIO) devices: maps non-overlapping address ranges to the
//! devices that own them.
//!
//! The VMM builds one bus per address space before the vCPUs start, then shares it
//! (`Arc<Bus>`) with every vCPU thread, which calls [`Bus::read`] / [`Bus::write`] on
//! each I/O exit. Lookup is a `BTreeMap` range query: O(log n). Each device sits behind
//! its own mutex, so vCPUs touching different devices do not wait on each other.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A device on a [`Bus`]. `offset` is relative to the base the device was inserted
/// at; `data.len()` is the access width (1, 2, 4 or 8 bytes for port and MMIO exits).
///
/// An access may start inside the device's range and run past its end (a 2-byte read
/// of its last port); the device decides what to do with the extra bytes. Both methods
/// are reached from guest input: they must not panic.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of [`Bus::insert`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty.
    #[error("The bus range at {base:#x} has length zero")]
    ZeroLength {
        /// Its base.
        base: u64,
    },
    /// The range runs past the end of the address space.
    #[error("The bus range at {base:#x} of length {len:#x} wraps around the address space")]
    Wrap {
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps one already on the bus.
    #[error(
        "The bus range at {base:#x} of length {len:#x} overlaps the device at \
         {other_base:#x} of length {other_len:#x}"
    )]
    Overlap {
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
        /// The base of the device already there.
        other_base: u64,
        /// The length of the device already there.
        other_len: u64,
    },
}

struct Entry {
    /// The last address of the range (inclusive, so a range may end at `u64::MAX`).
    last: u64,
    device: Arc<Mutex<dyn BusDevice>>,
    poison_logged: AtomicBool,
}

impl Entry {
    /// Locks the device. A device whose previous user panicked is still used: its
    /// state is plain data and the vCPU thread must not panic in turn. Logged once.
    fn lock(&self, base: u64) -> MutexGuard<'_, dyn BusDevice + 'static> {
        self.device
            .lock()
            .unwrap_or_else(|poisoned: PoisonError<_>| {
                if !self.poison_logged.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "The bus device at {base:#x} panicked earlier; using its state as it was"
                    );
                }
                poisoned.into_inner()
            })
    }
}

/// Address ranges `[base, base + len)` mapped to devices.
#[derive(Default)]
pub struct Bus {
    /// Keyed by base.
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`. Fails if the range is empty, wraps past
    /// the end of the address space, or overlaps a device already there.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Wrap { base, len })?;
        // The ranges are disjoint, so of those starting at or before `last`, the one
        // starting latest also ends latest: if it ends before `base`, all do.
        if let Some((&other_base, other)) = self.entries.range(..=last).next_back() {
            if other.last >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.last - other_base + 1,
                });
            }
        }
        self.entries.insert(
            base,
            Entry {
                last,
                device,
                poison_logged: AtomicBool::new(false),
            },
        );
        Ok(())
    }

    /// The device owning `addr`, with its base.
    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        (addr <= entry.last).then_some((base, entry))
    }

    /// Reads `data.len()` bytes at `addr` from the device owning it. Returns false
    /// (and leaves `data` alone) if no device owns `addr`; the caller then answers with
    /// 0xff bytes, as an unclaimed ISA port does.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, entry)) => {
                entry.lock(base).read(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `addr` to the device owning it. Returns false if no device owns
    /// `addr` (the write is then dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, entry)) => {
                entry.lock(base).write(addr - base, data);
                true
            }
            None => false,
        }
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Range(u64, u64);
        impl fmt::Debug for Range {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}..={:#x}", self.0, self.1)
            }
        }
        f.debug_list()
            .entries(self.entries.iter().map(|(&b, e)| Range(b, e.last)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers reads with its tag and the offset; records writes.
    struct Probe {
        tag: u8,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.tag.wrapping_add(u8::try_from(offset).unwrap_or(0xff)));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe(tag: u8) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            tag,
            writes: Vec::new(),
        }))
    }

    fn read1(bus: &Bus, addr: u64) -> Option<u8> {
        let mut b = [0u8];
        bus.read(addr, &mut b).then_some(b[0])
    }

    #[test]
    fn rejects_empty_wrapping_and_overlapping_ranges() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(probe(0), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(probe(0), u64::MAX, 2),
            Err(BusError::Wrap {
                base: u64::MAX,
                len: 2
            })
        );
        // A range may end exactly at the top of the address space.
        bus.insert(probe(0), u64::MAX - 1, 2).unwrap();

        bus.insert(probe(0), 0x3f8, 8).unwrap();
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            other_base: 0x3f8,
            other_len: 8,
        };
        // Same range, inside, straddling either edge, covering.
        assert_eq!(bus.insert(probe(1), 0x3f8, 8), Err(overlap(0x3f8, 8)));
        assert_eq!(bus.insert(probe(1), 0x3fa, 1), Err(overlap(0x3fa, 1)));
        assert_eq!(bus.insert(probe(1), 0x3f0, 9), Err(overlap(0x3f0, 9)));
        assert_eq!(bus.insert(probe(1), 0x3ff, 4), Err(overlap(0x3ff, 4)));
        assert_eq!(
            bus.insert(probe(1), 0x300, 0x200),
            Err(overlap(0x300, 0x200))
        );
        // Touching either edge is fine.
        bus.insert(probe(1), 0x3f0, 8).unwrap();
        bus.insert(probe(2), 0x400, 1).unwrap();
    }

    #[test]
    fn routes_by_range_edges() {
        let mut bus = Bus::new();
        bus.insert(probe(0x10), 0x60, 5).unwrap();
        bus.insert(probe(0x20), 0x65, 1).unwrap();
        bus.insert(probe(0x40), 0x3f8, 8).unwrap();

        assert_eq!(read1(&bus, 0x5f), None);
        assert_eq!(read1(&bus, 0x60), Some(0x10));
        assert_eq!(read1(&bus, 0x64), Some(0x14));
        assert_eq!(read1(&bus, 0x65), Some(0x20));
        assert_eq!(read1(&bus, 0x66), None);
        assert_eq!(read1(&bus, 0x3f7), None);
        assert_eq!(read1(&bus, 0x3f8), Some(0x40));
        assert_eq!(read1(&bus, 0x3ff), Some(0x47));
        assert_eq!(read1(&bus, 0x400), None);
        assert_eq!(read1(&bus, 0), None);
        assert_eq!(read1(&bus, u64::MAX), None);
    }

    #[test]
    fn unclaimed_addresses_leave_data_alone() {
        let bus = Bus::new();
        let mut data = [0xffu8; 4];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn writes_reach_the_device_at_its_offset() {
        let mut bus = Bus::new();
        let dev = probe(0);
        bus.insert(dev.clone(), 0x600, 4).unwrap();
        assert!(bus.write(0x602, &[1]));
        assert!(bus.write(0x600, &[0x34, 0]));
        assert!(!bus.write(0x604, &[1]));
        let writes = &dev.lock().unwrap().writes;
        assert_eq!(writes, &[(2, vec![1]), (0, vec![0x34, 0])]);
    }

    #[test]
    fn a_poisoned_device_keeps_working() {
        let mut bus = Bus::new();
        let dev = probe(7);
        bus.insert(dev.clone(), 0x505, 1).unwrap();
        // Poison the mutex by panicking while holding it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _guard = dev.lock().unwrap();
            panic!("device panicked");
        }));
        assert!(dev.is_poisoned());
        assert_eq!(read1(&bus, 0x505), Some(7));
        assert_eq!(read1(&bus, 0x505), Some(7));
    }

    #[test]
    fn debug_lists_the_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe(0), 0x60, 5).unwrap();
        assert_eq!(format!("{bus:?}"), "[0x60..=0x64]");
    }
}
