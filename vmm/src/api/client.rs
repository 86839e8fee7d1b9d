//! `rangevm ctl`: the client of a running VM's API socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{ApiError, Request, Response, VERSION};

/// Talk to a running VM (`rangevm run --api-socket PATH`). Prints the VM's answer as
/// JSON; exits 1 with the VM's sentence when it refuses.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub what: Ctl,
}

/// The things `rangevm ctl` can do.
#[derive(Debug, Subcommand)]
pub enum Ctl {
    /// The VM: info, pause, resume, shutdown.
    Vm {
        /// What to do with it.
        #[command(subcommand)]
        action: VmAction,
    },
    /// Dirty-page tracking: start (KVM dirty logging on), harvest (the pages written
    /// since the last harvest), stop.
    Dirty {
        /// What to do.
        #[command(subcommand)]
        action: DirtyAction,
    },
    /// The balloon: set its size, or read the guest's memory statistics.
    Balloon {
        /// What to do.
        #[command(subcommand)]
        action: BalloonAction,
    },
}

/// VM actions.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum VmAction {
    /// State, vCPUs, memory, lock mode, regions.
    Info,
    /// Stop the vCPUs (the guest keeps its state).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Stop the guest and end rangevm (exit status 0).
    Shutdown,
}

/// Dirty-tracking actions.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum DirtyAction {
    /// Turn KVM's dirty logging on.
    Start,
    /// Collect the dirty pages since the last harvest.
    Harvest,
    /// Turn dirty logging off.
    Stop,
}

/// Balloon actions.
#[derive(Debug, Clone, Subcommand)]
pub enum BalloonAction {
    /// Inflate or deflate the balloon to SIZE (bytes, or with K, M, G).
    Set {
        /// The balloon's target size.
        #[arg(value_parser = crate::cli::parse_size_or_zero)]
        size: u64,
    },
    /// The guest's memory statistics, as its balloon driver reports them.
    Stats,
}

impl Ctl {
    fn request(&self) -> Request {
        let (command, args) = match self {
            Ctl::Vm { action } => (
                match action {
                    VmAction::Info => "vm.info",
                    VmAction::Pause => "vm.pause",
                    VmAction::Resume => "vm.resume",
                    VmAction::Shutdown => "vm.shutdown",
                },
                serde_json::Value::Null,
            ),
            Ctl::Dirty { action } => (
                match action {
                    DirtyAction::Start => "dirty.start",
                    DirtyAction::Harvest => "dirty.harvest",
                    DirtyAction::Stop => "dirty.stop",
                },
                serde_json::Value::Null,
            ),
            Ctl::Balloon { action } => match action {
                BalloonAction::Set { size } => ("balloon.set", json!({ "bytes": size })),
                BalloonAction::Stats => ("balloon.stats", serde_json::Value::Null),
            },
        };
        Request {
            version: VERSION,
            command: command.into(),
            args,
        }
    }
}

/// Sends one request and returns the VM's result.
pub fn send(socket: &std::path::Path, request: &Request) -> Result<serde_json::Value, ApiError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ApiError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line =
        serde_json::to_string(request).map_err(|e| ApiError::BadResponse(e.to_string()))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(ApiError::Io)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(ApiError::Io)?;
    let response: Response = serde_json::from_str(answer.trim())
        .map_err(|e| ApiError::BadResponse(format!("{e}: {:?}", answer.trim())))?;
    if response.ok {
        Ok(response.result)
    } else {
        Err(ApiError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

/// Runs `rangevm ctl`: prints the result as pretty JSON.
pub fn run(args: &CtlArgs) -> Result<(), ApiError> {
    let result = send(&args.api_socket, &args.what.request())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
    );
    Ok(())
}
