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
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;

use super::queue::{Queue, QueueConfig};
use super::{VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::{log_limited, BusDevice, LogLimiter};

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
    device: D,
    ram: Arc<GuestRam>,
    interrupt: Arc<VirtioInterrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    activated: bool,
    log: LogLimiter,
}

impl<D: VirtioDevice> fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport for `device`, whose queues live in `ram`.
    pub fn new(mut device: D, ram: Arc<GuestRam>) -> Result<Self, MmioError> {
        let interrupt = Arc::new(VirtioInterrupt::new().map_err(MmioError::Interrupt)?);
        device.set_interrupt(Arc::clone(&interrupt));
        let queues = Self::fresh_queues(&device);
        Ok(MmioTransport {
            device,
            ram,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            activated: false,
            log: LogLimiter::default(),
        })
    }

    fn fresh_queues(device: &D) -> Vec<QueueConfig> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect()
    }

    /// The interrupt line; register [`VirtioInterrupt::eventfd`] as the GSI's irqfd.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for the VMM's requests (a new balloon target, fresh statistics).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The driver set `DRIVER_OK` and the device accepted its setup.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The driver notified queue `index`: what a write of `index` to `QueueNotify` does.
    /// For a VMM that registers an ioeventfd on `QueueNotify` (datamatch `index`) and
    /// calls this from its event loop instead of taking the MMIO exit.
    pub fn notify_queue(&mut self, index: u32) {
        self.notify(index);
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    fn bad(&self, what: std::fmt::Arguments<'_>) {
        log_limited!(
            self.log,
            log::Level::Warn,
            "virtio-mmio (device type {}): {what}",
            self.device.device_type()
        );
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = Self::fresh_queues(&self.device);
        self.activated = false;
        self.interrupt.set_driver_ok(false);
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => low(self.device.features()),
                1 => high(self.device.features()),
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: every region has length (and base) -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.bad(format_args!(
                    "read of write-only or unknown register {offset:#x}"
                ));
                0
            }
        }
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(super::usize_of(u64::from(self.queue_sel)))
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            o if is_queue_reg(o) => self.write_queue(o, value),
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => self.bad(format_args!(
                "write of {value:#x} to read-only or unknown register {offset:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.bad(format_args!(
                "driver features written after FEATURES_OK; ignored"
            ));
            return;
        }
        let v = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            sel => self.bad(format_args!(
                "driver features bank {sel} written with {value:#x}; only banks 0 and 1 exist"
            )),
        }
    }

    fn write_queue(&mut self, offset: u64, value: u32) {
        let sel = self.queue_sel;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.bad(format_args!(
                "queue {sel} register {offset:#x} written after DRIVER_OK; ignored"
            ));
            return;
        }
        let ram = Arc::clone(&self.ram);
        let Some(q) = self.queues.get_mut(super::usize_of(u64::from(sel))) else {
            self.bad(format_args!(
                "register {offset:#x} written for queue {sel}, which does not exist"
            ));
            return;
        };
        if q.ready && !(offset == QUEUE_READY && value == 0) {
            self.bad(format_args!(
                "queue {sel} register {offset:#x} written while the queue is ready; ignored"
            ));
            return;
        }
        let set_low = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(value);
        let set_high = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.size = size,
                // Stored as 0 so that QueueReady refuses it.
                Err(_) => q.size = 0,
            },
            QUEUE_READY => {
                if value == 0 {
                    q.ready = false;
                } else {
                    let checked = q.check(|addr, len| super::in_ram(&ram, addr, len));
                    match checked {
                        Ok(()) => q.ready = true,
                        Err(why) => self.bad(format_args!("queue {sel} not enabled: {why}")),
                    }
                }
            }
            QUEUE_DESC_LOW => set_low(&mut q.desc_table),
            QUEUE_DESC_HIGH => set_high(&mut q.desc_table),
            QUEUE_AVAIL_LOW => set_low(&mut q.avail_ring),
            QUEUE_AVAIL_HIGH => set_high(&mut q.avail_ring),
            QUEUE_USED_LOW => set_low(&mut q.used_ring),
            QUEUE_USED_HIGH => set_high(&mut q.used_ring),
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        if !self.activated {
            // Linux's balloon kicks its statistics queue before DRIVER_OK: normal, and
            // the buffer is served at activation. Only a note for debugging.
            log_limited!(
                self.log,
                log::Level::Debug,
                "virtio-mmio (device type {}): queue {value} notified before activation (status {:#x}); served at DRIVER_OK",
                self.device.device_type(),
                self.status
            );
            return;
        }
        let index = super::usize_of(u64::from(value));
        match self.queues.get(index) {
            Some(q) if q.ready => self.device.process_queue(index),
            _ => self.bad(format_args!(
                "notify of queue {value}, which does not exist or is not enabled"
            )),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            self.bad(format_args!(
                "status {value:#x} clears bits of {:#x}; only a write of 0 (reset) may",
                self.status
            ));
            return;
        }
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_NEEDS_RESET
            | VIRTIO_CONFIG_S_FAILED;
        let mut value = value & known;
        let added = value & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let extra = self.driver_features & !offered;
            if extra != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.bad(format_args!(
                    "FEATURES_OK refused: driver features {:#x} (not offered: {extra:#x}; \
                     VIRTIO_F_VERSION_1 is required)",
                    self.driver_features
                ));
                value &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            self.bad(format_args!("DRIVER_OK without FEATURES_OK; ignored"));
            value &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = value;
        if value & added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let queues = self
            .queues
            .iter()
            .map(|q| q.ready.then(|| Queue::new(*q)))
            .collect();
        self.interrupt.set_driver_ok(true);
        match self
            .device
            .activate(self.driver_features, queues, Arc::clone(&self.ram))
        {
            Ok(()) => {
                self.activated = true;
                // Drivers may make buffers available before DRIVER_OK (Linux's balloon
                // queues its first statistics buffer then); serve them now.
                for index in 0..self.queues.len() {
                    if self.queues[index].ready {
                        self.device.process_queue(index);
                    }
                }
            }
            Err(e) => {
                let chain = error_chain(&e);
                self.bad(format_args!("{chain}; the device needs a reset"));
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_OFFSET {
            if data.len() > 8 {
                self.bad(format_args!(
                    "{}-byte configuration read at {offset:#x}",
                    data.len()
                ));
                data.fill(0);
                return;
            }
            self.device.read_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                self.bad(format_args!(
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
                self.bad(format_args!(
                    "{}-byte configuration write at {offset:#x}",
                    data.len()
                ));
                return;
            }
            self.device.write_config(offset - MMIO_CONFIG_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => {
                self.write_register(offset, u32::from_le_bytes(word));
            }
            _ => self.bad(format_args!(
                "{}-byte register write at {offset:#x}; registers are 4 bytes, aligned",
                data.len()
            )),
        }
    }
}

fn is_queue_reg(offset: u64) -> bool {
    matches!(
        offset,
        QUEUE_NUM
            | QUEUE_READY
            | QUEUE_DESC_LOW
            | QUEUE_DESC_HIGH
            | QUEUE_AVAIL_LOW
            | QUEUE_AVAIL_HIGH
            | QUEUE_USED_LOW
            | QUEUE_USED_HIGH
    )
}

fn low(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

fn high(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

/// "error: cause: cause" for a log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

mod persist;
#[cfg(test)]
mod tests;
