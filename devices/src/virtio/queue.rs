//! Split virtqueues (virtio 1.2 section 2.7) read and written through [`GuestRam`].
//!
//! Why not rust-vmm's virtio-queue: it walks rings and buffers through a
//! `GuestMemory` backend, that is through the raw mapping, and `GuestRam` hands its
//! mapping out only to boot-time loaders under the write lock of all of RAM. DESIGN.md
//! wants every device access to guest memory to be a read lock of exactly the bytes
//! touched (and a dirty mark for writes). The rings are tiny, so this module reads each
//! descriptor, ring index and ring slot with one [`GuestRam::read`] (a copy under the read
//! lock of those bytes) and writes the used ring with [`GuestRam::write`]. What the guest
//! wrote is copied first and validated on the copy, so a guest changing a ring while the
//! device reads it can give wrong data but never an unchecked access.
//!
//! Features this queue does not support, and which the transport therefore never offers:
//! indirect descriptors (`VIRTIO_RING_F_INDIRECT_DESC`), event index
//! (`VIRTIO_RING_F_EVENT_IDX`), the packed ring.

use std::sync::atomic::{fence, Ordering};

use rangevm_memory::{GuestRam, GuestRamError};
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// The largest queue size the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Size of one descriptor-table entry.
const DESC_SIZE: u64 = 16;
/// Size of one used-ring element (`le32 id, le32 len`).
const USED_ELEM_SIZE: u64 = 8;

/// Errors of queue operations: the guest broke the ring protocol, or its memory is not
/// accessible. Each one is logged by the device and the device carries on.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Reading or writing a ring or a buffer failed.
    #[error("Cannot access the virtqueue in guest memory")]
    Memory(#[from] GuestRamError),
    /// The available index moved by more than the queue size since the device last
    /// looked.
    #[error(
        "Available index {avail_idx} is {ahead} entries ahead of the device (queue size {size})"
    )]
    AvailIndex {
        /// The index the driver wrote.
        avail_idx: u16,
        /// How far it is ahead of the device's next entry.
        ahead: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor index at or beyond the queue size.
    #[error("Descriptor index {index} is outside the queue of size {size}")]
    DescIndex {
        /// The index.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain with more descriptors than the queue has: it loops.
    #[error("Descriptor chain from head {head} is longer than the queue (size {size}): a loop")]
    Loop {
        /// The chain's head.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A buffer whose end wraps the address space.
    #[error("Buffer at {addr:#x} of length {len:#x} wraps the address space")]
    Overflow {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// An indirect descriptor, which was not negotiated.
    #[error("Indirect descriptor in the chain from head {head}; the feature was not offered")]
    Indirect {
        /// The chain's head.
        head: u16,
    },
}

/// The queue registers the driver programs through the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size (a power of two, at most `max_size`).
    pub size: u16,
    /// Largest size the device allows.
    pub max_size: u16,
    /// The driver enabled the queue (`QueueReady`).
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// ... of the available ("driver") ring.
    pub avail_ring: u64,
    /// ... of the used ("device") ring.
    pub used_ring: u64,
}

impl QueueConfig {
    /// A queue as it is after reset: not ready, size `max_size`, addresses zero.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            size: max_size,
            max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    /// Bytes of the three ring areas: descriptor table, available ring, used ring.
    fn areas(&self) -> [(&'static str, u64, u64, u64); 3] {
        let n = u64::from(self.size);
        [
            ("descriptor table", self.desc_table, n * DESC_SIZE, 16),
            // flags, idx, ring[n], used_event
            ("available ring", self.avail_ring, 6 + 2 * n, 2),
            // flags, idx, ring[n], avail_event
            ("used ring", self.used_ring, 6 + USED_ELEM_SIZE * n, 4),
        ]
    }

    /// Why the driver may not enable this queue, if it may not: a size that is zero, not
    /// a power of two or above the maximum; a ring area that is misaligned, wraps the
    /// address space or is not all guest RAM (as `in_ram` says).
    pub fn check(&self, in_ram: impl Fn(u64, u64) -> bool) -> Result<(), String> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!(
                "size {} is not a power of two in 1..={}",
                self.size, self.max_size
            ));
        }
        for (what, addr, len, align) in self.areas() {
            if addr % align != 0 {
                return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
            }
            if addr.checked_add(len).is_none() || !in_ram(addr, len) {
                return Err(format!(
                    "{what} [{addr:#x}, +{len:#x}) is not all guest RAM"
                ));
            }
        }
        Ok(())
    }
}

