//! `rangevm run`: boot a guest and run it until it powers off, resets, panics,
//! triple-faults, or the VMM is told to stop.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::Args;
use rangevm_memory::LockMode;

use crate::api::server::ApiSocket;
use crate::cli::parse_size;
use crate::event_loop::{self, EventLoopError, Outcome, Signals};
use crate::machine::{Machine, MachineConfig, MachineError};
use crate::migration::destination::{self, DestinationError, IncomingOptions};
use crate::migration::slot::Migrations;
use crate::migration::transport::MigrationAddr;
use rangevm_devices::GuestRequest;
use std::sync::Arc;

/// Guest memory when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// The kernel command line when `--cmdline` is not given (the console is the 16550 on
/// x86_64, the hypervisor virtual terminal on PowerPC).
#[cfg(not(target_arch = "powerpc64"))]
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// The kernel command line when `--cmdline` is not given (the console is the 16550 on
/// x86_64, the hypervisor virtual terminal on PowerPC).
#[cfg(target_arch = "powerpc64")]
pub const DEFAULT_CMDLINE: &str = "console=hvc0 reboot=k panic=1";

/// Exit status: the guest powered off.
pub const EXIT_POWER_OFF: u8 = 0;
/// Exit status: the VMM failed (a message on standard error says why).
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit status: the guest reset itself (reboot).
pub const EXIT_RESET: u8 = 3;
/// Exit status: a vCPU triple-faulted.
pub const EXIT_TRIPLE_FAULT: u8 = 4;
/// Exit status: the guest kernel reported a panic (pvpanic).
pub const EXIT_PANIC: u8 = 5;

/// Errors of `rangevm run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The serial output file could not be created.
    #[error("Cannot create the serial output file {0}")]
    SerialFile(PathBuf, #[source] std::io::Error),
    /// Standard output could not be duplicated for the serial console.
    #[error("Cannot use standard output for the serial console")]
    Stdout(#[source] std::io::Error),
    /// The machine could not be built.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The event loop failed.
    #[error("The VMM's event loop failed")]
    EventLoop(#[from] EventLoopError),
    /// The API socket could not be set up.
    #[error("Cannot serve the control API")]
    Api(#[from] crate::api::ApiError),
    /// `--incoming`: receiving the migration failed.
    #[error("Incoming migration failed")]
    Incoming(#[source] DestinationError),
    /// The migration request channel could not be created.
    #[error("Cannot create the migration request channel")]
    Channel(#[source] std::io::Error),
    /// Neither --kernel nor --incoming.
    #[error("Give --kernel PATH, or --incoming ADDR to receive a migration")]
    NoKernel,
    /// A vCPU failed while the guest ran.
    #[error("The guest stopped: {0}")]
    Vcpu(String),
}

/// `range` or `global` (`none`, the stress tool's baseline, is not a way to run a VM).
fn parse_mode(s: &str) -> Result<LockMode, String> {
    s.parse()
        .map_err(|e: rangevm_memory::RangeLockError| e.to_string())
}

/// Where the guest's serial console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// Standard output, with standard input as the console's input.
    Stdio,
    /// A file (created or truncated), no input.
    File(PathBuf),
    /// Nowhere.
    Null,
}

impl FromStr for SerialTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialTarget::Stdio),
            "null" => Ok(SerialTarget::Null),
            _ => match s.strip_prefix("file:") {
                Some("") => Err("'file:' needs a path, as in file:/tmp/console.log".into()),
                Some(path) => Ok(SerialTarget::File(PathBuf::from(path))),
                None => Err(format!(
                    "'{s}' is not a serial target (use stdio, file:PATH or null)"
                )),
            },
        }
    }
}

