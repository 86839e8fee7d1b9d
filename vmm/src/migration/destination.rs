//! The receiving side of a precopy migration (`rangevm run --incoming ADDR`): wait for
//! a source, check its header against what this host can run, build an empty machine
//! of its shape, write the pages of every round into guest memory, then restore the
//! vCPU and device state, start the guest and tell the source it runs here. Nothing
//! runs before a `Complete` was decoded; any error before that discards the machine.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rangevm_memory::{GuestRamError, LockMode};

use super::control::{MachineCtl, MachineRequest};
use super::page_index::PageIndex;
use super::postcopy_dest::{
    run_background, run_demand_reader, DemandClient, Digests, ResumeHook, Shared,
};
use super::protocol::{
    AckKind, Arch, Channel, Crc32c, Decoder, Encoder, Header, Message, MessageType, PageData,
    ProtocolError, Region, SwitchMode, FEATURE_DEMAND_CHANNEL, FEATURE_POSTCOPY, FEATURE_RESUME,
    FEATURE_VERIFY,
};
use super::transport::{Listener, MigrationAddr, Stream, TransportError};
use crate::arch::layout;
use crate::event_loop::Signals;
use crate::machine::{
    IncomingConfig, IncomingMachine, Machine, MachineError, MachineState, RestoreError,
};
use rangevm_memory::FaultEngine;
use std::sync::Arc;

/// How long the source may stay silent in the middle of a migration.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How often a blocked read looks at SIGINT/SIGTERM.
const POLL: Duration = Duration::from_millis(250);

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// Listening or accepting failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream failed or broke the protocol.
    #[error("The migration stream from {peer} failed")]
    Protocol {
        /// The source.
        peer: String,
        /// The cause.
        #[source]
        source: ProtocolError,
    },
    /// The source's VM cannot run here.
    #[error("The incoming VM cannot run here")]
    Incompatible(#[source] ProtocolError),
    /// The machine could not be built or started.
    #[error("Cannot build the incoming machine")]
    Machine(#[from] MachineError),
    /// The switch-over state could not be restored.
    #[error("Cannot restore the incoming VM")]
    Restore(#[from] RestoreError),
    /// A page could not be written.
    #[error("Cannot write a received page")]
    Memory(#[from] GuestRamError),
    /// The postcopy demand channel could not be set up.
    #[error("Cannot set up postcopy: {0}")]
    Demand(String),
    /// `--verify`: the pages received differ from the source's.
    #[error("Verification failed: {0}")]
    Verify(String),
    /// SIGINT or SIGTERM arrived while waiting.
    #[error("Interrupted by signal {0}")]
    Signal(i32),
    /// This host's architecture has no migration support.
    #[error("This host's architecture cannot receive a migration")]
    Arch,
    /// Waiting for a connection failed.
    #[error("Cannot wait for the migration connection")]
    Poll(#[source] io::Error),
}

/// What `run --incoming` was given.
pub struct IncomingOptions {
    /// Where to listen.
    pub addr: MigrationAddr,
    /// Guest memory, if given: the source must match it.
    pub memory: Option<u64>,
    /// vCPUs, if given: the source must match.
    pub cpus: Option<u32>,
    /// The memory lock of the machine built here.
    pub mem_lock: LockMode,
    /// Where the guest's console goes.
    pub serial_out: Box<dyn Write + Send>,
    /// How a postcopy migration tells the event loop it failed (the guest cannot go
    /// on without its source).
    pub ctl: MachineCtl,
    /// Postcopy fault handler threads (and userfaultfds).
    pub postcopy_handlers: usize,
    /// How long a postcopy paused on a dropped link waits for `migrate resume` before
    /// it gives up (the guest cannot go on without its source).
    pub resume_timeout: Duration,
}

impl std::fmt::Debug for IncomingOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingOptions")
            .field("addr", &self.addr)
            .field("memory", &self.memory)
            .field("cpus", &self.cpus)
            .finish_non_exhaustive()
    }
}

/// A received machine, running, and what the migration took.
#[derive(Debug)]
pub struct Received {
    /// The machine, its vCPUs running.
    pub machine: Machine,
    /// Who sent it.
    pub source: String,
    /// Bytes read.
    pub bytes: u64,
    /// Rounds seen.
    pub rounds: u32,
    /// Pages whose CRC32C matched the source's at switch-over (`--verify`), if checked.
    pub verified: Option<u64>,
    /// Postcopy: the figures of the pages still arriving.
    pub postcopy: Option<Arc<Shared>>,
    /// From the header to the guest running.
    pub elapsed: Duration,
}

/// A read that blocks without losing its place: while the source is silent it looks at
/// the signals every [`POLL`], and gives up after [`IDLE_LIMIT`].
struct Watched<'a> {
    stream: Stream,
    signals: &'a Signals,
}

/// The error a [`Watched`] read returns on a signal.
#[derive(Debug)]
struct GotSignal(i32);

impl std::fmt::Display for GotSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "signal {}", self.0)
    }
}

