//! What a migration is doing, for `migrate status` and the sending CLI's progress bar.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing was asked.
    None,
    /// Connecting and exchanging headers.
    Connecting,
    /// Sending rounds of pages while the guest runs.
    Precopy,
    /// vCPUs paused; the last pages and the state are on their way.
    SwitchOver,
    /// Postcopy: the guest runs on the destination, which fetches the pages it
    /// touches from here while the rest is pushed in the background.
    Postcopy,
    /// Postcopy, paused: the link dropped; the guest waits on the destination for
    /// pages only this side has, until `migrate resume` on both sides.
    PostcopyPaused,
    /// The guest runs on the destination; this source stops.
    Completed,
    /// The migration failed; the guest runs here as before (see `error`).
    Failed,
    /// The destination's state is unknown: the link dropped after the whole state was
    /// sent. The guest stays paused here; resume it only once sure the destination did
    /// not start it (`vm resume`).
    Unknown,
}

/// A migration's progress and figures. Byte counts include the framing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub phase: Phase,
    /// The destination.
    pub destination: String,
    /// The current round (0 is the full pass).
    pub round: u32,
    /// The round limit.
    pub max_rounds: u32,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pages sent with their contents.
    pub pages_sent: u64,
    /// Pages sent as zero runs (no bytes: all-zero or ballooned pages).
    pub zero_pages: u64,
    /// Of those, pages the balloon holds.
    pub ballooned_pages: u64,
    /// Pages the current round sends (round 0: all of memory).
    pub round_pages: u64,
    /// Of those, how many are sent.
    pub round_done: u64,
    /// Pages found dirty at the last harvest.
    pub dirty_pages: u64,
    /// Measured dirty rate, bytes/s.
    pub dirty_rate: u64,
    /// Measured link bandwidth, bytes/s.
    pub bandwidth: u64,
    /// What the switch-over would take now at the measured bandwidth, ms.
    pub expected_downtime_ms: u64,
    /// The downtime target, ms.
    pub downtime_target_ms: u64,
    /// vCPUs paused here to running on the destination, ms (once completed).
    pub downtime_ms: Option<f64>,
    /// From start to now, or to the end, ms.
    pub total_ms: f64,
    /// Whether the last round fit the downtime target (false: the round limit ended
    /// precopy).
    pub converged: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Postcopy figures, once postcopy started.
    #[serde(default)]
    pub postcopy: Option<PostcopyStatus>,
}

impl MigrationStatus {
    /// The status before anything happened.
    pub fn idle() -> Self {
        MigrationStatus {
            phase: Phase::None,
            destination: String::new(),
            round: 0,
            max_rounds: 0,
            memory_bytes: 0,
            bytes_sent: 0,
            pages_sent: 0,
            zero_pages: 0,
            ballooned_pages: 0,
            round_pages: 0,
            round_done: 0,
            dirty_pages: 0,
            dirty_rate: 0,
            bandwidth: 0,
            expected_downtime_ms: 0,
            downtime_target_ms: 0,
            downtime_ms: None,
            total_ms: 0.0,
            converged: false,
            error: None,
            postcopy: None,
        }
    }

    /// Whether the migration is over (done or failed).
    pub fn finished(&self) -> bool {
        matches!(
            self.phase,
            Phase::None | Phase::Completed | Phase::Failed | Phase::Unknown
        )
    }

