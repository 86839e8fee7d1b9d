//! The API socket's side in the VMM's event loop: accepts connections, reads one request
//! line from each without blocking, and queues it; the event loop carries requests out
//! with the machine in hand ([`execute`]) and answers.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::json;
use vmm_sys_util::epoll::EventSet;

use super::{parse_request, ApiError, Command, Response, MAX_REQUEST};
use crate::machine::Machine;
use crate::migration::slot::Migrations;

/// A request read off a connection, waiting for the event loop.
#[derive(Debug)]
pub struct Pending {
    /// Where the answer goes.
    pub stream: UnixStream,
    /// The request, or why it is not one.
    pub request: Result<Command, String>,
}

/// The listening socket; removes its file when dropped.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Listens on `path`. A stale socket file left by a VMM that is gone is replaced;
    /// a socket some live VMM answers on is not.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let err = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                ErrorKind::AddrInUse,
                "another VMM is listening on it",
            )));
        }
        if path.exists() {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ApiSocket {
            listener,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const LISTENER: u32 = u32::MAX;

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The event-loop subscriber of the API socket.
pub struct ApiServer {
    socket: ApiSocket,
    connections: HashMap<RawFd, Connection>,
    pending: Arc<Mutex<VecDeque<Pending>>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("socket", &self.socket)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// A server on `socket` that queues requests in `pending`.
    pub fn new(socket: ApiSocket, pending: Arc<Mutex<VecDeque<Pending>>>) -> Self {
        ApiServer {
            socket,
            connections: HashMap::new(),
            pending,
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.socket.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    let Ok(token) = u32::try_from(fd) else {
                        continue;
                    };
                    if ops
                        .add(Events::with_data_raw(fd, token, EventSet::IN))
                        .is_ok()
                    {
                        self.connections.insert(
                            fd,
                            Connection {
                                stream,
                                buf: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("API socket: cannot accept a connection: {e}");
                    return;
                }
            }
        }
    }

    /// Reads what is there; queues the request once its line is complete.
    fn read(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.connections.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let done = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break Some(false),
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.contains(&b'\n') || conn.buf.len() > MAX_REQUEST {
                        break Some(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Some(false),
            }
        };
        let Some(complete) = done else { return };
        let _ = ops.remove(Events::with_data_raw(fd, 0, EventSet::IN));
        let Some(conn) = self.connections.remove(&fd) else {
            return;
        };
        let line_end = conn.buf.iter().position(|&b| b == b'\n');
        let request = match line_end {
            Some(end) if end <= MAX_REQUEST => parse_request(&conn.buf[..end]),
            _ if conn.buf.len() > MAX_REQUEST => {
                Err(format!("The request is longer than {MAX_REQUEST} bytes"))
            }
            // The client closed without a newline: take what it sent.
            _ if !complete && !conn.buf.is_empty() => parse_request(&conn.buf),
            _ => return,
        };
        if let Err(why) = &request {
            log::info!("API: refused a request: {why}");
        }
        if let Ok(mut pending) = self.pending.lock() {
            pending.push_back(Pending {
                stream: conn.stream,
                request,
            });
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.socket.listener.as_raw_fd();
        if let Err(e) = ops.add(Events::with_data_raw(fd, LISTENER, EventSet::IN)) {
            log::error!("Cannot watch the API socket: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            LISTENER => self.accept(ops),
            _ => self.read(events.fd(), ops),
        }
    }
}

/// What carrying out a request asks of the event loop afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Nothing.
    Continue,
    /// Shut the VM down.
    Shutdown,
    /// Answer but keep the connection: a migration writes its status lines to it.
    Watch,
}

/// Carries out `command` on `machine`; `stream` is the request's connection (kept by a
/// watched `migrate.send`).
pub fn execute(
    machine: &mut Machine,
    migrations: &mut Migrations,
    command: Command,
    stream: &UnixStream,
) -> (Response, After) {
    let fail = |e: &dyn std::error::Error| {
        let mut why = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            why.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Response::err(why)
    };
    if migrations.busy()
        && matches!(
            command,
            Command::VmPause
                | Command::VmResume
                | Command::DirtyStart
                | Command::DirtyHarvest
                | Command::DirtyStop
        )
    {
        // The migration harvests the dirty log and pauses and resumes the vCPUs itself:
        // a harvest here would lose dirty pages, a resume would run the guest while
        // its final state is sent.
        return (
            Response::err("A migration is under way; it owns dirty logging and pause/resume (migrate status, migrate cancel)"),
            After::Continue,
        );
    }
    let response = match command {
        Command::VmInfo => Response::ok(json!(machine.info())),
        Command::VmPause => match machine.pause() {
            Ok(()) => Response::ok(json!({"state": "paused"})),
            Err(e) => fail(&e),
        },
        Command::VmResume => match machine.resume() {
            Ok(()) => Response::ok(json!({"state": "running"})),
            Err(e) => fail(&e),
        },
        Command::VmShutdown => {
            return (
                Response::ok(json!({"state": "shutting down"})),
                After::Shutdown,
            );
        }
        Command::DirtyStart | Command::DirtyStop => {
            let on = command == Command::DirtyStart;
            match machine.set_dirty_logging(on) {
                Ok(()) => Response::ok(json!({"dirty_logging": on})),
                Err(e) => fail(&e),
            }
        }
        Command::DirtyHarvest => match machine.harvest_dirty() {
            Ok((pages, stats)) => Response::ok(json!({
                "pages": pages.len(),
                "bytes": pages.len() as u64 * machine.info().page_size,
                "chunks": stats.chunks,
                "max_chunk_lock_us": stats.max_lock_hold.as_secs_f64() * 1e6,
                "elapsed_us": stats.elapsed.as_secs_f64() * 1e6,
                "dirty_logging": machine.info().dirty_logging,
                "first_pages": pages.iter().take(64).collect::<Vec<_>>(),
            })),
            Err(e) => fail(&e),
        },
        Command::BalloonSet(bytes) => balloon_set(machine, bytes),
        Command::BalloonStats => balloon_stats(machine),
        Command::BalloonCheck => {
            if machine.ram().is_missing() {
                Response::err("Guest memory is still arriving (postcopy); check the balloon once the migration is complete")
            } else {
                match machine.ram().check_ballooned() {
                    Ok((ballooned, nonzero)) => Response::ok(json!({
                        "ballooned_pages": ballooned,
                        "nonzero_pages": nonzero,
                        "page_size": machine.info().page_size,
                    })),
                    Err(e) => fail(&e),
                }
            }
        }
        Command::MigrateSend(args) => {
            let response = migrations.send(machine, &args, stream);
            if response.ok && args.watch {
                return (response, After::Watch);
            }
            response
        }
        Command::MigrateStatus => migrations.status(),
        Command::MigrateCancel => migrations.cancel(),
        Command::MigrateResume(url) => migrations.resume(&url),
    };
    (response, After::Continue)
}

/// Writes `response` to `stream` and leaves the connection open (a watched migration
/// writes to its clone).
pub fn answer_keep(mut stream: UnixStream, response: &Response) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = stream.write_all(response.to_line().as_bytes()) {
        log::info!("API: cannot answer a client: {e}");
    }
}

/// Writes `response` to `stream` (blocking, bounded by a timeout: a client that does
/// not read cannot stall the VMM for long).
pub fn answer(mut stream: UnixStream, response: &Response) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if let Err(e) = stream.write_all(response.to_line().as_bytes()) {
        log::info!("API: cannot answer a client: {e}");
        return;
    }
    // Closing with unread input (a request that was too long) would reset the
    // connection before the client reads the answer: discard what is queued first.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    let mut left = 4 * MAX_REQUEST;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// The balloon's unit: 4 KiB pages, whatever the host page size.
const BALLOON_PAGE: u64 = 4096;

fn balloon_set(machine: &Machine, bytes: u64) -> Response {
    let memory = machine.info().memory_bytes;
    if bytes > memory {
        return Response::err(format!(
            "A balloon of {bytes} bytes is larger than the guest's {memory} bytes of memory"
        ));
    }
    let Ok(pages) = u32::try_from(bytes / BALLOON_PAGE) else {
        return Response::err("The balloon target is too large for the virtio balloon");
    };
    let Ok(mut balloon) = machine.balloon().lock() else {
        return Response::err("The balloon device is unusable after an earlier failure");
    };
    balloon.device_mut().set_target_pages(pages);
    Response::ok(json!({
        "target_bytes": u64::from(pages) * BALLOON_PAGE,
        "actual_bytes": u64::from(balloon.device().actual_pages()) * BALLOON_PAGE,
        "driver_active": balloon.is_activated(),
    }))
}

fn balloon_stats(machine: &Machine) -> Response {
    let Ok(mut balloon) = machine.balloon().lock() else {
        return Response::err("The balloon device is unusable after an earlier failure");
    };
    // Hand the statistics buffer back so the guest refreshes it; the answer carries
    // the latest values received (`updates` counts the refreshes).
    let refreshing = balloon.device_mut().request_stats();
    let device = balloon.device();
    let stats: serde_json::Map<String, serde_json::Value> = device
        .stats()
        .values
        .iter()
        .map(|(&tag, &value)| {
            let name = rangevm_devices::BalloonStats::tag_name(tag)
                .map_or_else(|| format!("tag_{tag}"), str::to_string);
            (name, json!(value))
        })
        .collect();
    let m = device.metrics();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    Response::ok(json!({
        "driver_active": balloon.is_activated(),
        "target_bytes": u64::from(device.target_pages()) * BALLOON_PAGE,
        "actual_bytes": u64::from(device.actual_pages()) * BALLOON_PAGE,
        "updates": device.stats().updates,
        "refresh_requested": refreshing,
        "stats": stats,
        "host": {
            "bytes_discarded": get(&m.bytes_discarded),
            "bytes_reclaimed": get(&m.bytes_reclaimed),
            "pages_inflated": get(&m.pages_inflated),
            "pages_deflated": get(&m.pages_deflated),
            "guest_errors": get(&m.guest_errors),
            "memory_errors": get(&m.memory_errors),
        },
    }))
}
