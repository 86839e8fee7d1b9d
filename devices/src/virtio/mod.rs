//! Virtio devices (virtio 1.2, "modern" devices only) and their transports.
//!
//! - [`mmio`] has the virtio-mmio transport, [`MmioTransport`], a
//!   [`BusDevice`](crate::BusDevice) the VMM puts on its MMIO bus (x86_64);
//! - [`pci`] has the virtio PCI transport, [`PciTransport`], a PCI function whose
//!   configuration space and BAR the VMM's host bridge reaches (the sPAPR machine);
//! - both decode their registers into one state machine, `transport` (status, feature
//!   negotiation, queue configuration, activation, the saved form), so the checks the
//!   specification asks of a device are made once;
//! - [`queue`] has split virtqueues read and written through `GuestRam` (each access a
//!   copy under the read lock of the bytes it touches; see that module for why not
//!   virtio-queue);
//! - [`balloon`] has virtio-balloon.
//!
//! A device implements [`VirtioDevice`]; the transport owns it, negotiates features,
//! collects the queue configuration and hands the device its [`Queue`]s at `DRIVER_OK`.
//! Its interrupt line, [`VirtioInterrupt`], is an eventfd the VMM registers as an irqfd.
//! For snapshot and migration the transport saves and restores its registers with the
//! device's own state ([`MmioTransport::save_state`], [`PciTransport::save_state`],
//! [`VirtioDevice::save_device`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use rangevm_memory::{GuestRam, RegionInfo};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::persist::{PersistError, Reader, Writer};
use crate::LogLimiter;

pub mod balloon;
pub mod mmio;
pub mod pci;
pub mod queue;
#[cfg(test)]
pub(crate) mod test_utils;
mod transport;

pub use balloon::{Balloon, BalloonConfig, BalloonError, BalloonMetrics, BalloonStats};
pub use mmio::{MmioError, MmioTransport};
pub use pci::{PciError, PciIdentity, PciTransport};
pub use queue::{Chain, Descriptor, Popped, Queue, QueueConfig, QueueError};

/// Feature bit every device offers: a virtio 1.x device (no legacy interface).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Errors of the virtio module.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The interrupt eventfd could not be created.
    #[error("Cannot create the virtio interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device refused to start with what the driver set up.
    #[error("Cannot activate the virtio device")]
    Activate(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A device behind a virtio transport. Every method may be reached from guest
/// input and must not panic.
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 for a balloon).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers (the transport adds nothing: include
    /// `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// The maximum size of each queue the device may use, by queue index.
    fn queue_max_sizes(&self) -> &[u16];
    /// Receives the interrupt line once, when the transport is created.
    fn set_interrupt(&mut self, interrupt: Arc<VirtioInterrupt>);
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set `DRIVER_OK`: start with the features it accepted and the queues it
    /// enabled (`None` for a queue it left disabled), by queue index.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Option<Queue>>,
        ram: Arc<GuestRam>,
    ) -> Result<(), VirtioError>;
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// The driver reset the device: drop the queues and forget negotiated state.
    fn reset(&mut self);

    /// The device's own state, decoded and checked, ready to apply.
    type State: Send;
    /// Writes the device's own state (what the transport does not hold) for
    /// [`MmioTransport::save_state`]. Fails only for lists longer than
    /// [`decode_device`](Self::decode_device) accepts.
    fn save_device(&self, w: &mut Writer) -> Result<(), PersistError>;
    /// Reads what [`save_device`](Self::save_device) wrote and checks it against the
    /// transport state it comes with, without changing the device (every read checked,
    /// counts bounded before anything is allocated).
    fn decode_device(
        &self,
        r: &mut Reader<'_>,
        transport: &RestoreContext<'_>,
    ) -> Result<Self::State, PersistError>;
    /// Applies a decoded state. If the transport was active, it has just called
    /// [`activate`](Self::activate) with queues built from the restored configurations
    /// (at ring position 0); the device moves them to their saved positions. Must not
    /// read or write the rings, nor raise an interrupt.
    fn restore_device(&mut self, state: Self::State);
}

