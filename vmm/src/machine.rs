//! A machine: guest RAM, the KVM VM, its devices and vCPU threads, put together from a
//! [`MachineConfig`] and taken apart again.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rangevm_devices::{Bus, GuestRequests, GuestRequestsError, Serial};
use rangevm_memory::{host_page_size, DirtyLog, GuestRam, GuestRamError, HarvestStats, LockMode};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{self, layout, ArchError, IoHandler, KvmVm, SystemConfig};
use crate::vcpu::{VcpuEnv, VcpuError, VcpuEvent, VcpuExitReason, VcpuHandle, VcpuResponse};

/// The smallest guest memory the machine accepts: the boot structures live below 1 MiB
/// and the kernel is loaded at 1 MiB.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Most vCPUs (8-bit APIC IDs, one of them the IOAPIC's).
pub const MAX_CPUS: u8 = 254;
/// The chunk a dirty harvest locks at a time.
pub const DIRTY_CHUNK: u64 = 2 << 20;
/// How long a vCPU may take to answer a request before it is called stuck.
const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of building a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Guest memory is too small.
    #[error("Guest memory of {0} bytes is too small: the machine needs at least {MIN_MEMORY} bytes (2M)")]
    MemoryTooSmall(u64),
    /// Guest memory is not a whole number of host pages.
    #[error("Guest memory of {size} bytes is not a multiple of the host page size ({page} bytes)")]
    MemoryUnaligned {
        /// The size asked for.
        size: u64,
        /// The host page size.
        page: u64,
    },
    /// The vCPU count is out of range.
    #[error("{0} vCPUs asked for: the machine takes 1 to {MAX_CPUS}")]
    Cpus(u32),
    /// Guest memory could not be created.
    #[error("Cannot create guest memory")]
    Memory(#[source] GuestRamError),
    /// The KVM side failed.
    #[error("Cannot set up the virtual machine")]
    Arch(#[from] ArchError),
    /// The guest request signal could not be created.
    #[error("Cannot create the guest request signal")]
    Requests(#[from] GuestRequestsError),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A vCPU thread failed.
    #[error("vCPU thread failed")]
    Vcpu(#[from] VcpuError),
    /// A vCPU answered a pause or resume from a state that does not allow it.
    #[error("vCPU {id} answered {state}")]
    VcpuState {
        /// vCPU index.
        id: u64,
        /// What it answered.
        state: String,
    },
}

/// What to build.
pub struct MachineConfig {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Range lock or one global lock over guest memory.
    pub mem_lock: LockMode,
    /// Where the guest's serial console goes.
    pub serial_out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for MachineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineConfig")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .field("mem_lock", &self.mem_lock)
            .finish_non_exhaustive()
    }
}

/// Port and MMIO dispatch for the vCPUs.
#[derive(Debug)]
pub struct MachineIo {
    pio: Bus,
    mmio: Bus,
}

impl IoHandler for MachineIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// A built, running machine.
#[derive(Debug)]
pub struct Machine {
    vcpus: Vec<VcpuHandle>,
    serial: Arc<Mutex<Serial>>,
    balloon: Arc<Mutex<arch::BalloonTransport>>,
    requests: Arc<GuestRequests>,
    vcpu_exited: Arc<EventFd>,
    info: MachineInfo,
    vm: KvmVm,
}

/// What a running machine is, for `vm info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MachineInfo {
    /// "running" or "paused".
    pub state: &'static str,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// "range" or "global".
    pub mem_lock: String,
    /// The host page size every page-granular operation uses.
    pub page_size: u64,
    /// Guest RAM regions as `[start, size]`.
    pub regions: Vec<[u64; 2]>,
    /// Whether KVM's dirty logging is on.
    pub dirty_logging: bool,
    /// The kernel booted.
    pub kernel: String,
}

/// What an incoming migration builds before the guest's memory and state arrive.
pub struct IncomingConfig {
    /// Guest memory in bytes (the source's).
    pub memory: u64,
    /// vCPUs (the source's).
    pub cpus: u32,
    /// Range lock or one global lock over guest memory.
    pub mem_lock: LockMode,
    /// Where the guest's serial console goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Where the guest comes from, for `vm info`.
    pub source: String,
    /// Postcopy: guest RAM starts missing and is served by userfaultfd.
    pub postcopy: bool,
}

impl std::fmt::Debug for IncomingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingConfig")
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The state a migration carries at switch-over, in byte form: one blob per vCPU (in
/// vCPU order) and one per device, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineState {
    /// vCPU states.
    pub vcpus: Vec<Vec<u8>>,
    /// Device states: `vm` (irqchip, PIT, clock), `serial0`, `balloon0`.
    pub devices: Vec<(String, Vec<u8>)>,
}

/// The device ids a [`MachineState`] holds, in restore order.
pub const DEVICE_IDS: [&str; 3] = ["vm", "serial0", "balloon0"];

/// Errors of restoring a migrated machine.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state lacks a vCPU or device, or has one too many.
    #[error("The migrated state is incomplete: {0}")]
    Incomplete(String),
    /// A state blob did not decode or KVM refused it.
    #[error("Cannot restore {what}")]
    State {
        /// What.
        what: String,
        /// The cause.
        #[source]
        source: crate::arch::StateError,
    },
    /// A device refused its state.
    #[error("Cannot restore {what}")]
    Device {
        /// What.
        what: String,
        /// The cause.
        #[source]
        source: rangevm_devices::PersistError,
    },
    /// A device lock was poisoned.
    #[error("A device failed earlier")]
    Poisoned,
    /// The machine could not start.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

/// Everything but the running vCPU threads.
struct Parts {
    vm: KvmVm,
    requests: Arc<GuestRequests>,
    serial: Arc<Mutex<Serial>>,
    balloon: Arc<Mutex<arch::BalloonTransport>>,
    io: Arc<MachineIo>,
    vcpus: Vec<crate::arch::KvmVcpu>,
    info: MachineInfo,
}

fn check_shape(memory: u64, cpus: u32) -> Result<u8, MachineError> {
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|c| (1..=MAX_CPUS).contains(c))
        .ok_or(MachineError::Cpus(cpus))?;
    if memory < MIN_MEMORY {
        return Err(MachineError::MemoryTooSmall(memory));
    }
    let page = host_page_size();
    if memory % page != 0 {
        return Err(MachineError::MemoryUnaligned { size: memory, page });
    }
    Ok(cpus)
}

