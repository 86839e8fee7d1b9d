//! The balloon device: configuration space, queue processing, host-page aggregation.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use rangevm_memory::GuestRam;

use super::metrics::BalloonMetrics;
use super::{
    BalloonError, BALLOON_PAGE_SIZE, DEFLATE_QUEUE, INFLATE_QUEUE, QUEUE_SIZE, STAT_ENTRY_SIZE,
    STAT_TAGS, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_PFN_SHIFT, VIRTIO_ID_BALLOON,
};
pub use persist::BalloonState;

use crate::persist::{PersistError, Reader, Writer};
use crate::virtio::queue::{Chain, Popped, Queue};
use crate::virtio::transport::error_chain;
use crate::virtio::{
    in_ram, in_regions, usize_of, RestoreContext, VirtioDevice, VirtioError, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::{log_limited, LogLimiter};

/// PFNs read from guest memory at a time (one 4 KiB read).
const PFN_CHUNK: usize = 1024;
/// The longest PFN buffer the device takes: 256 Ki PFNs, 1 GiB of balloon. Linux sends
/// 256 PFNs (1 KiB) per buffer; a longer one is refused, which bounds the work one
/// notify makes the vCPU thread do.
pub const MAX_PFN_BUFFER: u32 = 1 << 20;
/// The most statistics bytes read from one buffer (far more than the 16 tags defined).
const MAX_STATS_BYTES: usize = 64 * STAT_ENTRY_SIZE;
/// Size of the configuration space: num_pages, actual, free_page_hint_cmd_id,
/// poison_val (the last two are zero: their features are not offered).
const CONFIG_SIZE: usize = 16;

/// Which optional balloon features the device offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer the statistics queue.
    pub stats: bool,
    /// Offer deflate-on-OOM: the guest may take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
}

impl Default for BalloonConfig {
    /// Statistics and deflate-on-OOM on; free page reporting off (see the report on
    /// migration in [`Balloon`]).
    fn default() -> Self {
        BalloonConfig {
            stats: true,
            deflate_on_oom: true,
            free_page_reporting: false,
        }
    }
}

/// The latest statistics the guest sent: tag to value, and how many updates arrived.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Value by tag, the latest one for each tag ever sent.
    pub values: BTreeMap<u16, u64>,
    /// Statistics buffers received so far.
    pub updates: u64,
}

impl BalloonStats {
    /// The latest value of `tag`.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(&tag).copied()
    }

    /// The control API's name of `tag` ("free_memory", ...), if the tag is defined.
    pub fn tag_name(tag: u16) -> Option<&'static str> {
        STAT_TAGS.iter().find(|(t, _)| *t == tag).map(|(_, n)| *n)
    }
}

/// Aggregates 4 KiB balloon pages into host pages. A pure state machine: it says which
/// host-page runs to discard or reclaim and keeps, per host page, the pieces the guest
/// has put in the balloon while the page is not whole.
///
/// A host page is discarded exactly when every piece of it is in the balloon. Its
/// state is then "discarded" (kept by the memory crate's `ballooned` page state, asked
/// through `is_discarded`) rather than here, so the tracker holds only partial pages.
/// Deflating one piece of a discarded host page reclaims the whole host page and keeps
/// the other pieces as partial.
#[derive(Debug, Clone)]
pub struct HostPageTracker {
    page_size: u64,
    pieces: u32,
    /// Host page address to a bit per piece in the balloon.
    partial: BTreeMap<u64, Vec<u64>>,
}

impl HostPageTracker {
    /// A tracker for host pages of `page_size` bytes (a power of two, at least 4 KiB).
    pub fn new(page_size: u64) -> Result<Self, BalloonError> {
        if !page_size.is_power_of_two() || page_size < BALLOON_PAGE_SIZE {
            return Err(BalloonError::PageSize(page_size));
        }
        let pieces = u32::try_from(page_size / BALLOON_PAGE_SIZE)
            .map_err(|_| BalloonError::PageSize(page_size))?;
        Ok(HostPageTracker {
            page_size,
            pieces,
            partial: BTreeMap::new(),
        })
    }

