//! Command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::client::{self as ctl, CtlArgs};
use crate::api::ApiError;
use crate::host_check::{self, HostCheckError};
use crate::run::{self, RunArgs, RunError};
use crate::stress::{self, StressArgs, StressError};

/// Errors of the CLI's commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `rangevm host-check` failed.
    #[error("Host check failed")]
    HostCheck(#[from] HostCheckError),
    /// `rangevm run` failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// `rangevm ctl` failed.
    #[error(transparent)]
    Ctl(#[from] ApiError),
    /// `rangevm stress` failed.
    #[error("Stress test failed")]
    Stress(#[from] StressError),
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "'{s}' is not a size: unknown suffix '{c}' (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 512M, 2G)"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("'{s}' is zero or too large"))
}

/// Parses a size that may be zero (a balloon of 0 bytes is a fully deflated one).
pub fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim()
        .trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T'])
        == "0"
    {
        return Ok(0);
    }
    parse_size(s)
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings (default).
    Warn,
    /// Progress of long operations.
    Info,
    /// Details for bug reports.
    Debug,
    /// Everything.
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// rangevm: a KVM virtual machine monitor whose guest memory is locked by
/// guest-physical range instead of one big lock.
///
/// vCPU page faults, userfaultfd postcopy fetches, balloon inflate/deflate, dirty-log
/// harvesting and device DMA each lock only the guest-physical range they touch, so
/// they run side by side wherever their ranges do not overlap. `--mem-lock global`
/// (on the commands that take guest memory) switches to one lock for the whole
/// address space, to measure the difference on the same work.
#[derive(Debug, Parser)]
#[command(name = "rangevm", version, propagate_version = true)]
pub struct Cli {
    /// How much to log on standard error.
    #[arg(long, value_enum, default_value = "warn", global = true)]
    pub log_level: LogLevel,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest kernel (bzImage or ELF) with an initrd and run it, its serial
    /// console on standard input/output. Exit status: 0 the guest powered off, 1 the
    /// VMM failed, 2 bad command line, 3 guest reset, 4 triple fault, 5 guest panic,
    /// 130/143 after SIGINT/SIGTERM (clean shutdown).
    Run(RunArgs),
    /// Talk to a running VM through its API socket (`rangevm run --api-socket PATH`):
    /// `vm info|pause|resume|shutdown`, `dirty start|harvest|stop`, `balloon set
    /// SIZE|stats`. Prints the VM's answer as JSON.
    Ctl(CtlArgs),
    /// Report what this host offers rangevm: host page size, KVM (API version and
    /// the capabilities rangevm uses) and userfaultfd (needed for postcopy and the
    /// fault engine). Exits with status 1 if KVM is unusable.
    HostCheck {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stress concurrent page faulting on userfaultfd-backed guest memory: host-thread
    /// workers touch missing pages, handler threads fill them under the range lock,
    /// and the workers give them back through the balloon path so they fault again.
    /// Reports faults/s, touch latency percentiles, and how long and how often the
    /// range lock made anybody wait (and whether for a non-overlapping range).
    /// `--compare` runs range mode and global mode on the same work.
    Stress(StressArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Run(args) => Ok(run::run(args)?),
        Command::Ctl(args) => {
            ctl::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stress(args) => {
            stress::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::HostCheck { json } => {
            let report = host_check::check()?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            Ok(if report.kvm_usable() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn unknown_subcommand_is_rejected() {
        assert!(Cli::try_parse_from(["rangevm", "fly"]).is_err());
        assert!(Cli::try_parse_from(["rangevm", "host-check", "--json"]).is_ok());
    }
}
