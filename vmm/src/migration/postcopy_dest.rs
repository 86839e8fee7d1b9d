//! The destination's side of postcopy: the guest runs while its memory arrives.
//!
//! Guest RAM is userfaultfd-served ([`rangevm_memory::GuestRam::new_missing`]) and a
//! [`FaultEngine`] resolves vCPU faults with a [`DemandClient`]: each missing page a
//! vCPU touches is asked of the source on the demand connection and copied in under
//! the page's write lock by the handler that caught the fault, so faults on different
//! pages resolve in parallel on several handler threads. The main connection brings
//! the rest in the background ([`run_background`]), placed under each run's write lock:
//! a page already there (fetched on demand, or written by the guest since) is kept,
//! and one the balloon discarded is dropped, so a late copy never resurrects it. Two
//! connections, because a demand response must not wait behind 4 MiB background frames
//! (QEMU's postcopy-preempt does the same), and because the thread that reads responses
//! must never block on a page lock a waiting handler holds.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rangevm_memory::{FaultEngine, GuestRam, PageContent, PageSource, Placed};

use super::page_index::PageIndex;
use super::protocol::{
    AckKind, Crc32c, Decoder, Encoder, Message, MessageType, PageData, PageRequest, ProtocolError,
};
use super::status::PostcopyStatus;
use super::transport::{Listener, MigrationAddr, Stream};