impl std::error::Error for GotSignal {}

impl Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let start = Instant::now();
        loop {
            match self.stream.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(signo) = self.signals.take() {
                        return Err(io::Error::other(GotSignal(signo)));
                    }
                    if start.elapsed() > IDLE_LIMIT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the source sent nothing for {} s", IDLE_LIMIT.as_secs()),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

fn signal_of(e: &ProtocolError) -> Option<i32> {
    match e {
        ProtocolError::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<GotSignal>())
            .map(|s| s.0),
        _ => None,
    }
}

/// Waits for a readable listener or a signal.
fn wait_for_connection(listener: &Listener, signals: &Signals) -> Result<(), DestinationError> {
    wait_for_connection_within(listener, signals, None).map(|_| ())
}

/// Waits at most `limit` (`None`: forever) for a readable listener or a signal; false
/// when the time is up.
fn wait_for_connection_within(
    listener: &Listener,
    signals: &Signals,
    limit: Option<Duration>,
) -> Result<bool, DestinationError> {
    let start = Instant::now();
    loop {
        let timeout = match limit {
            None => -1,
            Some(l) => match l.checked_sub(start.elapsed()) {
                Some(left) => i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1),
                None => return Ok(false),
            },
        };
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a local array of two initialized pollfd structs, and its
        // length is passed with it; both descriptors stay open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DestinationError::Poll(e));
        }
        if fds[1].revents != 0 {
            if let Some(signo) = signals.take() {
                return Err(DestinationError::Signal(signo));
            }
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

/// Which pages were written in this migration (a zero run then overwrites them; a
/// zero run on a page never written leaves it untouched, so it costs no memory).
struct Written {
    index: PageIndex,
    bits: Vec<u64>,
}

impl Written {
    fn new(regions: &[Region], page_shift: u8) -> Self {
        let index = PageIndex::new(regions, page_shift);
        let words = index.pages().div_ceil(64);
        Written {
            index,
            bits: vec![0; words],
        }
    }

    fn set(&mut self, gpa: u64) {
        if let Some(i) = self.index.index(gpa) {
            if let Some(w) = self.bits.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }

    fn get(&self, gpa: u64) -> bool {
        self.index
            .index(gpa)
            .and_then(|i| self.bits.get(i / 64).map(|w| w & (1 << (i % 64)) != 0))
            .unwrap_or(false)
    }
}

/// Listens on `opts.addr`, receives one migration and returns the machine running.
/// A connection that closes before sending a header (a port probe) is ignored.
pub fn receive(opts: IncomingOptions, signals: &Signals) -> Result<Received, DestinationError> {
    let IncomingOptions {
        addr,
        memory,
        cpus,
        mem_lock,
        serial_out,
        ctl,
        postcopy_handlers,
        resume_timeout,
    } = opts;
    let shape = Shape {
        memory,
        cpus,
        mem_lock,
        ctl,
        handlers: postcopy_handlers,
        resume_timeout,
    };
    let listener = Listener::bind(&addr)?;
    eprintln!(
        "rangevm: waiting for an incoming migration on {}",
        listener.local_addr()
    );
    let mut serial_out = Some(serial_out);
    loop {
        wait_for_connection(&listener, signals)?;
        let stream = listener.accept()?;
        let peer = stream.peer();
        log::info!("Incoming migration connection from {peer}");
        match receive_one(&shape, &listener, stream, &peer, signals, &mut serial_out) {
            Err(DestinationError::Protocol {
                source: ProtocolError::Closed,
                ..
            }) if serial_out.is_some() => {
                log::warn!("{peer} closed the connection before sending a header; still waiting");
            }
            other => return other,
        }
    }
}

/// What the destination was told of the VM's shape.
struct Shape {
    memory: Option<u64>,
    cpus: Option<u32>,
    mem_lock: LockMode,
    ctl: MachineCtl,
    handlers: usize,
    resume_timeout: Duration,
}

/// How long the source may take to open the demand connection.
const DEMAND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the postcopy demand connection: a header with the main one's session id on
/// channel 1, answered with `Ack(Accepted)`.
fn accept_demand(
    listener: &Listener,
    signals: &Signals,
    main: &Header,
) -> Result<Stream, DestinationError> {
    let demand = |why: String| DestinationError::Demand(why);
    if !wait_for_connection_within(listener, signals, Some(DEMAND_CONNECT_TIMEOUT))? {
        return Err(demand(format!(
            "the source did not open the demand connection within {} s",
            DEMAND_CONNECT_TIMEOUT.as_secs()
        )));
    }
    let stream = listener.accept()?;
    stream
        .set_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(30)))
        .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
    let mut dec =
        Decoder::new(BufReader::new(stream.try_clone().map_err(|e| {
            DestinationError::Transport(TransportError::Socket(e))
        })?));
    let mut enc = Encoder::new(
        stream
            .try_clone()
            .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?,
    );
    match dec.recv_expecting(&[MessageType::Header]) {
        Ok(Message::Header(h))
            if h.channel == Channel::Demand && h.session_id == main.session_id =>
        {
            enc.send(&Message::Ack(AckKind::Accepted))
                .and_then(|()| enc.flush())
                .map_err(|e| demand(super::chain(&e)))?;
            stream
                .set_timeouts(None, Some(Duration::from_secs(30)))
                .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
            Ok(stream)
        }
        Ok(_) => {
            let _ = enc.send(&Message::error(
                "expected the demand channel of the migration under way",
            ));
            Err(demand(
                "the second connection is not this migration's demand channel".into(),
            ))
        }
        Err(e) => Err(demand(super::chain(&e))),
    }
}

