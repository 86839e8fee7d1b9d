//! The virtio PCI transport, "modern" layout (virtio 1.2 section 4.1), for one
//! [`VirtioDevice`]: a conventional PCI function (type 0 header, vendor 0x1af4, device
//! 0x1040 + the virtio device type, revision 1) with one 32-bit memory BAR that holds
//! the four areas its vendor capabilities point at:
//!
//! | BAR 0 offset | area | accesses |
//! |---|---|---|
//! | 0x0000 | common configuration | the field's own width (64-bit fields also as two 32-bit halves) |
//! | 0x1000 | ISR status | 1 byte; a read returns the bits and clears them |
//! | 0x2000 | device configuration | 1, 2, 4 or 8 bytes |
//! | 0x3000 | notifications | a write of queue `n`'s index at 0x3000 + 4n |
//!
//! plus the `VIRTIO_PCI_CAP_PCI_CFG` window in configuration space, through which a
//! driver may reach the BAR without mapping it.
//!
//! There is no host bridge here: the VMM's bridge calls
//! [`config_read`](PciTransport::config_read) / [`config_write`](PciTransport::config_write)
//! for configuration cycles, and [`bar_read`](PciTransport::bar_read) /
//! [`bar_write`](PciTransport::bar_write) for memory accesses that fall in the BAR
//! ([`bar_address`](PciTransport::bar_address), decoded only while the command
//! register's memory-space bit is set). There is no MSI-X capability: the driver uses
//! the INTx line, which is [`VirtioInterrupt::eventfd`] (the bridge routes it to an
//! interrupt of its controller). Anything the driver gets wrong is logged,
//! rate-limited, and ignored; nothing panics.

use std::fmt;
use std::sync::Arc;

use rangevm_memory::GuestRam;

use super::transport::{QueueField, Transport};
use super::{usize_of, VirtioDevice, VirtioError, VirtioInterrupt};
use crate::persist::{PersistError, Reader, Writer, VIRTIO_PCI_MAGIC};

/// The PCI vendor ID of virtio devices (Red Hat, Inc.).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// A modern virtio device's PCI device ID is this plus its virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Size of BAR 0, which holds every area.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x4000;
/// Bytes of configuration space (a conventional PCI function).
pub const PCI_CONFIG_SIZE: usize = 256;

/// The command register's memory-space enable bit.
const COMMAND_MEMORY: u16 = 1 << 1;
/// The status register's interrupt-status bit (INTx asserted).
const STATUS_INTERRUPT: u16 = 1 << 3;
/// The status register's capabilities-list bit.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// BAR 0's low bits: memory space, 32-bit, not prefetchable (all zero).
const BAR_MEM_32: u32 = 0;

const COMMON_OFFSET: u64 = 0;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Each area's length in the BAR.
const AREA_LEN: u64 = 0x1000;
/// Queue `n` is notified at `NOTIFY_OFFSET + n * NOTIFY_MULTIPLIER`.
const NOTIFY_MULTIPLIER: u32 = 4;
/// The common configuration structure's length (up to and including `queue_device`).
const COMMON_LEN: u64 = 0x38;
/// "No MSI-X vector", what the vector fields read without MSI-X.
const NO_VECTOR: u16 = 0xffff;

/// Capability layout: `(offset, cfg_type, length)`; each begins `vndr next len type bar`.
const CAP_COMMON: usize = 0x40;
const CAP_NOTIFY: usize = 0x50;
const CAP_ISR: usize = 0x64;
const CAP_DEVICE: usize = 0x74;
const CAP_PCI_CFG: usize = 0x84;
/// Where the PCI-configuration-access capability's fields are.
const CFG_BAR: usize = CAP_PCI_CFG + 4;
const CFG_OFFSET: usize = CAP_PCI_CFG + 8;
const CFG_LENGTH: usize = CAP_PCI_CFG + 12;
const CFG_DATA: usize = CAP_PCI_CFG + 16;

/// Errors of the virtio PCI transport.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The interrupt line could not be created.
    #[error("Cannot create the virtio-pci interrupt line")]
    Interrupt(#[source] VirtioError),
}