/// How long a vCPU's page may take to arrive before its handler gives up on it.
const DEMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a page may take when a dropped link can be resumed (an operator has to
/// run `migrate resume` meanwhile). A fault given up still resolves when the
/// background stream brings its page.
const RESUMABLE_DEMAND_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long the destination waits for demand responses still in flight after the
/// source says every page is sent.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The source's CRC32C of every page at switch-over (`--verify`), by page index.
#[derive(Debug)]
pub struct Digests {
    index: PageIndex,
    crcs: Vec<u32>,
}

impl Digests {
    /// Room for every page of `ram`, all unknown (0).
    pub fn new(ram: &GuestRam) -> Self {
        let index = PageIndex::of(ram);
        let crcs = vec![0; index.pages()];
        Digests { index, crcs }
    }

    /// Records the digest of the page at `gpa`; false if it is not guest RAM.
    pub fn set(&mut self, gpa: u64, crc: u32) -> bool {
        match self.index.index(gpa).and_then(|i| self.crcs.get_mut(i)) {
            Some(c) => {
                *c = crc;
                true
            }
            None => false,
        }
    }

    /// Whether any digest was recorded.
    pub fn any(&self) -> bool {
        self.crcs.iter().any(|&c| c != 0)
    }

    fn matches(&self, gpa: u64, page: &[u8]) -> bool {
        self.index
            .index(gpa)
            .and_then(|i| self.crcs.get(i))
            .is_some_and(|&c| c == Crc32c::of(page))
    }
}

/// Shared by the demand client, the background receiver and `migrate status`.
#[derive(Debug)]
pub struct Shared {
    resume: Mutex<Option<ResumeHook>>,
    status: Mutex<PostcopyStatus>,
    latency: Mutex<Option<Histogram<u64>>>,
    digests: Option<Digests>,
    zero_page: Vec<u8>,
    started: Instant,
    failed: AtomicBool,
}

impl Shared {
    /// Fresh counters; `digests` when the source sent them.
    pub fn new(page_size: u64, digests: Option<Digests>) -> Self {
        Shared {
            resume: Mutex::new(None),
            status: Mutex::new(PostcopyStatus {
                phase: "running".into(),
                ..Default::default()
            }),
            latency: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).ok()),
            digests,
            zero_page: vec![0; usize::try_from(page_size).unwrap_or(0)],
            started: Instant::now(),
            failed: AtomicBool::new(false),
        }
    }

    /// Makes a dropped link resumable through `hook`.
    pub fn set_resume(&self, hook: ResumeHook) {
        *self
            .resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hook);
    }

    /// Whether postcopy is paused on a dropped link, waiting for `migrate resume`.
    pub fn paused(&self) -> bool {
        self.status
            .lock()
            .map(|s| s.phase == "paused")
            .unwrap_or(false)
    }

    /// `migrate resume ADDR` on the destination: listens on `addr` and, on a thread,
    /// accepts the source's new main and demand connections, answers the handshake
    /// with the pages held here, and hands them to the background receiver.
    pub fn resume(&self, addr: &MigrationAddr, ram: Arc<GuestRam>) -> Result<String, String> {
        if !self.paused() {
            return Err("Postcopy is not paused: there is nothing to resume".into());
        }
        let hook = self
            .resume
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or("This migration did not negotiate resuming")?;
        let listener = Listener::bind(addr).map_err(|e| super::chain(&e))?;
        let at = listener.local_addr();
        std::thread::Builder::new()
            .name("postcopy-resume".into())
            .spawn(move || match accept_resume(&listener, &ram, &hook) {
                Ok(link) => {
                    let _ = hook.tx.send(link);
                }
                Err(why) => log::error!("Postcopy resume failed: {why}"),
            })
            .map_err(|e| format!("Cannot start a thread: {e}"))?;
        Ok(at)
    }

    /// Changes the status.
    pub fn update(&self, f: impl FnOnce(&mut PostcopyStatus)) {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s);
    }

    /// A copy of the status with the latency percentiles filled in.
    pub fn status(&self, ram: &GuestRam) -> PostcopyStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Ok(Some(h)) = self.latency.lock().as_deref() {
            if !h.is_empty() {
                s.demand_p50_us = h.value_at_quantile(0.5) as f64;
                s.demand_p99_us = h.value_at_quantile(0.99) as f64;
                s.demand_max_us = h.max() as f64;
            }
        }
        if s.phase == "running" {
            s.missing_pages = ram.missing_pages();
            s.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        s
    }

    /// Checks received pages against the source's digests: every page received is
    /// compared (a mismatch means the stream or the source is wrong, whichever page it
    /// lands on), and `filled` of them, those actually placed, count as verified.
    fn verify(&self, gpa: u64, page_size: usize, data: Option<&[u8]>, count: u64, filled: u64) {
        let Some(d) = &self.digests else { return };
        let mut bad = 0u64;
        for k in 0..count {
            let at = gpa + k * page_size as u64;
            let page = match data {
                Some(bytes) => {
                    let off = usize::try_from(k)
                        .unwrap_or(usize::MAX)
                        .saturating_mul(page_size);
                    bytes.get(off..off.saturating_add(page_size)).unwrap_or(&[])
                }
                None => &self.zero_page,
            };
            if !d.matches(at, page) {
                bad += 1;
            }
        }
        if bad > 0 {
            log::error!("Postcopy: {bad} page(s) from {gpa:#x} do not match the source's digests");
        }
        self.update(|s| {
            s.verified_pages += if bad == 0 { filled } else { 0 };
            s.digest_mismatches += bad;
        });
    }

    /// Marks postcopy failed with `why` (the first failure wins).
    pub fn fail(&self, why: String) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!("Postcopy failed: {why}");
            self.update(|s| {
                s.phase = "failed".into();
                s.error = Some(why);
            });
        }
    }
}

type DemandEnc = Encoder<BufWriter<Stream>>;

/// Asks the source for pages vCPUs fault on; a [`PageSource`] for the fault engine.
pub struct DemandClient {
    enc: Mutex<DemandEnc>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    page_shift: u8,
    shared: arc_swap::ArcSwap<Shared>,
    /// The demand link works; while it is down (postcopy paused, waiting for
    /// `migrate resume`) requests wait and are sent on the next link.
    link_up: AtomicBool,
    /// A dropped link may be resumed: requests wait instead of failing.
    resumable: bool,
}