fn receive_one(
    opts: &Shape,
    listener: &Listener,
    stream: Stream,
    peer: &str,
    signals: &Signals,
    serial_out: &mut Option<Box<dyn Write + Send>>,
) -> Result<Received, DestinationError> {
    let proto = |source| DestinationError::Protocol {
        peer: peer.to_string(),
        source,
    };
    stream
        .set_timeouts(Some(POLL), Some(Duration::from_secs(30)))
        .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
    let writer = stream
        .try_clone()
        .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
    let mut enc = Encoder::new(BufWriter::new(writer));
    let mut dec = Decoder::new(BufReader::with_capacity(
        1 << 20,
        Watched { stream, signals },
    ));
    // Sends an error sentence to the source (best effort) and returns `e`.
    let refuse = |enc: &mut Encoder<BufWriter<Stream>>, e: DestinationError| {
        let _ = enc.send(&Message::error(super::chain(&e)));
        let _ = enc.flush();
        e
    };
    let first = match dec.recv_expecting(&[MessageType::Header]) {
        Ok(m) => m,
        Err(e) => {
            if let Some(signo) = signal_of(&e) {
                return Err(DestinationError::Signal(signo));
            }
            let e = proto(e);
            return Err(refuse(&mut enc, e));
        }
    };
    let Message::Header(header) = first else {
        return Err(refuse(&mut enc, proto(ProtocolError::Closed)));
    };
    let started = Instant::now();
    let memory = opts
        .memory
        .unwrap_or_else(|| u64::try_from(header.memory_size()).unwrap_or(u64::MAX));
    let cpus = opts.cpus.unwrap_or(header.vcpu_count);
    let page_shift = u8::try_from(rangevm_memory::host_page_size().trailing_zeros()).unwrap_or(0);
    let arch = Arch::host().ok_or(DestinationError::Arch)?;
    let local_regions: Vec<Region> = layout::ram_regions(memory)
        .iter()
        .map(|&(gpa, size)| Region { gpa, size })
        .collect();
    let local = Header::new(
        arch,
        page_shift,
        cpus,
        local_regions,
        FEATURE_VERIFY | FEATURE_POSTCOPY | FEATURE_DEMAND_CHANNEL | FEATURE_RESUME,
    );
    if let Err(e) = header.check_compatible(&local) {
        return Err(refuse(&mut enc, DestinationError::Incompatible(e)));
    }
    let postcopy = header.features & FEATURE_POSTCOPY != 0;
    if postcopy && header.features & FEATURE_DEMAND_CHANNEL == 0 {
        return Err(refuse(
            &mut enc,
            DestinationError::Demand("postcopy needs the demand channel feature".into()),
        ));
    }
    let Some(serial) = serial_out.take() else {
        return Err(DestinationError::Arch);
    };
    let mut incoming = match IncomingMachine::new(IncomingConfig {
        memory,
        cpus,
        mem_lock: opts.mem_lock,
        serial_out: serial,
        source: peer.to_string(),
        postcopy,
    }) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut enc, e.into())),
    };
    enc.send(&Message::Ack(AckKind::Accepted)).map_err(proto)?;
    enc.flush().map_err(proto)?;
    eprintln!(
        "rangevm: accepted a migration from {peer}: {} MiB, {cpus} vCPU(s); receiving",
        memory >> 20
    );
    // Postcopy: the demand connection, and the fault engine that asks it for the
    // pages vCPUs touch (and KVM, which may touch guest memory while the state is
    // restored).
    let mut pc = if postcopy {
        let demand = match accept_demand(listener, signals, &header) {
            Ok(d) => d,
            Err(e) => return Err(refuse(&mut enc, e)),
        };
        let resumable = header.features & FEATURE_RESUME != 0;
        match Postcopy::start(
            &incoming,
            demand,
            header.page_shift,
            opts.handlers,
            resumable,
        ) {
            Ok(p) => Some(p),
            Err(e) => return Err(refuse(&mut enc, e)),
        }
    } else {
        None
    };
    let mut state = MachineState::default();
    let result = receive_body(&mut dec, &mut incoming, &header, &mut state, pc.as_mut());
    let stale_pages;
    let (rounds, verified) = match result {
        Ok(Body {
            rounds,
            verified,
            postcopy,
            stale,
        }) => {
            stale_pages = stale;
            if !postcopy {
                // Precopy switch-over on userfaultfd-served RAM: every page is here;
                // the memory becomes ordinary before the guest starts.
                if let Some(p) = pc.take() {
                    p.finish_precopy();
                }
            }
            (rounds, verified)
        }
        Err(e) => {
            if let DestinationError::Protocol { source, .. } = &e {
                if let Some(signo) = signal_of(source) {
                    return Err(DestinationError::Signal(signo));
                }
            }
            let e = match e {
                DestinationError::Protocol { source, .. } => proto(source),
                other => other,
            };
            return Err(refuse(&mut enc, e));
        }
    };
    // Seal before restoring: restoring may already fault pages in (KVM writes the
    // kvmclock wall clock into guest memory), and they are counted and verified.
    let shared = pc.as_mut().map(Postcopy::seal);
    if let Err(e) = incoming.restore(&state) {
        return Err(refuse(&mut enc, e.into()));
    }
    if let Some(shared) = &shared {
        // Pages held at switch-over: checked against the digests before the start.
        let (held, stale) = (verified.unwrap_or(0), stale_pages);
        shared.update(|s| {
            s.verified_pages += held;
            s.stale_pages = stale;
        });
    }
    let machine = match incoming.start() {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut enc, e.into())),
    };
    // The guest runs here now; the source may go.
    if let Err(e) = enc
        .send(&Message::Ack(AckKind::Running))
        .and_then(|()| enc.flush())
    {
        log::warn!("Cannot tell the source the guest runs here ({e}); it runs here anyway");
    }
    if let (Some(pc), Some(shared)) = (pc, shared.clone()) {
        let reader = dec.into_inner();
        if !reader.buffer().is_empty() {
            log::warn!("Postcopy: the source sent data before the guest ran; it is dropped");
        }
        let stream = reader.into_inner().stream;
        pc.spawn_background(
            stream,
            enc,
            Arc::clone(&shared),
            opts.ctl.clone(),
            &header,
            opts.resume_timeout,
        )?;
        return Ok(Received {
            machine,
            source: peer.to_string(),
            bytes: 0,
            rounds,
            verified,
            postcopy: Some(shared),
            elapsed: started.elapsed(),
        });
    }
    Ok(Received {
        machine,
        source: peer.to_string(),
        bytes: dec.bytes_read(),
        rounds,
        verified,
        postcopy: None,
        elapsed: started.elapsed(),
    })
}