    /// One line for a terminal: phase, round, progress, rate.
    pub fn line(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let pct = (self.round_done * 100)
            .checked_div(self.round_pages)
            .unwrap_or(100)
            .min(100);
        let width = 24u64;
        let filled = usize::try_from(pct * width / 100).unwrap_or(0);
        let bar = format!(
            "[{}{}]",
            "#".repeat(filled),
            "-".repeat(usize::try_from(width).unwrap_or(0).saturating_sub(filled))
        );
        match self.phase {
            Phase::Precopy | Phase::Connecting => format!(
                "{bar} {pct:3}% round {}: {:.1} MiB sent, {:.0} MiB/s, dirty {:.0} MiB/s, \
                 expected downtime {} ms (target {})",
                self.round,
                mib(self.bytes_sent),
                mib(self.bandwidth),
                mib(self.dirty_rate),
                self.expected_downtime_ms,
                self.downtime_target_ms
            ),
            Phase::SwitchOver => format!(
                "{bar} switch-over: last {} pages and the vCPU and device state",
                self.round_pages
            ),
            Phase::Completed if self.postcopy.is_some() => {
                let p = self.postcopy.clone().unwrap_or_default();
                format!(
                    "Postcopy migration completed in {:.0} ms: downtime {:.1} ms, {} pages sent \
                     on demand and {} in the background, {:.1} MiB sent",
                    self.total_ms,
                    self.downtime_ms.unwrap_or(0.0),
                    p.demand_pages,
                    p.background_pages,
                    mib(self.bytes_sent)
                )
            }
            Phase::Completed => format!(
                "Migration completed in {:.0} ms: downtime {:.1} ms (target {} ms), {} \
                 round(s){}, {:.1} MiB sent ({} pages with contents, {} zero of which {} \
                 ballooned)",
                self.total_ms,
                self.downtime_ms.unwrap_or(0.0),
                self.downtime_target_ms,
                self.round + 1,
                if self.converged {
                    ""
                } else {
                    " (did not converge: round limit)"
                },
                mib(self.bytes_sent),
                self.pages_sent,
                self.zero_pages,
                self.ballooned_pages
            ),
            Phase::Postcopy => {
                let (demand, background) = self
                    .postcopy
                    .as_ref()
                    .map_or((0, 0), |p| (p.demand_pages, p.background_pages));
                format!(
                    "{bar} {pct:3}% postcopy: the guest runs on the destination; {demand} pages \
                     sent on demand, {background} in the background, {:.1} MiB sent",
                    mib(self.bytes_sent)
                )
            }
            Phase::PostcopyPaused => self
                .error
                .clone()
                .unwrap_or_else(|| "Postcopy paused: run `migrate resume ADDR`".into()),
            Phase::Failed => format!(
                "Migration failed; the guest keeps running here: {}",
                self.error.as_deref().unwrap_or("unknown cause")
            ),
            Phase::Unknown => format!(
                "Migration state unknown; the guest stays paused here: {}",
                self.error.as_deref().unwrap_or("unknown cause")
            ),
            Phase::None => "No migration".into(),
        }
    }
}

/// What postcopy has done so far: on the destination all of it, on the source the
/// pages it served.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStatus {
    /// "running" (pages still arriving), "completed", or "failed".
    pub phase: String,
    /// Pages fetched because a vCPU (or the VMM) touched them.
    pub demand_pages: u64,
    /// Pages placed from the background stream.
    pub background_pages: u64,
    /// Background pages dropped because they were already there or discarded.
    pub background_skipped: u64,
    /// Demand-fetch latency (request to response), µs.
    pub demand_p50_us: f64,
    /// The same, 99th percentile.
    pub demand_p99_us: f64,
    /// The same, the largest.
    pub demand_max_us: f64,
    /// Sum of every demand fetch's latency: the time vCPUs spent blocked on missing
    /// pages, ms.
    pub vcpu_blocked_ms: f64,
    /// Pages still missing.
    pub missing_pages: u64,
    /// Times a dropped link was resumed.
    #[serde(default)]
    pub resumes: u32,
    /// Pages a precopy round had brought that were written again before the switch
    /// to postcopy: dropped, and fetched anew.
    #[serde(default)]
    pub stale_pages: u64,
    /// Pages whose CRC32C matched the source's switch-over digest when they arrived
    /// (`--verify`).
    pub verified_pages: u64,
    /// Pages that did not match (any is fatal).
    pub digest_mismatches: u64,
    /// From the guest starting here to the last page, ms.
    pub total_ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// The status, shared between the migration thread and the control API.
#[derive(Debug, Clone)]
pub struct SharedStatus {
    inner: Arc<Mutex<MigrationStatus>>,
    start: Instant,
}

impl SharedStatus {
    /// A fresh status for a migration starting now.
    pub fn new(status: MigrationStatus) -> Self {
        SharedStatus {
            inner: Arc::new(Mutex::new(status)),
            start: Instant::now(),
        }
    }

    /// Changes it.
    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s);
        if !matches!(s.phase, Phase::Completed | Phase::Failed | Phase::Unknown) {
            s.total_ms = self.start.elapsed().as_secs_f64() * 1e3;
        }
    }

    /// A copy of it.
    pub fn get(&self) -> MigrationStatus {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Milliseconds since the migration started.
    pub fn elapsed_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_what_happens() {
        let mut s = MigrationStatus::idle();
        assert!(s.finished());
        s.phase = Phase::Precopy;
        s.round_pages = 100;
        s.round_done = 50;
        s.downtime_target_ms = 300;
        assert!(!s.finished());
        let line = s.line();
        assert!(line.contains(" 50% round 0"), "{line}");
        assert!(line.contains("############------------"), "{line}");
        s.phase = Phase::Failed;
        s.error = Some("The destination closed the connection".into());
        assert!(s
            .line()
            .contains("keeps running here: The destination closed"));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"phase\":\"failed\""), "{json}");
        let back: MigrationStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