/// A handler waiting for a page.
struct Waiter {
    tx: SyncSender<Result<PageData, String>>,
    gpa: u64,
}

impl std::fmt::Debug for DemandClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemandClient")
            .field("page_shift", &self.page_shift)
            .finish_non_exhaustive()
    }
}

impl DemandClient {
    /// A client that writes requests to `writer`.
    pub fn new(writer: Stream, page_shift: u8, shared: Arc<Shared>, resumable: bool) -> Self {
        DemandClient {
            enc: Mutex::new(Encoder::new(BufWriter::new(writer))),
            waiters: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            page_shift,
            shared: arc_swap::ArcSwap::new(shared),
            link_up: AtomicBool::new(true),
            resumable,
        }
    }

    /// The demand link dropped and may be resumed: requests wait from now on.
    fn link_down(&self) {
        self.link_up.store(false, Ordering::Release);
    }

    /// A resumed demand link: requests go to `writer`, and every request still
    /// waiting is sent again on it (its answer may have been lost with the old link).
    pub fn reconnect(&self, writer: Stream) {
        let mut enc = self
            .enc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *enc = Encoder::new(BufWriter::new(writer));
        let waiting: Vec<(u64, u64)> = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(&id, w)| (id, w.gpa))
            .collect();
        for (id, gpa) in &waiting {
            let _ = enc.send(&Message::PageRequest(PageRequest {
                request_id: *id,
                gpa: *gpa,
                page_shift: self.page_shift,
                count: 1,
            }));
        }
        let _ = enc.flush();
        self.link_up.store(true, Ordering::Release);
        log::info!(
            "Postcopy: demand link resumed; {} request(s) sent again",
            waiting.len()
        );
    }

    /// Replaces the figures it records into (once the switch-over state is in).
    pub fn set_shared(&self, shared: Arc<Shared>) {
        self.shared.store(shared);
    }

    fn deliver(&self, id: u64, data: Result<PageData, String>) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        match waiter {
            Some(w) => {
                let _ = w.tx.send(data);
            }
            None => log::warn!("Postcopy: a response for request {id}, which nobody waits for"),
        }
    }

    /// Fails every waiting request (the link is gone).
    fn fail_all(&self, why: &str) {
        let waiters: Vec<_> = self
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain()
            .collect();
        for (_, w) in waiters {
            let _ = w.tx.send(Err(why.to_string()));
        }
    }
}

