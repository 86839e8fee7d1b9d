//! The sPAPR PCI host bridge (PHB): one logical PHB, bus 0, with the virtio balloon as
//! function 0 of device [`BALLOON_PCI_DEVICE`], the way pseries Linux finds PCI
//! devices under a hypervisor.
//!
//! - Linux on an LPAR does not scan the bus: it creates a PCI device for each node under
//!   the PHB's device-tree node (see [`fdt`](super::fdt)), and reaches configuration
//!   space only through RTAS `ibm,read-pci-config` / `ibm,write-pci-config`, which name
//!   the PHB by its BUID ([`PHB_BUID`]). [`Phb`] answers those calls
//!   ([`PciConfigSpace`]).
//! - Memory accesses to the PHB's window ([`PHB_MEM_CPU`], [`PHB_MEM_SIZE`] bytes, bus
//!   addresses from [`PHB_MEM_PCI`]) reach the function's BAR while its memory decoding
//!   is on; elsewhere in the window reads are all ones (a master abort) and writes are
//!   dropped, with a log line.
//! - INTA is the XICS source [`PHB_INTA_IRQ`] (the device tree's `interrupt-map`), fed
//!   by the transport's interrupt eventfd through an irqfd.
//!
//! No MSI (no `ibm,change-msi`), no EEH, no DMA window: virtio devices that do not
//! negotiate `VIRTIO_F_ACCESS_PLATFORM` use guest-physical addresses directly.

use std::sync::{Arc, Mutex};

use rangevm_devices::virtio::pci::VIRTIO_PCI_BAR_SIZE;
use rangevm_devices::{log_limited, Balloon, BusDevice, LogLimiter, PciTransport};

use super::layout::{BALLOON_PCI_DEVICE, PHB_BUID, PHB_MEM_PCI};

/// Why a configuration access was refused (the RTAS status the guest gets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConfigFault {
    /// No such PHB, bus or function: a hardware error.
    NoDevice,
    /// A size other than 1, 2 or 4, a misaligned or out-of-range register.
    BadAccess,
}

/// PCI configuration space as RTAS reaches it (the PHB; a fake in tests).
pub(super) trait PciConfigSpace: Send + Sync {
    /// `ibm,read-pci-config`: the `size`-byte register at `addr` (RTAS config address:
    /// bus, devfn, register) of the PHB `buid`, as a number.
    fn read(&self, buid: u64, addr: u32, size: u32) -> Result<u32, ConfigFault>;
    /// `ibm,write-pci-config`.
    fn write(&self, buid: u64, addr: u32, size: u32, value: u32) -> Result<(), ConfigFault>;
}

/// The balloon's transport on this architecture: virtio PCI behind the PHB.
pub type BalloonTransport = PciTransport<Balloon>;
/// The balloon's transport, shared by the machine, the bus and RTAS.
pub type BalloonPci = Arc<Mutex<BalloonTransport>>;

/// The PHB. See the module documentation.
#[derive(Debug)]
pub struct Phb {
    balloon: BalloonPci,
    log: LogLimiter,
}

/// A decoded RTAS configuration address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConfigAddress {
    bus: u8,
    device: u8,
    function: u8,
    register: usize,
}

impl ConfigAddress {
    /// Linux's `rtas_config_addr`: register bits 0-7 and (extended) 8-11 at 28-31, bus at
    /// 16-23, devfn at 8-15.
    fn decode(addr: u32) -> Self {
        let [_, devfn, bus, _] = addr.to_le_bytes();
        let register = (addr & 0xff) | ((addr >> 20) & 0xf00);
        ConfigAddress {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
            register: usize::try_from(register).unwrap_or(usize::MAX),
        }
    }
}

impl Phb {
    /// The PHB with the balloon on it.
    pub fn new(balloon: BalloonPci) -> Self {
        Phb {
            balloon,
            log: LogLimiter::default(),
        }
    }

