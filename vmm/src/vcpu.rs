//! vCPU threads as an explicit state machine.
//!
//! Each vCPU runs on a thread of its own, in one of three states:
//!
//! ```text
//!            Pause                Finish / guest stops
//!  Running ---------> Paused -------------------------> Exited
//!     ^                 |
//!     +----- Resume ----+
//! ```
//!
//! The VMM drives it with [`VcpuEvent`]s over a channel and a *kick* (a signal that
//! makes KVM_RUN return), and hears back [`VcpuResponse`]s. A vCPU also exits by itself
//! when its guest stops (triple fault, a device asked for power-off/reset/panic, a KVM
//! error): it then reports [`VcpuResponse::Exited`] and signals the VMM's exit eventfd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use rangevm_devices::{GuestRequest, GuestRequests};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{IoHandler, KvmVcpu, VcpuStop};

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// Errors of vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be started.
    #[error("Cannot start the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread did not answer.
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u64, Duration),
    /// The thread is gone.
    #[error("vCPU {0} has exited")]
    Gone(u64),
}

/// What the VMM tells a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running the guest, keep the state.
    Pause,
    /// Run the guest again.
    Resume,
    /// Paused only: save the vCPU's KVM state (migration switch-over) and answer
    /// [`VcpuResponse::State`].
    SaveState,
    /// Stop for good.
    Finish,
}

/// Why a vCPU left the Running state for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The VMM asked it to finish.
    Finished,
    /// A device recorded a guest request (power-off, reset, panic).
    Guest(GuestRequest),
    /// The CPU triple-faulted.
    TripleFault,
    /// KVM or the VMM failed, or the guest did something unhandled: a sentence.
    Failed(String),
}

/// What a vCPU tells the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuResponse {
    /// It is now Paused.
    Paused,
    /// It is now Running.
    Resumed,
    /// It is now Exited.
    Exited(VcpuExitReason),
    /// Its saved state in byte form, or why it could not be saved. It stays Paused.
    State(Result<Vec<u8>, String>),
}

/// The state of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Exited,
}

/// The handle the VMM keeps for a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u64,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    kicked: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    exit: Option<VcpuExitReason>,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(VcpuError::Signal);
    });
    result
}

/// Where a vCPU thread sends what it needs: its devices, the guest requests the devices
/// record, and the eventfd that wakes the VMM's event loop when it exits by itself.
#[derive(Debug, Clone)]
pub struct VcpuEnv<I> {
    /// Port and MMIO dispatch.
    pub io: Arc<I>,
    /// Guest requests recorded by devices.
    pub requests: Arc<GuestRequests>,
    /// Written when the vCPU exits by itself.
    pub exited: Arc<EventFd>,
}

impl VcpuHandle {
    /// Starts `vcpu` on a thread of its own, Running.
    pub fn spawn<I: IoHandler + Send + Sync + 'static>(
        mut vcpu: KvmVcpu,
        env: VcpuEnv<I>,
    ) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let id = vcpu.id();
        let (events_tx, events_rx) = channel();
        let (responses_tx, responses_rx) = channel();
        let kicked = Arc::new(AtomicBool::new(false));
        let thread_kicked = Arc::clone(&kicked);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut thread = VcpuThread {
                    vcpu: &mut vcpu,
                    env,
                    events: events_rx,
                    responses: responses_tx,
                    kicked: thread_kicked,
                };
                thread.main_loop();
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            events: events_tx,
            responses: responses_rx,
            kicked,
            thread: Some(thread),
            exit: None,
        })
    }

    /// The vCPU's index.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Why it exited, once it has.
    pub fn exit_reason(&self) -> Option<&VcpuExitReason> {
        self.exit.as_ref()
    }

    /// Sends `event` and kicks the thread out of KVM_RUN until it answers (the kick is
    /// repeated: a signal that lands just before KVM_RUN starts would be lost).
    pub fn request(
        &mut self,
        event: VcpuEvent,
        timeout: Duration,
    ) -> Result<VcpuResponse, VcpuError> {
        if let Some(reason) = &self.exit {
            return Ok(VcpuResponse::Exited(reason.clone()));
        }
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.id))?;
        let start = std::time::Instant::now();
        loop {
            self.kick();
            match self.responses.recv_timeout(Duration::from_millis(5)) {
                Ok(response) => {
                    if let VcpuResponse::Exited(reason) = &response {
                        self.exit = Some(reason.clone());
                    }
                    return Ok(response);
                }
                Err(RecvTimeoutError::Timeout) if start.elapsed() < timeout => continue,
                Err(RecvTimeoutError::Timeout) => return Err(VcpuError::Timeout(self.id, timeout)),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.id)),
            }
        }
    }

    /// Collects a response the thread sent on its own (after exiting by itself).
    pub fn poll_exit(&mut self) -> Option<&VcpuExitReason> {
        while let Ok(response) = self.responses.try_recv() {
            if let VcpuResponse::Exited(reason) = response {
                self.exit = Some(reason);
            }
        }
        self.exit.as_ref()
    }

    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        if let Some(thread) = &self.thread {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the pthread_t comes from a JoinHandle that has not been joined,
            // so the thread (or at worst its finished, not yet joined, descriptor)
            // still exists; the signal has a handler installed by `spawn`.
            let _ = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Finishes the thread (if it still runs) and joins it.
    pub fn finish(&mut self, timeout: Duration) -> Result<VcpuExitReason, VcpuError> {
        let reason = match self.request(VcpuEvent::Finish, timeout) {
            Ok(VcpuResponse::Exited(reason)) => reason,
            Ok(_) => VcpuExitReason::Finished,
            Err(VcpuError::Gone(_)) => self.exit.clone().unwrap_or(VcpuExitReason::Finished),
            Err(e) => return Err(e),
        };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        Ok(reason)
    }
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut what = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        what.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    what
}

