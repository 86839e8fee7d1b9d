//! The sPAPR platform calls the VMM answers: the hypercalls KVM passes up
//! (KVM_EXIT_PAPR_HCALL) and the RTAS calls the kernel does not handle itself.
//!
//! - console: H_PUT_TERM_CHAR / H_GET_TERM_CHAR on the one virtual terminal, backed by
//!   the machine's 16550 (its registers at [`CONSOLE_PORT`] of the port bus, which only
//!   this code reaches), so console output, input and its saved state are the x86
//!   machine's;
//! - H_SET_MODE: interrupt endianness (LPCR bit ILE) and the alternate interrupt location
//!   (LPCR bit AIL), for every vCPU: each applies the wanted bits before it next enters
//!   the guest;
//! - H_GET_CPU_CHARACTERISTICS: the host's answer (KVM_PPC_GET_CPU_CHAR), so the guest
//!   picks the speculation mitigations the processor needs;
//! - H_PUT_TCE / H_STUFF_TCE / H_GET_TCE on the PHB's DMA window ([`super::tce`]);
//! - H_REGISTER_PROC_TBL: the guest's radix process table, handed to KVM with
//!   KVM_PPC_CONFIGURE_V3_MMU;
//! - H_RTAS: `rtas_args` in guest memory (big-endian): power-off, reboot, os-term,
//!   display-character, time of day, CPU start/stop/query, event-scan, and PCI
//!   configuration space (`ibm,read-pci-config` / `ibm,write-pci-config`, passed to
//!   the host bridge, [`super::phb`]).
//!
//! Everything read from the guest is checked: an unknown call, a bad terminal number, an
//! `rtas_args` outside RAM or with too many arguments gets an error code and a log line.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use rangevm_memory::GuestRam;

use super::layout::{hcall::*, rtas, CONSOLE_PORT, VTY_TERMNO};
use super::phb::{ConfigFault, PciConfigSpace};
use super::tce::TceTable;
use crate::arch::{IoHandler, VcpuStop};

/// Where the VMM applies the radix MMU configuration (the VM fd; a fake in tests).
pub(super) trait MmuControl: Send + Sync {
    /// KVM_PPC_CONFIGURE_V3_MMU.
    fn configure_v3_mmu(&self, flags: u64, process_table: u64) -> std::io::Result<()>;
}

impl MmuControl for super::kvm::VmFd {
    fn configure_v3_mmu(&self, flags: u64, process_table: u64) -> std::io::Result<()> {
        super::kvm::VmFd::configure_v3_mmu(self, flags, process_table)
    }
}

/// Most vCPUs a machine has (the machine's bound).
pub(super) const MAX_CPUS: usize = 254;
/// `rtas_args` holds at most 16 argument and return words.
const RTAS_MAX_WORDS: u32 = 16;
/// Bytes of an `ibm,os-term` message read for the log.
const OS_TERM_MAX: usize = 1024;
/// Unknown hypercalls logged (then silent).
const UNKNOWN_LOG_LIMIT: u32 = 16;

/// RTAS status words.
const RTAS_SUCCESS: i32 = 0;
const RTAS_HW_ERROR: i32 = -1;
const RTAS_PARAM_ERROR: i32 = -3;
/// `query-cpu-stopped-state` answers.
const CPU_STOPPED: u32 = 0;
const CPU_RUNNING: u32 = 2;
/// `event-scan`: no error found.
const RTAS_NO_EVENT: i32 = 1;

/// H_SET_MODE resources.
const SET_MODE_ADDR_TRANS: u64 = 3;
const SET_MODE_LE: u64 = 4;
/// H_REGISTER_PROC_TBL flags.
const PROC_TBL_MODIFY: u64 = 0x10;
const PROC_TBL_REGISTER: u64 = 0x08;
const PROC_TBL_RADIX: u64 = 0x04;
const PROC_TBL_HASH_SEG: u64 = 0x02;
const PROC_TBL_GTSE: u64 = 0x01;
/// The partition-table "guest radix" bit of the process table entry.
const PATE_GR: u64 = 1 << 63;

