//! What every virtio transport keeps for its device, whatever the register layout:
//! the device status and its state machine, the feature selectors and the accepted
//! features, the queue selector and queue configurations, and whether the device runs.
//!
//! [`MmioTransport`](super::MmioTransport) and [`PciTransport`](super::PciTransport)
//! decode their registers and call into a [`Transport`]; the checks the specification
//! asks of a device (features it did not offer, `DRIVER_OK` without `FEATURES_OK`, a
//! status write that clears bits, queue registers written while the queue is live,
//! rings outside RAM) are made here once, logged rate-limited and refused, never a panic.
//!
//! The saved form of this part is the same for both transports (see
//! [`Transport::save`]); each transport frames it with a magic of its own and adds its
//! own registers.

use std::fmt;
use std::sync::Arc;

use rangevm_memory::GuestRam;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use super::queue::{Queue, QueueConfig};
use super::{in_ram, RestoreContext, VirtioDevice, VirtioError, VirtioInterrupt};
use super::{usize_of, VIRTIO_F_VERSION_1};
use crate::persist::{PersistError, Reader, Writer};
use crate::{log_limited, LogLimiter};

/// The status bits a driver may set.
const KNOWN_STATUS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED;

/// A 32-bit queue configuration register, the same in both layouts (64-bit addresses
/// are written as two halves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueField {
    Size,
    Ready,
    DescLow,
    DescHigh,
    AvailLow,
    AvailHigh,
    UsedLow,
    UsedHigh,
}

/// The transport-independent state around one device. See the module documentation.
pub(crate) struct Transport<D: VirtioDevice> {
    pub(crate) device: D,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) interrupt: Arc<VirtioInterrupt>,
    pub(crate) status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) queues: Vec<QueueConfig>,
    pub(crate) activated: bool,
    /// "virtio-mmio" or "virtio-pci", for log lines.
    kind: &'static str,
    pub(crate) log: LogLimiter,
}

impl<D: VirtioDevice> fmt::Debug for Transport<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(self.kind)
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> Transport<D> {
    /// The state for `device`, whose queues live in `ram`; hands the device its
    /// interrupt line.
    pub(crate) fn new(
        mut device: D,
        ram: Arc<GuestRam>,
        kind: &'static str,
    ) -> Result<Self, VirtioError> {
        let interrupt = Arc::new(VirtioInterrupt::new()?);
        device.set_interrupt(Arc::clone(&interrupt));
        let queues = fresh_queues(&device);
        Ok(Transport {
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
            kind,
            log: LogLimiter::default(),
        })
    }

    /// Logs (rate-limited) something the driver did wrong.
    pub(crate) fn bad(&self, what: fmt::Arguments<'_>) {
        log_limited!(
            self.log,
            log::Level::Warn,
            "{} (device type {}): {what}",
            self.kind,
            self.device.device_type()
        );
    }

    /// A reset: the device forgets its queues and negotiated state.
    pub(crate) fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = fresh_queues(&self.device);
        self.activated = false;
        self.interrupt.set_driver_ok(false);
    }

    /// The offered features, the 32 bits the device features selector picks.
    pub(crate) fn device_features_word(&self) -> u32 {
        word(self.device.features(), self.device_features_sel)
    }

    /// The accepted features, the 32 bits the driver features selector picks.
    pub(crate) fn driver_features_word(&self) -> u32 {
        word(self.driver_features, self.driver_features_sel)
    }

    /// A write to the driver features register (the bank the selector picks).
    pub(crate) fn write_driver_features(&mut self, value: u32) {
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

    /// The queue the queue selector picks, if it exists.
    pub(crate) fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize_of(u64::from(self.queue_sel)))
    }

    /// A write to one of the selected queue's configuration registers. Refused after
    /// `DRIVER_OK`, and while the queue is ready (except disabling it); enabling it
    /// checks the size and the rings.
    pub(crate) fn write_queue(&mut self, field: QueueField, value: u32) {
        let sel = self.queue_sel;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.bad(format_args!(
                "queue {sel} {field:?} written after DRIVER_OK; ignored"
            ));
            return;
        }
        let ram = Arc::clone(&self.ram);
        let Some(q) = self.queues.get_mut(usize_of(u64::from(sel))) else {
            self.bad(format_args!(
                "{field:?} written for queue {sel}, which does not exist"
            ));
            return;
        };
        if q.ready && !(field == QueueField::Ready && value == 0) {
            self.bad(format_args!(
                "queue {sel} {field:?} written while the queue is ready; ignored"
            ));
            return;
        }
        let set_low = |a: &mut u64| *a = (*a & !0xffff_ffff) | u64::from(value);
        let set_high = |a: &mut u64| *a = (*a & 0xffff_ffff) | (u64::from(value) << 32);
        match field {
            // Stored as 0 if it does not fit, so that enabling the queue refuses it.
            QueueField::Size => q.size = u16::try_from(value).unwrap_or(0),
            QueueField::Ready if value == 0 => q.ready = false,
            QueueField::Ready => match q.check(|addr, len| in_ram(&ram, addr, len)) {
                Ok(()) => q.ready = true,
                Err(why) => self.bad(format_args!("queue {sel} not enabled: {why}")),
            },
            QueueField::DescLow => set_low(&mut q.desc_table),
            QueueField::DescHigh => set_high(&mut q.desc_table),
            QueueField::AvailLow => set_low(&mut q.avail_ring),
            QueueField::AvailHigh => set_high(&mut q.avail_ring),
            QueueField::UsedLow => set_low(&mut q.used_ring),
            QueueField::UsedHigh => set_high(&mut q.used_ring),
        }
    }

    /// The driver notified queue `value`.
    pub(crate) fn notify(&mut self, value: u32) {
        if !self.activated {
            // Linux's balloon kicks its statistics queue before DRIVER_OK: normal, and
            // the buffer is served at activation. Only a note for debugging.
            log_limited!(
                self.log,
                log::Level::Debug,
                "{} (device type {}): queue {value} notified before activation (status {:#x}); served at DRIVER_OK",
                self.kind,
                self.device.device_type(),
                self.status
            );
            return;
        }
        let index = usize_of(u64::from(value));
        match self.queues.get(index) {
            Some(q) if q.ready => self.device.process_queue(index),
            _ => self.bad(format_args!(
                "notify of queue {value}, which does not exist or is not enabled"
            )),
        }
    }

    /// A write to the device status: 0 resets; otherwise bits may only be added, and
    /// `FEATURES_OK` and `DRIVER_OK` are kept only if the setup allows them.
    pub(crate) fn write_status(&mut self, value: u32) {
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
        let mut value = value & KNOWN_STATUS;
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

fn fresh_queues<D: VirtioDevice>(device: &D) -> Vec<QueueConfig> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| QueueConfig::new(max))
        .collect()
}

