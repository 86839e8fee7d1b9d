//! The i8042 keyboard controller, reduced to what a VMM needs: the CPU reset line.
//!
//! vm-superio's [`vm_superio::I8042Device`] does the register work: every read gives 0
//! (no keyboard, nothing to read) and a write of 0xfe (pulse the reset line) to the
//! command port, offset 4, fires its trigger, which here becomes
//! [`GuestRequest::Reset`]. Other commands are ignored.

use std::convert::Infallible;
use std::sync::Arc;

use vm_superio::Trigger;

use super::{answer, check_width, register};
use crate::bus::BusDevice;
use crate::{log_limited, GuestRequest, GuestRequests, LogLimiter};

/// Ports the i8042 takes: data at +0, command/status at +4.
pub const I8042_PORT_LEN: u64 = 5;
/// The command port's offset.
const COMMAND: u64 = 4;

/// The reset line: turns vm-superio's trigger into a guest request.
#[derive(Debug)]
struct ResetLine(Arc<GuestRequests>);

impl Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.request(GuestRequest::Reset);
        Ok(())
    }
}

/// The i8042 controller. Goes on the port bus at its data port, 5 ports long.
#[derive(Debug)]
pub struct I8042 {
    device: vm_superio::I8042Device<ResetLine>,
    access_log: LogLimiter,
    command_log: LogLimiter,
}

impl I8042 {
    /// An i8042 whose reset command becomes a [`GuestRequest::Reset`] on `requests`.
    pub fn new(requests: Arc<GuestRequests>) -> Self {
        I8042 {
            device: vm_superio::I8042Device::new(ResetLine(requests)),
            access_log: LogLimiter::default(),
            command_log: LogLimiter::default(),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        check_width("i8042", offset, data.len(), &self.access_log);
        let value = match register(offset, 5) {
            Some(reg) => self.device.read(reg),
            None => 0xff,
        };
        answer(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        check_width("i8042", offset, data.len(), &self.access_log);
        let (Some(reg), Some(&value)) = (register(offset, 5), data.first()) else {
            return;
        };
        if offset == COMMAND && value != 0xfe {
            log_limited!(
                self.command_log,
                log::Level::Debug,
                "i8042: command {value:#04x} ignored"
            );
        }
        let Ok(()) = self.device.write(reg, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> (I8042, Arc<GuestRequests>) {
        let requests = Arc::new(GuestRequests::new().unwrap());
        (I8042::new(requests.clone()), requests)
    }

    #[test]
    fn reset_command_requests_a_reset() {
        let (mut dev, requests) = i8042();
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(requests.first(), Some(GuestRequest::Reset));
        assert_eq!(requests.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not() {
        let (mut dev, requests) = i8042();
        dev.write(COMMAND, &[0xfd]);
        dev.write(COMMAND, &[0xd1]);
        dev.write(0, &[0xfe]);
        dev.write(5, &[0xfe]);
        dev.write(COMMAND, &[]);
        assert_eq!(requests.first(), None);
    }

    #[test]
    fn reads_are_zero() {
        let (mut dev, _) = i8042();
        let mut b = [0xaau8];
        dev.read(COMMAND, &mut b);
        assert_eq!(b, [0]);
        let mut wide = [0xaau8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0, 0xff]);
    }
}
