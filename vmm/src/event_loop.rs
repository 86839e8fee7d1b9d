//! The VMM's one event loop (event-manager): SIGINT/SIGTERM, the guest's requests
//! (power-off, reset, panic), vCPUs that exit by themselves, and serial input from
//! standard input. It runs on the main thread until it knows how the machine ends.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use rangevm_devices::{GuestRequest, GuestRequests, Serial};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::server::{self, After, ApiServer, ApiSocket, Pending};
use crate::api::Response;
use crate::machine::Machine;
use crate::migration::control::{self, MachineRequest};
use crate::migration::slot::Migrations;
use crate::vcpu::VcpuExitReason;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The signal mask or signalfd could not be set up.
    #[error("Cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// event-manager failed.
    #[error("Event loop failed")]
    Epoll(#[source] event_manager::Error),
    /// An eventfd could not be duplicated.
    #[error("Cannot duplicate an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// How a machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest asked for something (power-off, reset, panic).
    Guest(GuestRequest),
    /// A vCPU triple-faulted.
    TripleFault,
    /// The VMM got SIGINT or SIGTERM.
    Signal(i32),
    /// A vCPU failed: a sentence.
    Failed(String),
    /// `vm.shutdown` through the control API.
    ApiShutdown,
    /// The guest was migrated away and runs on the destination.
    Migrated,
}