    /// The host page size.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Host pages with some but not all pieces in the balloon.
    pub fn partial_pages(&self) -> usize {
        self.partial.len()
    }

    /// Forgets every partial page (device reset).
    pub fn clear(&mut self) {
        self.partial.clear();
    }

    /// The host page holding balloon page `pfn`, and the piece's index in it.
    pub fn host_page_of(&self, pfn: u32) -> (u64, u32) {
        let addr = u64::from(pfn) << VIRTIO_BALLOON_PFN_SHIFT;
        let host = addr & !(self.page_size - 1);
        let piece = u32::try_from((addr - host) / BALLOON_PAGE_SIZE).unwrap_or(0);
        (host, piece)
    }

    fn words(&self) -> usize {
        usize_of(u64::from(self.pieces).div_ceil(64))
    }

    fn full(&self, bits: &[u64]) -> bool {
        let count: u32 = bits.iter().map(|w| w.count_ones()).sum();
        count == self.pieces
    }

    /// The guest put `pfns` in the balloon. Returns the runs of host pages that became
    /// whole, to discard: sorted, merged where adjacent, host-page aligned.
    /// `is_discarded(host_page)` says whether a host page is already discarded (a
    /// repeated piece of it is then ignored).
    pub fn inflate(&mut self, pfns: &[u32], is_discarded: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
        let mut done = BTreeSet::new();
        for &pfn in pfns {
            let (host, piece) = self.host_page_of(pfn);
            if self.pieces == 1 {
                done.insert(host);
                continue;
            }
            let words = self.words();
            if let Some(bits) = self.partial.get_mut(&host) {
                set_bit(bits, piece, true);
                if self.full(&self.partial[&host]) {
                    self.partial.remove(&host);
                    done.insert(host);
                }
            } else if !done.contains(&host) && !is_discarded(host) {
                let mut bits = vec![0u64; words];
                set_bit(&mut bits, piece, true);
                self.partial.insert(host, bits);
            }
        }
        self.runs(done)
    }

    /// The guest took `pfns` out of the balloon. Returns the runs of host pages to
    /// reclaim (those that were discarded), as [`inflate`](Self::inflate) does.
    pub fn deflate(&mut self, pfns: &[u32], is_discarded: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
        let mut reclaim = BTreeSet::new();
        for &pfn in pfns {
            let (host, piece) = self.host_page_of(pfn);
            if self.pieces == 1 {
                reclaim.insert(host);
                continue;
            }
            if let Some(bits) = self.partial.get_mut(&host) {
                set_bit(bits, piece, false);
                if bits.iter().all(|&w| w == 0) {
                    self.partial.remove(&host);
                }
            } else if is_discarded(host) {
                // The whole host page comes back; its other pieces stay in the balloon.
                reclaim.insert(host);
                let mut bits = vec![0u64; self.words()];
                for p in 0..self.pieces {
                    set_bit(&mut bits, p, p != piece);
                }
                self.partial.insert(host, bits);
            }
        }
        self.runs(reclaim)
    }

    /// Merges sorted host pages into runs.
    fn runs(&self, pages: BTreeSet<u64>) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        for host in pages {
            let end = host.saturating_add(self.page_size);
            match runs.last_mut() {
                Some(last) if last.end == host => last.end = end,
                _ => runs.push(host..end),
            }
        }
        runs
    }
}

fn set_bit(bits: &mut [u64], piece: u32, on: bool) {
    let word = usize_of(u64::from(piece / 64));
    let mask = 1u64 << (piece % 64);
    if let Some(w) = bits.get_mut(word) {
        if on {
            *w |= mask;
        } else {
            *w &= !mask;
        }
    }
}

/// What a queue index is for, once the driver's features are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Inflate => "inflate",
            Role::Deflate => "deflate",
            Role::Stats => "stats",
            Role::Reporting => "reporting",
        }
    }
}