/// Whether a vCPU runs, waits for `start-cpu`, or has been told to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CpuRun {
    /// Not started, or stopped itself: KVM_RUN is not entered.
    Stopped,
    /// `start-cpu` asked it to start at `entry` with `r3`.
    Start {
        /// Where it starts (real mode).
        entry: u64,
        /// Its r3.
        r3: u64,
    },
    /// Running.
    Running,
}

#[derive(Debug)]
struct CpuSlot {
    run: Mutex<CpuRun>,
    wake: Condvar,
}

/// The processor modes H_SET_MODE sets for every vCPU, with a generation each vCPU
/// compares with the one it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Modes {
    /// Interrupts taken little-endian (LPCR bit ILE).
    pub ile: bool,
    /// LPCR bit AIL (0 or 3).
    pub ail: u64,
    /// Bumped on each change.
    pub generation: u64,
}

impl Modes {
    /// The LPCR with these modes applied to `lpcr`.
    pub fn apply(&self, lpcr: u64) -> u64 {
        let mut v = lpcr & !(super::kvm::LPCR_ILE | super::kvm::LPCR_AIL);
        if self.ile {
            v |= super::kvm::LPCR_ILE;
        }
        v | ((self.ail & 3) << super::kvm::LPCR_AIL.trailing_zeros())
    }
}

/// The radix MMU configuration the guest registered (for migration too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ProcessTable {
    /// KVM_PPC_MMUV3_* flags.
    pub flags: u64,
    /// The process table entry (`PATE_GR | base | size`), 0 when none.
    pub entry: u64,
}

/// How a hypercall is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    /// r3.
    pub ret: u64,
    /// New r4.. values, if the call returns any.
    pub outputs: Option<Vec<u64>>,
    /// The vCPU stops, or the machine does.
    pub effect: Effect,
}

/// What a call does besides its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    /// Nothing.
    None,
    /// The calling vCPU stopped itself (`stop-self`).
    StoppedSelf,
    /// The machine stops.
    Stop(VcpuStop),
}

impl Answer {
    fn ret(ret: u64) -> Self {
        Answer {
            ret,
            outputs: None,
            effect: Effect::None,
        }
    }
}

/// The platform state every vCPU of a VM shares.
pub(super) struct Spapr {
    ram: Arc<GuestRam>,
    mmu: Arc<dyn MmuControl>,
    cpus: Vec<CpuSlot>,
    modes: Mutex<Modes>,
    process_table: Mutex<ProcessTable>,
    /// Guest time-of-day minus host time, in seconds (`set-time-of-day`).
    time_offset: AtomicI64,
    unknown_logged: AtomicU32,
    /// PCI configuration space for the RTAS PCI calls, once the devices exist.
    pci: OnceLock<Arc<dyn PciConfigSpace>>,
    /// The PHB's DMA window.
    tce: TceTable,
    /// H_GET_CPU_CHARACTERISTICS' answer (characteristics, behaviour), if the host
    /// gave one.
    cpu_char: OnceLock<(u64, u64)>,
}

impl std::fmt::Debug for Spapr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spapr")
            .field("modes", &self.modes)
            .field("process_table", &self.process_table)
            .finish_non_exhaustive()
    }
}

/// Reads a big-endian u32 of guest memory.
fn read_be32(ram: &GuestRam, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    ram.read(addr, &mut b).ok()?;
    Some(u32::from_be_bytes(b))
}

/// Up to 8 bytes packed big-endian into a register, the first in the top byte.
fn pack(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
    u64::from_be_bytes(w)
}

