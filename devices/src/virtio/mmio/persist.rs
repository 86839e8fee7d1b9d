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

use super::MmioTransport;
use crate::persist::{PersistError, Reader, Writer, VIRTIO_MMIO_MAGIC};
use crate::virtio::VirtioDevice;

impl<D: VirtioDevice> MmioTransport<D> {
    /// The transport's state (status, feature selectors and accepted features, queue
    /// selector and configurations, whether the device runs, the interrupt status and
    /// configuration generation) and the device's own, in the versioned byte form of
    /// [`crate::persist`]. Take it with the vCPUs paused and the queue work stopped.
    pub fn save_state(&self) -> Result<Vec<u8>, PersistError> {
        let mut w = Writer::new();
        self.core.save(&mut w)?;
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
        let state = self.core.decode(&mut r)?;
        r.end()?;
        self.core.apply(state)
    }
}