/// Builds the VM, its devices and (unconfigured) vCPUs around `ram`.
fn build(
    ram: GuestRam,
    memory: u64,
    cpus: u8,
    mem_lock: LockMode,
    serial_out: Box<dyn Write + Send>,
    kernel: String,
) -> Result<Parts, MachineError> {
    let ram = Arc::new(ram);
    let vm = KvmVm::new(Arc::clone(&ram))?;
    vm.create_irqchip()?;
    let requests = Arc::new(GuestRequests::new()?);
    let devices = arch::create_legacy_devices(&vm, &requests, serial_out)?;
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..u64::from(cpus) {
        vcpus.push(vm.create_vcpu(id)?);
    }
    let info = MachineInfo {
        state: "running",
        cpus,
        memory_bytes: memory,
        mem_lock: match mem_lock {
            LockMode::Range => "range".into(),
            LockMode::Global => "global".into(),
        },
        page_size: ram.page_size(),
        regions: ram.regions().iter().map(|r| [r.start, r.size]).collect(),
        dirty_logging: false,
        kernel,
    };
    Ok(Parts {
        io: Arc::new(MachineIo {
            pio: devices.pio,
            mmio: devices.mmio,
        }),
        serial: devices.serial,
        balloon: devices.balloon,
        requests,
        vcpus,
        info,
        vm,
    })
}

impl Parts {
    /// Starts the vCPU threads.
    fn start(self) -> Result<Machine, MachineError> {
        let vcpu_exited = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?);
        let mut machine = Machine {
            vcpus: Vec::new(),
            serial: self.serial,
            balloon: self.balloon,
            requests: self.requests,
            vcpu_exited,
            info: self.info,
            vm: self.vm,
        };
        for vcpu in self.vcpus {
            let env = VcpuEnv {
                io: Arc::clone(&self.io),
                requests: Arc::clone(&machine.requests),
                exited: Arc::clone(&machine.vcpu_exited),
            };
            // On failure `machine` is dropped, which stops the vCPUs already started.
            machine.vcpus.push(VcpuHandle::spawn(vcpu, env)?);
        }
        Ok(machine)
    }
}

/// A machine being migrated in: memory, VM, devices and vCPUs exist, nothing runs.
/// Fill its memory through [`IncomingMachine::ram`], then [`IncomingMachine::restore`]
/// the switch-over state, then [`IncomingMachine::start`].
pub struct IncomingMachine {
    parts: Parts,
}

impl std::fmt::Debug for IncomingMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingMachine")
            .field("info", &self.parts.info)
            .finish_non_exhaustive()
    }
}

impl IncomingMachine {
    /// Builds an empty machine of the source's shape.
    pub fn new(cfg: IncomingConfig) -> Result<Self, MachineError> {
        let cpus = check_shape(cfg.memory, cfg.cpus)?;
        let regions = layout::ram_regions(cfg.memory);
        let ram = if cfg.postcopy {
            GuestRam::new_missing(cfg.mem_lock, &regions)
        } else {
            GuestRam::new(cfg.mem_lock, &regions)
        }
        .map_err(MachineError::Memory)?;
        let parts = build(
            ram,
            cfg.memory,
            cpus,
            cfg.mem_lock,
            cfg.serial_out,
            format!("migrated from {}", cfg.source),
        )?;
        Ok(IncomingMachine { parts })
    }