impl PageSource for DemandClient {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let shared = self.shared.load_full();
        if shared.failed.load(Ordering::Acquire) {
            return Err(io::Error::other("the postcopy link to the source is gone"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = sync_channel(1);
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, Waiter { tx, gpa });
        let start = Instant::now();
        if self.link_up.load(Ordering::Acquire) {
            let mut enc = self
                .enc
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let sent = enc
                .send(&Message::PageRequest(PageRequest {
                    request_id: id,
                    gpa,
                    page_shift: self.page_shift,
                    count: 1,
                }))
                .and_then(|()| enc.flush());
            if let Err(e) = sent {
                drop(enc);
                if !self.resumable {
                    self.deliver(id, Err(e.to_string()));
                }
            }
        }
        let limit = if self.resumable {
            RESUMABLE_DEMAND_TIMEOUT
        } else {
            DEMAND_TIMEOUT
        };
        let answer = rx
            .recv_timeout(limit)
            .map_err(|_| io::Error::other("the source did not send a requested page in time"))?
            .map_err(io::Error::other)?;
        let us = u64::try_from(start.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        if let Ok(Some(h)) = shared.latency.lock().as_deref_mut() {
            let _ = h.record(us);
        }
        let content = match answer {
            PageData::Bytes(bytes) if bytes.len() == buf.len() => {
                buf.copy_from_slice(&bytes);
                shared.verify(gpa, buf.len(), Some(buf), 1, 1);
                PageContent::Data
            }
            PageData::Bytes(bytes) => {
                return Err(io::Error::other(format!(
                    "the source answered {} bytes for a page of {}",
                    bytes.len(),
                    buf.len()
                )))
            }
            PageData::Zero => {
                shared.verify(gpa, buf.len(), None, 1, 1);
                PageContent::Zero
            }
        };
        shared.update(|s| {
            s.demand_pages += 1;
            s.vcpu_blocked_ms += us as f64 / 1e3;
        });
        Ok(content)
    }
}

/// What the destination needs to take a resumed link: the migration's header (its
/// session id is checked) and where to hand the link.
#[derive(Debug, Clone)]
pub struct ResumeHook {
    /// The main connection's header of this migration.
    pub header: super::protocol::Header,
    /// The background receiver's end.
    pub tx: std::sync::mpsc::SyncSender<ResumedLink>,
}

/// How long `migrate resume` waits for the source to connect.
const RESUME_ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Accepts one connection within [`RESUME_ACCEPT_TIMEOUT`].
fn accept_within(listener: &Listener) -> Result<Stream, String> {
    let mut fds = [libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ms = i32::try_from(RESUME_ACCEPT_TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `fds` is one initialized pollfd on a descriptor `listener` keeps open.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    if n <= 0 {
        return Err(format!(
            "the source did not connect within {} s",
            RESUME_ACCEPT_TIMEOUT.as_secs()
        ));
    }
    listener.accept().map_err(|e| super::chain(&e))
}

/// The destination's half of the resume handshake (docs/migration-protocol.md).
fn accept_resume(
    listener: &Listener,
    ram: &GuestRam,
    hook: &ResumeHook,
) -> Result<ResumedLink, String> {
    let main = accept_within(listener)?;
    let _ = main.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30)));
    let mut dec = Decoder::new(BufReader::with_capacity(
        1 << 20,
        main.try_clone().map_err(|e| e.to_string())?,
    ));
    let mut enc = Encoder::new(BufWriter::new(main.try_clone().map_err(|e| e.to_string())?));
    let refuse = |enc: &mut Encoder<BufWriter<Stream>>, why: String| {
        let _ = enc.send(&Message::error(why.clone()));
        let _ = enc.flush();
        why
    };
    match dec.recv_expecting(&[MessageType::Header]) {
        Ok(Message::Header(h)) if h.session_id == hook.header.session_id && h == hook.header => {}
        Ok(_) => return Err(refuse(
            &mut enc,
            "this is not the postcopy migration that is paused here (another session id or header)"
                .into(),
        )),
        Err(e) => return Err(super::chain(&e)),
    }
    match dec.recv_expecting(&[MessageType::Resume]) {
        Ok(_) => {}
        Err(e) => return Err(refuse(&mut enc, super::chain(&e))),
    }
    let send = |enc: &mut Encoder<BufWriter<Stream>>, m: &Message| {
        enc.send(m).map_err(|e| super::chain(&e))
    };
    send(&mut enc, &Message::Ack(AckKind::Accepted))?;
    // Exactly the pages in guest memory (or discarded by the balloon): a page is
    // marked only once it is placed, so none is lost and none is written twice.
    let shift = u8::try_from(ram.page_size().trailing_zeros()).unwrap_or(12);
    let page = ram.page_size();
    let per_map = u64::from(super::protocol::MAX_MAP_PAGES);
    let mut received = 0u64;
    for r in ram.regions() {
        let mut start = r.start;
        while start < r.end() {
            let count = ((r.end() - start) / page).min(per_map);
            let mut map = super::protocol::ReceivedPages::new(
                start,
                shift,
                u32::try_from(count).unwrap_or(0),
            );
            for i in 0..count {
                let gpa = start + i * page;
                if !ram.is_fetchable(gpa) {
                    map.set(u32::try_from(i).unwrap_or(u32::MAX));
                    received += 1;
                }
            }
            send(&mut enc, &Message::ReceivedPages(map))?;
            start += count * page;
        }
    }
    send(&mut enc, &Message::ResumeReady { received })?;
    enc.flush().map_err(|e| e.to_string())?;
    let demand = accept_within(listener)?;
    let _ = demand.set_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(30)));
    let mut ddec = Decoder::new(BufReader::new(
        demand.try_clone().map_err(|e| e.to_string())?,
    ));
    ddec.expect_page_shift(shift);
    let mut denc = Encoder::new(demand.try_clone().map_err(|e| e.to_string())?);
    match ddec.recv_expecting(&[MessageType::Header]) {
        Ok(Message::Header(h))
            if h.channel == super::protocol::Channel::Demand
                && h.session_id == hook.header.session_id => {}
        Ok(_) => return Err("the second connection is not this migration's demand channel".into()),
        Err(e) => return Err(super::chain(&e)),
    }
    denc.send(&Message::Ack(AckKind::Accepted))
        .and_then(|()| denc.flush())
        .map_err(|e| super::chain(&e))?;
    let _ = demand.set_timeouts(None, Some(Duration::from_secs(30)));
    let _ = main.set_timeouts(Some(Duration::from_secs(60)), Some(Duration::from_secs(30)));
    log::info!("Postcopy resume: {received} pages held here");
    dec.expect_page_shift(shift);
    Ok(ResumedLink {
        main_dec: dec,
        main_enc: enc,
        demand_dec: ddec,
        demand_writer: demand,
    })
}