struct VcpuThread<'a, I> {
    vcpu: &'a mut KvmVcpu,
    env: VcpuEnv<I>,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    kicked: Arc<AtomicBool>,
}

impl<I: IoHandler> VcpuThread<'_, I> {
    fn main_loop(&mut self) {
        let mut state = State::Running;
        loop {
            state = match state {
                State::Running => self.running(),
                State::Paused => self.paused(),
                State::Exited => return,
            };
        }
    }

    fn exit(&self, reason: VcpuExitReason, by_itself: bool) -> State {
        let _ = self.responses.send(VcpuResponse::Exited(reason));
        if by_itself {
            let _ = self.env.exited.write(1);
        }
        State::Exited
    }

    /// Runs the guest until an event arrives or the guest stops.
    fn running(&mut self) -> State {
        loop {
            if self.kicked.swap(false, Ordering::AcqRel) {
                if let Some(state) = self.handle_events(State::Running) {
                    return state;
                }
            }
            if let Some(request) = self.env.requests.first() {
                return self.exit(VcpuExitReason::Guest(request), true);
            }
            match self.vcpu.run_once(&*self.env.io) {
                Ok(None) | Ok(Some(VcpuStop::Interrupted)) => {}
                Ok(Some(VcpuStop::TripleFault)) => {
                    return self.exit(VcpuExitReason::TripleFault, true)
                }
                Ok(Some(VcpuStop::PowerOffRequested)) => {
                    self.env.requests.request(GuestRequest::PowerOff);
                }
                Ok(Some(VcpuStop::ResetRequested)) => {
                    self.env.requests.request(GuestRequest::Reset);
                }
                Ok(Some(VcpuStop::Crashed)) => {
                    self.env.requests.request(GuestRequest::Panic);
                }
                Ok(Some(VcpuStop::Halted)) => {
                    return self.exit(
                        VcpuExitReason::Failed(format!(
                            "vCPU {} halted without an in-kernel LAPIC to wake it",
                            self.vcpu.id()
                        )),
                        true,
                    )
                }
                Ok(Some(VcpuStop::Unhandled(what))) => {
                    return self.exit(
                        VcpuExitReason::Failed(format!("vCPU {} stopped: {what}", self.vcpu.id())),
                        true,
                    )
                }
                Err(e) => {
                    let what = error_chain(&e);
                    return self.exit(
                        VcpuExitReason::Failed(format!("vCPU {}: {what}", self.vcpu.id())),
                        true,
                    );
                }
            }
        }
    }

    /// Applies pending events; `None` means "stay in `current`".
    fn handle_events(&mut self, current: State) -> Option<State> {
        let mut next = None;
        while let Ok(event) = self.events.try_recv() {
            next = Some(self.apply(event, next.unwrap_or(current)));
            if next == Some(State::Exited) {
                break;
            }
        }
        next.filter(|&s| s != current)
    }

    fn apply(&mut self, event: VcpuEvent, current: State) -> State {
        match (event, current) {
            (VcpuEvent::SaveState, State::Paused) => {
                let saved = self
                    .vcpu
                    .save_state()
                    .and_then(|state| state.to_bytes())
                    .map_err(|e| format!("vCPU {}: {}", self.vcpu.id(), error_chain(&e)));
                let _ = self.responses.send(VcpuResponse::State(saved));
                State::Paused
            }
            (VcpuEvent::SaveState, _) => {
                let _ = self.responses.send(VcpuResponse::State(Err(format!(
                    "vCPU {} is not paused; its state can only be saved while paused",
                    self.vcpu.id()
                ))));
                current
            }
            (VcpuEvent::Finish, _) => self.exit(VcpuExitReason::Finished, false),
            (VcpuEvent::Pause, _) => {
                let _ = self.responses.send(VcpuResponse::Paused);
                State::Paused
            }
            (VcpuEvent::Resume, _) => {
                let _ = self.responses.send(VcpuResponse::Resumed);
                State::Running
            }
        }
    }

    /// Waits for Resume or Finish.
    fn paused(&mut self) -> State {
        match self.events.recv() {
            Ok(event) => {
                self.kicked.store(false, Ordering::Release);
                self.apply(event, State::Paused)
            }
            // The VMM dropped its handle: nobody can resume us.
            Err(_) => State::Exited,
        }
    }
}
