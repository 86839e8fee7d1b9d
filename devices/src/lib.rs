//! Devices for rangevm (legacy serial/reset, virtio-mmio balloon): coming with the boot and balloon issues.
