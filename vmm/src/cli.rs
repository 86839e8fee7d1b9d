//! Command-line interface.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::host_check::{self, HostCheckError};

/// Errors of the CLI's commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `rangevm host-check` failed.
    #[error("Host check failed")]
    HostCheck(#[from] HostCheckError),
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
    /// Report what this host offers rangevm: host page size, KVM (API version and
    /// the capabilities rangevm uses) and userfaultfd (needed for postcopy and the
    /// fault engine). Exits with status 1 if KVM is unusable.
    HostCheck {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
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
    fn unknown_subcommand_is_rejected() {
        assert!(Cli::try_parse_from(["rangevm", "fly"]).is_err());
        assert!(Cli::try_parse_from(["rangevm", "host-check", "--json"]).is_ok());
    }
}
