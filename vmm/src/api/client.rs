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
    /// Live migration: send the running guest to a destination started with
    /// `rangevm run --incoming ADDR`, follow its progress, cancel it.
    Migrate {
        /// What to do.
        #[command(subcommand)]
        action: MigrateAction,
    },
}

/// Migration actions.
#[derive(Debug, Clone, Subcommand)]
pub enum MigrateAction {
    /// Migrate the guest to ADDR (tcp:HOST:PORT or unix:PATH): a full pass over its
    /// memory while it runs, rounds of the pages it dirties until the rest fits the
    /// downtime target, then a short pause for the last pages and the vCPU and device
    /// state. Shows a progress bar on standard error and prints the final status as
    /// JSON; exits 0 once the guest runs on the destination (the source VMM then
    /// exits), 1 if the migration failed (the guest keeps running here).
    Send {
        /// The destination.
        #[arg(value_name = "ADDR")]
        url: String,
        /// Switch over once the remaining dirty pages would take at most this long to
        /// send at the measured bandwidth, in ms.
        #[arg(long, value_name = "MS", default_value_t = crate::migration::DEFAULT_DOWNTIME_MS)]
        downtime_target: u64,
        /// Switch over after this many rounds of dirty pages even if the downtime
        /// target is not met (a guest that dirties memory faster than the link).
        #[arg(long, value_name = "N", default_value_t = crate::migration::DEFAULT_MAX_ROUNDS)]
        max_rounds: u32,
        /// Start it and return at once; follow it with `migrate status`.
        #[arg(long)]
        detach: bool,
        /// At switch-over, send a CRC32C of every guest page; the destination compares
        /// them with the pages it received and refuses to start the guest (which then
        /// keeps running here) if any differs. Costs a pass over guest memory on each
        /// side while the guest is paused.
        #[arg(long)]
        verify: bool,
        /// Postcopy: pause here at once, start the guest on the destination with its
        /// memory served by userfaultfd, answer the pages it faults on first (on a
        /// second connection) and push the rest in the background. The downtime is
        /// only the vCPU and device state; the guest runs slower until its memory has
        /// arrived. After the switch the guest lives on the destination: if the link
        /// drops, it cannot go on (recovery is not implemented yet). With --verify,
        /// every page is checked against the source's CRC32C as it arrives.
        #[arg(long, conflicts_with = "postcopy_after")]
        postcopy: bool,
        /// Start in precopy and switch to postcopy after N rounds (the full pass is
        /// round 1) if precopy has not converged to the downtime target by then (or at
        /// --max-rounds): pages written since they were sent are dropped on the
        /// destination and come again.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(super::MAX_ROUNDS_LIMIT)))]
        postcopy_after: Option<u32>,
    },
    /// Phase, round, bytes sent, dirty rate, bandwidth, expected and actual downtime.
    Status,
    /// Stop a migration before switch-over; the guest keeps running here.
    Cancel,
    /// Go on with a postcopy migration whose link dropped. Run it on the destination
    /// first (it listens on ADDR), then on the source (it connects to ADDR): the
    /// destination tells which pages it holds, exactly those count as delivered, and
    /// every other page is sent (again).
    Resume {
        /// Where the destination listens.
        #[arg(value_name = "ADDR")]
        url: String,
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
    /// Checks the balloon's invariant: every host page it holds reads as zero (none
    /// came back with old content). Prints the pages held and the nonzero ones.
    Check,
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
                BalloonAction::Check => ("balloon.check", serde_json::Value::Null),
            },
            Ctl::Migrate { action } => match action {
                MigrateAction::Send {
                    url,
                    downtime_target,
                    max_rounds,
                    detach,
                    verify,
                    postcopy,
                    postcopy_after,
                } => (
                    "migrate.send",
                    json!({
                        "url": url,
                        "downtime_ms": downtime_target,
                        "max_rounds": max_rounds,
                        "watch": !detach,
                        "verify": verify,
                        "postcopy": postcopy,
                        "postcopy_after": postcopy_after,
                    }),
                ),
                MigrateAction::Status => ("migrate.status", serde_json::Value::Null),
                MigrateAction::Cancel => ("migrate.cancel", serde_json::Value::Null),
                MigrateAction::Resume { url } => ("migrate.resume", json!({ "url": url })),
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
    send_keep(socket, request).map(|(result, _)| result)
}

/// Sends one request; returns the VM's result and the connection, for the status
/// lines a watched `migrate.send` writes after its answer.
fn send_keep(
    socket: &std::path::Path,
    request: &Request,
) -> Result<(serde_json::Value, BufReader<UnixStream>), ApiError> {
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
    let mut reader = BufReader::new(stream);
    reader.read_line(&mut answer).map_err(ApiError::Io)?;
    let response: Response = serde_json::from_str(answer.trim())
        .map_err(|e| ApiError::BadResponse(format!("{e}: {:?}", answer.trim())))?;
    if response.ok {
        Ok((response.result, reader))
    } else {
        Err(ApiError::Refused(
            response.error.unwrap_or_else(|| "no reason given".into()),
        ))
    }
}

/// Follows a watched migration: a progress line on standard error (redrawn in place
/// on a terminal, one line per round otherwise), then the final status.
fn watch_migration(
    mut reader: BufReader<UnixStream>,
    first: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    use crate::migration::status::{MigrationStatus, Phase};
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(120)));
    // SAFETY: isatty only inspects file descriptor 2.
    let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
    let mut last: serde_json::Value = first;
    let mut last_round = None;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                if tty {
                    eprintln!();
                }
                return Err(ApiError::Io(e));
            }
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(line.trim()) else {
            continue;
        };
        if let Ok(status) = serde_json::from_value::<MigrationStatus>(value.clone()) {
            // A failure is said once, by the error this returns.
            let failed = (status.finished() && status.phase != Phase::Completed)
                || status.phase == Phase::PostcopyPaused;
            if tty && !failed {
                eprint!("\r\x1b[K{}", status.line());
            } else if tty {
                eprint!("\r\x1b[K");
            } else if !failed
                && (status.finished() || last_round != Some((status.round, status.phase)))
            {
                eprintln!("{}", status.line());
            }
            last_round = Some((status.round, status.phase));
            // A paused postcopy waits for an operator: stop watching and say so.
            let done = status.finished() || status.phase == Phase::PostcopyPaused;
            last = value;
            if done {
                if tty {
                    eprintln!();
                }
                match status.phase {
                    Phase::Completed => break,
                    _ => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&last).unwrap_or_default()
                        );
                        return Err(ApiError::MigrationFailed(status.line()));
                    }
                }
            }
        }
    }
    let status: Option<MigrationStatus> = serde_json::from_value(last.clone()).ok();
    if status.as_ref().map(|s| s.phase) != Some(Phase::Completed) {
        return Err(ApiError::MigrationFailed(
            "The VM closed the connection before the migration ended (see the source's log)".into(),
        ));
    }
    Ok(last)
}

/// Runs `rangevm ctl`: prints the result as pretty JSON.
pub fn run(args: &CtlArgs) -> Result<(), ApiError> {
    let request = args.what.request();
    let watched = request.command == "migrate.send"
        && request
            .args
            .get("watch")
            .and_then(serde_json::Value::as_bool)
            == Some(true);
    let result = if watched {
        let (first, reader) = send_keep(&args.api_socket, &request)?;
        watch_migration(reader, first)?
    } else {
        send(&args.api_socket, &request)?
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
    );
    Ok(())
}
