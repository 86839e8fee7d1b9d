//! What the targets share: a small guest, a balloon behind the virtio-mmio transport,
//! and a driver handshake that lays its four queues out at fixed addresses.

#![allow(dead_code)] // Each target uses its own subset.

use std::sync::Arc;

use rangevm_devices::{Balloon, BalloonConfig, BusDevice, MmioTransport};
use rangevm_memory::{GuestRam, LockMode};

/// Guest RAM: 1 MiB at 0.
pub const RAM_SIZE: u64 = 1 << 20;
/// Queue size the driver programs.
pub const QUEUE_SIZE: u16 = 16;
/// Queue `q`: descriptor table at `q * 0x1000`, available ring at `+0x400`, used ring
/// at `+0x800`. The fuzz input is copied to guest RAM from 0, so it writes the rings.
pub fn queue_base(q: u32) -> u64 {
    u64::from(q) * 0x1000
}

pub type Device = MmioTransport<Balloon>;

pub fn device() -> (Device, Arc<GuestRam>) {
    let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, RAM_SIZE)]).expect("guest RAM"));
    let balloon = Balloon::new(BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        free_page_reporting: true,
    });
    let t = MmioTransport::new(balloon, Arc::clone(&ram)).expect("transport");
    (t, ram)
}

pub fn write32(t: &mut Device, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// ACKNOWLEDGE, DRIVER, all offered features, FEATURES_OK, four queues, DRIVER_OK.
pub fn handshake(t: &mut Device) {
    write32(t, 0x70, 0);
    write32(t, 0x70, 1);
    write32(t, 0x70, 3);
    for sel in 0..2u32 {
        write32(t, 0x14, sel);
        let mut f = [0u8; 4];
        t.read(0x10, &mut f);
        write32(t, 0x24, sel);
        write32(t, 0x20, u32::from_le_bytes(f));
    }
    write32(t, 0x70, 0xb);
    for q in 0..4u32 {
        let base = queue_base(q);
        write32(t, 0x30, q);
        write32(t, 0x38, u32::from(QUEUE_SIZE));
        for (reg, addr) in [(0x80, base), (0x90, base + 0x400), (0xa0, base + 0x800)] {
            write32(t, reg, u32::try_from(addr).unwrap_or(0));
            write32(t, reg + 4, 0);
        }
        write32(t, 0x44, 1);
    }
    write32(t, 0x70, 0xf);
}