/// The virtio-balloon device. The VMM sets the target with
/// [`set_target_pages`](Self::set_target_pages) and asks for statistics with
/// [`request_stats`](Self::request_stats); it reads them with [`stats`](Self::stats).
///
/// Free page reporting discards reported pages with `GuestRam::discard`, which marks
/// them `ballooned`; the guest reuses them without telling the host, so a migration must
/// not skip a `ballooned` page that the KVM dirty log shows written (or the memory crate
/// needs a discard that does not mark pages ballooned). That is why it is off by
/// default.
#[derive(Debug)]
pub struct Balloon {
    config: BalloonConfig,
    queue_sizes: Vec<u16>,
    num_pages: u32,
    actual: u32,
    acked: u64,
    interrupt: Option<Arc<VirtioInterrupt>>,
    ram: Option<Arc<GuestRam>>,
    queues: Vec<Option<Queue>>,
    roles: Vec<Role>,
    tracker: HostPageTracker,
    /// A host page size given at construction (tests simulate 64 KiB hosts).
    page_size_override: Option<u64>,
    stats: BalloonStats,
    stats_head: Option<u16>,
    /// Something was discarded since the last reset: a reset must reclaim.
    discarded: bool,
    metrics: Arc<BalloonMetrics>,
    log: LogLimiter,
}

impl Balloon {
    /// A balloon offering the features of `config`, with a target of 0 pages.
    pub fn new(config: BalloonConfig) -> Self {
        let queues = 2 + usize::from(config.stats) + usize::from(config.free_page_reporting);
        Balloon {
            config,
            queue_sizes: vec![QUEUE_SIZE; queues],
            num_pages: 0,
            actual: 0,
            acked: 0,
            interrupt: None,
            ram: None,
            queues: Vec::new(),
            roles: Vec::new(),
            // 4 KiB until activation tells the host page size.
            tracker: HostPageTracker {
                page_size: BALLOON_PAGE_SIZE,
                pieces: 1,
                partial: BTreeMap::new(),
            },
            page_size_override: None,
            stats: BalloonStats::default(),
            stats_head: None,
            discarded: false,
            metrics: Arc::new(BalloonMetrics::default()),
            log: LogLimiter::default(),
        }
    }

    /// As [`new`](Self::new), aggregating into host pages of `page_size` bytes instead
    /// of the memory's own (a multiple of it): lets tests on a 4 KiB host play a 64 KiB
    /// one.
    pub fn with_host_page_size(config: BalloonConfig, page_size: u64) -> Self {
        let mut balloon = Self::new(config);
        balloon.page_size_override = Some(page_size);
        balloon
    }

    /// The target the host asks for, in 4 KiB pages (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// The pages the guest says it has in the balloon (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Sets the target (in 4 KiB pages) and tells the driver its configuration changed.
    pub fn set_target_pages(&mut self, pages: u32) {
        if pages == self.num_pages {
            return;
        }
        self.num_pages = pages;
        if let Some(irq) = &self.interrupt {
            irq.signal_config_change();
        }
    }

