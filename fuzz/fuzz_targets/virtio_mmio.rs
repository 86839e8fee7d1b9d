//! The virtio-mmio transport's register file against arbitrary accesses: any offset,
//! any width, any value, in any order, with the balloon behind it and the rings in
//! guest RAM filled from the input as well.
//!
//! Each operation: a kind byte (read, write, notify, RAM write), a 16-bit offset, a
//! width byte (0..=8 bytes), then the value bytes of a write.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use rangevm_devices::BusDevice;

fuzz_target!(|data: &[u8]| {
    let (mut t, ram) = common::device();
    if data.first().is_some_and(|b| b & 1 == 1) {
        common::handshake(&mut t);
    }
    let mut ops = data.get(1..).unwrap_or(&[]);
    while let Some((head, rest)) = ops.split_first_chunk::<4>() {
        ops = rest;
        let [kind, lo, hi, width] = *head;
        let offset = u64::from(u16::from_le_bytes([lo, hi]) & 0x1fff);
        let width = usize::from(width % 9);
        match kind % 4 {
            0 => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..width]);
            }
            1 => {
                let Some((value, rest)) = ops.split_at_checked(width) else {
                    break;
                };
                ops = rest;
                t.write(offset, value);
            }
            2 => common::write32(&mut t, 0x50, u32::from(lo % 5)),
            _ => {
                let Some((value, rest)) = ops.split_at_checked(width) else {
                    break;
                };
                ops = rest;
                let _ = ram.write(offset * 2, value);
            }
        }
    }
});
