//! A test driver that plays the guest: it lays out split virtqueues in a `GuestRam`,
//! talks to an [`MmioTransport`] through its registers, writes descriptors and
//! available-ring entries, notifies, and reads the used rings.

use std::sync::Arc;

use rangevm_memory::{GuestRam, LockMode};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::BusDevice;

/// Guest RAM of the tests: one region at 0.
pub const RAM_SIZE: u64 = 16 << 20;
/// Queue `q`'s rings start at `QUEUE_BASE + q * QUEUE_STRIDE`.
pub const QUEUE_BASE: u64 = 0x1_0000;
const QUEUE_STRIDE: u64 = 0x4000;
/// Buffers the driver hands the device are allocated from here.
pub const BUFFER_BASE: u64 = 0x10_0000;

/// `RAM_SIZE` bytes of guest RAM at 0, every page present.
pub fn test_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(LockMode::Range, &[(0, RAM_SIZE)]).unwrap())
}

/// The register at `offset` as a `u64` offset.
pub fn r(offset: u32) -> u64 {
    u64::from(offset)
}

/// The driver's view of one queue.
#[derive(Debug, Clone, Copy)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The guest side of one device.
pub struct TestDriver<D: VirtioDevice> {
    pub transport: MmioTransport<D>,
    pub ram: Arc<GuestRam>,
    pub queues: Vec<DriverQueue>,
    next_buffer: u64,
}

impl<D: VirtioDevice> TestDriver<D> {
    pub fn new(device: D) -> Self {
        Self::with_ram(device, test_ram())
    }

    /// A driver for `device` with `ram` (at least 2 MiB, from 0) as guest memory.
    pub fn with_ram(device: D, ram: Arc<GuestRam>) -> Self {
        let transport = MmioTransport::new(device, Arc::clone(&ram)).unwrap();
        TestDriver {
            transport,
            ram,
            queues: Vec::new(),
            next_buffer: BUFFER_BASE,
        }
    }