impl Spapr {
    /// The platform of a new VM: vCPU 0 runs, the others wait for `start-cpu`.
    pub fn new(ram: Arc<GuestRam>, mmu: Arc<dyn MmuControl>) -> Self {
        let cpus = (0..MAX_CPUS)
            .map(|i| CpuSlot {
                run: Mutex::new(if i == 0 {
                    CpuRun::Running
                } else {
                    CpuRun::Stopped
                }),
                wake: Condvar::new(),
            })
            .collect();
        Spapr {
            ram,
            mmu,
            cpus,
            modes: Mutex::new(Modes::default()),
            process_table: Mutex::new(ProcessTable::default()),
            time_offset: AtomicI64::new(0),
            unknown_logged: AtomicU32::new(0),
            pci: OnceLock::new(),
            tce: TceTable::default(),
            cpu_char: OnceLock::new(),
        }
    }

    /// What H_GET_CPU_CHARACTERISTICS answers (set once, from KVM_PPC_GET_CPU_CHAR);
    /// without it the call gets H_FUNCTION and the guest assumes the worst.
    pub fn set_cpu_characteristics(&self, character: u64, behaviour: u64) {
        let _ = self.cpu_char.set((character, behaviour));
    }

    /// Connects the PCI host bridge the RTAS PCI configuration calls reach (once; later
    /// calls are ignored). Until then those calls fail with a hardware error.
    pub fn attach_pci(&self, pci: Arc<dyn PciConfigSpace>) {
        if self.pci.set(pci).is_err() {
            log::warn!("A PCI host bridge is attached already; the second one is ignored");
        }
    }

    fn slot(&self, cpu: u64) -> Option<&CpuSlot> {
        self.cpus.get(usize::try_from(cpu).ok()?)
    }

    /// Waits up to `wait` for vCPU `cpu` to be allowed to run; a pending start becomes
    /// `Running` and is returned so the caller sets the start registers.
    pub fn gate(&self, cpu: u64, wait: Duration) -> CpuRun {
        let Some(slot) = self.slot(cpu) else {
            return CpuRun::Stopped;
        };
        let Ok(mut run) = slot.run.lock() else {
            return CpuRun::Stopped;
        };
        if *run == CpuRun::Stopped {
            run = match slot.wake.wait_timeout(run, wait) {
                Ok((guard, _)) => guard,
                Err(_) => return CpuRun::Stopped,
            };
        }
        let now = *run;
        if let CpuRun::Start { .. } = now {
            *run = CpuRun::Running;
        }
        now
    }

    /// Sets vCPU `cpu`'s run state (restore, stop-self).
    pub fn set_run(&self, cpu: u64, state: CpuRun) {
        if let Some(slot) = self.slot(cpu) {
            if let Ok(mut run) = slot.run.lock() {
                *run = state;
                slot.wake.notify_all();
            }
        }
    }

    /// vCPU `cpu`'s run state.
    pub fn run_state(&self, cpu: u64) -> CpuRun {
        self.slot(cpu)
            .and_then(|s| s.run.lock().ok().map(|r| *r))
            .unwrap_or(CpuRun::Stopped)
    }

    /// The modes every vCPU should have.
    pub fn modes(&self) -> Modes {
        self.modes.lock().map(|m| *m).unwrap_or_default()
    }

    /// Sets the modes (restore); the generation starts again at 0, which every vCPU
    /// counts as applied (their LPCRs come with the state).
    pub fn set_modes(&self, ile: bool, ail: u64) {
        if let Ok(mut m) = self.modes.lock() {
            *m = Modes {
                ile,
                ail,
                generation: 0,
            };
        }
    }

    /// The registered process table.
    pub fn process_table(&self) -> ProcessTable {
        self.process_table.lock().map(|p| *p).unwrap_or_default()
    }

    /// Applies a saved process table (restore).
    pub fn restore_process_table(&self, table: ProcessTable) -> std::io::Result<()> {
        if table.entry != 0 {
            self.mmu.configure_v3_mmu(table.flags, table.entry)?;
        }
        if let Ok(mut p) = self.process_table.lock() {
            *p = table;
        }
        Ok(())
    }

