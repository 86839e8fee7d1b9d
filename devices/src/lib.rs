//! Devices for rangevm.
//!
//! - [`bus`]: the port-I/O (and MMIO) bus that routes a vCPU's access to the device
//!   owning the address.
//! - [`legacy`]: the x86_64 machine's legacy devices: a 16550 UART (on vm-superio), the
//!   i8042 reset line, the hardware-reduced ACPI power-management block and QEMU's
//!   pvpanic. The code is arch-neutral; only the port numbers (in the VMM's
//!   `arch::layout`) are x86_64's.
//! - [`virtio`]: the virtio-mmio transport and virtio devices (the balloon).
//! - [`persist`]: the versioned byte format of device state for snapshot and live
//!   migration ([`PersistError`], [`persist::Writer`], [`persist::Reader`]).
//! - [`GuestRequests`]: how those devices tell the VMM that the guest asked to power
//!   off, reset or report a panic.
//!
//! Everything a guest can trigger is handled without panicking, and logged through
//! [`LogLimiter`] so a misbehaving guest cannot flood the log.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

pub mod bus;
pub mod legacy;
pub mod persist;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use legacy::{AcpiPm, AcpiPmError, PvPanic, Serial, SerialError, SerialMetrics, I8042};
pub use persist::PersistError;
pub use ratelimit::LogLimiter;
pub use virtio::{
    Balloon, BalloonConfig, BalloonError, BalloonMetrics, BalloonStats, MmioError, MmioTransport,
    PciError, PciIdentity, PciTransport, RestoreContext, VirtioDevice, VirtioError,
    VirtioInterrupt,
};

#[doc(hidden)]
pub use log as __log;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRequest {
    /// Power off (ACPI S5).
    PowerOff,
    /// Reset (i8042 0xfe, or the ACPI reset register).
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
}

impl GuestRequest {
    // 0 in `GuestRequests::first` means "nothing requested yet".
    fn code(self) -> u8 {
        match self {
            GuestRequest::PowerOff => 1,
            GuestRequest::Reset => 2,
            GuestRequest::Panic => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(GuestRequest::PowerOff),
            2 => Some(GuestRequest::Reset),
            3 => Some(GuestRequest::Panic),
            _ => None,
        }
    }
}

impl fmt::Display for GuestRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestRequest::PowerOff => "power off",
            GuestRequest::Reset => "reset",
            GuestRequest::Panic => "panic",
        })
    }
}

/// Errors of [`GuestRequests`].
#[derive(Debug, thiserror::Error)]
pub enum GuestRequestsError {
    /// The eventfd could not be created.
    #[error("Cannot create the guest-request eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Shared by the devices and the VMM's event loop: the first request wins and is kept;
/// each request also signals an EventFd the event loop polls.
///
/// Used as `Arc<GuestRequests>`. [`first`](Self::first) is one atomic load, cheap
/// enough for a vCPU thread to call after every exit.
#[derive(Debug)]
pub struct GuestRequests {
    first: AtomicU8,
    eventfd: EventFd,
    repeat_log: LogLimiter,
}

impl GuestRequests {
    /// No request yet; the eventfd is non-blocking and close-on-exec.
    pub fn new() -> Result<Self, GuestRequestsError> {
        Ok(GuestRequests {
            first: AtomicU8::new(0),
            eventfd: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                .map_err(GuestRequestsError::EventFd)?,
            repeat_log: LogLimiter::default(),
        })
    }

    /// Records `request` if it is the first one, and signals the eventfd either way.
    pub fn request(&self, request: GuestRequest) {
        match self
            .first
            .compare_exchange(0, request.code(), Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => log::info!("Guest request: {request}"),
            Err(kept) => {
                let kept = GuestRequest::from_code(kept);
                log_limited!(
                    self.repeat_log,
                    log::Level::Debug,
                    "Guest request: {request}, after {kept:?}; the first one is kept"
                );
            }
        }
        // Non-blocking: fails only if the counter would overflow (2^64 - 2 unread
        // signals), which still leaves it readable, so the event loop wakes anyway.
        if let Err(e) = self.eventfd.write(1) {
            log_limited!(
                self.repeat_log,
                log::Level::Warn,
                "Cannot signal the guest-request eventfd: {e}"
            );
        }
    }

    /// The first request the guest made, if any.
    pub fn first(&self) -> Option<GuestRequest> {
        GuestRequest::from_code(self.first.load(Ordering::Acquire))
    }

    /// Readable once a request was made; the event loop reads it to clear it, then
    /// looks at [`first`](Self::first).
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_request_at_first() {
        let requests = GuestRequests::new().unwrap();
        assert_eq!(requests.first(), None);
        // Nothing signalled: a non-blocking read would block.
        assert_eq!(
            requests.eventfd().read().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn keeps_the_first_request_and_signals_each() {
        let requests = GuestRequests::new().unwrap();
        requests.request(GuestRequest::Reset);
        assert_eq!(requests.first(), Some(GuestRequest::Reset));
        requests.request(GuestRequest::PowerOff);
        requests.request(GuestRequest::Panic);
        assert_eq!(requests.first(), Some(GuestRequest::Reset));
        assert_eq!(requests.eventfd().read().unwrap(), 3);
    }

    #[test]
    fn codes_round_trip() {
        for r in [
            GuestRequest::PowerOff,
            GuestRequest::Reset,
            GuestRequest::Panic,
        ] {
            assert_eq!(GuestRequest::from_code(r.code()), Some(r));
        }
        assert_eq!(GuestRequest::from_code(0), None);
        assert_eq!(GuestRequest::PowerOff.to_string(), "power off");
    }
}