    /// Guest RAM, to receive pages into.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.parts.vm.ram()
    }

    /// What it is.
    pub fn info(&self) -> &MachineInfo {
        &self.parts.info
    }

    /// Restores every vCPU, the VM's in-kernel devices and the VMM's devices. Checks
    /// that the state has exactly one blob per vCPU and per device before applying any.
    pub fn restore(&mut self, state: &MachineState) -> Result<(), RestoreError> {
        if state.vcpus.len() != self.parts.vcpus.len() {
            return Err(RestoreError::Incomplete(format!(
                "{} vCPU state(s) for {} vCPUs",
                state.vcpus.len(),
                self.parts.vcpus.len()
            )));
        }
        let mut blobs = Vec::with_capacity(DEVICE_IDS.len());
        for id in DEVICE_IDS {
            let mut found = state.devices.iter().filter(|(d, _)| d == id);
            match (found.next(), found.next()) {
                (Some((_, blob)), None) => blobs.push(blob.as_slice()),
                (None, _) => {
                    return Err(RestoreError::Incomplete(format!(
                        "no state for device {id}"
                    )))
                }
                (Some(_), Some(_)) => {
                    return Err(RestoreError::Incomplete(format!(
                        "two states for device {id}"
                    )))
                }
            }
        }
        if let Some((id, _)) = state
            .devices
            .iter()
            .find(|(d, _)| !DEVICE_IDS.contains(&d.as_str()))
        {
            return Err(RestoreError::Incomplete(format!(
                "state for an unknown device {id}"
            )));
        }
        let decoded: Vec<arch::VcpuState> = state
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, b)| {
                arch::VcpuState::from_bytes(b).map_err(|source| RestoreError::State {
                    what: format!("the state of vCPU {i}"),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let vm_state =
            arch::VmState::from_bytes(blobs[0]).map_err(|source| RestoreError::State {
                what: "the VM's interrupt controllers, PIT and clock".into(),
                source,
            })?;
        for (i, (vcpu, s)) in self.parts.vcpus.iter_mut().zip(&decoded).enumerate() {
            vcpu.restore_state(s)
                .map_err(|source| RestoreError::State {
                    what: format!("the state of vCPU {i}"),
                    source,
                })?;
        }
        self.parts
            .vm
            .restore_state(&vm_state)
            .map_err(|source| RestoreError::State {
                what: "the VM's interrupt controllers, PIT and clock".into(),
                source,
            })?;
        self.parts
            .serial
            .lock()
            .map_err(|_| RestoreError::Poisoned)?
            .restore_state(blobs[1])
            .map_err(|source| RestoreError::Device {
                what: "the serial port".into(),
                source,
            })?;
        self.parts
            .balloon
            .lock()
            .map_err(|_| RestoreError::Poisoned)?
            .restore_state(blobs[2])
            .map_err(|source| RestoreError::Device {
                what: "the balloon".into(),
                source,
            })?;
        Ok(())
    }

    /// Starts the restored vCPUs.
    pub fn start(self) -> Result<Machine, MachineError> {
        self.parts.start()
    }
}

impl Machine {
    /// Checks the configuration, builds guest memory, the VM, its devices and vCPUs,
    /// loads the kernel, and starts the vCPUs.
    pub fn start(cfg: MachineConfig) -> Result<Self, MachineError> {
        let cpus = check_shape(cfg.memory, cfg.cpus)?;
        let mut ram = GuestRam::new(cfg.mem_lock, &layout::ram_regions(cfg.memory))
            .map_err(MachineError::Memory)?;
        // Load while guest RAM is still ours alone (no VM, device or vCPU has it yet).
        let entry = arch::configure_system(
            &mut ram,
            &SystemConfig {
                kernel: &cfg.kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.cmdline,
                cpus,
            },
        )?;
        let mut parts = build(
            ram,
            cfg.memory,
            cpus,
            cfg.mem_lock,
            cfg.serial_out,
            cfg.kernel.display().to_string(),
        )?;
        log::info!(
            "Loaded {} ({entry:?}); {} MiB of guest memory, {cpus} vCPU(s), {:?} lock",
            cfg.kernel.display(),
            cfg.memory >> 20,
            cfg.mem_lock
        );
        for vcpu in &mut parts.vcpus {
            vcpu.configure(&parts.vm, entry, cpus)?;
        }
        parts.start()
    }

    /// Saves the state a migration carries at switch-over. The vCPUs must be paused.
    pub fn save_state(&mut self) -> Result<MachineState, String> {
        let mut state = MachineState::default();
        for vcpu in &mut self.vcpus {
            match vcpu.request(VcpuEvent::SaveState, VCPU_TIMEOUT) {
                Ok(VcpuResponse::State(Ok(blob))) => state.vcpus.push(blob),
                Ok(VcpuResponse::State(Err(why))) => return Err(why),
                Ok(other) => return Err(format!("vCPU {} answered {other:?}", vcpu.id())),
                Err(e) => return Err(e.to_string()),
            }
        }
        let vm = self
            .vm
            .save_state()
            .and_then(|s| s.to_bytes())
            .map_err(|e| format!("Cannot save the VM's interrupt controllers and clock: {e}"))?;
        state.devices.push(("vm".into(), vm));
        let serial = self
            .serial
            .lock()
            .map_err(|_| "The serial port failed earlier".to_string())?
            .save_state();
        state.devices.push(("serial0".into(), serial));
        let balloon = self
            .balloon
            .lock()
            .map_err(|_| "The balloon failed earlier".to_string())?
            .save_state()
            .map_err(|e| format!("Cannot save the balloon: {e}"))?;
        state.devices.push(("balloon0".into(), balloon));
        Ok(state)
    }

    /// The serial port (the event loop feeds it input).
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }

    /// What the guest's devices recorded.
    pub fn requests(&self) -> &Arc<GuestRequests> {
        &self.requests
    }

    /// Written whenever a vCPU exits by itself.
    pub fn vcpu_exited(&self) -> &Arc<EventFd> {
        &self.vcpu_exited
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        self.vm.ram()
    }

    /// The first reason a vCPU gave for exiting by itself, if any has.
    pub fn vcpu_exit(&mut self) -> Option<VcpuExitReason> {
        self.vcpus.iter_mut().find_map(|v| {
            v.poll_exit()
                .filter(|r| **r != VcpuExitReason::Finished)
                .cloned()
        })
    }

    /// Pauses every vCPU (each leaves KVM_RUN and waits); returns once all have.
    pub fn pause(&mut self) -> Result<(), MachineError> {
        self.send_all(VcpuEvent::Pause, &VcpuResponse::Paused)?;
        self.info.state = "paused";
        Ok(())
    }

    /// Resumes every paused vCPU.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        self.send_all(VcpuEvent::Resume, &VcpuResponse::Resumed)?;
        self.info.state = "running";
        Ok(())
    }

    /// The virtio balloon.
    pub fn balloon(&self) -> &Arc<Mutex<arch::BalloonTransport>> {
        &self.balloon
    }

    /// What the machine is.
    pub fn info(&self) -> &MachineInfo {
        &self.info
    }

    /// Turns KVM's dirty logging on or off (each slot under its region's write lock),
    /// and on start clears the VMM's own bitmap so the next harvest sees only writes
    /// from now on.
    pub fn set_dirty_logging(&mut self, enabled: bool) -> Result<(), MachineError> {
        self.vm.set_dirty_logging(enabled)?;
        if enabled {
            self.ram()
                .harvest_dirty(None, DIRTY_CHUNK)
                .map_err(MachineError::Memory)?;
        }
        self.info.dirty_logging = enabled;
        Ok(())
    }

    /// Harvests the dirty set (KVM's log, if logging is on, OR the VMM's bitmap), in
    /// chunks of [`DIRTY_CHUNK`] under read locks.
    pub fn harvest_dirty(&self) -> Result<(Vec<u64>, HarvestStats), MachineError> {
        let log: Option<&dyn DirtyLog> = if self.info.dirty_logging {
            Some(&self.vm)
        } else {
            None
        };
        self.ram()
            .harvest_dirty(log, DIRTY_CHUNK)
            .map_err(MachineError::Memory)
    }

    fn send_all(&mut self, event: VcpuEvent, want: &VcpuResponse) -> Result<(), MachineError> {
        for vcpu in &mut self.vcpus {
            let got = vcpu.request(event, VCPU_TIMEOUT)?;
            if got != *want {
                return Err(MachineError::VcpuState {
                    id: vcpu.id(),
                    state: format!("{got:?}"),
                });
            }
        }
        Ok(())
    }

    /// Stops every vCPU and joins its thread; returns the reasons they gave, in vCPU
    /// order. Idempotent.
    pub fn stop(&mut self) -> Vec<VcpuExitReason> {
        let mut reasons = Vec::with_capacity(self.vcpus.len());
        for vcpu in &mut self.vcpus {
            match vcpu.finish(VCPU_TIMEOUT) {
                Ok(reason) => reasons.push(reason),
                Err(e) => {
                    log::error!("vCPU {}: {e}", vcpu.id());
                    reasons.push(VcpuExitReason::Failed(e.to_string()));
                }
            }
        }
        self.vcpus.clear();
        reasons
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}