/// Bank `sel` (0: bits 0-31, 1: bits 32-63) of a feature set; other banks are 0.
fn word(features: u64, sel: u32) -> u32 {
    match sel {
        0 => u32::try_from(features & 0xffff_ffff).unwrap_or(0),
        1 => u32::try_from(features >> 32).unwrap_or(0),
        _ => 0,
    }
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

/// The transport's part of a saved state, decoded and checked, with the device's.
pub(crate) struct Decoded<S> {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    activated: bool,
    interrupt_status: u32,
    config_generation: u32,
    device: S,
}

impl<D: VirtioDevice> Transport<D> {
    /// Writes this part of the state, then the device's own:
    ///
    /// ```text
    /// device_type u32 | offered features u64 | queue count u32
    /// status u32 | device_features_sel u32 | driver_features_sel u32 | driver_features u64
    /// queue_sel u32
    /// per queue: size u16 | max_size u16 | ready u8 | desc u64 | avail u64 | used u64
    /// activated u8 | interrupt status u32 | config generation u32
    /// the device's own state (VirtioDevice::save_device)
    /// ```
    pub(crate) fn save(&self, w: &mut Writer) -> Result<(), PersistError> {
        w.u32(self.device.device_type());
        w.u64(self.device.features());
        let max = self.device.queue_max_sizes().len();
        w.count("queues", self.queues.len(), max)?;
        w.u32(self.status);
        w.u32(self.device_features_sel);
        w.u32(self.driver_features_sel);
        w.u64(self.driver_features);
        w.u32(self.queue_sel);
        for q in &self.queues {
            w.u16(q.size);
            w.u16(q.max_size);
            w.flag(q.ready);
            w.u64(q.desc_table);
            w.u64(q.avail_ring);
            w.u64(q.used_ring);
        }
        w.flag(self.activated);
        w.u32(self.interrupt.status());
        w.u32(self.interrupt.config_generation());
        self.device.save_device(w)
    }

    /// Reads what [`save`](Self::save) wrote and checks it against this device and
    /// guest memory, changing nothing.
    pub(crate) fn decode(&self, r: &mut Reader<'_>) -> Result<Decoded<D::State>, PersistError> {
        let expect = |what, found: u64, expected: u64| {
            if found == expected {
                Ok(())
            } else {
                Err(PersistError::Mismatch {
                    what,
                    found,
                    expected,
                })
            }
        };
        expect(
            "device type",
            u64::from(r.u32("device type")?),
            u64::from(self.device.device_type()),
        )?;
        let offered = self.device.features();
        expect("offered features", r.u64("offered features")?, offered)?;
        let max_sizes = self.device.queue_max_sizes();
        let count = r.u32("queue count")?;
        let want = max_sizes.len();
        if usize::try_from(count).ok() != Some(want) {
            return Err(PersistError::Mismatch {
                what: "queue count",
                found: u64::from(count),
                expected: u64::try_from(want).unwrap_or(u64::MAX),
            });
        }
        let status = r.u32("status")?;
        let device_features_sel = r.u32("device features selector")?;
        let driver_features_sel = r.u32("driver features selector")?;
        let driver_features = r.u64("driver features")?;
        let queue_sel = r.u32("queue selector")?;
        // The device's own count: not a length taken from the input.
        let mut queues = Vec::with_capacity(want);
        for (index, &max) in max_sizes.iter().enumerate() {
            let q = QueueConfig {
                size: r.u16("queue size")?,
                max_size: r.u16("queue maximum size")?,
                ready: r.flag("queue ready")?,
                desc_table: r.u64("descriptor table address")?,
                avail_ring: r.u64("available ring address")?,
                used_ring: r.u64("used ring address")?,
            };
            if q.max_size != max {
                return Err(PersistError::Mismatch {
                    what: "queue maximum size",
                    found: u64::from(q.max_size),
                    expected: u64::from(max),
                });
            }
            // What enabling the queue checks. A queue that is not ready holds whatever
            // the driver wrote; it is checked when the driver enables it.
            if q.ready {
                q.check(|addr, len| in_ram(&self.ram, addr, len))
                    .map_err(|why| PersistError::Queue { index, why })?;
            }
            queues.push(q);
        }
        let activated = r.flag("activated")?;
        let interrupt_status = r.u32("interrupt status")?;
        let config_generation = r.u32("configuration generation")?;

        if status & !KNOWN_STATUS != 0 {
            return Err(PersistError::Invalid("status"));
        }
        let features_ok = status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        let driver_ok = status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let needs_reset = status & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
        if features_ok
            && (driver_features & !offered != 0 || driver_features & (1 << VIRTIO_F_VERSION_1) == 0)
        {
            return Err(PersistError::Invalid("accepted features"));
        }
        if driver_ok && !features_ok {
            return Err(PersistError::Invalid("status"));
        }
        // The device runs only after DRIVER_OK, and after DRIVER_OK unless the
        // activation was refused, which sets NEEDS_RESET.
        if (activated && !driver_ok) || (driver_ok && !needs_reset && !activated) {
            return Err(PersistError::Invalid("activation state"));
        }
        if interrupt_status & !(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG) != 0 {
            return Err(PersistError::Invalid("interrupt status"));
        }
        let device = self.device.decode_device(
            r,
            &RestoreContext {
                activated,
                acked_features: driver_features,
                queues: &queues,
                ram: &self.ram,
            },
        )?;
        Ok(Decoded {
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            queues,
            activated,
            interrupt_status,
            config_generation,
            device,
        })
    }

    /// Applies a decoded state. A running device is activated as `DRIVER_OK` does it
    /// (queues built from the restored configurations, the device's `activate`), then
    /// its queues are moved to their saved ring positions. Unlike `DRIVER_OK`, no queue
    /// is processed and no interrupt is raised: the rings are neither read nor written.
    /// Fails (having changed nothing) only if the device refuses the activation.
    pub(crate) fn apply(&mut self, state: Decoded<D::State>) -> Result<(), PersistError> {
        if state.activated {
            let queues = state
                .queues
                .iter()
                .map(|q| q.ready.then(|| Queue::new(*q)))
                .collect();
            self.device
                .activate(state.driver_features, queues, Arc::clone(&self.ram))
                .map_err(PersistError::Activate)?;
        }
        self.device.restore_device(state.device);
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = state.queues;
        self.activated = state.activated;
        self.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0,
        );
        Ok(())
    }
}