/// SIGINT and SIGTERM, blocked in every thread and read from a signalfd instead.
#[derive(Debug)]
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread (threads started afterwards inherit the
    /// mask) and opens a signalfd for them. Call before starting any thread.
    pub fn block() -> Result<Self, EventLoopError> {
        // SAFETY: `set` is a local sigset_t initialized by sigemptyset before use;
        // pthread_sigmask and signalfd only read it.
        let fd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(EventLoopError::Signals(std::io::Error::last_os_error()));
            }
            libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(EventLoopError::Signals(std::io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// The number of a pending signal, if one is pending.
    pub fn take(&self) -> Option<i32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into the local buffer from a
        // descriptor this struct owns.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if usize::try_from(n).ok() != Some(info.len()) {
            return None;
        }
        // ssi_signo is the first field of signalfd_siginfo, a u32.
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        i32::try_from(signo).ok()
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

const SIGNAL: u32 = 1;
const GUEST_REQUEST: u32 = 2;
const VCPU_EXITED: u32 = 3;
const MIGRATION: u32 = 4;

/// Decides how the machine ends.
#[derive(Debug)]
struct Control {
    signals: Signals,
    requests: Arc<GuestRequests>,
    requests_evt: EventFd,
    vcpu_exited: EventFd,
    migration_evt: EventFd,
    outcome: Option<Outcome>,
    vcpu_exit_seen: bool,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, data) in [
            (self.signals.fd.as_raw_fd(), SIGNAL),
            (self.requests_evt.as_raw_fd(), GUEST_REQUEST),
            (self.vcpu_exited.as_raw_fd(), VCPU_EXITED),
            (self.migration_evt.as_raw_fd(), MIGRATION),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                log::error!("Cannot watch an event source: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        match events.data() {
            SIGNAL => {
                if let Some(signo) = self.signals.take() {
                    log::info!("Got signal {signo}: shutting down");
                    self.outcome.get_or_insert(Outcome::Signal(signo));
                }
            }
            GUEST_REQUEST => {
                let _ = self.requests_evt.read();
                if let Some(request) = self.requests.first() {
                    log::info!("Guest request: {request}");
                    self.outcome.get_or_insert(Outcome::Guest(request));
                }
            }
            VCPU_EXITED => {
                let _ = self.vcpu_exited.read();
                self.vcpu_exit_seen = true;
            }
            // The main loop drains the migration's requests (and the eventfd).
            MIGRATION => {}
            other => log::warn!("Event loop: unknown event token {other}"),
        }
    }
}

const STDIN: u32 = 1;
const INPUT_DRAINED: u32 = 2;

/// Feeds standard input to the serial port without losing bytes: stdin is read only
/// as far as the UART's FIFO has room, and watched again once the guest drains it.
struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    drained: EventFd,
    stdin: RawFd,
    watching_stdin: bool,
    open: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("watching_stdin", &self.watching_stdin)
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    fn stdin_events(&self) -> Events {
        Events::with_data_raw(self.stdin, STDIN, EventSet::IN)
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let room = self.serial.lock().map(|s| s.input_capacity()).unwrap_or(0);
        if room == 0 {
            // Wait for the guest to drain the FIFO (level-triggered epoll would spin).
            self.unwatch_stdin(ops);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // Standard input is borrowed, not owned: read through a File that is never
        // dropped as an owner (ManuallyDrop).
        // SAFETY: `self.stdin` is file descriptor 0, open for the whole process.
        let mut file =
            std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.stdin) });
        match file.read(&mut buf[..want]) {
            Ok(0) => {
                self.unwatch_stdin(ops);
                self.open = false;
            }
            Ok(n) => {
                if let Ok(mut serial) = self.serial.lock() {
                    serial.enqueue_input(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("Cannot read standard input for the serial console: {e}");
                self.unwatch_stdin(ops);
                self.open = false;
            }
        }
    }

    fn unwatch_stdin(&mut self, ops: &mut EventOps) {
        if self.watching_stdin {
            let _ = ops.remove(self.stdin_events());
            self.watching_stdin = false;
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(self.stdin_events()) {
            // /dev/null and regular files cannot be polled: no console input then.
            log::debug!("Standard input is not pollable ({e}); the serial console gets no input");
            self.open = false;
        } else {
            self.watching_stdin = true;
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.drained,
            INPUT_DRAINED,
            EventSet::IN,
        )) {
            log::error!("Cannot watch the serial port's input FIFO: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STDIN => {
                if events.event_set().contains(EventSet::HANG_UP)
                    && !events.event_set().contains(EventSet::IN)
                {
                    self.unwatch_stdin(ops);
                    self.open = false;
                } else {
                    self.read_stdin(ops);
                }
            }
            INPUT_DRAINED => {
                let _ = self.drained.read();
                if self.open && !self.watching_stdin && ops.add(self.stdin_events()).is_ok() {
                    self.watching_stdin = true;
                }
            }
            other => log::warn!("Serial input: unknown event token {other}"),
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the event loop for `machine` until it ends; `stdin_to_serial` feeds standard
/// input to the guest's serial console; `api` serves the control API.
pub fn run(
    machine: &mut Machine,
    signals: Signals,
    stdin_to_serial: bool,
    api: Option<ApiSocket>,
    mut migrations: Migrations,
) -> Result<Outcome, EventLoopError> {
    let mut manager: EventManager<Subscriber> =
        EventManager::new().map_err(EventLoopError::Epoll)?;
    let control = Arc::new(Mutex::new(Control {
        signals,
        requests: Arc::clone(machine.requests()),
        requests_evt: machine
            .requests()
            .eventfd()
            .try_clone()
            .map_err(EventLoopError::EventFd)?,
        vcpu_exited: machine
            .vcpu_exited()
            .try_clone()
            .map_err(EventLoopError::EventFd)?,
        migration_evt: migrations
            .calls()
            .eventfd()
            .try_clone()
            .map_err(EventLoopError::EventFd)?,
        outcome: None,
        vcpu_exit_seen: false,
    }));
    manager.add_subscriber(control.clone());
    if stdin_to_serial {
        let serial = Arc::clone(machine.serial());
        let drained = serial
            .lock()
            .map_err(|_| EventLoopError::EventFd(std::io::Error::other("serial port poisoned")))?
            .input_drained_eventfd()
            .try_clone()
            .map_err(EventLoopError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(SerialInput {
            serial,
            drained,
            stdin: libc::STDIN_FILENO,
            watching_stdin: false,
            open: true,
        })));
    }
    let pending = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(socket) = api {
        manager.add_subscriber(Arc::new(Mutex::new(ApiServer::new(
            socket,
            Arc::clone(&pending),
        ))));
    }
    // A request recorded before the loop started is not lost: the eventfd stays readable.
    loop {
        manager.run().map_err(EventLoopError::Epoll)?;
        let requests: Vec<Pending> = pending
            .lock()
            .map(|mut p| p.drain(..).collect())
            .unwrap_or_default();
        for call in migrations.calls().drain() {
            let end = match &call.request {
                MachineRequest::Migrated => Some(Outcome::Migrated),
                MachineRequest::Fail(why) => Some(Outcome::Failed(why.clone())),
                _ => None,
            };
            if let Some(end) = end {
                let mut control = control
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                control.outcome.get_or_insert(end);
            }
            let _ = call.reply.send(control::execute(machine, call.request));
        }
        for Pending { stream, request } in requests {
            let (response, after) = match request {
                Ok(command) => server::execute(machine, &mut migrations, command, &stream),
                Err(why) => (Response::err(why), After::Continue),
            };
            if after == After::Watch {
                server::answer_keep(stream, &response);
            } else {
                server::answer(stream, &response);
            }
            if after == After::Shutdown {
                let mut control = control
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                control.outcome.get_or_insert(Outcome::ApiShutdown);
            }
        }
        let mut control = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if control.vcpu_exit_seen {
            control.vcpu_exit_seen = false;
            match machine.vcpu_exit() {
                Some(VcpuExitReason::TripleFault) => {
                    control.outcome.get_or_insert(Outcome::TripleFault);
                }
                Some(VcpuExitReason::Failed(why)) => {
                    control.outcome.get_or_insert(Outcome::Failed(why));
                }
                Some(VcpuExitReason::Guest(request)) => {
                    control.outcome.get_or_insert(Outcome::Guest(request));
                }
                Some(VcpuExitReason::Finished) | None => {}
            }
        }
        if let Some(outcome) = control.outcome.clone() {
            return Ok(outcome);
        }
    }
}
