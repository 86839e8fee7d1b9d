//! Saving and restoring a virtio-mmio transport with its device.
//!
//! Payload (inside the frame of [`crate::persist`], magic [`VIRTIO_MMIO_MAGIC`]):
//!
//! ```text
//! device_type u32 | offered features u64 | queue count u32
//! status u32 | device_features_sel u32 | driver_features_sel u32 | driver_features u64
//! queue_sel u32
//! per queue: size u16 | max_size u16 | ready u8 | desc u64 | avail u64 | used u64
//! activated u8 | interrupt status u32 | config generation u32
//! the device's own state (VirtioDevice::save_device)
//! ```

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use super::MmioTransport;
use crate::persist::{PersistError, Reader, Writer, VIRTIO_MMIO_MAGIC};
use crate::virtio::queue::{Queue, QueueConfig};
use crate::virtio::{in_ram, RestoreContext, VirtioDevice, VIRTIO_F_VERSION_1};

/// The transport's registers as saved, decoded and checked.
struct TransportState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    activated: bool,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's state (status, feature selectors and accepted features, queue
    /// selector and configurations, whether the device runs, the interrupt status and
    /// configuration generation) and the device's own, in the versioned byte form of
    /// [`crate::persist`]. Take it with the vCPUs paused and the queue work stopped.
    pub fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        let mut w = Writer::new();
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
        self.device.save_device(&mut w)?;
        w.finish(VIRTIO_MMIO_MAGIC)
    }

    /// Restores a state from [`save_state`](Self::save_state) into this transport,
    /// whose device must be of the same type, offer the same features and have the
    /// same queues; its guest memory must hold the rings (the same RAM, or a copy of
    /// it). Everything is decoded and checked first: on an error nothing changed.
    ///
    /// A running device is activated as `DRIVER_OK` does it (queues built from the
    /// restored configurations, the device's `activate`), then its queues are moved to
    /// their saved ring positions. Unlike `DRIVER_OK`, no queue is processed and no
    /// interrupt is raised: the rings in guest memory are neither read nor written.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let mut r = Reader::unframe(VIRTIO_MMIO_MAGIC, "virtio-mmio", bytes)?;
        let state = self.decode_transport(&mut r)?;
        let device_state = self.device.decode_device(
            &mut r,
            &RestoreContext {
                activated: state.activated,
                acked_features: state.driver_features,
                queues: &state.queues,
                ram: &self.ram,
            },
        )?;
        r.end()?;

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
        self.device.restore_device(device_state);
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

    /// Reads the transport's part and checks it against this device and guest memory.
    fn decode_transport(&self, r: &mut Reader<'_>) -> Result<TransportState, PersistError> {
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
            // What QueueReady checks. A queue that is not ready holds whatever the
            // driver wrote; it is checked when the driver enables it.
            if q.ready {
                q.check(|addr, len| in_ram(&self.ram, addr, len))
                    .map_err(|why| PersistError::Queue { index, why })?;
            }
            queues.push(q);
        }
        let activated = r.flag("activated")?;
        let interrupt_status = r.u32("interrupt status")?;
        let config_generation = r.u32("configuration generation")?;

        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_NEEDS_RESET
            | VIRTIO_CONFIG_S_FAILED;
        if status & !known != 0 {
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
        Ok(TransportState {
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            queues,
            activated,
            interrupt_status,
            config_generation,
        })
    }
}