/// One descriptor as read from the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// The device may write it (else it may only read it).
    pub writable: bool,
}

/// A popped chain: its head (to return through the used ring) and its descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor.
    pub head: u16,
    /// The descriptors in chain order.
    pub descriptors: Vec<Descriptor>,
}

/// What [`Queue::pop`] found.
#[derive(Debug)]
pub enum Popped {
    /// A well-formed chain.
    Chain(Chain),
    /// An entry whose chain is malformed. If the head index is valid (`Some`) the device
    /// returns it through the used ring with length 0, so the driver gets its buffer
    /// back; the error says what was wrong.
    Bad(Option<u16>, QueueError),
}

/// A split virtqueue the device processes: the programmed configuration plus the
/// device's position in the rings.
#[derive(Debug, Clone)]
pub struct Queue {
    config: QueueConfig,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    /// A queue in its initial state (`next_avail` = `next_used` = 0). The transport
    /// creates it at activation from a configuration that passed [`QueueConfig::check`].
    pub fn new(config: QueueConfig) -> Self {
        Queue {
            config,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// A queue resuming at a saved position: the next available-ring entry to pop is
    /// `next_avail`, the next used-ring entry to fill is `next_used` (both free-running
    /// 16-bit indices, as the rings' `idx` fields). For a restore; nothing in guest
    /// memory is read or written.
    pub fn with_position(config: QueueConfig, next_avail: u16, next_used: u16) -> Self {
        Queue {
            config,
            next_avail,
            next_used,
        }
    }

    /// The configuration it was created from.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The index of the next available-ring entry the device will pop.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The index of the next used-ring entry the device will fill.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    fn read_u16(ram: &GuestRam, addr: u64) -> Result<u16, GuestRamError> {
        let mut b = [0u8; 2];
        ram.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The next available chain, if the driver made one available. `Ok(None)`: nothing
    /// new. An error that is not tied to one chain (the available ring is unreadable or
    /// its index is impossible) is `Err`; the queue does not advance.
    pub fn pop(&mut self, ram: &GuestRam) -> Result<Option<Popped>, QueueError> {
        let size = self.config.size;
        if size == 0 {
            // Never the case for a queue that passed `QueueConfig::check`.
            return Ok(None);
        }
        let avail_idx = Self::read_u16(ram, self.config.avail_ring + 2)?;
        let ahead = avail_idx.wrapping_sub(self.next_avail);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > size {
            return Err(QueueError::AvailIndex {
                avail_idx,
                ahead,
                size,
            });
        }
        // The ring entry and the descriptors were written before the index: read them
        // only after reading the index.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % size);
        let head = Self::read_u16(ram, self.config.avail_ring + 4 + 2 * slot)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= size {
            return Ok(Some(Popped::Bad(
                None,
                QueueError::DescIndex { index: head, size },
            )));
        }
        Ok(Some(match self.walk(ram, head) {
            Ok(descriptors) => Popped::Chain(Chain { head, descriptors }),
            Err(e) => Popped::Bad(Some(head), e),
        }))
    }

    /// The descriptors of the chain starting at `head` (< size).
    fn walk(&self, ram: &GuestRam, head: u16) -> Result<Vec<Descriptor>, QueueError> {
        let size = self.config.size;
        let mut descriptors = Vec::new();
        let mut index = head;
        loop {
            if descriptors.len() >= usize::from(size) {
                return Err(QueueError::Loop { head, size });
            }
            let mut raw = [0u8; 16];
            ram.read(
                self.config.desc_table + u64::from(index) * DESC_SIZE,
                &mut raw,
            )?;
            let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
            let addr = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
            let len = u32::from_le_bytes([l0, l1, l2, l3]);
            let flags = u32::from(u16::from_le_bytes([f0, f1]));
            let next = u16::from_le_bytes([n0, n1]);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect { head });
            }
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(QueueError::Overflow { addr, len });
            }
            descriptors.push(Descriptor {
                addr,
                len,
                writable: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(descriptors);
            }
            if next >= size {
                return Err(QueueError::DescIndex { index: next, size });
            }
            index = next;
        }
    }