/// Boot a guest kernel and run it.
///
/// Exit status: 0 the guest powered off (or was shut down through the API); 1 the VMM failed (standard error says why);
/// 2 bad command line; 3 the guest reset (reboot); 4 a vCPU triple-faulted; 5 the
/// guest kernel panicked (reported through pvpanic); 130 and 143 after SIGINT
/// (Ctrl-C) and SIGTERM, which stop the guest and shut down cleanly.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest kernel: on x86_64 a bzImage, or an ELF vmlinux (entered through its PVH
    /// note if it has one, else at its 64-bit entry); on PowerPC64 an ELF vmlinux
    /// (entered in real mode with the device tree in r3). Not with --incoming.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "incoming",
        conflicts_with = "incoming"
    )]
    pub kernel: Option<PathBuf>,
    /// An initial ramdisk, placed high in guest memory (below 3 GiB on x86_64, below
    /// the device tree in the first 256 MiB on PowerPC64).
    #[arg(long, value_name = "PATH", conflicts_with = "incoming")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Guest memory: bytes, or a number with K, M, G or T (powers of 1024). At least
    /// 2M, a multiple of the host page size; beyond 3G it continues above 4 GiB.
    /// Default 512M; with --incoming, the source's (given, it must match the source).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Number of vCPUs (1 to 254). Default 1; with --incoming, the source's (given, it
    /// must match the source).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=u32::from(crate::machine::MAX_CPUS) as i64))]
    pub cpus: Option<u32>,
    /// How guest memory is locked: `range` locks only the guest-physical range each
    /// operation touches; `global` uses one lock for all of it (the baseline).
    #[arg(long, value_name = "MODE", default_value = "range", value_parser = parse_mode)]
    pub mem_lock: LockMode,
    /// Where the guest's serial console goes: stdio (standard output, and standard
    /// input as its input), file:PATH, or null.
    #[arg(long, value_name = "TARGET", default_value = "stdio")]
    pub serial: SerialTarget,
    /// Serve the control API on this Unix socket (`rangevm ctl --api-socket PATH ...`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Receive a live migration instead of booting a kernel: listen on tcp:HOST:PORT
    /// (tcp:0.0.0.0:4444 for every address) or unix:PATH, take the guest's memory and
    /// state from the first source that connects (`rangevm ctl migrate send` on the
    /// source), and run it. Memory size and vCPUs come from the source.
    #[arg(long, value_name = "ADDR", value_parser = parse_incoming)]
    pub incoming: Option<MigrationAddr>,
    /// With --incoming, if the source migrates in postcopy: the fault handler threads
    /// (each with a userfaultfd of its own for its share of guest memory) that fetch
    /// the pages vCPUs touch from the source.
    #[arg(long, value_name = "N", default_value_t = 2, requires = "incoming",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub postcopy_handlers: u32,
    /// With --incoming: if a postcopy migration's link drops, how long (seconds) the
    /// guest waits on missing pages for `migrate resume` before rangevm gives up and
    /// exits 1 (the guest cannot go on without its source).
    #[arg(long, value_name = "SECS", default_value_t = 300, requires = "incoming",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub postcopy_resume_timeout: u64,
}

fn parse_incoming(s: &str) -> Result<MigrationAddr, String> {
    s.parse()
        .map_err(|e: crate::migration::transport::TransportError| e.to_string())
}

/// Standard output as an unbuffered writer (the guest's console appears as it types).
fn stdout_writer() -> Result<Box<dyn Write + Send>, RunError> {
    let stdout = std::io::stdout();
    let fd = std::os::fd::AsFd::as_fd(&stdout)
        .try_clone_to_owned()
        .map_err(RunError::Stdout)?;
    Ok(Box::new(File::from(fd)))
}

/// The terminal settings of standard input while the guest runs: characters go to the
/// guest as typed, unechoed (the guest echoes), and Ctrl-C still signals the VMM.
struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty only inspects file descriptor 0.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return RawTerminal { saved: None };
        }
        // SAFETY: `tio` is a local termios that tcgetattr fills before it is read.
        let saved = unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut tio) != 0 {
                return RawTerminal { saved: None };
            }
            tio
        };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: sets the terminal of fd 0 from a valid termios value.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores fd 0's terminal settings saved by `enter`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