/// The postcopy machinery of a destination, from the demand connection to the
/// background receiver.
struct Postcopy {
    resumable: bool,
    engine: Option<FaultEngine>,
    client: Arc<DemandClient>,
    digests: Option<Digests>,
    ram: Arc<rangevm_memory::GuestRam>,
    shared: Option<Arc<Shared>>,
    page_shift: u8,
}

impl Postcopy {
    /// Starts the demand reader and the fault engine over `incoming`'s RAM.
    fn start(
        incoming: &IncomingMachine,
        demand: Stream,
        page_shift: u8,
        handlers: usize,
        resumable: bool,
    ) -> Result<Self, DestinationError> {
        let ram = Arc::clone(incoming.ram());
        // The shared figures exist before the digests are known; they are attached at
        // `seal` (digest checks only start once pages flow, after the guest starts).
        let placeholder = Arc::new(Shared::new(ram.page_size(), None));
        let writer = demand
            .try_clone()
            .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
        let client = Arc::new(DemandClient::new(
            writer,
            page_shift,
            placeholder,
            resumable,
        ));
        let engine = FaultEngine::start(
            Arc::clone(&ram),
            Arc::clone(&client) as Arc<dyn rangevm_memory::PageSource>,
            rangevm_memory::FaultEngineConfig {
                handlers,
                shards: handlers,
            },
        )
        .map_err(|e| DestinationError::Demand(super::chain(&e)))?;
        let reader_client = Arc::clone(&client);
        let mut dec = Decoder::new(BufReader::new(demand));
        dec.expect_page_shift(page_shift);
        std::thread::Builder::new()
            .name("postcopy-demand".into())
            .spawn(move || run_demand_reader(dec, reader_client))
            .map_err(|e| DestinationError::Demand(format!("cannot start a thread: {e}")))?;
        Ok(Postcopy {
            resumable,
            engine: Some(engine),
            digests: Some(Digests::new(&ram)),
            client,
            ram,
            shared: None,
            page_shift,
        })
    }

