//! The event loop's side of outgoing migrations: at most one at a time, started by
//! `migrate.send`, watched by `migrate.status`, stopped by `migrate.cancel`.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::control::{machine_channel, MachineCalls, MachineCtl};
use super::postcopy_dest::Shared;
use super::source::{self, Outgoing, SourceOptions};
use super::status::MigrationStatus;
use super::transport::MigrationAddr;
use crate::api::{MigrateArgs, Response};
use crate::machine::Machine;

/// The migrations of one VM.
#[derive(Debug)]
pub struct Migrations {
    ctl: MachineCtl,
    calls: MachineCalls,
    outgoing: Option<Outgoing>,
    incoming: Option<(Arc<Shared>, Arc<rangevm_memory::GuestRam>)>,
}

impl Migrations {
    /// No migration yet.
    pub fn new() -> std::io::Result<Self> {
        let (ctl, calls) = machine_channel()?;
        Ok(Migrations {
            ctl,
            calls,
            outgoing: None,
            incoming: None,
        })
    }

    /// The end a migration thread asks the machine through.
    pub fn ctl(&self) -> MachineCtl {
        self.ctl.clone()
    }

    /// This VM arrives by postcopy: `migrate status` reports its figures.
    pub fn set_incoming(&mut self, shared: Arc<Shared>, ram: Arc<rangevm_memory::GuestRam>) {
        self.incoming = Some((shared, ram));
    }

    /// The requests a migration thread makes of the machine.
    pub fn calls(&self) -> &MachineCalls {
        &self.calls
    }

    /// `migrate.send`: starts a migration unless one is under way. With `watch`, the
    /// migration writes status lines to (a clone of) `stream`.
    pub fn send(&mut self, machine: &Machine, args: &MigrateArgs, stream: &UnixStream) -> Response {
        if self.outgoing.as_ref().is_some_and(Outgoing::active) {
            return Response::err("A migration is already under way (migrate status)");
        }
        if machine.info().state != "running" {
            return Response::err("The VM is paused: resume it (vm resume) before migrating it");
        }
        let addr: MigrationAddr = match args.url.parse() {
            Ok(a) => a,
            Err(e) => return Response::err(e.to_string()),
        };
        let watch = if args.watch {
            match stream.try_clone() {
                Ok(w) => {
                    let _ = w.set_nonblocking(false);
                    let _ = w.set_write_timeout(Some(Duration::from_secs(2)));
                    Some(w)
                }
                Err(e) => return Response::err(format!("Cannot keep the API connection: {e}")),
            }
        } else {
            None
        };
        let opts = SourceOptions {
            addr,
            downtime_target: Duration::from_millis(args.downtime_ms),
            max_rounds: args.max_rounds,
            verify: args.verify,
            postcopy: args.postcopy,
            postcopy_after: args.postcopy_after,
        };
        match source::start(
            opts,
            Arc::clone(machine.ram()),
            u32::from(machine.info().cpus),
            self.ctl.clone(),
            watch,
        ) {
            Ok(outgoing) => {
                let status = outgoing.status.get();
                self.outgoing = Some(outgoing);
                Response::ok(json!(status))
            }
            Err(e) => Response::err(format!("Cannot start the migration thread: {e}")),
        }
    }

    /// Whether a migration is under way (it owns dirty logging and pause/resume).
    pub fn busy(&self) -> bool {
        self.outgoing.as_ref().is_some_and(Outgoing::active)
    }

    /// `migrate.status`.
    pub fn status(&self) -> Response {
        let mut status = self
            .outgoing
            .as_ref()
            .map_or_else(MigrationStatus::idle, |o| o.status.get());
        if let (None, Some((shared, ram))) = (&self.outgoing, &self.incoming) {
            let pc = shared.status(ram);
            status.phase = match pc.phase.as_str() {
                "running" => super::status::Phase::Postcopy,
                "completed" => super::status::Phase::Completed,
                _ => super::status::Phase::Failed,
            };
            status.error.clone_from(&pc.error);
            status.postcopy = Some(pc);
        }
        Response::ok(json!(status))
    }

    /// `migrate.resume ADDR`: on a source whose postcopy lost its link, reconnect to
    /// ADDR; on a destination whose postcopy is paused, listen on ADDR for the source.
    pub fn resume(&self, url: &str) -> Response {
        let addr: MigrationAddr = match url.parse() {
            Ok(a) => a,
            Err(e) => return Response::err(e.to_string()),
        };
        if let Some(o) = self.outgoing.as_ref().filter(|o| o.active()) {
            return match o.resume(addr) {
                Ok(()) => Response::ok(json!({"resuming": url})),
                Err(why) => Response::err(why),
            };
        }
        if let Some((shared, ram)) = &self.incoming {
            return match shared.resume(&addr, Arc::clone(ram)) {
                Ok(at) => Response::ok(json!({"listening": at})),
                Err(why) => Response::err(why),
            };
        }
        Response::err("No postcopy migration is paused here")
    }

    /// `migrate.cancel`: a migration before switch-over stops and the guest runs on.
    pub fn cancel(&self) -> Response {
        match &self.outgoing {
            Some(o) if o.active() => {
                o.cancel();
                Response::ok(json!({"cancelling": true}))
            }
            _ => Response::err("No migration is under way"),
        }
    }
}
