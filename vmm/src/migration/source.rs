//! The sending side of a precopy migration, on a thread of its own while the guest
//! keeps running: a full pass over guest memory, rounds of dirty pages until the rest
//! fits the downtime target at the measured bandwidth (or a round limit), then pause,
//! the last dirty pages, the vCPU and device state, and `Complete`. The source ends
//! only once the destination says the guest runs there; every failure before that
//! resumes the guest here.

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rangevm_memory::{GuestRam, GuestRamError};

use super::control::{MachineCtl, MachineReply, MachineRequest};
use super::postcopy_source::{self, SentMap};
use super::protocol::{
    max_run_pages, AckKind, Arch, Channel, Crc32c, Decoder, Encoder, Header, Message, MessageType,
    PageDigests, PageRun, ProtocolError, ReceivedPages, Region, Round, SwitchMode,
    FEATURE_DEMAND_CHANNEL, FEATURE_POSTCOPY, FEATURE_RESUME, FEATURE_VERIFY, MAX_DIGESTS,
};
use super::status::{MigrationStatus, Phase, SharedStatus};
use super::transport::{MigrationAddr, Stream, TransportError};
use crate::machine::MachineState;

/// RAM whose page digests go in one `PageDigests` message (`--verify`).
const DIGEST_FLUSH_BYTES: u64 = 64 << 20;
/// How long to wait for the destination to connect, accept the header or answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write may block (a destination that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take to restore the state and start the guest.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the machine may take to answer a migration request.
const MACHINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the sending side.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No connection.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream failed.
    #[error("The migration stream failed")]
    Protocol(#[from] ProtocolError),
    /// The socket could not be configured.
    #[error("Cannot configure the migration socket")]
    Socket(#[source] std::io::Error),
    /// The machine could not do what the migration needs.
    #[error("The VM could not {what}: {why}")]
    Machine {
        /// What.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// Reading guest memory failed.
    #[error("Cannot read guest memory")]
    Memory(#[from] GuestRamError),
    /// This host's architecture has no migration support.
    #[error("This host's architecture cannot migrate")]
    Arch,
    /// The destination answered with something other than what it should.
    #[error("The destination answered {0} instead of accepting")]
    Refused(String),
    /// `migrate cancel`.
    #[error("Cancelled")]
    Cancelled,
}

/// What `migrate send` asked for.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The destination.
    pub addr: MigrationAddr,
    /// Switch over once the remaining dirty set would take at most this long.
    pub downtime_target: Duration,
    /// Switch over after this many dirty rounds even if the target is not met.
    pub max_rounds: u32,
    /// Send a CRC32C of every page at switch-over for the destination to check.
    pub verify: bool,
    /// Postcopy: switch over at once; the destination runs the guest and fetches its
    /// memory on demand while the rest is pushed.
    pub postcopy: bool,
    /// Switch to postcopy after this many precopy rounds (the full pass is one) if
    /// precopy has not converged by then, or at the round limit.
    pub postcopy_after: Option<u32>,
}

/// A running or finished outgoing migration.
#[derive(Debug)]
pub struct Outgoing {
    /// Its status.
    pub status: SharedStatus,
    cancel: Arc<AtomicBool>,
    resume_tx: std::sync::mpsc::Sender<MigrationAddr>,
    thread: Option<JoinHandle<()>>,
}

impl Outgoing {
    /// Whether it is still going.
    pub fn active(&self) -> bool {
        !self.status.get().finished()
    }

    /// `migrate resume ADDR`: a postcopy paused on a dropped link reconnects to `addr`.
    pub fn resume(&self, addr: MigrationAddr) -> Result<(), String> {
        if self.status.get().phase != Phase::PostcopyPaused {
            return Err(
                "This migration is not a paused postcopy: there is nothing to resume".into(),
            );
        }
        self.resume_tx
            .send(addr)
            .map_err(|_| "The migration thread is gone".to_string())
    }

    /// Asks it to stop before switch-over (it resumes nothing that was not paused).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.cancel();
        // Not joined: a thread blocked on a dead peer ends with its socket timeout.
        drop(self.thread.take());
    }
}

/// Starts sending. `watch`, if given, gets one JSON status line every ~200 ms and a
/// last one when the migration ends.
pub fn start(
    opts: SourceOptions,
    ram: Arc<GuestRam>,
    cpus: u32,
    ctl: MachineCtl,
    watch: Option<UnixStream>,
) -> std::io::Result<Outgoing> {
    let mut initial = MigrationStatus::idle();
    initial.phase = Phase::Connecting;
    initial.destination = opts.addr.to_string();
    initial.max_rounds = opts.max_rounds;
    initial.memory_bytes = ram.size();
    initial.downtime_target_ms =
        u64::try_from(opts.downtime_target.as_millis()).unwrap_or(u64::MAX);
    let status = SharedStatus::new(initial);
    let cancel = Arc::new(AtomicBool::new(false));
    let (resume_tx, resume_rx) = std::sync::mpsc::channel();
    let mut sender = Sender {
        resume_rx,
        buf: Vec::new(),
        opts,
        ram,
        cpus,
        ctl,
        status: status.clone(),
        cancel: Arc::clone(&cancel),
        watch,
        last_watch: Instant::now(),
        paused: false,
        dirty_log: false,
    };
    let thread = std::thread::Builder::new()
        .name("migrate-send".into())
        .spawn(move || sender.main())?;
    Ok(Outgoing {
        status,
        cancel,
        resume_tx,
        thread: Some(thread),
    })
}

struct Sender {
    opts: SourceOptions,
    ram: Arc<GuestRam>,
    cpus: u32,
    ctl: MachineCtl,
    status: SharedStatus,
    cancel: Arc<AtomicBool>,
    watch: Option<UnixStream>,
    last_watch: Instant,
    paused: bool,
    dirty_log: bool,
    resume_rx: std::sync::mpsc::Receiver<MigrationAddr>,
    /// Scratch space for one run of pages read from guest memory.
    buf: Vec<u8>,
}

/// How the sending ended, if not with an error before `Complete`.
enum End {
    /// The destination runs the guest.
    Running,
    /// The destination refused after `Complete` (it did not start).
    RefusedAfterComplete(String),
    /// No answer after `Complete`: the destination's state is unknown.
    Unknown(String),
    /// Postcopy lost its link after the guest started on the destination.
    PostcopyLost(String),
}

type Enc = Encoder<BufWriter<TimedWriter>>;

/// The postcopy demand connection, past its handshake.
struct DemandLink {
    stream: Stream,
    dec: Decoder<BufReader<Stream>>,
    enc: Encoder<BufWriter<Stream>>,
}

/// The connection, timing its writes: bytes over the time spent in `write` is the
/// bandwidth the link (and the destination's reading) gives, whatever time reading
/// guest memory and finding zero pages takes between the writes.
#[derive(Debug)]
struct TimedWriter {
    inner: Stream,
    busy: Duration,
    bytes: u64,
}

impl TimedWriter {
    /// Bytes per second while writing, 0 before anything was written.
    fn bandwidth(&self) -> u64 {
        if self.bytes == 0 {
            0
        } else {
            per_second(self.bytes, self.busy)
        }
    }
}

impl Write for TimedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let t = Instant::now();
        let n = self.inner.write(buf)?;
        self.busy += t.elapsed();
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
type Dec = Decoder<BufReader<Stream>>;

impl Sender {
    fn main(&mut self) {
        log::info!("Migration to {} started", self.opts.addr);
        let result = self.run();
        match result {
            Ok(End::Running) => {
                self.status.update(|s| s.phase = Phase::Completed);
                let st = self.status.get();
                log::info!("{}", st.line());
                self.write_watch(true);
                let _ = self.ctl.call(MachineRequest::Migrated, MACHINE_TIMEOUT);
            }
            Ok(End::PostcopyLost(why)) => {
                let msg = format!(
                    "Postcopy lost the destination ({why}). The guest runs there but cannot get \
                     the pages it still needs; this side keeps the only full copy of its memory, \
                     paused (postcopy recovery, migrate resume, is not implemented yet)"
                );
                log::error!("{msg}");
                self.status.update(|s| {
                    s.phase = Phase::Unknown;
                    s.error = Some(msg);
                });
                self.write_watch(true);
            }
            Ok(End::RefusedAfterComplete(why)) => {
                self.recover();
                self.fail(format!("The destination did not start the guest: {why}"));
            }
            Ok(End::Unknown(why)) => {
                let msg = format!(
                    "The whole state was sent but the destination did not confirm it runs \
                     the guest ({why}). The guest stays paused here: check the destination, \
                     and resume this one (vm resume) only if it did not start"
                );
                log::error!("{msg}");
                self.status.update(|s| {
                    s.phase = Phase::Unknown;
                    s.error = Some(msg);
                });
                self.write_watch(true);
            }
            Err(e) => {
                self.recover();
                self.fail(super::chain(&e));
            }
        }
    }

    /// Undoes what the migration did to the machine: resume, dirty logging off.
    fn recover(&mut self) {
        if self.paused {
            match self.ctl.call(MachineRequest::Resume, MACHINE_TIMEOUT) {
                Ok(_) => self.paused = false,
                Err(why) => log::error!("Cannot resume the guest after a failed migration: {why}"),
            }
        }
        if self.dirty_log {
            if let Err(why) = self.ctl.call(MachineRequest::StopDirtyLog, MACHINE_TIMEOUT) {
                log::warn!("Cannot turn dirty logging off after a failed migration: {why}");
            }
            self.dirty_log = false;
        }
    }

    fn fail(&mut self, why: String) {
        log::error!(
            "Migration to {} failed; the guest keeps running here: {why}",
            self.opts.addr
        );
        self.status.update(|s| {
            s.phase = Phase::Failed;
            s.error = Some(why);
        });
        self.write_watch(true);
    }

    fn write_watch(&mut self, force: bool) {
        if !force && self.last_watch.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last_watch = Instant::now();
        if let Some(w) = &mut self.watch {
            let line = serde_json::to_string(&self.status.get()).unwrap_or_default();
            if writeln!(w, "{line}").is_err() {
                // The watching CLI went away; the migration goes on.
                self.watch = None;
            }
        }
    }

    fn machine(
        &self,
        request: MachineRequest,
        what: &'static str,
    ) -> Result<MachineReply, SourceError> {
        self.ctl
            .call(request, MACHINE_TIMEOUT)
            .map_err(|why| SourceError::Machine { what, why })
    }

    fn check_cancel(&self) -> Result<(), SourceError> {
        if self.cancel.load(Ordering::Acquire) {
            Err(SourceError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn header(&self) -> Result<Header, SourceError> {
        let arch = Arch::host().ok_or(SourceError::Arch)?;
        let page_shift = u8::try_from(self.ram.page_size().trailing_zeros()).unwrap_or(0);
        let regions = self
            .ram
            .regions()
            .iter()
            .map(|r| Region {
                gpa: r.start,
                size: r.size,
            })
            .collect();
        let mut features = if self.opts.verify { FEATURE_VERIFY } else { 0 };
        if self.opts.postcopy || self.opts.postcopy_after.is_some() {
            features |= FEATURE_POSTCOPY | FEATURE_DEMAND_CHANNEL | FEATURE_RESUME;
        }
        let mut header = Header::new(arch, page_shift, self.cpus, regions, features);
        header.session_id = session_id();
        Ok(header)
    }

    fn run(&mut self) -> Result<End, SourceError> {
        let stream = Stream::connect(&self.opts.addr, CONNECT_TIMEOUT)?;
        stream
            .set_timeouts(Some(CONNECT_TIMEOUT), Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        let reader = stream.try_clone().map_err(SourceError::Socket)?;
        let header = self.header()?;
        let page_shift = header.page_shift;
        let mut enc: Enc = Encoder::new(BufWriter::with_capacity(
            1 << 20,
            TimedWriter {
                inner: stream,
                busy: Duration::ZERO,
                bytes: 0,
            },
        ));
        let mut dec: Dec = Decoder::new(BufReader::new(reader));
        dec.expect_page_shift(page_shift);
        let header_copy = header.clone();
        enc.send(&Message::Header(header))?;
        enc.flush()?;
        match dec.recv_expecting(&[MessageType::Ack])? {
            Message::Ack(AckKind::Accepted) => {}
            other => return Err(SourceError::Refused(format!("{other:?}"))),
        }
        log::info!("The destination {} accepted the migration", self.opts.addr);
        let mut demand = if self.opts.postcopy || self.opts.postcopy_after.is_some() {
            let addr = self.opts.addr.clone();
            Some(self.open_demand(header_copy.clone(), &addr)?)
        } else {
            None
        };
        if self.opts.postcopy {
            if let Some(link) = demand.take() {
                return self.switch_postcopy(enc, dec, link, None, header_copy);
            }
        }

        self.machine(MachineRequest::StartDirtyLog, "start dirty logging")?;
        self.dirty_log = true;
        let page = self.ram.page_size();
        let target_ms = self.status.get().downtime_target_ms;
        let mut pending: Vec<u64> = Vec::new();
        let mut bandwidth = 0u64;
        let mut round = 0u32;
        let mut last_harvest = Instant::now();
        let mut converged;
        loop {
            self.status.update(|s| {
                s.phase = Phase::Precopy;
                s.round = round;
                s.round_done = 0;
            });
            let bytes_before = enc.bytes_written();
            let t = Instant::now();
            if round == 0 {
                let total = self.ram.size() / page;
                self.status.update(|s| s.round_pages = total);
                for r in self.ram.regions() {
                    let mut gpa = r.start;
                    while gpa < r.end() {
                        self.check_cancel()?;
                        let n = max_run_pages(page_shift).max(1);
                        let count = ((r.end() - gpa) / page).min(u64::from(n));
                        self.send_range(&mut enc, gpa, count, page_shift)?;
                        gpa += count * page;
                    }
                }
            } else {
                self.status.update(|s| s.round_pages = pending.len() as u64);
                self.send_list(&mut enc, &pending, page_shift)?;
            }
            let sent = enc.bytes_written() - bytes_before;
            let secs = t.elapsed().as_secs_f64().max(1e-6);
            // Flush so that the round's bytes are on the link and timed.
            enc.flush()?;
            let link = enc.get_mut().get_ref().bandwidth();
            if link > 0 {
                bandwidth = link;
            } else if bandwidth == 0 {
                bandwidth = per_second(sent, t.elapsed()).max(1);
            }
            let dirty =
                match self.machine(MachineRequest::HarvestDirty, "harvest the dirty pages")? {
                    MachineReply::Dirty(d) => d,
                    _ => Vec::new(),
                };
            let since = last_harvest.elapsed();
            last_harvest = Instant::now();
            let dirty_bytes = dirty.len() as u64 * page;
            let expected_ms = dirty_bytes.saturating_mul(1000) / bandwidth;
            enc.send(&Message::RoundEnd(Round {
                round,
                dirty_bytes,
                dirty_rate: per_second(dirty_bytes, since),
            }))?;
            self.status.update(|s| {
                s.dirty_pages = dirty.len() as u64;
                s.dirty_rate = per_second(dirty_bytes, since);
                s.bandwidth = bandwidth;
                s.expected_downtime_ms = expected_ms;
            });
            log::info!(
                "Round {round}: {sent} bytes in {:.0} ms; {} pages dirty, expected downtime {expected_ms} ms",
                secs * 1e3,
                dirty.len()
            );
            self.write_watch(true);
            pending = dirty;
            converged = expected_ms <= target_ms;
            let postcopy_due = self
                .opts
                .postcopy_after
                .is_some_and(|n| round.saturating_add(1) >= n);
            if converged || round >= self.opts.max_rounds || postcopy_due {
                break;
            }
            round += 1;
        }
        self.status.update(|s| s.converged = converged);
        self.check_cancel()?;
        if !converged {
            if let Some(link) = demand.take() {
                // Precopy did not converge in the rounds allowed: postcopy for the rest.
                return self.switch_postcopy(enc, dec, link, Some(pending), header_copy);
            }
        }
        drop(demand);

        // Switch-over: from here the guest is paused until the destination runs it or
        // this side resumes it.
        let paused_at = Instant::now();
        self.status.update(|s| s.phase = Phase::SwitchOver);
        let (dirty, state) =
            match self.machine(MachineRequest::PauseAndSave, "pause and save its state") {
                Ok(MachineReply::Saved { dirty, state }) => {
                    self.paused = true;
                    (dirty, state)
                }
                Ok(_) => {
                    return Err(SourceError::Machine {
                        what: "pause and save its state",
                        why: "unexpected answer".into(),
                    })
                }
                Err(e) => {
                    // A failed pause resumes whatever it paused.
                    return Err(e);
                }
            };
        let last = merge_sorted(&pending, &dirty);
        self.status.update(|s| {
            s.round_pages = last.len() as u64;
            s.round_done = 0;
        });
        enc.send(&Message::SwitchOver(SwitchMode::Precopy))?;
        self.send_list(&mut enc, &last, page_shift)?;
        if self.opts.verify {
            self.send_digests(&mut enc, page_shift)?;
        }
        send_state(&mut enc, &state)?;
        enc.send(&Message::Complete)?;
        enc.flush()?;
        let total_sent = enc.bytes_written();
        self.status.update(|s| s.bytes_sent = total_sent);
        // Complete is out: the destination may now start the guest.
        dec.get_mut()
            .get_ref()
            .set_timeouts(Some(RUNNING_TIMEOUT), Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        match dec.recv_expecting(&[MessageType::Ack]) {
            Ok(Message::Ack(AckKind::Running)) => {
                let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
                let total = self.status.elapsed_ms();
                self.status.update(|s| {
                    s.downtime_ms = Some(downtime);
                    s.total_ms = total;
                });
                Ok(End::Running)
            }
            Ok(other) => Ok(End::Unknown(format!("it answered {other:?}"))),
            Err(ProtocolError::Peer(why)) => Ok(End::RefusedAfterComplete(why)),
            Err(e) => Ok(End::Unknown(super::chain(&e))),
        }
    }

    /// Postcopy from the start: the demand connection, switch-over at once, then the
    /// destination runs the guest while this side serves its page requests and pushes
    /// the rest.
    fn open_demand(
        &mut self,
        header: Header,
        addr: &MigrationAddr,
    ) -> Result<DemandLink, SourceError> {
        let page_shift = header.page_shift;
        let demand = Stream::connect(addr, CONNECT_TIMEOUT)?;
        demand
            .set_timeouts(Some(CONNECT_TIMEOUT), Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        let demand_writer = demand.try_clone().map_err(SourceError::Socket)?;
        let mut demand_header = header;
        demand_header.channel = Channel::Demand;
        let mut denc = Encoder::new(BufWriter::new(demand_writer));
        denc.send(&Message::Header(demand_header))?;
        denc.flush()?;
        let mut ddec = Decoder::new(BufReader::new(
            demand.try_clone().map_err(SourceError::Socket)?,
        ));
        ddec.expect_page_shift(page_shift);
        match ddec.recv_expecting(&[MessageType::Ack])? {
            Message::Ack(AckKind::Accepted) => {}
            other => {
                return Err(SourceError::Refused(format!(
                    "{other:?} on the demand channel"
                )))
            }
        }
        Ok(DemandLink {
            stream: demand,
            dec: ddec,
            enc: denc,
        })
    }

    /// Switches over to postcopy: pause, the stale pages (those sent in precopy rounds
    /// and written since: `pending` plus what the pause harvests; `None` when no round
    /// ran), the state; then, once the destination runs the guest, serve its page
    /// requests and push every page it does not hold.
    fn switch_postcopy(
        &mut self,
        mut enc: Enc,
        mut dec: Dec,
        link: DemandLink,
        pending: Option<Vec<u64>>,
        header: Header,
    ) -> Result<End, SourceError> {
        let DemandLink {
            stream: demand,
            dec: ddec,
            enc: denc,
        } = link;
        let page_shift = u8::try_from(self.ram.page_size().trailing_zeros()).unwrap_or(12);
        self.check_cancel()?;

        let paused_at = Instant::now();
        self.status.update(|s| s.phase = Phase::SwitchOver);
        let (state, stale) =
            match self.machine(MachineRequest::PauseAndSave, "pause and save its state")? {
                MachineReply::Saved { state, dirty } => {
                    self.paused = true;
                    (state, pending.map(|p| merge_sorted(&p, &dirty)))
                }
                _ => {
                    return Err(SourceError::Machine {
                        what: "pause and save its state",
                        why: "unexpected answer".into(),
                    })
                }
            };
        enc.send(&Message::SwitchOver(SwitchMode::Postcopy))?;
        if let Some(stale) = &stale {
            self.send_stale(&mut enc, stale, page_shift)?;
        }
        if self.opts.verify {
            self.send_digests(&mut enc, page_shift)?;
        }
        send_state(&mut enc, &state)?;
        enc.send(&Message::Complete)?;
        enc.flush()?;
        // Serve page requests from now on: restoring the state may already touch guest
        // memory on the destination (KVM writes the kvmclock wall clock into the guest
        // when its MSR is restored), before the guest runs and before `Ack(Running)`.
        let mut sent = Arc::new(match &stale {
            // After precopy rounds the destination holds every page but the stale ones.
            Some(stale) => SentMap::all_but(&self.ram, stale),
            None => SentMap::new(&self.ram),
        });
        let mut demand_stream = self.serve_demand(
            DemandLink {
                stream: demand,
                dec: ddec,
                enc: denc,
            },
            &sent,
        )?;
        dec.get_mut()
            .get_ref()
            .set_timeouts(Some(RUNNING_TIMEOUT), Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        let running = dec.recv_expecting(&[MessageType::Ack]);
        if !matches!(running, Ok(Message::Ack(AckKind::Running))) {
            // The guest did not start there (or nobody knows): stop serving it.
            demand_stream.shutdown();
        }
        match running {
            Ok(Message::Ack(AckKind::Running)) => {}
            Ok(other) => return Ok(End::Unknown(format!("it answered {other:?}"))),
            Err(ProtocolError::Peer(why)) => return Ok(End::RefusedAfterComplete(why)),
            Err(e) => return Ok(End::Unknown(super::chain(&e))),
        }
        // The guest runs on the destination: this side can never resume it.
        let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
        self.status.update(|s| {
            s.phase = Phase::Postcopy;
            s.downtime_ms = Some(downtime);
            s.postcopy = Some(super::status::PostcopyStatus {
                phase: "running".into(),
                ..Default::default()
            });
        });
        self.write_watch(true);
        loop {
            let why = match self.finish_postcopy(&mut enc, &mut dec, &sent) {
                Ok(()) => return Ok(End::Running),
                Err(why) => why,
            };
            // The link dropped: the guest waits on the destination for pages only this
            // side has. Wait for `migrate resume`, then reconnect and go on.
            demand_stream.shutdown();
            let msg = format!(
                "Postcopy paused: the link to the destination dropped ({why}); run `migrate resume ADDR` on the destination, then here"
            );
            log::error!("{msg}");
            self.status.update(|s| {
                s.phase = Phase::PostcopyPaused;
                s.error = Some(msg);
            });
            self.write_watch(true);
            loop {
                let Ok(addr) = self.resume_rx.recv() else {
                    return Ok(End::PostcopyLost(why));
                };
                match self.reconnect(&addr, &header) {
                    Ok((e, d, l, map)) => {
                        enc = e;
                        dec = d;
                        sent = Arc::new(map);
                        demand_stream = self.serve_demand(l, &sent)?;
                        break;
                    }
                    Err(e) => {
                        let msg = format!(
                            "Postcopy paused; resuming through {addr} failed: {}",
                            super::chain(&e)
                        );
                        log::error!("{msg}");
                        self.status.update(|s| s.error = Some(msg));
                    }
                }
            }
            self.status.update(|s| {
                s.phase = Phase::Postcopy;
                s.error = None;
                if let Some(p) = &mut s.postcopy {
                    p.resumes += 1;
                }
            });
            log::info!("Postcopy resumed through {}", self.opts.addr);
        }
    }

    /// Starts answering page requests on `link`; returns its stream, to shut it down
    /// when the link is given up.
    fn serve_demand(&self, link: DemandLink, sent: &Arc<SentMap>) -> Result<Stream, SourceError> {
        link.stream
            .set_timeouts(None, Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        postcopy_source::spawn_demand(
            link.dec,
            link.enc.into_inner(),
            Arc::clone(&self.ram),
            Arc::clone(sent),
            self.status.clone(),
        )
        .map_err(SourceError::Socket)?;
        Ok(link.stream)
    }

    /// Pushes every page not sent yet, then waits for the destination to confirm it
    /// holds them all. An error is the sentence of a dropped link.
    fn finish_postcopy(
        &mut self,
        enc: &mut Enc,
        dec: &mut Dec,
        sent: &SentMap,
    ) -> Result<(), String> {
        postcopy_source::push_background(enc, &self.ram, sent, &self.status)
            .map_err(|e| super::chain(&e))?;
        dec.get_mut()
            .get_ref()
            .set_timeouts(
                Some(postcopy_source::ALL_RECEIVED_TIMEOUT),
                Some(WRITE_TIMEOUT),
            )
            .map_err(|e| e.to_string())?;
        match dec.recv_expecting(&[MessageType::Ack]) {
            Ok(Message::Ack(AckKind::AllPagesReceived)) => {
                let total = self.status.elapsed_ms();
                self.status.update(|s| {
                    s.total_ms = total;
                    if let Some(p) = &mut s.postcopy {
                        p.phase = "completed".into();
                    }
                });
                Ok(())
            }
            Ok(other) => Err(format!("the destination answered {other:?}")),
            Err(e) => Err(super::chain(&e)),
        }
    }

    /// The source's half of the resume handshake: a new main connection with the
    /// migration's header and `Resume`, the destination's map of the pages it holds
    /// (exactly those count as sent; every other page goes again), then a new demand
    /// connection.
    fn reconnect(
        &mut self,
        addr: &MigrationAddr,
        header: &Header,
    ) -> Result<(Enc, Dec, DemandLink, SentMap), SourceError> {
        let stream = Stream::connect(addr, CONNECT_TIMEOUT)?;
        stream
            .set_timeouts(Some(CONNECT_TIMEOUT), Some(WRITE_TIMEOUT))
            .map_err(SourceError::Socket)?;
        let reader = stream.try_clone().map_err(SourceError::Socket)?;
        let mut enc: Enc = Encoder::new(BufWriter::with_capacity(
            1 << 20,
            TimedWriter {
                inner: stream,
                busy: Duration::ZERO,
                bytes: 0,
            },
        ));
        let mut dec: Dec = Decoder::new(BufReader::new(reader));
        dec.expect_page_shift(header.page_shift);
        enc.send(&Message::Header(header.clone()))?;
        enc.send(&Message::Resume)?;
        enc.flush()?;
        match dec.recv_expecting(&[MessageType::Ack])? {
            Message::Ack(AckKind::Accepted) => {}
            other => return Err(SourceError::Refused(format!("{other:?}"))),
        }
        let sent = SentMap::new(&self.ram);
        let mut marked = 0u64;
        loop {
            match dec.recv_expecting(&[MessageType::ReceivedPages, MessageType::ResumeReady])? {
                Message::ReceivedPages(map) => {
                    let page = 1u64 << map.page_shift;
                    for i in 0..map.count {
                        if map.get(i) && sent.claim(map.gpa + u64::from(i) * page) {
                            marked += 1;
                        }
                    }
                }
                Message::ResumeReady { received } => {
                    if received != marked {
                        return Err(SourceError::Refused(format!(
                            "a received-pages map of {marked} pages, but ResumeReady says {received}"
                        )));
                    }
                    break;
                }
                _ => {}
            }
        }
        log::info!("Postcopy resume: the destination holds {marked} pages; the rest goes again");
        let link = self.open_demand(header.clone(), addr)?;
        Ok((enc, dec, link, sent))
    }

    /// Sends the stale pages as `StalePages` bitmaps, region by region.
    fn send_stale(
        &mut self,
        enc: &mut Enc,
        stale: &[u64],
        page_shift: u8,
    ) -> Result<(), SourceError> {
        let page = 1u64 << page_shift;
        let per_map = u64::from(super::protocol::MAX_MAP_PAGES);
        let mut i = 0usize;
        for r in self.ram.regions() {
            let mut start = r.start;
            while start < r.end() {
                let count = ((r.end() - start) / page).min(per_map);
                let end = start + count * page;
                let mut map =
                    ReceivedPages::new(start, page_shift, u32::try_from(count).unwrap_or(0));
                let mut any = false;
                while i < stale.len() && stale[i] < end {
                    if stale[i] >= start {
                        any |=
                            map.set(u32::try_from((stale[i] - start) / page).unwrap_or(u32::MAX));
                    }
                    i += 1;
                }
                if any {
                    enc.send(&Message::StalePages(map))?;
                }
                start = end;
            }
        }
        log::info!("Postcopy: {} stale page(s) to send again", stale.len());
        Ok(())
    }

    /// Sends the CRC32C of every page (the guest is paused: they are the switch-over
    /// contents).
    fn send_digests(&mut self, enc: &mut Enc, page_shift: u8) -> Result<(), SourceError> {
        let page = 1u64 << page_shift;
        let chunk_pages = u64::from(max_run_pages(page_shift).max(1));
        let mut buf = Vec::new();
        for r in self.ram.regions() {
            let mut digests = PageDigests {
                gpa: r.start,
                page_shift,
                digests: Vec::new(),
            };
            let mut gpa = r.start;
            while gpa < r.end() {
                let count = ((r.end() - gpa) / page).min(chunk_pages);
                buf.resize(usize::try_from(count * page).unwrap_or(0), 0);
                self.ram.read(gpa, &mut buf)?;
                for p in buf.chunks_exact(usize::try_from(page).unwrap_or(1)) {
                    digests.digests.push(Crc32c::of(p));
                }
                gpa += count * page;
                // A message per DIGEST_FLUSH_BYTES of RAM, so the stream keeps moving
                // while the digests are computed (on a slow host all of RAM takes
                // longer than the destination waits for a silent source).
                let covered = digests.digests.len() as u64 * page;
                if digests.digests.len() >= usize::try_from(MAX_DIGESTS).unwrap_or(0)
                    || covered >= DIGEST_FLUSH_BYTES
                    || gpa >= r.end()
                {
                    let next = PageDigests {
                        gpa,
                        page_shift,
                        digests: Vec::new(),
                    };
                    enc.send(&Message::PageDigests(std::mem::replace(&mut digests, next)))?;
                }
            }
        }
        Ok(())
    }

    /// Sends the pages of a sorted list, as runs of consecutive pages.
    fn send_list(
        &mut self,
        enc: &mut Enc,
        pages: &[u64],
        page_shift: u8,
    ) -> Result<(), SourceError> {
        let page = 1u64 << page_shift;
        let max = u64::from(max_run_pages(page_shift).max(1));
        let regions = self.ram.regions();
        let mut i = 0;
        while i < pages.len() {
            self.check_cancel()?;
            let start = pages[i];
            let region_end = regions
                .iter()
                .find(|r| r.start <= start && start < r.end())
                .map_or(start + page, |r| r.end());
            let mut count = 1u64;
            while i + usize::try_from(count).unwrap_or(usize::MAX) < pages.len()
                && count < max
                && pages[i + usize::try_from(count).unwrap_or(0)] == start + count * page
                && start + (count + 1) * page <= region_end
            {
                count += 1;
            }
            self.send_range(enc, start, count, page_shift)?;
            i += usize::try_from(count).unwrap_or(usize::MAX);
        }
        Ok(())
    }

    /// Sends `count` pages from `gpa` (one region, at most one run): read under the
    /// read lock of the range, then split into runs of zero pages (no bytes) and runs
    /// with contents.
    fn send_range(
        &mut self,
        enc: &mut Enc,
        gpa: u64,
        count: u64,
        page_shift: u8,
    ) -> Result<(), SourceError> {
        let sent = encode_range(&self.ram, enc, gpa, count, page_shift, &mut self.buf)?;
        let (data_pages, zero_pages, ballooned) = (sent.data, sent.zero, sent.ballooned);
        let bytes = enc.bytes_written();
        self.status.update(|s| {
            s.bytes_sent = bytes;
            s.pages_sent += data_pages;
            s.zero_pages += zero_pages;
            s.ballooned_pages += ballooned;
            s.round_done += count;
        });
        self.write_watch(false);
        Ok(())
    }
}

/// What [`encode_range`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeSent {
    /// Pages sent with their contents.
    pub data: u64,
    /// Pages sent as zero runs.
    pub zero: u64,
    /// Of those, pages the balloon holds.
    pub ballooned: u64,
}

/// Reads `count` pages from `gpa` (inside one region, at most one run) under the read
/// lock of that range, and writes them to `enc` as runs: all-zero pages (ballooned
/// pages read as zero) as zero runs without bytes, the others with their contents.
/// `buf` is scratch space, kept by the caller so that runs do not allocate.
pub fn encode_range<W: Write>(
    ram: &GuestRam,
    enc: &mut Encoder<W>,
    gpa: u64,
    count: u64,
    page_shift: u8,
    buf: &mut Vec<u8>,
) -> Result<RangeSent, SourceError> {
    let page = 1usize << page_shift;
    let len = usize::try_from(count).unwrap_or(0) * page;
    buf.resize(len, 0);
    ram.read(gpa, &mut buf[..len])?;
    let buf = &buf[..len];
    let (mut data_pages, mut zero_pages, mut ballooned) = (0u64, 0u64, 0u64);
    let mut run_start = 0usize;
    let mut run_zero = None;
    let pages = len / page;
    for p in 0..=pages {
        let zero = (p < pages).then(|| is_zero(&buf[p * page..(p + 1) * page]));
        if zero != run_zero || p == pages {
            if let Some(z) = run_zero {
                let at = gpa + (run_start * page) as u64;
                let n = p - run_start;
                if z {
                    enc.send(&Message::Pages(PageRun::zero(
                        at,
                        page_shift,
                        u32::try_from(n).unwrap_or(u32::MAX),
                    )))?;
                    zero_pages += n as u64;
                    for k in 0..n {
                        if ram
                            .page_state(at + (k * page) as u64)
                            .is_ok_and(|s| s.ballooned)
                        {
                            ballooned += 1;
                        }
                    }
                } else {
                    enc.send_pages(at, page_shift, &buf[run_start * page..p * page])?;
                    data_pages += n as u64;
                }
            }
            run_start = p;
            run_zero = zero;
        }
    }
    Ok(RangeSent {
        data: data_pages,
        zero: zero_pages,
        ballooned,
    })
}

fn send_state(enc: &mut Enc, state: &MachineState) -> Result<(), ProtocolError> {
    for (i, blob) in state.vcpus.iter().enumerate() {
        enc.send(&Message::VcpuState {
            vcpu_id: u32::try_from(i).unwrap_or(u32::MAX),
            blob: blob.clone(),
        })?;
    }
    for (id, blob) in &state.devices {
        enc.send(&Message::DeviceState {
            id: id.clone(),
            blob: blob.clone(),
        })?;
    }
    Ok(())
}

/// `amount` per second over `over` (integer arithmetic, at least 1 µs).
fn per_second(amount: u64, over: Duration) -> u64 {
    let micros = over.as_micros().max(1);
    u64::try_from(u128::from(amount) * 1_000_000 / micros).unwrap_or(u64::MAX)
}

/// Whether a page is all zero bytes (64 bytes at a time, which vectorizes).
pub fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(64);
    let body = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    body && chunks.remainder().iter().all(|&b| b == 0)
}

/// The union of two ascending lists, ascending, without repeats.
pub fn merge_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) if x == y => {
                i += 1;
                j += 1;
                x
            }
            (Some(&x), Some(&y)) if x < y => {
                i += 1;
                x
            }
            (Some(_), Some(&y)) => {
                j += 1;
                y
            }
            (Some(&x), None) => {
                i += 1;
                x
            }
            (None, Some(&y)) => {
                j += 1;
                y
            }
            (None, None) => break,
        };
        if out.last() != Some(&next) {
            out.push(next);
        }
    }
    out
}

/// A session id that differs between migrations (time and process id; not a secret).
fn session_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 32);
    nanos ^ (u64::from(std::process::id()) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM of 64 pages: page 1 and pages 10..13 with contents, pages 20..30
    /// given back by the balloon after holding contents, the rest never touched.
    /// Pages are host pages (64 KiB on ppc64le).
    fn ram_with_balloon() -> GuestRam {
        let page = rangevm_memory::host_page_size();
        let ram = GuestRam::new(rangevm_memory::LockMode::Range, &[(0, 64 * page)]).unwrap();
        let bytes = |b: u8| vec![b; usize::try_from(page).unwrap()];
        ram.write(page, &bytes(1)).unwrap();
        for p in 10..13u8 {
            ram.write(u64::from(p) * page, &bytes(p)).unwrap();
        }
        for p in 20..30u64 {
            ram.write(p * page, &bytes(0xee)).unwrap();
        }
        ram.discard(20 * page..30 * page).unwrap();
        ram
    }

    #[test]
    fn ballooned_and_zero_pages_go_as_zero_runs_without_bytes() {
        use crate::migration::protocol::PageData;
        let ram = ram_with_balloon();
        let page = rangevm_memory::host_page_size();
        let mut enc = Encoder::new(Vec::new());
        let sent = encode_range(
            &ram,
            &mut enc,
            0,
            64,
            u8::try_from(page.trailing_zeros()).unwrap(),
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(
            sent,
            RangeSent {
                data: 4,
                zero: 60,
                ballooned: 10
            }
        );
        let bytes = enc.into_inner();
        // 4 pages of contents plus a few frames of framing: nothing of the balloon's.
        assert!(
            bytes.len() < 4 * usize::try_from(page).unwrap() + 8 * 64,
            "{}",
            bytes.len()
        );
        let mut dec = Decoder::new(&bytes[..]);
        let mut runs = Vec::new();
        while let Ok(Message::Pages(run)) = dec.recv() {
            let with_data = matches!(run.data, PageData::Bytes(_));
            runs.push((run.gpa / page, run.count, with_data));
        }
        assert_eq!(
            runs,
            vec![
                (0, 1, false),
                (1, 1, true),
                (2, 8, false),
                (10, 3, true),
                (13, 51, false)
            ]
        );
    }

    #[test]
    fn zero_pages_are_found() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 100]));
        assert!(!is_zero(&[&[0u8; 99][..], &[1]].concat()));
    }

    #[test]
    fn merging_keeps_order_and_drops_repeats() {
        assert_eq!(merge_sorted(&[1, 3, 5], &[2, 3, 6]), vec![1, 2, 3, 5, 6]);
        assert_eq!(merge_sorted(&[], &[4]), vec![4]);
        assert_eq!(merge_sorted(&[4, 4], &[]), vec![4]);
    }
}