/// What a PCI host bridge tells the guest about a function (a device tree describes
/// each function with these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, subclass, programming interface (24 bits).
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Interrupt pin (1 = INTA).
    pub interrupt_pin: u8,
}

impl PciIdentity {
    /// The identity a [`PciTransport`] for a device of `device_type` has (a device
    /// tree can be written before the device exists).
    pub fn of_virtio(device_type: u32) -> Self {
        identity_of(&fresh_config(device_type).0)
    }
}

/// The virtio PCI transport around one device. See the module documentation.
pub struct PciTransport<D: VirtioDevice> {
    core: Transport<D>,
    /// Configuration space as the guest reads it (except the bits computed on read).
    config: [u8; PCI_CONFIG_SIZE],
    /// The bits the guest may write.
    wmask: [u8; PCI_CONFIG_SIZE],
}

impl<D: VirtioDevice> fmt::Debug for PciTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciTransport")
            .field("core", &self.core)
            .field("bar", &format_args!("{:#x}", self.bar_address()))
            .field("command", &self.u16_at(0x04))
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> PciTransport<D> {
    /// The transport for `device`, whose queues live in `ram`. BAR 0 is at 0 and memory
    /// decoding is off until the VMM (as firmware would) or the guest programs them.
    pub fn new(device: D, ram: Arc<GuestRam>) -> Result<Self, PciError> {
        let device_type = device.device_type();
        let core = Transport::new(device, ram, "virtio-pci").map_err(PciError::Interrupt)?;
        let (config, wmask) = fresh_config(device_type);
        Ok(PciTransport {
            core,
            config,
            wmask,
        })
    }

    /// The interrupt line (INTx); the host bridge routes its eventfd to an interrupt.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.core.interrupt
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.core.device
    }

    /// The device, for the VMM's requests (a new balloon target, fresh statistics).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.core.device
    }

    /// The driver set `DRIVER_OK` and the device accepted its setup.
    pub fn is_activated(&self) -> bool {
        self.core.activated
    }

    /// The device status.
    pub fn status(&self) -> u32 {
        self.core.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.core.driver_features
    }

    /// The IDs the host bridge describes the function with.
    pub fn identity(&self) -> PciIdentity {
        identity_of(&self.config)
    }

    /// The PCI bus address BAR 0 holds.
    pub fn bar_address(&self) -> u64 {
        u64::from(u32::from_le_bytes(self.bytes4(0x10)) & !0xf)
    }

    /// Programs BAR 0 with `address` (its bits below [`VIRTIO_PCI_BAR_SIZE`] are
    /// dropped) and turns memory decoding on: what firmware does before the guest
    /// boots.
    pub fn assign_bar(&mut self, address: u32) {
        self.config_write(0x10, &address.to_le_bytes());
        let command = self.u16_at(0x04) | COMMAND_MEMORY;
        self.config_write(0x04, &command.to_le_bytes());
    }

    /// The command register's memory-space bit: BAR 0 decodes only while it is set.
    pub fn memory_enabled(&self) -> bool {
        self.u16_at(0x04) & COMMAND_MEMORY != 0
    }

    /// A configuration read of `data.len()` bytes at `offset`. Offsets past the 256
    /// bytes of a conventional function read as 0.
    pub fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let Some(end) = offset
            .checked_add(data.len())
            .filter(|&e| e <= PCI_CONFIG_SIZE)
        else {
            data.fill(0);
            return;
        };
        if offset < CFG_DATA + 4 && end > CFG_DATA {
            self.cfg_window_read();
        }
        data.copy_from_slice(&self.config[offset..end]);
        // Status bit 3 follows the interrupt line.
        if (offset..end).contains(&0x06) && self.core.interrupt.status() != 0 {
            let i = 0x06 - offset;
            data[i] |= u8::try_from(STATUS_INTERRUPT).unwrap_or(0);
        }
    }

    /// A configuration write of `data` at `offset`: only the writable bits change
    /// (BAR 0's size bits read back as 0, so sizing the BAR works as on hardware).
    pub fn config_write(&mut self, offset: usize, data: &[u8]) {
        let Some(end) = offset
            .checked_add(data.len())
            .filter(|&e| e <= PCI_CONFIG_SIZE)
        else {
            self.core.bad(format_args!(
                "{}-byte configuration write at {offset:#x} is past the configuration space",
                data.len()
            ));
            return;
        };
        for (i, &b) in (offset..end).zip(data) {
            self.config[i] = (self.config[i] & !self.wmask[i]) | (b & self.wmask[i]);
        }
        if offset < CFG_DATA + 4 && end > CFG_DATA {
            self.cfg_window_write();
        }
    }

    /// A read of `data.len()` bytes at `offset` in BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_OFFSET + AREA_LEN => self.common_read(o - COMMON_OFFSET, data),
            ISR_OFFSET => {
                let bits = self.core.interrupt.status();
                self.core.interrupt.ack(bits);
                if let Some(b) = data.first_mut() {
                    *b = u8::try_from(bits & 0xff).unwrap_or(0);
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + AREA_LEN).contains(&o) && data.len() <= 8 => {
                self.core.device.read_config(o - DEVICE_OFFSET, data);
            }
            _ => self.core.bad(format_args!(
                "{}-byte read at BAR offset {offset:#x}, which is not readable",
                data.len()
            )),
        }
    }

    /// A write of `data` at `offset` in BAR 0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + AREA_LEN => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + AREA_LEN).contains(&o) && data.len() <= 8 => {
                self.core.device.write_config(o - DEVICE_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + AREA_LEN).contains(&o)
                && (o - NOTIFY_OFFSET) % u64::from(NOTIFY_MULTIPLIER) == 0
                && matches!(data.len(), 2 | 4) =>
            {
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                self.core.notify(u32::try_from(queue).unwrap_or(u32::MAX));
            }
            _ => self.core.bad(format_args!(
                "{}-byte write at BAR offset {offset:#x}, which is not writable",
                data.len()
            )),
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = &self.core;
        let q = c.selected();
        let (value, width): (u64, usize) = match offset {
            0x00 => (c.device_features_sel.into(), 4),
            0x04 => (c.device_features_word().into(), 4),
            0x08 => (c.driver_features_sel.into(), 4),
            0x0c => (c.driver_features_word().into(), 4),
            0x10 | 0x1a => (NO_VECTOR.into(), 2),
            0x12 => (u64::try_from(c.queues.len()).unwrap_or(0), 2),
            0x14 => (u64::from(c.status & 0xff), 1),
            0x15 => (u64::from(c.interrupt.config_generation() & 0xff), 1),
            0x16 => (c.queue_sel.into(), 2),
            0x18 => (q.map_or(0, |q| q.size).into(), 2),
            0x1c => (q.map_or(0, |q| u64::from(q.ready)), 2),
            // Queue n is notified at n * multiplier: its notify offset is its index.
            0x1e => (q.map_or(0, |_| u64::from(c.queue_sel)), 2),
            0x20..COMMON_LEN => {
                let Some(q) = q else {
                    data.fill(0);
                    return;
                };
                let field = offset & !7;
                let v = match field {
                    0x20 => q.desc_table,
                    0x28 => q.avail_ring,
                    _ => q.used_ring,
                };
                match (offset % 8, data.len()) {
                    (0, 8) => (v, 8),
                    (0, 4) => (v & 0xffff_ffff, 4),
                    (4, 4) => (v >> 32, 4),
                    _ => (0, 0),
                }
            }
            _ => (0, 0),
        };
        if width == 0 || width != data.len() {
            self.core.bad(format_args!(
                "{}-byte read of common configuration at {offset:#x}",
                data.len()
            ));
            return;
        }
        data.copy_from_slice(&value.to_le_bytes()[..width]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let Some(dst) = raw.get_mut(..data.len()) else {
            self.core.bad(format_args!(
                "{}-byte write of common configuration at {offset:#x}",
                data.len()
            ));
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(raw);
        let v32 = u32::try_from(value & 0xffff_ffff).unwrap_or(0);
        let c = &mut self.core;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_sel = v32,
            (0x08, 4) => c.driver_features_sel = v32,
            (0x0c, 4) => c.write_driver_features(v32),
            // No MSI-X: the vectors stay "none" (they read back as NO_VECTOR).
            (0x10 | 0x1a, 2) => {}
            (0x14, 1) => c.write_status(v32),
            (0x16, 2) => c.queue_sel = v32,
            (0x18, 2) => c.write_queue(QueueField::Size, v32),
            (0x1c, 2) => c.write_queue(QueueField::Ready, v32),
            (0x20..COMMON_LEN, 4 | 8) if offset % 4 == 0 && offset % 8 + data.len() as u64 <= 8 => {
                let (low, high) = match offset & !7 {
                    0x20 => (QueueField::DescLow, QueueField::DescHigh),
                    0x28 => (QueueField::AvailLow, QueueField::AvailHigh),
                    _ => (QueueField::UsedLow, QueueField::UsedHigh),
                };
                let high_word = u32::try_from(value >> 32).unwrap_or(0);
                match (offset % 8, data.len()) {
                    (0, 8) => {
                        c.write_queue(low, v32);
                        c.write_queue(high, high_word);
                    }
                    (0, _) => c.write_queue(low, v32),
                    _ => c.write_queue(high, v32),
                }
            }
            _ => c.bad(format_args!(
                "{}-byte write of {value:#x} to common configuration at {offset:#x}, \
                 which is read-only or not a field",
                data.len()
            )),
        }
    }

    /// The configuration-access window's target, if the driver set a valid one:
    /// `(offset in BAR 0, length)`.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let bar = self.config[CFG_BAR];
        let offset = u32::from_le_bytes(self.bytes4(CFG_OFFSET));
        let length = u32::from_le_bytes(self.bytes4(CFG_LENGTH));
        let ok = bar == 0
            && matches!(length, 1 | 2 | 4)
            && offset % length == 0
            && u64::from(offset) + u64::from(length) <= VIRTIO_PCI_BAR_SIZE;
        if !ok {
            self.core.bad(format_args!(
                "configuration-access window on BAR {bar} at {offset:#x}, {length} bytes: \
                 not BAR 0, or not an aligned 1-, 2- or 4-byte access inside it"
            ));
            return None;
        }
        Some((u64::from(offset), usize_of(u64::from(length))))
    }

    fn cfg_window_read(&mut self) {
        let mut buf = [0u8; 4];
        if let Some((offset, len)) = self.cfg_window() {
            self.bar_read(offset, &mut buf[..len]);
        }
        self.config[CFG_DATA..CFG_DATA + 4].copy_from_slice(&buf);
    }

    fn cfg_window_write(&mut self) {
        if let Some((offset, len)) = self.cfg_window() {
            let buf = self.bytes4(CFG_DATA);
            self.bar_write(offset, &buf[..len]);
        }
    }

    fn bytes4(&self, offset: usize) -> [u8; 4] {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.config[offset..offset + 4]);
        b
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.config[offset], self.config[offset + 1]])
    }

    /// The transport's state (configuration space, device status, features, queues,
    /// interrupt status) and the device's own, in the versioned byte form of
    /// [`crate::persist`]:
    ///
    /// ```text
    /// configuration space [256] | the virtio state common to the transports (see
    /// MmioTransport's) | the device's own state
    /// ```
    ///
    /// Take it with the vCPUs paused and the queue work stopped.
    pub fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        let mut w = Writer::new();
        w.bytes(&self.config);
        self.core.save(&mut w)?;
        w.finish(VIRTIO_PCI_MAGIC)
    }

    /// Restores a state from [`save_state`](Self::save_state) into this transport,
    /// whose device must be of the same type, offer the same features and have the
    /// same queues; its guest memory must hold the rings. Read-only configuration
    /// bytes (IDs, capabilities) must match this build's. Everything is decoded and
    /// checked first: on an error nothing changed. No queue is processed and no
    /// interrupt is raised.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let mut r = Reader::unframe(VIRTIO_PCI_MAGIC, "virtio-pci", bytes)?;
        let config = r.array::<PCI_CONFIG_SIZE>("PCI configuration space")?;
        let (fresh, _) = fresh_config(self.core.device.device_type());
        let fixed_differs = config
            .iter()
            .zip(&fresh)
            .zip(&self.wmask)
            .any(|((saved, fresh), mask)| (saved ^ fresh) & !mask != 0);
        if fixed_differs {
            return Err(PersistError::Invalid(
                "PCI configuration space (read-only bytes differ from this device's)",
            ));
        }
        let state = self.core.decode(&mut r)?;
        r.end()?;
        self.core.apply(state)?;
        self.config = config;
        Ok(())
    }
}