/// A resumed postcopy's connections, past their handshake.
pub struct ResumedLink {
    /// The main connection's decoder.
    pub main_dec: Decoder<BufReader<Stream>>,
    /// The main connection's encoder.
    pub main_enc: Encoder<BufWriter<Stream>>,
    /// The demand connection's decoder.
    pub demand_dec: Decoder<BufReader<Stream>>,
    /// The demand connection, for requests.
    pub demand_writer: Stream,
}

impl std::fmt::Debug for ResumedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumedLink").finish_non_exhaustive()
    }
}

/// Reads demand responses until the link ends; hands each to the handler waiting.
pub fn run_demand_reader<R: Read>(mut dec: Decoder<BufReader<R>>, client: Arc<DemandClient>) {
    loop {
        match dec.recv_expecting(&[MessageType::PageResponse]) {
            Ok(Message::PageResponse { request_id, run }) => {
                client.deliver(request_id, Ok(run.data));
            }
            Ok(_) => {}
            Err(e) => {
                let why = super::chain(&e);
                if client.resumable {
                    log::warn!("Postcopy: the demand link dropped ({why}); requests wait for migrate resume");
                    client.link_down();
                    return;
                }
                client.fail_all(&why);
                if !matches!(e, ProtocolError::Closed) {
                    client
                        .shared
                        .load()
                        .fail(format!("The demand link to the source failed: {why}"));
                }
                return;
            }
        }
    }
}

/// Places the background stream until `PostcopyDone`, waits for demand fetches still
/// in flight, acknowledges, and finishes the fault engine (guest RAM is ordinary from
/// then on). Returns an error sentence if the link fails first: the guest cannot go on
/// without its source.
pub fn run_background(
    dec: Decoder<BufReader<Stream>>,
    enc: Encoder<BufWriter<Stream>>,
    engine: FaultEngine,
    ram: &GuestRam,
    shared: &Shared,
    client: &Arc<DemandClient>,
    resume: Option<(std::sync::mpsc::Receiver<ResumedLink>, Duration)>,
) -> Result<(), String> {
    let mut engine = Some(engine);
    let result = background_loop(dec, enc, &mut engine, ram, shared, client, resume);
    if let Err(why) = &result {
        // Free the fault handlers still waiting for pages, so that the engine (dropped
        // here) can stop its threads.
        shared.fail(why.clone());
        client.fail_all(why);
    }
    drop(engine);
    result
}