    /// The latest statistics.
    pub fn stats(&self) -> &BalloonStats {
        &self.stats
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<BalloonMetrics> {
        &self.metrics
    }

    /// The features the driver accepted (0 before it did).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Host pages holding some, not all, pieces in the balloon.
    pub fn partial_host_pages(&self) -> usize {
        self.tracker.partial_pages()
    }

    /// Asks the guest for fresh statistics: hands it back the statistics buffer it
    /// left with the device; it refills and returns it, and [`stats`](Self::stats)
    /// then shows the new values. False if there is no buffer to hand back (statistics
    /// not negotiated, the device not running, or a request already outstanding).
    pub fn request_stats(&mut self) -> bool {
        let Some(index) = self.roles.iter().position(|&r| r == Role::Stats) else {
            return false;
        };
        let Some(head) = self.stats_head.take() else {
            return false;
        };
        self.return_buffers(index, &[head]);
        true
    }

    fn guest_error(&self, e: &BalloonError) {
        BalloonMetrics::add(&self.metrics.guest_errors, 1);
        log_limited!(
            self.log,
            log::Level::Warn,
            "virtio-balloon: {}",
            error_chain(e)
        );
    }

    fn memory_error(&self, e: &BalloonError) {
        BalloonMetrics::add(&self.metrics.memory_errors, 1);
        log_limited!(
            self.log,
            log::Level::Error,
            "virtio-balloon: {}",
            error_chain(e)
        );
    }

    /// Returns `heads` on queue `index` with length 0 and interrupts the driver if it
    /// wants that.
    fn return_buffers(&mut self, index: usize, heads: &[u16]) {
        let (Some(ram), Some(Some(queue))) = (self.ram.clone(), self.queues.get_mut(index)) else {
            return;
        };
        let mut returned = false;
        let mut failure = None;
        for &head in heads {
            match queue.add_used(&ram, head, 0) {
                Ok(()) => returned = true,
                Err(e) => failure = Some(e),
            }
        }
        let notify = returned && queue.needs_interrupt(&ram);
        if let Some(e) = failure {
            self.guest_error(&BalloonError::Queue(e));
        }
        if notify {
            if let Some(irq) = &self.interrupt {
                irq.signal_used_queue();
            }
        }
    }

    /// Pops every available chain of queue `index`, hands the good ones to `handle`
    /// (which says whether to return the chain now), returns them, and logs the bad ones
    /// (returned with length 0 where their head is valid).
    fn drain(&mut self, index: usize, mut handle: impl FnMut(&mut Self, &Chain) -> bool) {
        let Some(ram) = self.ram.clone() else {
            return;
        };
        let mut heads = Vec::new();
        loop {
            let Some(Some(queue)) = self.queues.get_mut(index) else {
                return;
            };
            match queue.pop(&ram) {
                Ok(None) => break,
                Err(e) => {
                    self.guest_error(&BalloonError::Queue(e));
                    break;
                }
                Ok(Some(Popped::Bad(head, e))) => {
                    self.guest_error(&BalloonError::Queue(e));
                    heads.extend(head);
                }
                Ok(Some(Popped::Chain(chain))) => {
                    if handle(self, &chain) {
                        heads.push(chain.head);
                    }
                }
            }
        }
        if !heads.is_empty() {
            self.return_buffers(index, &heads);
        }
    }

    fn process_pfns(&mut self, chain: &Chain, inflate: bool) {
        let Some(ram) = self.ram.clone() else {
            return;
        };
        let queue = if inflate { "inflate" } else { "deflate" };
        let counter = if inflate {
            &self.metrics.inflate_buffers
        } else {
            &self.metrics.deflate_buffers
        };
        BalloonMetrics::add(counter, 1);
        for d in &chain.descriptors {
            if d.writable {
                self.guest_error(&BalloonError::Direction {
                    queue,
                    addr: d.addr,
                });
                continue;
            }
            if d.len > MAX_PFN_BUFFER {
                self.guest_error(&BalloonError::Length {
                    addr: d.addr,
                    len: d.len,
                    entry: 4,
                });
                continue;
            }
            if d.len % 4 != 0 {
                self.guest_error(&BalloonError::Length {
                    addr: d.addr,
                    len: d.len,
                    entry: 4,
                });
            }
            let count = usize_of(u64::from(d.len / 4));
            let mut done = 0;
            while done < count {
                let n = PFN_CHUNK.min(count - done);
                let mut bytes = vec![0u8; n * 4];
                let at = d.addr + (done as u64) * 4;
                if let Err(e) = ram.read(at, &mut bytes) {
                    self.guest_error(&BalloonError::Queue(e.into()));
                    break;
                }
                let pfns: Vec<u32> = bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                self.apply_pfns(&ram, &pfns, inflate);
                done += n;
            }
        }
    }

    /// Inflates or deflates `pfns`: drops those outside RAM, aggregates, discards or
    /// reclaims each run.
    fn apply_pfns(&mut self, ram: &GuestRam, pfns: &[u32], inflate: bool) {
        let page = self.tracker.page_size();
        let regions = ram.regions();
        let mut valid = Vec::with_capacity(pfns.len());
        for &pfn in pfns {
            let (host, _) = self.tracker.host_page_of(pfn);
            if in_regions(&regions, host, page) {
                valid.push(pfn);
            } else {
                self.guest_error(&BalloonError::PfnOutsideRam {
                    pfn,
                    addr: u64::from(pfn) << VIRTIO_BALLOON_PFN_SHIFT,
                });
            }
        }
        let pages = valid.len() as u64;
        let is_discarded = |host: u64| ram.page_state(host).is_ok_and(|s| s.ballooned);
        let runs = if inflate {
            BalloonMetrics::add(&self.metrics.pages_inflated, pages);
            self.tracker.inflate(&valid, is_discarded)
        } else {
            BalloonMetrics::add(&self.metrics.pages_deflated, pages);
            self.tracker.deflate(&valid, is_discarded)
        };
        for run in runs {
            let len = run.end - run.start;
            let (result, counter) = if inflate {
                (ram.discard(run.clone()), &self.metrics.bytes_discarded)
            } else {
                (ram.reclaim(run.clone()), &self.metrics.bytes_reclaimed)
            };
            match result {
                Ok(()) => {
                    BalloonMetrics::add(counter, len);
                    self.discarded |= inflate;
                }
                Err(source) => self.memory_error(&BalloonError::Memory {
                    start: run.start,
                    end: run.end,
                    source,
                }),
            }
        }
    }

    fn process_report(&mut self, chain: &Chain) {
        let Some(ram) = self.ram.clone() else {
            return;
        };
        BalloonMetrics::add(&self.metrics.reports, 1);
        let page = ram.page_size().max(self.tracker.page_size());
        for d in &chain.descriptors {
            let len = u64::from(d.len);
            // `walk` checked that addr + len does not wrap.
            let start = d.addr.div_ceil(page).saturating_mul(page);
            let end = (d.addr + len) / page * page;
            if !in_ram(&ram, d.addr, len) {
                self.guest_error(&BalloonError::ReportOutsideRam {
                    addr: d.addr,
                    len: d.len,
                });
                continue;
            }
            if start >= end {
                continue;
            }
            match ram.discard(start..end) {
                Ok(()) => {
                    BalloonMetrics::add(&self.metrics.bytes_discarded, end - start);
                    self.discarded = true;
                }
                Err(source) => self.memory_error(&BalloonError::Memory { start, end, source }),
            }
        }
    }

    /// Reads the statistics of `chain`. The buffer stays with the device until the VMM
    /// asks for fresh statistics; returns false (keep it) unless it was malformed.
    fn process_stats(&mut self, chain: &Chain) -> bool {
        let Some(ram) = self.ram.clone() else {
            return true;
        };
        let mut bytes = Vec::new();
        for d in &chain.descriptors {
            if d.writable {
                self.guest_error(&BalloonError::Direction {
                    queue: "stats",
                    addr: d.addr,
                });
                continue;
            }
            let room = MAX_STATS_BYTES - bytes.len();
            let take = usize_of(u64::from(d.len)).min(room);
            let mut buf = vec![0u8; take];
            if let Err(e) = ram.read(d.addr, &mut buf) {
                self.guest_error(&BalloonError::Queue(e.into()));
                return true;
            }
            bytes.extend_from_slice(&buf);
        }
        let entries = bytes.chunks_exact(STAT_ENTRY_SIZE);
        if !entries.remainder().is_empty() {
            let (addr, len) = chain
                .descriptors
                .first()
                .map_or((0, 0), |d| (d.addr, d.len));
            self.guest_error(&BalloonError::Length {
                addr,
                len,
                entry: STAT_ENTRY_SIZE,
            });
        }
        for e in entries {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            self.stats.values.insert(tag, u64::from_le_bytes(v));
        }
        self.stats.updates += 1;
        BalloonMetrics::add(&self.metrics.stats_updates, 1);
        // A second buffer while holding one: give the old one back.
        if let (Some(old), Some(index)) = (
            self.stats_head.replace(chain.head),
            self.roles.iter().position(|&r| r == Role::Stats),
        ) {
            self.return_buffers(index, &[old]);
        }
        false
    }

    /// The guest (re)started: whatever it had in the balloon is its own again.
    fn reclaim_all(&mut self) {
        let Some(ram) = self.ram.clone() else {
            return;
        };
        for r in ram.regions() {
            if let Err(source) = ram.reclaim(r.start..r.end()) {
                self.memory_error(&BalloonError::Memory {
                    start: r.start,
                    end: r.end(),
                    source,
                });
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1;
        if self.config.stats {
            f |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
        }
        if self.config.deflate_on_oom {
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.config.free_page_reporting {
            f |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn set_interrupt(&mut self, interrupt: Arc<VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        let start = usize_of(offset);
        match start
            .checked_add(data.len())
            .and_then(|end| config.get(start..end))
        {
            Some(bytes) => data.copy_from_slice(bytes),
            None => {
                data.fill(0);
                log_limited!(
                    self.log,
                    log::Level::Warn,
                    "virtio-balloon: {}-byte configuration read at {offset:#x} is out of range",
                    data.len()
                );
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        let start = usize_of(offset);
        let inside = start >= 4 && start.checked_add(data.len()).is_some_and(|e| e <= 8);
        if !inside {
            log_limited!(
                self.log,
                log::Level::Warn,
                "virtio-balloon: {}-byte configuration write at {offset:#x} outside `actual`; ignored",
                data.len()
            );
            return;
        }
        let mut actual = self.actual.to_le_bytes();
        actual[start - 4..start - 4 + data.len()].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: Vec<Option<Queue>>,
        ram: Arc<GuestRam>,
    ) -> Result<(), VirtioError> {
        let page = self.page_size_override.unwrap_or(ram.page_size());
        let tracker = HostPageTracker::new(page).map_err(|e| VirtioError::Activate(e.into()))?;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked_features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if acked_features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        for (index, role) in [
            (INFLATE_QUEUE, Role::Inflate),
            (DEFLATE_QUEUE, Role::Deflate),
        ] {
            if !matches!(queues.get(index), Some(Some(_))) {
                return Err(VirtioError::Activate(
                    BalloonError::MissingQueue(role.name()).into(),
                ));
            }
        }
        for (index, role) in roles.iter().enumerate().skip(2) {
            if !matches!(queues.get(index), Some(Some(_))) {
                log_limited!(
                    self.log,
                    log::Level::Warn,
                    "virtio-balloon: the {} queue (index {index}) was negotiated but not enabled",
                    role.name()
                );
            }
        }
        if tracker.page_size() != self.tracker.page_size() {
            self.tracker = tracker;
        }
        self.acked = acked_features;
        self.queues = queues;
        self.roles = roles;
        self.ram = Some(ram);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match self.roles.get(index) {
            Some(Role::Inflate) => self.drain(index, |b, c| {
                b.process_pfns(c, true);
                true
            }),
            Some(Role::Deflate) => self.drain(index, |b, c| {
                b.process_pfns(c, false);
                true
            }),
            Some(Role::Stats) => self.drain(index, Self::process_stats),
            Some(Role::Reporting) => self.drain(index, |b, c| {
                b.process_report(c);
                true
            }),
            None => log_limited!(
                self.log,
                log::Level::Warn,
                "virtio-balloon: queue {index} has no negotiated use"
            ),
        }
    }

    fn reset(&mut self) {
        if self.discarded || self.tracker.partial_pages() > 0 {
            self.reclaim_all();
        }
        self.discarded = false;
        self.tracker.clear();
        self.acked = 0;
        self.actual = 0;
        self.queues.clear();
        self.roles.clear();
        self.stats_head = None;
        self.ram = None;
    }

    type State = BalloonState;

    fn save_device(&self, w: &mut Writer) -> Result<(), PersistError> {
        self.save(w)
    }

    fn decode_device(
        &self,
        r: &mut Reader<'_>,
        transport: &RestoreContext<'_>,
    ) -> Result<BalloonState, PersistError> {
        self.decode(r, transport)
    }

    fn restore_device(&mut self, state: BalloonState) {
        self.restore(state);
    }
}

mod persist;
#[cfg(test)]
mod tests;