fn identity_of(c: &[u8; PCI_CONFIG_SIZE]) -> PciIdentity {
    let u16_at = |at: usize| u16::from_le_bytes([c[at], c[at + 1]]);
    PciIdentity {
        vendor: u16_at(0x00),
        device: u16_at(0x02),
        revision: c[0x08],
        class_code: u32::from_le_bytes([c[0x09], c[0x0a], c[0x0b], 0]),
        subsystem_vendor: u16_at(0x2c),
        subsystem: u16_at(0x2e),
        interrupt_pin: c[0x3d],
    }
}

/// Configuration space after reset, and its writable bits.
fn fresh_config(device_type: u32) -> ([u8; PCI_CONFIG_SIZE], [u8; PCI_CONFIG_SIZE]) {
    let mut c = [0u8; PCI_CONFIG_SIZE];
    let mut m = [0u8; PCI_CONFIG_SIZE];
    let put = |buf: &mut [u8; PCI_CONFIG_SIZE], at: usize, bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let device_id = u16::try_from(device_type)
        .ok()
        .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
        .unwrap_or(VIRTIO_PCI_DEVICE_ID_BASE);
    put(&mut c, 0x00, &VIRTIO_PCI_VENDOR_ID.to_le_bytes());
    put(&mut c, 0x02, &device_id.to_le_bytes());
    put(&mut c, 0x06, &STATUS_CAP_LIST.to_le_bytes());
    // Revision 1 (modern); class "unclassified device" (0xff, 0x00, 0x00).
    put(&mut c, 0x08, &[1, 0x00, 0x00, 0xff]);
    put(&mut c, 0x10, &BAR_MEM_32.to_le_bytes());
    put(&mut c, 0x2c, &VIRTIO_PCI_VENDOR_ID.to_le_bytes());
    put(&mut c, 0x2e, &0x0040u16.to_le_bytes());
    c[0x34] = u8::try_from(CAP_COMMON).unwrap_or(0);
    c[0x3d] = 1; // INTA

    // Vendor capabilities: vndr 0x09, next, length, cfg_type, bar 0, id, padding,
    // offset, length (and the notify multiplier, or the access window).
    let caps: [(usize, usize, u8, u8, u64, u64); 5] = [
        (CAP_COMMON, CAP_NOTIFY, 16, 1, COMMON_OFFSET, AREA_LEN),
        (CAP_NOTIFY, CAP_ISR, 20, 2, NOTIFY_OFFSET, AREA_LEN),
        (CAP_ISR, CAP_DEVICE, 16, 3, ISR_OFFSET, AREA_LEN),
        (CAP_DEVICE, CAP_PCI_CFG, 16, 4, DEVICE_OFFSET, AREA_LEN),
        (CAP_PCI_CFG, 0, 20, 5, 0, 0),
    ];
    for (at, next, len, cfg_type, offset, length) in caps {
        let next = u8::try_from(next).unwrap_or(0);
        put(&mut c, at, &[0x09, next, len, cfg_type, 0, 0, 0, 0]);
        let offset = u32::try_from(offset).unwrap_or(0);
        let length = u32::try_from(length).unwrap_or(0);
        put(&mut c, at + 8, &offset.to_le_bytes());
        put(&mut c, at + 12, &length.to_le_bytes());
    }
    put(&mut c, CAP_NOTIFY + 16, &NOTIFY_MULTIPLIER.to_le_bytes());

    // Writable: command (memory space, bus master, INTx disable), BAR 0's address
    // bits above its size, the interrupt line, and the access window's BAR, offset,
    // length and data.
    put(&mut m, 0x04, &0x0406u16.to_le_bytes());
    let size_mask = u32::try_from(!(VIRTIO_PCI_BAR_SIZE - 1) & 0xffff_fff0).unwrap_or(0);
    put(&mut m, 0x10, &size_mask.to_le_bytes());
    m[0x3c] = 0xff;
    m[CFG_BAR] = 0xff;
    put(&mut m, CFG_OFFSET, &[0xff; 12]);
    (c, m)
}

#[cfg(test)]
mod tests;
