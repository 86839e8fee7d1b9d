//! The virtio PCI transport against arbitrary configuration cycles and BAR accesses:
//! any offset, any width, any value, in any order (BAR sizing, the command register,
//! the configuration-access window), with the balloon behind it and the rings in guest
//! RAM filled from the input as well.
//!
//! Each operation: a kind byte (config read, config write, BAR read, BAR write, RAM
//! write), a 16-bit offset, a width byte (0..=8 bytes), then the value bytes of a write.
//! The first byte picks whether a driver handshake runs first.

#![no_main]

mod common;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rangevm_devices::{Balloon, BalloonConfig, PciTransport};
use rangevm_memory::{GuestRam, LockMode};

/// The next `width` bytes of `ops`, consumed.
fn take<'a>(ops: &mut &'a [u8], width: usize) -> Option<&'a [u8]> {
    let (value, rest) = ops.split_at_checked(width)?;
    *ops = rest;
    Some(value)
}

fn write(t: &mut PciTransport<Balloon>, offset: u64, len: usize, value: u64) {
    t.bar_write(offset, &value.to_le_bytes()[..len]);
}

/// What Linux's virtio_pci_modern does up to DRIVER_OK, with the rings where the
/// virtio-mmio target puts them.
fn handshake(t: &mut PciTransport<Balloon>) {
    write(t, 0x14, 1, 0);
    write(t, 0x14, 1, 1);
    write(t, 0x14, 1, 3);
    for sel in 0..2u64 {
        write(t, 0x00, 4, sel);
        let mut f = [0u8; 4];
        t.bar_read(0x04, &mut f);
        write(t, 0x08, 4, sel);
        write(t, 0x0c, 4, u64::from(u32::from_le_bytes(f)));
    }
    write(t, 0x14, 1, 0xb);
    for q in 0..4u64 {
        let base = common::queue_base(u32::try_from(q).unwrap_or(0));
        write(t, 0x16, 2, q);
        write(t, 0x18, 2, u64::from(common::QUEUE_SIZE));
        for (field, addr) in [(0x20, base), (0x28, base + 0x400), (0x30, base + 0x800)] {
            write(t, field, 8, addr);
        }
        write(t, 0x1c, 2, 1);
    }
    write(t, 0x14, 1, 0xf);
}

fuzz_target!(|data: &[u8]| {
    let ram = Arc::new(
        GuestRam::new(LockMode::Range, &[(0, common::RAM_SIZE)]).expect("guest RAM"),
    );
    let balloon = Balloon::new(BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        free_page_reporting: true,
    });
    let mut t = PciTransport::new(balloon, Arc::clone(&ram)).expect("transport");
    t.assign_bar(0x8000_0000);
    if data.first().is_some_and(|b| b & 1 == 1) {
        handshake(&mut t);
    }
    let mut ops = data.get(1..).unwrap_or(&[]);
    while let Some((head, rest)) = ops.split_first_chunk::<4>() {
        ops = rest;
        let [kind, lo, hi, width] = *head;
        let offset = u16::from_le_bytes([lo, hi]);
        let width = usize::from(width % 9);
        let mut buf = [0u8; 8];
        match kind % 5 {
            0 => t.config_read(usize::from(offset & 0x1ff), &mut buf[..width]),
            1 => match take(&mut ops, width) {
                Some(v) => t.config_write(usize::from(offset & 0x1ff), v),
                None => break,
            },
            2 => t.bar_read(u64::from(offset & 0x7fff), &mut buf[..width]),
            3 => match take(&mut ops, width) {
                Some(v) => t.bar_write(u64::from(offset & 0x7fff), v),
                None => break,
            },
            _ => match take(&mut ops, width) {
                Some(v) => {
                    let _ = ram.write(u64::from(offset) * 2, v);
                }
                None => break,
            },
        }
    }
    // Whatever happened, the function still identifies itself.
    let mut id = [0u8; 2];
    t.config_read(0, &mut id);
    assert_eq!(u16::from_le_bytes(id), 0x1af4);
});
