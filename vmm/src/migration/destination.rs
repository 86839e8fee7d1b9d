//! The receiving side of a precopy migration (`rangevm run --incoming ADDR`): wait for
//! a source, check its header against what this host can run, build an empty machine
//! of its shape, write the pages of every round into guest memory, then restore the
//! vCPU and device state, start the guest and tell the source it runs here. Nothing
//! runs before a `Complete` was decoded; any error before that discards the machine.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use rangevm_memory::{GuestRamError, LockMode};

use super::protocol::{
    AckKind, Arch, Crc32c, Decoder, Encoder, Header, Message, MessageType, PageData, ProtocolError,
    Region, SwitchMode, FEATURE_VERIFY,
};
use super::transport::{Listener, MigrationAddr, Stream, TransportError};
use crate::arch::layout;
use crate::event_loop::Signals;
use crate::machine::{
    IncomingConfig, IncomingMachine, Machine, MachineError, MachineState, RestoreError,
};

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
    loop {
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
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
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
            return Ok(());
        }
    }
}

/// Which pages were written in this migration (a zero run then overwrites them; a
/// zero run on a page never written leaves it untouched, so it costs no memory).
struct Written {
    /// (start, end, index of the first page).
    regions: Vec<(u64, u64, usize)>,
    bits: Vec<u64>,
    page_shift: u32,
}

impl Written {
    fn new(regions: &[Region], page_shift: u8) -> Self {
        let shift = u32::from(page_shift);
        let mut out = Vec::with_capacity(regions.len());
        let mut index = 0usize;
        for r in regions {
            out.push((r.gpa, r.gpa + r.size, index));
            index += usize::try_from(r.size >> shift).unwrap_or(0);
        }
        Written {
            regions: out,
            bits: vec![0; index.div_ceil(64)],
            page_shift: shift,
        }
    }

    fn index(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|(s, e, _)| *s <= gpa && gpa < *e)
            .and_then(|(s, _, i)| {
                usize::try_from((gpa - s) >> self.page_shift)
                    .ok()
                    .map(|o| i + o)
            })
    }

    fn set(&mut self, gpa: u64) {
        if let Some(i) = self.index(gpa) {
            if let Some(w) = self.bits.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        }
    }

    fn get(&self, gpa: u64) -> bool {
        self.index(gpa)
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
    } = opts;
    let shape = Shape {
        memory,
        cpus,
        mem_lock,
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
        match receive_one(&shape, stream, &peer, signals, &mut serial_out) {
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
}

fn receive_one(
    opts: &Shape,
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
    let local = Header::new(arch, page_shift, cpus, local_regions, FEATURE_VERIFY);
    if let Err(e) = header.check_compatible(&local) {
        return Err(refuse(&mut enc, DestinationError::Incompatible(e)));
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
    let mut state = MachineState::default();
    let result = receive_body(&mut dec, &mut incoming, &header, &mut state);
    let (rounds, verified) = match result {
        Ok(r) => r,
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
    if let Err(e) = incoming.restore(&state) {
        return Err(refuse(&mut enc, e.into()));
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
    Ok(Received {
        machine,
        source: peer.to_string(),
        bytes: dec.bytes_read(),
        rounds,
        verified,
        elapsed: started.elapsed(),
    })
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

/// Reads rounds of pages, the switch-over, the state and `Complete`; returns the
/// rounds seen and, with verification, the pages checked.
fn receive_body(
    dec: &mut Dec<'_>,
    incoming: &mut IncomingMachine,
    header: &Header,
    state: &mut MachineState,
) -> Result<(u32, Option<u64>), DestinationError> {
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
    loop {
        let allowed: &[MessageType] = if switched {
            &[
                MessageType::Pages,
                MessageType::VcpuState,
                MessageType::DeviceState,
                MessageType::PageDigests,
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
    if !verify {
        take_vcpus(vcpus, state)?;
        return Ok((rounds, None));
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
    Ok((rounds, Some(checked)))
}