    /// Returns the chain at `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, ram: &GuestRam, head: u16, len: u32) -> Result<(), QueueError> {
        let size = self.config.size;
        if head >= size {
            return Err(QueueError::DescIndex { index: head, size });
        }
        let slot = u64::from(self.next_used % self.config.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        ram.write(self.config.used_ring + 4 + USED_ELEM_SIZE * slot, &elem)?;
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        let next = self.next_used.wrapping_add(1);
        ram.write(self.config.used_ring + 2, &next.to_le_bytes())?;
        self.next_used = next;
        Ok(())
    }

    /// Whether the driver wants an interrupt for used buffers (it did not set
    /// `VRING_AVAIL_F_NO_INTERRUPT`). An unreadable ring counts as "yes": a spurious
    /// interrupt is harmless, a lost one hangs the driver.
    pub fn needs_interrupt(&self, ram: &GuestRam) -> bool {
        fence(Ordering::SeqCst);
        Self::read_u16(ram, self.config.avail_ring).map_or(true, |flags| {
            u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::test_ram;

    fn config(size: u16) -> QueueConfig {
        QueueConfig {
            size,
            max_size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    #[test]
    fn check_names_what_is_wrong() {
        let anywhere = |_, _| true;
        assert!(config(16).check(anywhere).is_ok());
        assert!(config(0).check(anywhere).unwrap_err().contains("size 0"));
        assert!(config(512).check(anywhere).is_err());
        let mut c = config(16);
        c.used_ring = 0x3002;
        assert!(c.check(anywhere).unwrap_err().contains("used ring"));
        c.used_ring = u64::MAX - 3;
        assert!(c.check(anywhere).unwrap_err().contains("not all guest RAM"));
        let nowhere = |_, _| false;
        assert!(config(16).check(nowhere).is_err());
    }

    #[test]
    fn a_zero_sized_queue_does_nothing() {
        let ram = test_ram();
        let mut q = Queue::new(config(0));
        assert!(q.pop(&ram).unwrap().is_none());
        assert!(matches!(
            q.add_used(&ram, 0, 0),
            Err(QueueError::DescIndex { .. })
        ));
    }

    #[test]
    fn pops_a_chain_and_publishes_used() {
        let ram = test_ram();
        let mut q = Queue::new(config(4));
        // Descriptor 2 -> 3, avail ring [2], idx 1.
        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            raw
        };
        ram.write(0x1000 + 32, &desc(0x8000, 8, 1, 3)).unwrap();
        ram.write(0x1000 + 48, &desc(0x9000, 4, 2, 0)).unwrap();
        ram.write(0x2004, &2u16.to_le_bytes()).unwrap();
        ram.write(0x2002, &1u16.to_le_bytes()).unwrap();
        let Some(Popped::Chain(chain)) = q.pop(&ram).unwrap() else {
            panic!("a chain");
        };
        assert_eq!(chain.head, 2);
        assert_eq!(
            chain.descriptors,
            vec![
                Descriptor {
                    addr: 0x8000,
                    len: 8,
                    writable: false
                },
                Descriptor {
                    addr: 0x9000,
                    len: 4,
                    writable: true
                }
            ]
        );
        assert!(q.pop(&ram).unwrap().is_none());
        q.add_used(&ram, 2, 4).unwrap();
        assert_eq!(ram.read_obj::<u16>(0x3002).unwrap(), 1);
        assert_eq!(ram.read_obj::<u32>(0x3004).unwrap(), 2);
        assert_eq!(ram.read_obj::<u32>(0x3008).unwrap(), 4);
        assert!(
            ram.page_state(0x3000).unwrap().dirty,
            "used ring marked dirty"
        );
        assert!(q.needs_interrupt(&ram));
        assert_eq!(q.config().size, 4);
    }
}