fn background_loop(
    mut dec: Decoder<BufReader<Stream>>,
    mut enc: Encoder<BufWriter<Stream>>,
    engine: &mut Option<FaultEngine>,
    ram: &GuestRam,
    shared: &Shared,
    client: &Arc<DemandClient>,
    resume: Option<(std::sync::mpsc::Receiver<ResumedLink>, Duration)>,
) -> Result<(), String> {
    let page = usize::try_from(ram.page_size()).unwrap_or(4096);
    loop {
        let msg = match dec.recv_expecting(&[MessageType::Pages, MessageType::PostcopyDone]) {
            Ok(m) => m,
            Err(e) => {
                let why = format!(
                    "The postcopy link to the source failed: {}",
                    super::chain(&e)
                );
                let Some((rx, limit)) = &resume else {
                    shared.fail(why.clone());
                    client.fail_all(&why);
                    return Err(why);
                };
                // The guest stays, paused on whatever it touches that is missing,
                // until both sides run `migrate resume`.
                client.link_down();
                eprintln!(
                    "rangevm: {why}; the guest waits on missing pages: run `migrate resume ADDR` here and on the source"
                );
                shared.update(|s| {
                    s.phase = "paused".into();
                    s.error = Some(why.clone());
                });
                let Ok(link) = rx.recv_timeout(*limit) else {
                    let why = format!(
                        "{why}; no `migrate resume` brought the source back within {} s",
                        limit.as_secs()
                    );
                    // Free the fault handlers waiting for pages, so the engine stops.
                    shared.fail(why.clone());
                    client.fail_all(&why);
                    return Err(why);
                };
                dec = link.main_dec;
                enc = link.main_enc;
                client.reconnect(link.demand_writer);
                let reader_client = Arc::clone(client);
                let demand_dec = link.demand_dec;
                if let Err(e) = std::thread::Builder::new()
                    .name("postcopy-demand".into())
                    .spawn(move || run_demand_reader(demand_dec, reader_client))
                {
                    return Err(format!("Cannot start the demand reader again: {e}"));
                }
                shared.update(|s| {
                    s.phase = "running".into();
                    s.error = None;
                    s.resumes += 1;
                });
                eprintln!("rangevm: postcopy resumed");
                continue;
            }
        };
        match msg {
            Message::Pages(run) => {
                let data = match &run.data {
                    PageData::Bytes(b) => Some(b.as_slice()),
                    PageData::Zero => None,
                };
                let placed: Placed = engine
                    .as_ref()
                    .ok_or("the fault engine is gone")?
                    .place(run.gpa, u64::from(run.count), data)
                    .map_err(|e| format!("Cannot place received pages: {}", super::chain(&e)))?;
                shared.verify(run.gpa, page, data, u64::from(run.count), placed.filled());
                shared.update(|s| {
                    s.background_pages += placed.filled();
                    s.background_skipped += placed.kept + placed.dropped;
                });
            }
            Message::PostcopyDone => break,
            _ => {}
        }
    }
    let start = Instant::now();
    while ram.missing_pages() > 0 {
        if start.elapsed() > DRAIN_TIMEOUT || shared.failed.load(Ordering::Acquire) {
            return Err(format!(
                "The source said every page was sent, but {} are still missing",
                ram.missing_pages()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mismatches = shared.status(ram).digest_mismatches;
    let stats = engine.take().map(FaultEngine::finish);
    log::info!("Postcopy: all pages received; fault engine {stats:?}");
    if mismatches > 0 {
        return Err(format!(
            "{mismatches} received page(s) differ from the source's switch-over contents"
        ));
    }
    let total = shared.started.elapsed().as_secs_f64() * 1e3;
    shared.update(|s| {
        s.phase = "completed".into();
        s.missing_pages = 0;
        s.total_ms = total;
    });
    enc.send(&Message::Ack(AckKind::AllPagesReceived))
        .and_then(|()| enc.flush())
        .map_err(|e| format!("Cannot tell the source every page arrived: {e}"))?;
    Ok(())
}