    /// A precopy round's pages on userfaultfd-served RAM (before the guest runs):
    /// missing pages are placed, pages an earlier round brought are overwritten.
    fn place_round(
        &self,
        ram: &rangevm_memory::GuestRam,
        run: &super::protocol::PageRun,
        zeros: &[u8],
    ) -> Result<(), DestinationError> {
        let Some(engine) = &self.engine else {
            return Err(DestinationError::Demand("the fault engine is gone".into()));
        };
        let data = match &run.data {
            PageData::Bytes(b) => Some(b.as_slice()),
            PageData::Zero => None,
        };
        let count = u64::from(run.count);
        let placed = engine.place(run.gpa, count, data)?;
        if placed.kept > 0 {
            match data {
                Some(bytes) => ram.write(run.gpa, bytes)?,
                None => {
                    for k in 0..count {
                        ram.write(run.gpa + k * ram.page_size(), zeros)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops the stale pages `map` marks (they become missing and come again).
    /// Returns how many.
    fn forget(
        &self,
        ram: &rangevm_memory::GuestRam,
        map: &super::protocol::ReceivedPages,
    ) -> Result<u64, DestinationError> {
        let page = 1u64 << map.page_shift;
        let mut n = 0u64;
        let mut run: Option<(u64, u64)> = None;
        for i in 0..map.count {
            if map.get(i) {
                n += 1;
                let at = map.gpa + u64::from(i) * page;
                run = match run {
                    Some((s, e)) if e == at => Some((s, e + page)),
                    Some((s, e)) => {
                        ram.forget(s..e)?;
                        Some((at, at + page))
                    }
                    None => Some((at, at + page)),
                };
            }
        }
        if let Some((s, e)) = run {
            ram.forget(s..e)?;
        }
        Ok(n)
    }

    /// The migration switched over in precopy after all: every page is here, so the
    /// fault engine stops and guest RAM becomes ordinary.
    fn finish_precopy(mut self) {
        if let Some(engine) = self.engine.take() {
            let stats = engine.finish();
            log::info!("Precopy switch-over on postcopy-ready memory; fault engine {stats:?}");
        }
    }

    /// The switch-over state is in: fixes the digests (if the source sent any) and
    /// returns the figures shared with the demand client and `migrate status`.
    fn seal(&mut self) -> Arc<Shared> {
        let digests = self.digests.take().filter(Digests::any);
        let shared = Arc::new(Shared::new(self.ram.page_size(), digests));
        self.client.set_shared(Arc::clone(&shared));
        self.shared = Some(Arc::clone(&shared));
        shared
    }

    /// Receives the background stream on its own thread until every page is here.
    fn spawn_background(
        mut self,
        stream: Stream,
        enc: Encoder<BufWriter<Stream>>,
        shared: Arc<Shared>,
        ctl: MachineCtl,
        header: &Header,
        resume_timeout: Duration,
    ) -> Result<(), DestinationError> {
        let resume = if self.resumable {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            shared.set_resume(ResumeHook {
                header: header.clone(),
                tx,
            });
            Some((rx, resume_timeout))
        } else {
            None
        };
        let client = Arc::clone(&self.client);
        let Some(engine) = self.engine.take() else {
            return Err(DestinationError::Demand("the fault engine is gone".into()));
        };
        stream
            .set_timeouts(Some(Duration::from_secs(60)), Some(Duration::from_secs(30)))
            .map_err(|e| DestinationError::Transport(TransportError::Socket(e)))?;
        let ram = Arc::clone(&self.ram);
        let page_shift = self.page_shift;
        std::thread::Builder::new()
            .name("postcopy-pages".into())
            .spawn(move || {
                let mut dec = Decoder::new(BufReader::with_capacity(1 << 20, stream));
                dec.expect_page_shift(page_shift);
                match run_background(dec, enc, engine, &ram, &shared, &client, resume) {
                    Ok(()) => {
                        let s = shared.status(&ram);
                        eprintln!(
                            "rangevm: postcopy complete in {:.0} ms: {} pages on demand (p50 {:.0} µs, p99 {:.0} µs), {} in the background{}",
                            s.total_ms,
                            s.demand_pages,
                            s.demand_p50_us,
                            s.demand_p99_us,
                            s.background_pages,
                            if s.verified_pages > 0 {
                                format!(", {} pages verified", s.verified_pages)
                            } else {
                                String::new()
                            }
                        );
                    }
                    Err(why) => {
                        let why = format!("{why} (the guest cannot go on without its source)");
                        shared.fail(why.clone());
                        let _ = ctl.call(MachineRequest::Fail(why), Duration::from_secs(5));
                    }
                }
            })
            .map_err(|e| DestinationError::Demand(format!("cannot start a thread: {e}")))?;
        Ok(())
    }
}

/// Whether `len` bytes from `gpa` lie inside one region.
fn in_one_region(regions: &[Region], gpa: u64, len: u64) -> bool {
    regions.iter().any(|r| {
        gpa >= r.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= r.gpa + r.size)
    })
}

/// Moves the vCPU states into `state`, in order; every vCPU must have one.
fn take_vcpus(vcpus: Vec<Option<Vec<u8>>>, state: &mut MachineState) -> Result<(), RestoreError> {
    for (i, v) in vcpus.into_iter().enumerate() {
        state
            .vcpus
            .push(v.ok_or(RestoreError::Incomplete(format!("no state for vCPU {i}")))?);
    }
    Ok(())
}

type Dec<'a> = Decoder<BufReader<Watched<'a>>>;

/// What [`receive_body`] saw.
struct Body {
    /// Rounds seen.
    rounds: u32,
    /// With verification, the pages checked before the guest starts.
    verified: Option<u64>,
    /// The switch-over was to postcopy.
    postcopy: bool,
    /// Stale pages dropped at a switch to postcopy.
    stale: u64,
}

/// Reads rounds of pages, the switch-over, the state and `Complete`.
fn receive_body(
    dec: &mut Dec<'_>,
    incoming: &mut IncomingMachine,
    header: &Header,
    state: &mut MachineState,
    mut pc: Option<&mut Postcopy>,
) -> Result<Body, DestinationError> {
    let proto = |source| DestinationError::Protocol {
        peer: String::from("the source"),
        source,
    };
    let ram = std::sync::Arc::clone(incoming.ram());
    let page = ram.page_size();
    let mut written = Written::new(&header.regions, header.page_shift);
    let zeros = vec![0u8; usize::try_from(page).unwrap_or(0)];
    let mut rounds = 0u32;
    let mut switched = false;
    let cpus = usize::try_from(header.vcpu_count).unwrap_or(0);
    let mut vcpus: Vec<Option<Vec<u8>>> = vec![None; cpus];
    let verify = header.features & FEATURE_VERIFY != 0;
    let (mut checked, mut differ, mut first_bad) = (0u64, 0u64, None);
    let mut page_buf = vec![0u8; usize::try_from(page).unwrap_or(0)];
    let mut postcopy_mode = false;
    let mut stale = 0u64;
    loop {
        let allowed: &[MessageType] = if switched {
            &[
                MessageType::Pages,
                MessageType::VcpuState,
                MessageType::DeviceState,
                MessageType::PageDigests,
                MessageType::StalePages,
                MessageType::Complete,
            ]
        } else {
            &[
                MessageType::Pages,
                MessageType::RoundEnd,
                MessageType::SwitchOver,
            ]
        };
        match dec.recv_expecting(allowed).map_err(proto)? {
            Message::Pages(run) => {
                let n = u64::from(run.count);
                if !in_one_region(&header.regions, run.gpa, n.saturating_mul(page)) {
                    return Err(DestinationError::Memory(GuestRamError::NotMapped {
                        start: run.gpa,
                        end: run.gpa.saturating_add(n.saturating_mul(page)),
                    }));
                }
                if postcopy_mode {
                    return Err(proto(ProtocolError::Unexpected {
                        got: "Pages",
                        expected: "the switch-over state (postcopy pages come after it)".into(),
                    }));
                }
                if let Some(pc) = pc.as_deref_mut() {
                    // Userfaultfd-served RAM (postcopy negotiated): place missing
                    // pages, overwrite the ones an earlier round brought.
                    pc.place_round(&ram, &run, &zeros)?;
                    continue;
                }
                match run.data {
                    PageData::Bytes(data) => {
                        ram.write(run.gpa, &data)?;
                        for k in 0..n {
                            written.set(run.gpa + k * page);
                        }
                    }
                    PageData::Zero => {
                        for k in 0..n {
                            let gpa = run.gpa + k * page;
                            if written.get(gpa) {
                                ram.write(gpa, &zeros)?;
                            }
                        }
                    }
                }
            }
            Message::RoundEnd(r) => {
                rounds = r.round.saturating_add(1);
                log::info!(
                    "Received round {}: {} MiB read so far; {} bytes still dirty at the source",
                    r.round,
                    dec.bytes_read() >> 20,
                    r.dirty_bytes
                );
            }
            Message::SwitchOver(SwitchMode::Precopy) => switched = true,
            Message::SwitchOver(SwitchMode::Postcopy) if pc.is_some() => {
                switched = true;
                postcopy_mode = true;
            }
            Message::SwitchOver(SwitchMode::Postcopy) => {
                return Err(proto(ProtocolError::Malformed {
                    message: "SwitchOver",
                    reason: "postcopy was not negotiated",
                }))
            }
            Message::VcpuState { vcpu_id, blob } => {
                let slot = usize::try_from(vcpu_id)
                    .ok()
                    .and_then(|i| vcpus.get_mut(i))
                    .ok_or(RestoreError::Incomplete(format!(
                        "state for vCPU {vcpu_id} of a {cpus}-vCPU VM"
                    )))?;
                if slot.replace(blob).is_some() {
                    return Err(
                        RestoreError::Incomplete(format!("two states for vCPU {vcpu_id}")).into(),
                    );
                }
            }
            Message::DeviceState { id, blob } => state.devices.push((id, blob)),
            Message::StalePages(map) if postcopy_mode => {
                if let Some(pc) = pc.as_deref_mut() {
                    stale += pc.forget(&ram, &map)?;
                }
            }
            Message::PageDigests(d) if verify && postcopy_mode => {
                // Pages here already (from precopy rounds) are checked now; the others
                // as they arrive.
                let digests = pc.as_deref_mut().and_then(|p| p.digests.as_mut());
                let Some(digests) = digests else {
                    return Err(DestinationError::Verify("no room for the digests".into()));
                };
                for (k, &crc) in d.digests.iter().enumerate() {
                    let gpa = d.gpa + k as u64 * page;
                    if !digests.set(gpa, crc) {
                        return Err(DestinationError::Verify(format!(
                            "a digest for {gpa:#x}, which is not guest RAM"
                        )));
                    }
                    if ram.is_present(gpa) {
                        ram.read(gpa, &mut page_buf)?;
                        checked += 1;
                        if Crc32c::of(&page_buf) != crc {
                            differ += 1;
                            first_bad.get_or_insert(gpa);
                        }
                    }
                }
            }
            Message::PageDigests(d) if verify => {
                for (k, want) in d.digests.iter().enumerate() {
                    let gpa = d.gpa + k as u64 * page;
                    ram.read(gpa, &mut page_buf)?;
                    checked += 1;
                    if Crc32c::of(&page_buf) != *want {
                        differ += 1;
                        first_bad.get_or_insert(gpa);
                    }
                }
            }
            Message::Complete => break,
            other => {
                return Err(proto(ProtocolError::Unexpected {
                    got: other.message_type().name(),
                    expected: "pages or state".into(),
                }))
            }
        }
    }
    if postcopy_mode {
        if let Some(bad) = first_bad {
            return Err(DestinationError::Verify(format!(
                "{differ} of the {checked} pages held at switch-over differ from the source's, the first at {bad:#x}"
            )));
        }
        if stale > 0 {
            log::info!("Postcopy: {stale} stale page(s) dropped; they come again");
        }
        // The other digests are checked as their pages arrive, after the guest starts.
        take_vcpus(vcpus, state)?;
        return Ok(Body {
            rounds,
            verified: verify.then_some(checked),
            postcopy: true,
            stale,
        });
    }
    if !verify {
        take_vcpus(vcpus, state)?;
        return Ok(Body {
            rounds,
            verified: None,
            postcopy: false,
            stale: 0,
        });
    }
    let total = ram.size() / page;
    if let Some(bad) = first_bad {
        return Err(DestinationError::Verify(format!(
            "{differ} of {checked} pages differ from the source's at switch-over, the first at {bad:#x}"
        )));
    }
    if checked != total {
        return Err(DestinationError::Verify(format!(
            "the source sent digests for {checked} of {total} pages"
        )));
    }
    log::info!("Verified all {checked} pages against the source's digests");
    take_vcpus(vcpus, state)?;
    Ok(Body {
        rounds,
        verified: Some(checked),
        postcopy: false,
        stale: 0,
    })
}
