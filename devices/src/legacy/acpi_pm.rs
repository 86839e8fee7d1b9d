//! The power-management block of hardware-reduced ACPI: the sleep control, sleep
//! status and reset registers the FADT points at (ACPI 6.5, sections 4.8.3.7 and
//! 4.8.3.6).
//!
//! | offset | register | here |
//! |---|---|---|
//! | +0 | sleep control: SLP_EN (bit 5), SLP_TYP (bits 2..=4) | SLP_EN with the S5 type: [`GuestRequest::PowerOff`]; other types logged and ignored |
//! | +1 | sleep status: WAK_STS (bit 7) | 0, or WAK_STS after an ignored sleep request; writing WAK_STS clears it |
//! | +2 | reset register | the reset value: [`GuestRequest::Reset`] |
//! | +3 | (none) | reads 0, writes ignored |
//!
//! Sleep status: after writing SLP_EN, Linux spins reading the status register until
//! WAK_STS is set. A sleep state this machine does not have therefore "wakes up" at once
//! (WAK_STS set) instead of hanging the guest. After a power off the VMM stops the
//! guest, so there it stays 0.

use std::sync::Arc;

use super::{answer, check_width, register};
use crate::bus::BusDevice;
use crate::{log_limited, GuestRequest, GuestRequests, LogLimiter};

/// Ports the block takes.
pub const ACPI_PM_LEN: u64 = 4;
/// Sleep control register offset.
pub const SLEEP_CONTROL: u64 = 0;
/// Sleep status register offset.
pub const SLEEP_STATUS: u64 = 1;
/// Reset register offset.
pub const RESET: u64 = 2;
/// SLP_EN: start the transition to the sleep state in SLP_TYP.
pub const SLP_EN: u8 = 0x20;
/// SLP_TYP's position in the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// SLP_TYP's width, as a mask after shifting.
pub const SLP_TYP_MASK: u8 = 0x7;
/// WAK_STS in the sleep status register.
pub const WAK_STS: u8 = 0x80;

/// Errors of [`AcpiPm::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcpiPmError {
    /// The S5 sleep type does not fit SLP_TYP.
    #[error("The S5 sleep type {0} does not fit the 3-bit SLP_TYP field")]
    SleepType(u8),
}

/// The ACPI power-management block. Goes on the port bus at its base, 4 ports long.
#[derive(Debug)]
pub struct AcpiPm {
    requests: Arc<GuestRequests>,
    s5_sleep_type: u8,
    reset_value: u8,
    wake_status: bool,
    log: LogLimiter,
}

impl AcpiPm {
    /// A block that powers off on SLP_EN with SLP_TYP = `s5_sleep_type` (the DSDT's
    /// `_S5_` package) and resets on a write of `reset_value` (the FADT's
    /// `RESET_VALUE`).
    pub fn new(
        requests: Arc<GuestRequests>,
        s5_sleep_type: u8,
        reset_value: u8,
    ) -> Result<Self, AcpiPmError> {
        if s5_sleep_type > SLP_TYP_MASK {
            return Err(AcpiPmError::SleepType(s5_sleep_type));
        }
        Ok(AcpiPm {
            requests,
            s5_sleep_type,
            reset_value,
            wake_status: false,
            log: LogLimiter::default(),
        })
    }

    fn sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            // Setting SLP_TYP up without SLP_EN does nothing yet.
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == self.s5_sleep_type {
            self.requests.request(GuestRequest::PowerOff);
        } else {
            log_limited!(
                self.log,
                log::Level::Info,
                "ACPI: sleep type {sleep_type} is not supported; the guest wakes up at once"
            );
            self.wake_status = true;
        }
    }

    fn reset(&mut self, value: u8) {
        if value == self.reset_value {
            self.requests.request(GuestRequest::Reset);
        } else {
            log_limited!(
                self.log,
                log::Level::Debug,
                "ACPI: reset register write {value:#04x} ignored"
            );
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        check_width("ACPI PM", offset, data.len(), &self.log);
        let value = match offset {
            SLEEP_STATUS if self.wake_status => WAK_STS,
            _ if offset < ACPI_PM_LEN => 0,
            _ => 0xff,
        };
        answer(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        check_width("ACPI PM", offset, data.len(), &self.log);
        let Some(&value) = data.first() else {
            return;
        };
        match register(offset, 3).map(u64::from) {
            Some(SLEEP_CONTROL) => self.sleep_control(value),
            // Write 1 to clear.
            Some(SLEEP_STATUS) if value & WAK_STS != 0 => self.wake_status = false,
            Some(RESET) => self.reset(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S5: u8 = 5;

    fn pm() -> (AcpiPm, Arc<GuestRequests>) {
        let requests = Arc::new(GuestRequests::new().unwrap());
        (AcpiPm::new(requests.clone(), S5, 0x01).unwrap(), requests)
    }

    fn read(dev: &mut AcpiPm, offset: u64) -> u8 {
        let mut b = [0xaau8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn s5_powers_off() {
        let (mut dev, requests) = pm();
        dev.write(SLEEP_CONTROL, &[0x34]);
        assert_eq!(requests.first(), Some(GuestRequest::PowerOff));
        assert_eq!(requests.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_sleep_types_do_not_and_wake_at_once() {
        let (mut dev, requests) = pm();
        // SLP_TYP = 5 without SLP_EN: nothing yet.
        dev.write(SLEEP_CONTROL, &[S5 << SLP_TYP_SHIFT]);
        assert_eq!(requests.first(), None);
        assert_eq!(read(&mut dev, SLEEP_STATUS), 0);
        // S3.
        dev.write(SLEEP_CONTROL, &[SLP_EN | (3 << SLP_TYP_SHIFT)]);
        assert_eq!(requests.first(), None);
        assert_eq!(read(&mut dev, SLEEP_STATUS), WAK_STS);
        dev.write(SLEEP_STATUS, &[WAK_STS]);
        assert_eq!(read(&mut dev, SLEEP_STATUS), 0);
    }

    #[test]
    fn reset_register_resets() {
        let (mut dev, requests) = pm();
        dev.write(RESET, &[0x02]);
        assert_eq!(requests.first(), None);
        dev.write(RESET, &[0x01]);
        assert_eq!(requests.first(), Some(GuestRequest::Reset));
    }

    #[test]
    fn reads_and_stray_writes() {
        let (mut dev, requests) = pm();
        for offset in 0..ACPI_PM_LEN {
            assert_eq!(read(&mut dev, offset), 0);
        }
        assert_eq!(read(&mut dev, ACPI_PM_LEN), 0xff);
        dev.write(3, &[0x34]);
        dev.write(4, &[0x01]);
        dev.write(SLEEP_CONTROL, &[]);
        assert_eq!(requests.first(), None);
        // A wide write handles its first byte.
        dev.write(SLEEP_CONTROL, &[0x34, 0x00]);
        assert_eq!(requests.first(), Some(GuestRequest::PowerOff));
    }

    #[test]
    fn sleep_type_must_fit() {
        let requests = Arc::new(GuestRequests::new().unwrap());
        assert_eq!(
            AcpiPm::new(requests, 8, 1).unwrap_err(),
            AcpiPmError::SleepType(8)
        );
    }
}
