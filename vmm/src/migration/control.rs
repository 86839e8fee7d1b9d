//! How a migration thread asks the machine's owner (the event loop, which holds the
//! `&mut Machine`) to act on the machine: dirty logging, pause and save, resume, end.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::machine::{Machine, MachineState};

/// What a migration asks of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineRequest {
    /// Turn KVM's dirty logging on (and clear the dirty set).
    StartDirtyLog,
    /// Harvest the dirty set.
    HarvestDirty,
    /// Turn dirty logging off.
    StopDirtyLog,
    /// Pause every vCPU, harvest the last dirty pages and save the state.
    PauseAndSave,
    /// Resume the vCPUs (the migration failed before the destination ran).
    Resume,
    /// The guest runs on the destination: end this VMM.
    Migrated,
    /// Postcopy on the destination failed: the guest cannot go on; end with this
    /// sentence.
    Fail(String),
}

/// The machine's answer.
#[derive(Debug)]
pub enum MachineReply {
    /// Done.
    Done,
    /// The dirty pages, by guest-physical address, ascending.
    Dirty(Vec<u64>),
    /// Paused: the last dirty pages and the saved state.
    Saved {
        /// Dirty pages harvested after the pause.
        dirty: Vec<u64>,
        /// The state.
        state: Box<MachineState>,
    },
    /// It could not: a sentence.
    Failed(String),
}

/// One request and where its answer goes.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: MachineRequest,
    /// Where the reply goes.
    pub reply: Sender<MachineReply>,
}

/// The migration thread's end.
#[derive(Debug, Clone)]
pub struct MachineCtl {
    calls: Sender<Call>,
    wake: Arc<EventFd>,
}

/// The event loop's end: watch [`MachineCalls::eventfd`], then [`MachineCalls::drain`].
#[derive(Debug)]
pub struct MachineCalls {
    calls: Receiver<Call>,
    wake: Arc<EventFd>,
}

/// A connected pair.
pub fn machine_channel() -> std::io::Result<(MachineCtl, MachineCalls)> {
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = channel();
    Ok((
        MachineCtl {
            calls: tx,
            wake: Arc::clone(&wake),
        },
        MachineCalls { calls: rx, wake },
    ))
}

impl MachineCtl {
    /// Asks and waits at most `timeout` for the answer; an error is a sentence.
    pub fn call(&self, request: MachineRequest, timeout: Duration) -> Result<MachineReply, String> {
        let (tx, rx) = channel();
        self.calls
            .send(Call {
                request: request.clone(),
                reply: tx,
            })
            .map_err(|_| "The VM has stopped".to_string())?;
        let _ = self.wake.write(1);
        match rx.recv_timeout(timeout) {
            Ok(MachineReply::Failed(why)) => Err(why),
            Ok(reply) => Ok(reply),
            Err(_) => Err(format!(
                "The VM did not answer {request:?} within {timeout:?} (it may have stopped)"
            )),
        }
    }
}

impl MachineCalls {
    /// Signalled when a call is waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.wake
    }

    /// The calls waiting.
    pub fn drain(&self) -> Vec<Call> {
        let _ = self.wake.read();
        self.calls.try_iter().collect()
    }
}

/// Carries out one request on the machine. `Migrated` is the caller's to act on.
pub fn execute(machine: &mut Machine, request: MachineRequest) -> MachineReply {
    let failed = |e: &dyn std::error::Error| MachineReply::Failed(crate::migration::chain(e));
    match request {
        MachineRequest::StartDirtyLog => match machine.set_dirty_logging(true) {
            Ok(()) => MachineReply::Done,
            Err(e) => failed(&e),
        },
        MachineRequest::StopDirtyLog => match machine.set_dirty_logging(false) {
            Ok(()) => MachineReply::Done,
            Err(e) => failed(&e),
        },
        MachineRequest::HarvestDirty => match machine.harvest_dirty() {
            Ok((pages, _)) => MachineReply::Dirty(pages),
            Err(e) => failed(&e),
        },
        MachineRequest::PauseAndSave => {
            if let Err(e) = machine.pause() {
                let _ = machine.resume();
                return failed(&e);
            }
            let dirty = match machine.harvest_dirty() {
                Ok((pages, _)) => pages,
                Err(e) => return failed(&e),
            };
            match machine.save_state() {
                Ok(state) => MachineReply::Saved {
                    dirty,
                    state: Box::new(state),
                },
                Err(why) => MachineReply::Failed(why),
            }
        }
        MachineRequest::Resume => match machine.resume() {
            Ok(()) => MachineReply::Done,
            Err(e) => failed(&e),
        },
        MachineRequest::Migrated | MachineRequest::Fail(_) => MachineReply::Done,
    }
}
