//! The legacy devices of the x86_64 machine (arch-neutral code; the VMM's
//! `arch::layout` says where they go).
//!
//! | device | ports (x86_64) | what it does |
//! |---|---|---|
//! | [`Serial`] | 0x3f8..0x400, GSI 4 | 16550 UART: the guest console |
//! | [`I8042`] | 0x60..=0x64 | only the CPU reset line (0xfe on the command port) |
//! | [`AcpiPm`] | 0x600..0x604 | hardware-reduced ACPI sleep control, status, reset |
//! | [`PvPanic`] | 0x505 | QEMU's ISA pvpanic: the guest reports a panic |
//!
//! All registers are one byte wide. An access wider than one byte handles its first
//! byte only (reads fill the others with 0xff, as unclaimed ports do) and is logged,
//! rate-limited.

pub mod acpi_pm;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::{AcpiPm, AcpiPmError};
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::{EventFdTrigger, Serial, SerialCounters, SerialError, SerialMetrics};

use crate::LogLimiter;

/// The byte register `offset` names, if the device has `count` of them.
fn register(offset: u64, count: u8) -> Option<u8> {
    u8::try_from(offset).ok().filter(|&r| r < count)
}

/// Notes a read or write of more than one byte (or of none); the caller handles the
/// first byte only. For reads, the bytes after the first become 0xff.
fn check_width(device: &str, offset: u64, data_len: usize, limiter: &LogLimiter) {
    if data_len != 1 {
        crate::log_limited!(
            limiter,
            log::Level::Debug,
            "{device}: {data_len}-byte access at offset {offset}; only the first byte is handled"
        );
    }
}

/// Answers a byte-register read: `value` in the first byte, 0xff in any others.
fn answer(data: &mut [u8], value: u8) {
    if let Some((first, rest)) = data.split_first_mut() {
        *first = value;
        rest.fill(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_answers() {
        assert_eq!(register(0, 8), Some(0));
        assert_eq!(register(7, 8), Some(7));
        assert_eq!(register(8, 8), None);
        assert_eq!(register(0x1_0000_0000, 8), None);

        let mut wide = [0u8; 4];
        answer(&mut wide, 0x3);
        assert_eq!(wide, [0x3, 0xff, 0xff, 0xff]);
        let mut none: [u8; 0] = [];
        answer(&mut none, 0x3);
        check_width("test", 0, 0, &LogLimiter::default());
    }
}
