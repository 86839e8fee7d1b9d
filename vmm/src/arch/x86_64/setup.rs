//! Putting an x86_64 machine together: the boot tables, MP table, ACPI tables and the
//! kernel in guest memory, and the legacy devices on the port bus.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rangevm_devices::{
    AcpiPm, Balloon, BalloonConfig, Bus, GuestRequests, MmioTransport, PvPanic, Serial, I8042,
};
use rangevm_memory::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::acpi::{create_acpi_tables, AcpiConfig, MmioDevice};
use super::boot::{load_kernel, BootConfig, EntryPoint};
use super::layout::{
    ACPI_PM_PORT, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, COM1_GSI, COM1_PORT,
    COM1_PORT_LEN, I8042_PORT, I8042_PORT_LEN, PVPANIC_PORT, VIRTIO_MMIO_FIRST_GSI,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use super::mptable::{self, setup_mptable};
use super::regs::write_boot_tables;
use super::{ArchError, KvmVm};

/// What to boot, and on how many vCPUs.
#[derive(Debug, Clone)]
pub struct SystemConfig<'a> {
    /// The kernel (bzImage or ELF).
    pub kernel: &'a Path,
    /// The initrd.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// vCPUs (1..=254).
    pub cpus: u8,
}

/// Writes everything the guest reads at boot into `ram` and loads the kernel; returns
/// where the boot vCPU starts.
pub fn configure_system(
    ram: &mut GuestRam,
    cfg: &SystemConfig<'_>,
) -> Result<EntryPoint, ArchError> {
    write_boot_tables(ram).map_err(|source| ArchError::Regs { id: 0, source })?;
    // Linux reads the MP table only without ACPI (acpi=off); it fits 40 vCPUs in the
    // EBDA, and larger machines are described by the MADT alone.
    if cfg.cpus <= mptable::MAX_CPUS {
        setup_mptable(ram, cfg.cpus)?;
    } else {
        log::debug!(
            "No MP table for {} vCPUs (at most {}): ACPI only",
            cfg.cpus,
            mptable::MAX_CPUS
        );
    }
    let rsdp = create_acpi_tables(
        ram,
        &AcpiConfig {
            cpus: cfg.cpus,
            mmio_devices: mmio_devices(),
        },
    )?;
    let entry = load_kernel(
        ram,
        &BootConfig {
            kernel: cfg.kernel,
            initrd: cfg.initrd,
            cmdline: cfg.cmdline,
            rsdp,
        },
    )?;
    Ok(entry)
}

/// The machine's devices, on the port and MMIO buses.
#[derive(Debug)]
pub struct LegacyDevices {
    /// The port-I/O bus.
    pub pio: Bus,
    /// The MMIO bus (virtio-mmio devices).
    pub mmio: Bus,
    /// COM1 (the event loop feeds it input).
    pub serial: Arc<Mutex<Serial>>,
    /// The virtio balloon.
    pub balloon: Arc<Mutex<BalloonTransport>>,
}

/// The balloon's transport on this architecture: virtio-mmio.
pub type BalloonTransport = MmioTransport<Balloon>;

/// Creates COM1 (interrupt through an irqfd on GSI 4), the i8042 reset line, the ACPI
/// power-management block and pvpanic on the port bus, and the virtio balloon on the
/// MMIO bus (the first virtio-mmio window, the first virtio GSI).
pub fn create_legacy_devices(
    vm: &KvmVm,
    requests: &Arc<GuestRequests>,
    serial_out: Box<dyn Write + Send>,
) -> Result<LegacyDevices, ArchError> {
    let interrupt = EventFd::new(EFD_NONBLOCK).map_err(ArchError::EventFd)?;
    vm.register_irqfd(&interrupt, COM1_GSI)?;
    let serial = Arc::new(Mutex::new(Serial::new(interrupt, serial_out)?));
    let mut pio = Bus::new();
    pio.insert(
        serial.clone(),
        u64::from(COM1_PORT),
        u64::from(COM1_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(Arc::clone(requests)))),
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(
            Arc::clone(requests),
            ACPI_S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
        )?)),
        u64::from(ACPI_PM_PORT),
        u64::from(ACPI_PM_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(PvPanic::new(Arc::clone(requests)))),
        u64::from(PVPANIC_PORT),
        1,
    )?;
    let mut mmio = Bus::new();
    let balloon = Arc::new(Mutex::new(MmioTransport::new(
        Balloon::new(BalloonConfig::default()),
        Arc::clone(vm.ram()),
    )?));
    let [slot] = mmio_devices()[..] else {
        return Err(ArchError::DevicePoisoned);
    };
    vm.register_irqfd(
        balloon
            .lock()
            .map_err(|_| ArchError::DevicePoisoned)?
            .interrupt()
            .eventfd(),
        slot.gsi,
    )?;
    mmio.insert(balloon.clone(), slot.base, slot.size)?;
    Ok(LegacyDevices {
        pio,
        mmio,
        serial,
        balloon,
    })
}

/// The virtio-mmio devices of the machine, in window order: the balloon in the first
/// window with the first virtio GSI. The ACPI tables and the device setup both read it.
fn mmio_devices() -> Vec<MmioDevice> {
    vec![MmioDevice {
        base: VIRTIO_MMIO_START,
        size: VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_MMIO_FIRST_GSI,
    }]
}