    /// Checks `buid`, `addr` and `size`; the register offset of the balloon's function.
    fn target(&self, buid: u64, addr: u32, size: u32) -> Result<usize, ConfigFault> {
        let a = ConfigAddress::decode(addr);
        if buid != PHB_BUID || a.bus != 0 || a.device != BALLOON_PCI_DEVICE || a.function != 0 {
            log_limited!(
                self.log,
                log::Level::Debug,
                "PCI configuration access to BUID {buid:#x} {a:?}: no such function"
            );
            return Err(ConfigFault::NoDevice);
        }
        let size = usize::try_from(size).unwrap_or(0);
        if !matches!(size, 1 | 2 | 4) || a.register % size != 0 || a.register >= 0x1000 {
            log_limited!(
                self.log,
                log::Level::Warn,
                "PCI configuration access of {size} bytes at register {:#x}: refused",
                a.register
            );
            return Err(ConfigFault::BadAccess);
        }
        Ok(a.register)
    }

    /// The balloon's BAR offset of the window offset `offset`, if `len` bytes there fall
    /// inside its BAR and its memory decoding is on.
    fn decode(t: &PciTransport<Balloon>, offset: u64, len: usize) -> Option<u64> {
        let pci = u64::from(PHB_MEM_PCI).checked_add(offset)?;
        let bar = t.bar_address();
        let in_bar = pci.checked_sub(bar)?;
        (t.memory_enabled() && in_bar + len as u64 <= VIRTIO_PCI_BAR_SIZE).then_some(in_bar)
    }
}

impl PciConfigSpace for Phb {
    fn read(&self, buid: u64, addr: u32, size: u32) -> Result<u32, ConfigFault> {
        let register = self.target(buid, addr, size)?;
        let mut bytes = [0u8; 4];
        let len = usize::try_from(size).unwrap_or(0);
        let mut t = self.balloon.lock().map_err(|_| ConfigFault::NoDevice)?;
        t.config_read(register, &mut bytes[..len]);
        Ok(u32::from_le_bytes(bytes))
    }

    fn write(&self, buid: u64, addr: u32, size: u32, value: u32) -> Result<(), ConfigFault> {
        let register = self.target(buid, addr, size)?;
        let len = usize::try_from(size).unwrap_or(0);
        let mut t = self.balloon.lock().map_err(|_| ConfigFault::NoDevice)?;
        t.config_write(register, &value.to_le_bytes()[..len]);
        Ok(())
    }
}