    /// The guest's time-of-day offset from the host's, in seconds.
    pub fn time_offset(&self) -> i64 {
        self.time_offset.load(Ordering::Relaxed)
    }

    /// Sets it (restore).
    pub fn set_time_offset(&self, secs: i64) {
        self.time_offset.store(secs, Ordering::Relaxed);
    }

    /// Answers hypercall `nr` of vCPU `cpu` with arguments r4..r12.
    pub fn hcall(&self, cpu: u64, nr: u64, args: &[u64; 9], io: &dyn IoHandler) -> Answer {
        match nr {
            H_PUT_TERM_CHAR => self.put_term_char(args, io),
            H_GET_TERM_CHAR => self.get_term_char(args, io),
            H_SET_MODE => self.set_mode(args),
            H_REGISTER_PROC_TBL => self.register_process_table(args),
            H_RTAS => self.rtas(cpu, args[0], io),
            H_PUT_TCE => Answer::ret(self.tce.put(args[0], args[1], args[2])),
            H_STUFF_TCE => Answer::ret(self.tce.stuff(args[0], args[1], args[2], args[3])),
            H_GET_CPU_CHARACTERISTICS => match self.cpu_char.get() {
                Some(&(character, behaviour)) => Answer {
                    ret: H_SUCCESS,
                    outputs: Some(vec![character, behaviour]),
                    effect: Effect::None,
                },
                None => Answer::ret(H_FUNCTION),
            },
            H_GET_TCE => {
                let (ret, tce) = self.tce.get(args[0], args[1]);
                Answer {
                    ret,
                    outputs: Some(vec![tce]),
                    effect: Effect::None,
                }
            }
            _ => {
                if self.unknown_logged.fetch_add(1, Ordering::Relaxed) < UNKNOWN_LOG_LIMIT {
                    log::warn!(
                        "vCPU {cpu}: unsupported hypercall {nr:#x} (args {:#x} {:#x} {:#x}): H_FUNCTION",
                        args[0],
                        args[1],
                        args[2]
                    );
                }
                Answer::ret(H_FUNCTION)
            }
        }
    }

