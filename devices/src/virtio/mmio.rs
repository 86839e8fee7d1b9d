//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2), for one
//! [`VirtioDevice`].
//!
//! The VMM puts an [`MmioTransport`] on its MMIO bus at a `VIRTIO_MMIO_SIZE` window
//! (0x1000 bytes; registers up to 0x100, device configuration space after), registers
//! [`VirtioInterrupt::eventfd`] as an irqfd for the device's GSI, and tells the guest
//! where the device is (`virtio_mmio.device=4K@<base>:<gsi>` on the kernel command
//! line, or a device-tree node). A write to `QueueNotify` runs the device's queue work on
//! the writing vCPU's thread.
//!
//! Registers are 32 bits wide and 32-bit aligned; configuration space takes 1-, 2-, 4-
//! (and 8-) byte accesses. Anything else the driver does wrong (an unaligned or wide
//! register access, an unknown register, a queue size that is not a power of two or is
//! above the maximum, rings outside RAM or misaligned, a notify before `DRIVER_OK`, a
//! status write that clears bits, features the device did not offer) is logged,
//! rate-limited, and ignored or refused the way the specification lets the device
//! refuse it; nothing panics.
//!
//! [`MmioTransport::save_state`] and [`MmioTransport::restore_state`] carry the
//! transport's registers, queue configurations and interrupt state, with the device's
//! own state, for snapshot and migration.

use std::fmt;
use std::sync::Arc;

use rangevm_memory::GuestRam;
use virtio_bindings::virtio_mmio as reg;

use super::transport::{QueueField, Transport};
use super::{VirtioDevice, VirtioError, VirtioInterrupt};
use crate::BusDevice;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The transport version: 2, the virtio 1.x ("modern") layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID: "RVMM", little-endian.
pub const MMIO_VENDOR_ID: u32 = 0x4d4d_5652;
/// Device configuration space starts here.
pub const MMIO_CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

const MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_AVAIL_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_AVAIL_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_USED_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_USED_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const SHM_SEL: u64 = reg::VIRTIO_MMIO_SHM_SEL as u64;
const SHM_LEN_LOW: u64 = reg::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const SHM_BASE_HIGH: u64 = reg::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;

/// Errors of the virtio-mmio transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The interrupt line could not be created.
    #[error("Cannot create the virtio-mmio interrupt line")]
    Interrupt(#[source] VirtioError),
}

/// The virtio-mmio transport around one device. See the module documentation.
pub struct MmioTransport<D: VirtioDevice> {
    core: Transport<D>,
}

impl<D: VirtioDevice> fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("core", &self.core)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport for `device`, whose queues live in `ram`.
    pub fn new(device: D, ram: Arc<GuestRam>) -> Result<Self, MmioError> {
        let core = Transport::new(device, ram, "virtio-mmio").map_err(MmioError::Interrupt)?;
        Ok(MmioTransport { core })
    }

    /// The interrupt line; register [`VirtioInterrupt::eventfd`] as the GSI's irqfd.
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

    /// The driver notified queue `index`: what a write of `index` to `QueueNotify` does.
    /// For a VMM that registers an ioeventfd on `QueueNotify` (datamatch `index`) and
    /// calls this from its event loop instead of taking the MMIO exit.
    pub fn notify_queue(&mut self, index: u32) {
        self.core.notify(index);
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.core.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.core.driver_features
    }

    fn read_register(&self, offset: u64) -> u32 {
        let c = &self.core;
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => c.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => c.device_features_word(),
            QUEUE_NUM_MAX => c.selected().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => c.selected().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => c.interrupt.status(),
            STATUS => c.status,
            CONFIG_GENERATION => c.interrupt.config_generation(),
            // No shared memory regions: every region has length (and base) -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            _ => {
                c.bad(format_args!(
                    "read of write-only or unknown register {offset:#x}"
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let c = &mut self.core;
        match offset {
            DEVICE_FEATURES_SEL => c.device_features_sel = value,
            DRIVER_FEATURES_SEL => c.driver_features_sel = value,
            DRIVER_FEATURES => c.write_driver_features(value),
            QUEUE_SEL => c.queue_sel = value,
            QUEUE_NOTIFY => c.notify(value),
            INTERRUPT_ACK => c.interrupt.ack(value),
            STATUS => c.write_status(value),
            SHM_SEL => {}
            o => match queue_field(o) {
                Some(field) => c.write_queue(field, value),
                None => c.bad(format_args!(
                    "write of {value:#x} to read-only or unknown register {offset:#x}"
                )),
            },
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if data.len() > 8 {
                self.core.bad(format_args!(
                    "{}-byte configuration read at {offset:#x}",
                    data.len()
                ));
                data.fill(0);
                return;
            }
            self.core
                .device
                .read_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                self.core.bad(format_args!(
                    "{}-byte register read at {offset:#x}; registers are 4 bytes, aligned",
                    data.len()
                ));
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if data.len() > 8 {
                self.core.bad(format_args!(
                    "{}-byte configuration write at {offset:#x}",
                    data.len()
                ));
                return;
            }
            self.core
                .device
                .write_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => {
                self.write_register(offset, u32::from_le_bytes(word));
            }
            _ => self.core.bad(format_args!(
                "{}-byte register write at {offset:#x}; registers are 4 bytes, aligned",
                data.len()
            )),
        }
    }
}

/// The queue configuration register at `offset`, if it is one.
fn queue_field(offset: u64) -> Option<QueueField> {
    Some(match offset {
        QUEUE_NUM => QueueField::Size,
        QUEUE_READY => QueueField::Ready,
        QUEUE_DESC_LOW => QueueField::DescLow,
        QUEUE_DESC_HIGH => QueueField::DescHigh,
        QUEUE_AVAIL_LOW => QueueField::AvailLow,
        QUEUE_AVAIL_HIGH => QueueField::AvailHigh,
        QUEUE_USED_LOW => QueueField::UsedLow,
        QUEUE_USED_HIGH => QueueField::UsedHigh,
        _ => return None,
    })
}

mod persist;
#[cfg(test)]
mod tests;