    pub fn read32(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(r(offset), &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u32, value: u32) {
        self.transport.write(r(offset), &value.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.read32(reg::VIRTIO_MMIO_STATUS)
    }

    pub fn device_features(&mut self) -> u64 {
        self.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    pub fn write_features(&mut self, features: u64) {
        for (sel, half) in [(0, features & 0xffff_ffff), (1, features >> 32)] {
            self.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write32(
                reg::VIRTIO_MMIO_DRIVER_FEATURES,
                u32::try_from(half).unwrap(),
            );
        }
    }

    /// Status ACKNOWLEDGE | DRIVER, then `features`, then FEATURES_OK; returns whether the
    /// device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write32(reg::VIRTIO_MMIO_STATUS, 0);
        self.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write32(
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write_features(features);
        self.write32(
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Programs queue `q` with `size` entries at its standard place (or at `desc`
    /// instead, if given) and enables it; returns whether the device took it (QueueReady
    /// reads back 1).
    pub fn setup_queue(&mut self, q: u32, size: u16, desc: Option<u64>) -> bool {
        let base = QUEUE_BASE + u64::from(q) * QUEUE_STRIDE;
        let dq = DriverQueue {
            size,
            desc: desc.unwrap_or(base),
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        self.write32(reg::VIRTIO_MMIO_QUEUE_SEL, q);
        self.write32(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(size));
        let split = |a: u64| {
            (
                u32::try_from(a & 0xffff_ffff).unwrap(),
                u32::try_from(a >> 32).unwrap(),
            )
        };
        for (lo, hi, addr) in [
            (
                reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
                reg::VIRTIO_MMIO_QUEUE_DESC_HIGH,
                dq.desc,
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                dq.avail,
            ),
            (
                reg::VIRTIO_MMIO_QUEUE_USED_LOW,
                reg::VIRTIO_MMIO_QUEUE_USED_HIGH,
                dq.used,
            ),
        ] {
            let (l, h) = split(addr);
            self.write32(lo, l);
            self.write32(hi, h);
        }
        self.write32(reg::VIRTIO_MMIO_QUEUE_READY, 1);
        let i = usize::try_from(q).unwrap();
        if self.queues.len() <= i {
            self.queues.resize(i + 1, dq);
        }
        self.queues[i] = dq;
        self.read32(reg::VIRTIO_MMIO_QUEUE_READY) == 1
    }

    /// The whole handshake: negotiate `features`, enable `queues` queues of their
    /// maximum size, DRIVER_OK. Panics (the test fails) if the device refuses.
    pub fn start(&mut self, features: u64, queues: u32) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        for q in 0..queues {
            self.write32(reg::VIRTIO_MMIO_QUEUE_SEL, q);
            let max = u16::try_from(self.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX)).unwrap();
            assert!(max > 0, "queue {q} does not exist");
            assert!(self.setup_queue(q, max, None), "queue {q} refused");
        }
        self.driver_ok();
        assert!(self.transport.is_activated());
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.write32(reg::VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }

    /// A buffer of `len` bytes in guest RAM, 16-byte aligned.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer = (addr + len + 15) & !15;
        addr
    }

    /// Copies `data` into a new buffer; returns its address.
    pub fn buffer(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len() as u64);
        self.ram.write(addr, data).unwrap();
        addr
    }

    /// Writes descriptor `index` of queue `q` as is.
    pub fn write_desc(&mut self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let desc = self.queues[q].desc;
        self.ram.write(desc + u64::from(index) * 16, &raw).unwrap();
    }

    /// Makes the chain at `head` available on queue `q` (without notifying).
    pub fn publish(&mut self, q: usize, head: u16) {
        let dq = self.queues[q];
        let slot = u64::from(dq.avail_idx % dq.size);
        self.ram
            .write(dq.avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        let idx = dq.avail_idx.wrapping_add(1);
        self.ram.write(dq.avail + 2, &idx.to_le_bytes()).unwrap();
        self.queues[q].avail_idx = idx;
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers into free descriptors of
    /// queue `q` and makes it available; returns its head.
    pub fn add_chain(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let size = self.queues[q].size;
        let head = self.queues[q].next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (head + u16::try_from(i).unwrap()) % size;
            let last = i + 1 == buffers.len();
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(
                q,
                index,
                addr,
                len,
                u16::try_from(flags).unwrap(),
                (index + 1) % size,
            );
        }
        self.queues[q].next_desc = (head + u16::try_from(buffers.len()).unwrap()) % size;
        self.publish(q, head);
        head
    }

    pub fn notify(&mut self, q: u32) {
        self.write32(reg::VIRTIO_MMIO_QUEUE_NOTIFY, q);
    }

    /// The used-ring entries `(id, len)` of queue `q` the device added since the last
    /// call.
    pub fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let dq = self.queues[q];
        let idx: u16 = self.ram.read_obj(dq.used + 2).unwrap();
        let mut out = Vec::new();
        let mut seen = dq.used_seen;
        while seen != idx {
            let slot = u64::from(seen % dq.size);
            let id: u32 = self.ram.read_obj(dq.used + 4 + 8 * slot).unwrap();
            let len: u32 = self.ram.read_obj(dq.used + 8 + 8 * slot).unwrap();
            out.push((id, len));
            seen = seen.wrapping_add(1);
        }
        self.queues[q].used_seen = seen;
        out
    }

    /// Reads and acknowledges the interrupt status; drains the eventfd. Returns the
    /// status bits.
    pub fn take_interrupt(&mut self) -> u32 {
        let status = self.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write32(reg::VIRTIO_MMIO_INTERRUPT_ACK, status);
        let _ = self.transport.interrupt().eventfd().read();
        status
    }

    pub fn read_config32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport
            .read(r(reg::VIRTIO_MMIO_CONFIG) + offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_config32(&mut self, offset: u64, value: u32) {
        self.transport
            .write(r(reg::VIRTIO_MMIO_CONFIG) + offset, &value.to_le_bytes());
    }
}
