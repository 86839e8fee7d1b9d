//! The balloon's queue parsers against arbitrary guest rings and buffers.
//!
//! The input's first 16 KiB (or all of it, if shorter) is copied into guest RAM at 0,
//! where the four queues' rings live; the rest is a stream of operations: notify a
//! queue, ask for statistics, set a target, patch a 16-bit ring word, reset and start
//! again.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mut t, ram) = common::device();
    common::handshake(&mut t);
    let (image, mut ops) = data.split_at(data.len().min(16 << 10));
    let _ = ram.write(0, image);
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 8 {
            0..=3 => common::write32(&mut t, 0x50, u32::from(op % 4)),
            4 => {
                let _ = t.device_mut().request_stats();
            }
            5 => {
                let Some((b, rest)) = ops.split_first_chunk::<4>() else {
                    break;
                };
                ops = rest;
                t.device_mut().set_target_pages(u32::from_le_bytes(*b));
            }
            6 => {
                let Some((b, rest)) = ops.split_first_chunk::<4>() else {
                    break;
                };
                ops = rest;
                let addr = u64::from(u16::from_le_bytes([b[0], b[1]]) & 0x3ffe);
                let _ = ram.write(addr, &b[2..]);
            }
            _ => common::handshake(&mut t),
        }
    }
    // Whatever happened, the device still answers.
    let _ = t.device().stats();
    let _ = t.device().actual_pages();
});
