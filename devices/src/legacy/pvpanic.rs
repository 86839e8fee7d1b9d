//! QEMU's ISA pvpanic device (ACPI `QEMU0001`): one port through which the guest
//! kernel reports that it panicked.
//!
//! Reads give the events the device supports, PANICKED | CRASH_LOADED (0x3); Linux's
//! driver only sends those. A write with PANICKED (bit 0) is a
//! [`GuestRequest::Panic`]; CRASH_LOADED (bit 1: a crash kernel took over) is only
//! logged, since the guest goes on running it.

use std::sync::Arc;

use super::{answer, check_width};
use crate::bus::BusDevice;
use crate::{log_limited, GuestRequest, GuestRequests, LogLimiter};

/// Ports pvpanic takes.
pub const PVPANIC_LEN: u64 = 1;
/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel (kdump) after a panic.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What a read of the port returns.
pub const PVPANIC_CAPABILITIES: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic device. Goes on the port bus at its port, 1 port long.
#[derive(Debug)]
pub struct PvPanic {
    requests: Arc<GuestRequests>,
    log: LogLimiter,
}

impl PvPanic {
    /// A pvpanic whose panic event becomes a [`GuestRequest::Panic`] on `requests`.
    pub fn new(requests: Arc<GuestRequests>) -> Self {
        PvPanic {
            requests,
            log: LogLimiter::default(),
        }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        check_width("pvpanic", offset, data.len(), &self.log);
        answer(
            data,
            if offset == 0 {
                PVPANIC_CAPABILITIES
            } else {
                0xff
            },
        );
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        check_width("pvpanic", offset, data.len(), &self.log);
        let (0, Some(&value)) = (offset, data.first()) else {
            return;
        };
        if value & PVPANIC_CRASH_LOADED != 0 {
            log_limited!(
                self.log,
                log::Level::Warn,
                "pvpanic: the guest panicked and loaded a crash kernel"
            );
        }
        if value & !PVPANIC_CAPABILITIES != 0 {
            log_limited!(
                self.log,
                log::Level::Debug,
                "pvpanic: unsupported event bits {value:#04x} ignored"
            );
        }
        if value & PVPANIC_PANICKED != 0 {
            self.requests.request(GuestRequest::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvpanic() -> (PvPanic, Arc<GuestRequests>) {
        let requests = Arc::new(GuestRequests::new().unwrap());
        (PvPanic::new(requests.clone()), requests)
    }

    #[test]
    fn reads_the_capabilities() {
        let (mut dev, _) = pvpanic();
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b, [0x3]);
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0x3, 0xff]);
    }

    #[test]
    fn panicked_bit_panics() {
        let (mut dev, requests) = pvpanic();
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(requests.first(), Some(GuestRequest::Panic));
        assert_eq!(requests.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn crash_loaded_alone_does_not() {
        let (mut dev, requests) = pvpanic();
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(0, &[0x4]);
        dev.write(1, &[PVPANIC_PANICKED]);
        dev.write(0, &[]);
        assert_eq!(requests.first(), None);
    }
}