    fn put_term_char(&self, args: &[u64; 9], io: &dyn IoHandler) -> Answer {
        let (termno, len) = (args[0], args[1]);
        if termno != VTY_TERMNO {
            return Answer::ret(H_PARAMETER);
        }
        let Some(len) = usize::try_from(len).ok().filter(|&l| l <= 16) else {
            return Answer::ret(H_PARAMETER);
        };
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&args[2].to_be_bytes());
        bytes[8..].copy_from_slice(&args[3].to_be_bytes());
        for &b in &bytes[..len] {
            io.pio_write(CONSOLE_PORT, &[b]);
        }
        Answer::ret(H_SUCCESS)
    }

    fn get_term_char(&self, args: &[u64; 9], io: &dyn IoHandler) -> Answer {
        if args[0] != VTY_TERMNO {
            return Answer::ret(H_PARAMETER);
        }
        let mut got = Vec::with_capacity(16);
        while got.len() < 16 {
            let mut lsr = [0u8];
            io.pio_read(CONSOLE_PORT + 5, &mut lsr);
            // LSR bit 0: data ready.
            if lsr[0] & 1 == 0 || lsr[0] == 0xff {
                break;
            }
            let mut b = [0u8];
            io.pio_read(CONSOLE_PORT, &mut b);
            got.push(b[0]);
        }
        let n = got.len();
        got.resize(16, 0);
        Answer {
            ret: H_SUCCESS,
            outputs: Some(vec![n as u64, pack(&got[..8]), pack(&got[8..])]),
            effect: Effect::None,
        }
    }

    fn set_mode(&self, args: &[u64; 9]) -> Answer {
        let (mflags, resource, value1, value2) = (args[0], args[1], args[2], args[3]);
        let change = |f: &dyn Fn(&mut Modes)| {
            if let Ok(mut m) = self.modes.lock() {
                f(&mut m);
                m.generation += 1;
            }
        };
        match resource {
            SET_MODE_LE | SET_MODE_ADDR_TRANS if value1 != 0 => Answer::ret(H_P3),
            SET_MODE_LE | SET_MODE_ADDR_TRANS if value2 != 0 => Answer::ret(H_P4),
            SET_MODE_LE => match mflags {
                0 | 1 => {
                    change(&|m| m.ile = mflags == 1);
                    Answer::ret(H_SUCCESS)
                }
                _ => Answer::ret(H_UNSUPPORTED_FLAG),
            },
            SET_MODE_ADDR_TRANS => match mflags {
                0 | 3 => {
                    change(&|m| m.ail = mflags);
                    Answer::ret(H_SUCCESS)
                }
                _ => Answer::ret(H_UNSUPPORTED_FLAG),
            },
            _ => Answer::ret(H_P2),
        }
    }

    fn register_process_table(&self, args: &[u64; 9]) -> Answer {
        let (flags, table, page_size, table_size) = (args[0], args[1], args[2], args[3]);
        if flags & !0x1f != 0 {
            return Answer::ret(H_PARAMETER);
        }
        let Ok(mut current) = self.process_table.lock() else {
            return Answer::ret(H_HARDWARE);
        };
        let entry = if flags & PROC_TBL_MODIFY != 0 {
            if flags & PROC_TBL_REGISTER != 0 {
                if flags & PROC_TBL_RADIX == 0 || flags & PROC_TBL_HASH_SEG != 0 {
                    // Hash guests are not offered (the device tree says radix only).
                    return Answer::ret(H_PARAMETER);
                }
                if table & 0xfff != 0 || table >> 60 != 0 {
                    return Answer::ret(H_P2);
                }
                if page_size != 0 {
                    return Answer::ret(H_P3);
                }
                if table_size > 24 {
                    return Answer::ret(H_P4);
                }
                PATE_GR | table | table_size
            } else {
                // Deregister: a benign entry keeping the radix bit.
                current.entry & PATE_GR
            }
        } else {
            if (flags & PROC_TBL_RADIX != 0) != (current.entry & PATE_GR != 0) {
                return Answer::ret(H_PARAMETER);
            }
            current.entry
        };
        let mut mmu_flags = 0;
        if flags & PROC_TBL_RADIX != 0 {
            mmu_flags |= super::kvm::MMUV3_RADIX;
        }
        if flags & PROC_TBL_GTSE != 0 {
            mmu_flags |= super::kvm::MMUV3_GTSE;
        }
        match self.mmu.configure_v3_mmu(mmu_flags, entry) {
            Ok(()) => {
                *current = ProcessTable {
                    flags: mmu_flags,
                    entry,
                };
                Answer::ret(H_SUCCESS)
            }
            Err(e) => {
                log::warn!("KVM refused the guest's process table {entry:#x}: {e}");
                Answer::ret(H_PARAMETER)
            }
        }
    }

    /// An RTAS call: `addr` is the guest-physical `rtas_args`.
    fn rtas(&self, cpu: u64, addr: u64, io: &dyn IoHandler) -> Answer {
        let ram = &*self.ram;
        let (Some(token), Some(nargs), Some(nret)) = (
            read_be32(ram, addr),
            read_be32(ram, addr.wrapping_add(4)),
            read_be32(ram, addr.wrapping_add(8)),
        ) else {
            log::warn!("vCPU {cpu}: RTAS arguments at {addr:#x} are outside guest RAM");
            return Answer::ret(H_PARAMETER);
        };
        if nargs > RTAS_MAX_WORDS || nret > RTAS_MAX_WORDS || nargs + nret > RTAS_MAX_WORDS {
            log::warn!(
                "vCPU {cpu}: RTAS call {token:#x} with {nargs} arguments and {nret} returns"
            );
            return Answer::ret(H_PARAMETER);
        }
        let mut argv = [0u32; RTAS_MAX_WORDS as usize];
        for (i, a) in argv.iter_mut().enumerate().take(nargs as usize) {
            match read_be32(ram, addr + 12 + 4 * i as u64) {
                Some(v) => *a = v,
                None => return Answer::ret(H_PARAMETER),
            }
        }
        let argv = &argv[..nargs as usize];
        let (rets, effect) = self.rtas_call(cpu, token, argv, nret, io);
        let rets_at = addr + 12 + 4 * u64::from(nargs);
        for (i, r) in rets.iter().take(nret as usize).enumerate() {
            if ram.write(rets_at + 4 * i as u64, &r.to_be_bytes()).is_err() {
                return Answer::ret(H_PARAMETER);
            }
        }
        Answer {
            ret: H_SUCCESS,
            outputs: None,
            effect,
        }
    }

    /// One RTAS call: its return words (status first) and effect.
    fn rtas_call(
        &self,
        cpu: u64,
        token: u32,
        args: &[u32],
        nret: u32,
        io: &dyn IoHandler,
    ) -> (Vec<u32>, Effect) {
        let status = |s: i32| vec![u32::from_ne_bytes(s.to_ne_bytes())];
        let arg = |i: usize| args.get(i).copied();
        match token {
            rtas::POWER_OFF => (
                status(RTAS_SUCCESS),
                Effect::Stop(VcpuStop::PowerOffRequested),
            ),
            rtas::SYSTEM_REBOOT => (status(RTAS_SUCCESS), Effect::Stop(VcpuStop::ResetRequested)),
            rtas::IBM_OS_TERM => {
                let msg = arg(0).map(|a| self.read_string(u64::from(a)));
                log::error!(
                    "The guest terminated (ibm,os-term): {}",
                    msg.unwrap_or_default()
                );
                (status(RTAS_SUCCESS), Effect::Stop(VcpuStop::Crashed))
            }
            rtas::DISPLAY_CHARACTER => match arg(0) {
                Some(c) => {
                    io.pio_write(CONSOLE_PORT, &[c.to_le_bytes()[0]]);
                    (status(RTAS_SUCCESS), Effect::None)
                }
                None => (status(RTAS_PARAM_ERROR), Effect::None),
            },
            rtas::GET_TIME_OF_DAY => {
                let now = unix_now() + self.time_offset();
                match civil_from_unix(now) {
                    Some([y, mo, d, h, mi, s]) => (vec![0, y, mo, d, h, mi, s, 0], Effect::None),
                    None => (status(RTAS_HW_ERROR), Effect::None),
                }
            }
            rtas::SET_TIME_OF_DAY => {
                let t: Option<Vec<u32>> = (0..6).map(arg).collect();
                match t.and_then(|t| unix_from_civil(&t)) {
                    Some(secs) => {
                        self.set_time_offset(secs - unix_now());
                        (status(RTAS_SUCCESS), Effect::None)
                    }
                    None => (status(RTAS_PARAM_ERROR), Effect::None),
                }
            }
            rtas::QUERY_CPU_STOPPED_STATE => match arg(0).and_then(|c| self.slot(u64::from(c))) {
                Some(_) => {
                    let state = match self.run_state(u64::from(args[0])) {
                        CpuRun::Stopped => CPU_STOPPED,
                        _ => CPU_RUNNING,
                    };
                    (vec![0, state], Effect::None)
                }
                None => (status(RTAS_PARAM_ERROR), Effect::None),
            },
            rtas::START_CPU => {
                let (Some(target), Some(entry), Some(r3)) = (arg(0), arg(1), arg(2)) else {
                    return (status(RTAS_PARAM_ERROR), Effect::None);
                };
                let Some(slot) = self.slot(u64::from(target)) else {
                    return (status(RTAS_PARAM_ERROR), Effect::None);
                };
                let Ok(mut run) = slot.run.lock() else {
                    return (status(RTAS_HW_ERROR), Effect::None);
                };
                if *run != CpuRun::Stopped {
                    return (status(RTAS_HW_ERROR), Effect::None);
                }
                *run = CpuRun::Start {
                    entry: u64::from(entry),
                    r3: u64::from(r3),
                };
                slot.wake.notify_all();
                (status(RTAS_SUCCESS), Effect::None)
            }
            rtas::STOP_SELF => {
                self.set_run(cpu, CpuRun::Stopped);
                (status(RTAS_SUCCESS), Effect::StoppedSelf)
            }
            rtas::EVENT_SCAN => (status(RTAS_NO_EVENT), Effect::None),
            rtas::IBM_READ_PCI_CONFIG | rtas::IBM_WRITE_PCI_CONFIG => {
                (self.pci_config(token, args), Effect::None)
            }
            other => {
                if self.unknown_logged.fetch_add(1, Ordering::Relaxed) < UNKNOWN_LOG_LIMIT {
                    log::warn!(
                        "vCPU {cpu}: unsupported RTAS call {other:#x} ({} args, {nret} returns)",
                        args.len()
                    );
                }
                (status(RTAS_PARAM_ERROR), Effect::None)
            }
        }
    }

    /// `ibm,read-pci-config` (address, BUID high, BUID low, size -> status, value) and
    /// `ibm,write-pci-config` (address, BUID high, BUID low, size, value -> status).
    fn pci_config(&self, token: u32, args: &[u32]) -> Vec<u32> {
        let word = |s: i32| u32::from_ne_bytes(s.to_ne_bytes());
        let fault = |f: ConfigFault| match f {
            ConfigFault::NoDevice => vec![word(RTAS_HW_ERROR)],
            ConfigFault::BadAccess => vec![word(RTAS_PARAM_ERROR)],
        };
        let Some(pci) = self.pci.get() else {
            return vec![word(RTAS_HW_ERROR)];
        };
        let [addr, hi, lo, size, rest @ ..] = args else {
            return vec![word(RTAS_PARAM_ERROR)];
        };
        let buid = (u64::from(*hi) << 32) | u64::from(*lo);
        if token == rtas::IBM_READ_PCI_CONFIG {
            match pci.read(buid, *addr, *size) {
                Ok(v) => vec![word(RTAS_SUCCESS), v],
                Err(f) => fault(f),
            }
        } else {
            let Some(value) = rest.first() else {
                return vec![word(RTAS_PARAM_ERROR)];
            };
            match pci.write(buid, *addr, *size, *value) {
                Ok(()) => vec![word(RTAS_SUCCESS)],
                Err(f) => fault(f),
            }
        }
    }

    /// A NUL-terminated string of guest memory, at most [`OS_TERM_MAX`] bytes.
    fn read_string(&self, addr: u64) -> String {
        let mut out = Vec::new();
        for i in 0..OS_TERM_MAX as u64 {
            let mut b = [0u8];
            if self.ram.read(addr + i, &mut b).is_err() || b[0] == 0 {
                break;
            }
            out.push(b[0]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `[year, month, day, hour, minute, second]` of a Unix time.
fn civil_from_unix(t: i64) -> Option<[u32; 6]> {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let f = |v: i64| u32::try_from(v).ok();
    Some([
        f(y)?,
        f(m)?,
        f(d)?,
        f(secs / 3600)?,
        f(secs / 60 % 60)?,
        f(secs % 60)?,
    ])
}

/// The Unix time of `[year, month, day, hour, minute, second]`, if it is a valid time.
fn unix_from_civil(t: &[u32]) -> Option<i64> {
    let [y, mo, d, h, mi, s] = <[u32; 6]>::try_from(t).ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), i64::from(mo), i64::from(d));
    Some(days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s))
}

#[cfg(test)]
#[path = "spapr_tests.rs"]
mod tests;