impl BusDevice for Phb {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(mut t) = self.balloon.lock() else {
            data.fill(0xff);
            return;
        };
        match Self::decode(&t, offset, data.len()) {
            Some(at) => t.bar_read(at, data),
            None => {
                data.fill(0xff);
                log_limited!(
                    self.log,
                    log::Level::Warn,
                    "PHB: {}-byte read at window offset {offset:#x} hits no BAR",
                    data.len()
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(mut t) = self.balloon.lock() else {
            return;
        };
        match Self::decode(&t, offset, data.len()) {
            Some(at) => t.bar_write(at, data),
            None => log_limited!(
                self.log,
                log::Level::Warn,
                "PHB: {}-byte write at window offset {offset:#x} hits no BAR; dropped",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ppc64::layout::BALLOON_BAR;
    use rangevm_devices::{BalloonConfig, VirtioDevice};
    use rangevm_memory::{GuestRam, LockMode};

    fn phb() -> (Phb, BalloonPci) {
        let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, 16 << 20)]).unwrap());
        let mut t = PciTransport::new(Balloon::new(BalloonConfig::default()), ram).unwrap();
        t.assign_bar(BALLOON_BAR);
        let t = Arc::new(Mutex::new(t));
        (Phb::new(Arc::clone(&t)), t)
    }

    /// Linux's rtas_config_addr.
    fn addr(bus: u32, devfn: u32, reg: u32) -> u32 {
        ((reg & 0xf00) << 20) | (bus << 16) | (devfn << 8) | (reg & 0xff)
    }

    #[test]
    fn rtas_config_reads_the_function_and_refuses_the_rest() {
        let (phb, _) = phb();
        let c = |a, s| PciConfigSpace::read(&phb, PHB_BUID, a, s);
        assert_eq!(c(addr(0, 0, 0), 4), Ok(0x1045_1af4));
        assert_eq!(c(addr(0, 0, 2), 2), Ok(0x1045));
        assert_eq!(c(addr(0, 0, 0x3d), 1), Ok(1), "INTA");
        assert_eq!(c(addr(0, 0, 0x10), 4), Ok(BALLOON_BAR));
        assert_eq!(c(addr(0, 0, 0x100), 4), Ok(0), "extended space reads 0");
        assert_eq!(c(addr(0, 1 << 3, 0), 4), Err(ConfigFault::NoDevice));
        assert_eq!(
            c(addr(0, 1, 0), 4),
            Err(ConfigFault::NoDevice),
            "function 1"
        );
        assert_eq!(c(addr(1, 0, 0), 4), Err(ConfigFault::NoDevice), "bus 1");
        assert_eq!(
            PciConfigSpace::read(&phb, PHB_BUID + 1, addr(0, 0, 0), 4),
            Err(ConfigFault::NoDevice)
        );
        assert_eq!(
            c(addr(0, 0, 2), 4),
            Err(ConfigFault::BadAccess),
            "misaligned"
        );
        assert_eq!(c(addr(0, 0, 0), 3), Err(ConfigFault::BadAccess));
        assert_eq!(c(addr(0, 0, 0), 8), Err(ConfigFault::BadAccess));
    }

    #[test]
    fn the_window_reaches_the_bar_only_while_decoding() {
        let (mut phb, t) = phb();
        let bar_off = u64::from(BALLOON_BAR - PHB_MEM_PCI);
        let mut b = [0u8; 2];
        // num_queues in the common configuration.
        BusDevice::read(&mut phb, bar_off + 0x12, &mut b);
        let queues = u16::try_from(t.lock().unwrap().device().queue_max_sizes().len()).unwrap();
        assert_eq!(u16::from_le_bytes(b), queues);
        // Past the BAR: master abort.
        BusDevice::read(&mut phb, bar_off + VIRTIO_PCI_BAR_SIZE, &mut b);
        assert_eq!(b, [0xff; 2]);
        BusDevice::read(&mut phb, bar_off + VIRTIO_PCI_BAR_SIZE - 1, &mut b);
        assert_eq!(b, [0xff; 2], "straddles the end");
        // Device status write through the window, then decoding off.
        BusDevice::write(&mut phb, bar_off + 0x14, &[1]);
        assert_eq!(t.lock().unwrap().status(), 1);
        PciConfigSpace::write(&phb, PHB_BUID, addr(0, 0, 4), 2, 0).unwrap();
        BusDevice::read(&mut phb, bar_off + 0x14, &mut b[..1]);
        assert_eq!(b[0], 0xff);
        BusDevice::write(&mut phb, bar_off + 0x14, &[0]);
        assert_eq!(t.lock().unwrap().status(), 1, "dropped while not decoding");
        // The guest moves the BAR: the window follows.
        PciConfigSpace::write(&phb, PHB_BUID, addr(0, 0, 0x10), 4, PHB_MEM_PCI + 0x10_0000)
            .unwrap();
        PciConfigSpace::write(&phb, PHB_BUID, addr(0, 0, 4), 2, 2).unwrap();
        BusDevice::read(&mut phb, 0x10_0000 + 0x14, &mut b[..1]);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn config_addresses_decode_as_linux_encodes_them() {
        let a = ConfigAddress::decode(addr(3, (5 << 3) | 2, 0x1fc));
        assert_eq!(
            a,
            ConfigAddress {
                bus: 3,
                device: 5,
                function: 2,
                register: 0x1fc
            }
        );
    }
}