/// The transport's part of a state being restored, for the device to check its own
/// part against.
#[derive(Debug)]
pub struct RestoreContext<'a> {
    /// The driver had set `DRIVER_OK` and the device accepted it.
    pub activated: bool,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The queue configurations, by index.
    pub queues: &'a [QueueConfig],
    /// The guest memory the queues live in.
    pub ram: &'a GuestRam,
}

/// The interrupt line of one virtio device, shared by the transport and its device:
/// the interrupt status bits (virtio-mmio's `InterruptStatus`, virtio-pci's ISR), the
/// configuration generation, and the eventfd the VMM registers as an irqfd for the
/// device's interrupt.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    driver_ok: AtomicBool,
    eventfd: EventFd,
    log: LogLimiter,
}

impl VirtioInterrupt {
    /// A line with nothing pending; the eventfd is non-blocking and close-on-exec.
    pub fn new() -> Result<Self, VirtioError> {
        Ok(VirtioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            driver_ok: AtomicBool::new(false),
            eventfd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(VirtioError::EventFd)?,
            log: LogLimiter::default(),
        })
    }

    /// The eventfd to register as an irqfd (KVM_IRQFD) for the device's GSI.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Puts back saved `InterruptStatus` bits and `ConfigGeneration`, and whether the
    /// driver is running, without signalling the eventfd (the guest had the interrupt
    /// delivered already if it was pending).
    pub(crate) fn restore(&self, status: u32, config_generation: u32, driver_ok: bool) {
        self.driver_ok.store(driver_ok, Ordering::Release);
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
    }

    /// The driver acknowledged the bits `ack` (`InterruptACK`).
    pub(crate) fn ack(&self, ack: u32) {
        self.status.fetch_and(!ack, Ordering::AcqRel);
    }

    pub(crate) fn set_driver_ok(&self, ok: bool) {
        self.driver_ok.store(ok, Ordering::Release);
        if !ok {
            self.status.store(0, Ordering::Release);
        }
    }

    fn trigger(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(e) = self.eventfd.write(1) {
            crate::log_limited!(
                self.log,
                log::Level::Warn,
                "Cannot signal the virtio interrupt eventfd: {e}"
            );
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.trigger(VIRTIO_MMIO_INT_VRING);
    }

    /// The device changed its configuration space: the generation moves on, and the
    /// driver is interrupted if it is running (before `DRIVER_OK` it reads the
    /// configuration anyway).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        if self.driver_ok.load(Ordering::Acquire) {
            self.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }
}

/// u64 to usize for lengths that are bounded by a guest buffer or a small constant
/// (saturating; only 32-bit hosts could saturate, and then a length would be refused).
pub(crate) fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Whether `[addr, addr + len)` is all guest RAM (it may span adjacent regions).
pub(crate) fn in_ram(ram: &GuestRam, addr: u64, len: u64) -> bool {
    in_regions(&ram.regions(), addr, len)
}

/// Whether `[addr, addr + len)` lies in `regions` (sorted by address, as
/// `GuestRam::regions` gives them).
pub(crate) fn in_regions(regions: &[RegionInfo], addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    for r in regions {
        if at >= end {
            break;
        }
        if r.start <= at && at < r.end() {
            at = r.end();
        }
    }
    at >= end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_regions_spans_adjacent_regions_only() {
        let regions = [
            RegionInfo {
                start: 0,
                size: 0x1000,
            },
            RegionInfo {
                start: 0x1000,
                size: 0x1000,
            },
            RegionInfo {
                start: 0x4000,
                size: 0x1000,
            },
        ];
        assert!(in_regions(&regions, 0x800, 0x1000));
        assert!(in_regions(&regions, 0x4000, 0x1000));
        assert!(!in_regions(&regions, 0x1800, 0x1000), "into the gap");
        assert!(!in_regions(&regions, 0x4800, 0x1000), "past the end");
        assert!(!in_regions(&regions, u64::MAX, 2), "wraps");
        assert!(in_regions(&regions, 0x3000, 0), "empty");
    }

    #[test]
    fn interrupt_bits_and_generation() {
        let irq = VirtioInterrupt::new().unwrap();
        irq.signal_config_change();
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.status(), 0, "no config interrupt before DRIVER_OK");
        irq.set_driver_ok(true);
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.set_driver_ok(false);
        assert_eq!(irq.status(), 0);
    }
}