/// Runs `rangevm run`; returns the exit status for how the guest ended.
pub fn run(args: RunArgs) -> Result<ExitCode, RunError> {
    // Before any thread starts, so every thread inherits the blocked mask.
    let signals = Signals::block()?;
    let api = args
        .api_socket
        .as_deref()
        .map(ApiSocket::bind)
        .transpose()?;
    let serial_out: Box<dyn Write + Send> = match &args.serial {
        SerialTarget::Stdio => stdout_writer()?,
        SerialTarget::File(path) => {
            Box::new(File::create(path).map_err(|e| RunError::SerialFile(path.clone(), e))?)
        }
        SerialTarget::Null => Box::new(std::io::sink()),
    };
    let mut migrations = Migrations::new().map_err(RunError::Channel)?;
    let mut machine = if let Some(addr) = args.incoming {
        let received = destination::receive(
            IncomingOptions {
                addr,
                memory: args.memory,
                cpus: args.cpus,
                mem_lock: args.mem_lock,
                serial_out,
                ctl: migrations.ctl(),
                postcopy_handlers: usize::try_from(args.postcopy_handlers).unwrap_or(2),
                resume_timeout: std::time::Duration::from_secs(args.postcopy_resume_timeout),
            },
            &signals,
        );
        match received {
            Ok(r) => {
                let verified = r
                    .verified
                    .map(|n| format!(", all {n} pages verified"))
                    .unwrap_or_default();
                if let Some(shared) = r.postcopy {
                    eprintln!(
                        "rangevm: postcopy migration from {}: the guest runs here after {:.0} ms; its memory follows",
                        r.source,
                        r.elapsed.as_secs_f64() * 1e3
                    );
                    migrations.set_incoming(shared, Arc::clone(r.machine.ram()));
                } else {
                    eprintln!(
                        "rangevm: migration from {} received ({:.1} MiB, {} round(s), {:.0} ms{verified}); the guest runs here",
                        r.source,
                        r.bytes as f64 / f64::from(1 << 20),
                        r.rounds,
                        r.elapsed.as_secs_f64() * 1e3
                    );
                }
                r.machine
            }
            Err(DestinationError::Signal(signo)) => {
                return Ok(ExitCode::from(
                    u8::try_from(128 + signo).unwrap_or(EXIT_VMM_ERROR),
                ))
            }
            Err(e) => return Err(RunError::Incoming(e)),
        }
    } else {
        let Some(kernel) = args.kernel else {
            return Err(RunError::NoKernel);
        };
        Machine::start(MachineConfig {
            kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
            memory: args.memory.unwrap_or(DEFAULT_MEMORY),
            cpus: args.cpus.unwrap_or(1),
            mem_lock: args.mem_lock,
            serial_out,
        })?
    };
    let stdin_to_serial = args.serial == SerialTarget::Stdio;
    let terminal = stdin_to_serial.then(RawTerminal::enter);
    let outcome = event_loop::run(&mut machine, signals, stdin_to_serial, api, migrations);
    machine.stop();
    drop(terminal);
    let code = match outcome? {
        Outcome::Guest(GuestRequest::PowerOff) => EXIT_POWER_OFF,
        Outcome::ApiShutdown => {
            log::info!("Shut down through the control API");
            EXIT_POWER_OFF
        }
        Outcome::Migrated => {
            eprintln!("rangevm: the guest was migrated and runs on the destination");
            EXIT_POWER_OFF
        }
        Outcome::Guest(GuestRequest::Reset) => {
            log::info!("The guest reset itself");
            EXIT_RESET
        }
        Outcome::Guest(GuestRequest::Panic) => {
            log::warn!("The guest kernel panicked");
            EXIT_PANIC
        }
        Outcome::TripleFault => {
            log::warn!("A vCPU triple-faulted");
            EXIT_TRIPLE_FAULT
        }
        Outcome::Signal(signo) => u8::try_from(128 + signo).unwrap_or(EXIT_VMM_ERROR),
        Outcome::Failed(why) => return Err(RunError::Vcpu(why)),
    };
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_targets_parse() {
        assert_eq!("stdio".parse(), Ok(SerialTarget::Stdio));
        assert_eq!("null".parse(), Ok(SerialTarget::Null));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialTarget::File("/tmp/x".into()))
        );
        assert!("file:".parse::<SerialTarget>().is_err());
        assert!("tty".parse::<SerialTarget>().is_err());
    }
}
