//! The source's side of postcopy, once the guest runs on the destination: a thread
//! answers the destination's page requests on the demand connection, and the main
//! connection pushes every page not sent yet in small runs (so that the destination's
//! background placement holds each run's write lock only briefly). Each page goes
//! once: a page requested is marked sent before its answer goes out, and the
//! background skips pages already marked.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rangevm_memory::GuestRam;

use super::page_index::PageIndex;
use super::protocol::{Decoder, Encoder, Message, MessageType, PageRun, ProtocolError};
use super::source::is_zero;
use super::status::{PostcopyStatus, SharedStatus};
use super::transport::Stream;

/// Pages per background run: 256 KiB at 4 KiB pages.
pub const BACKGROUND_RUN_BYTES: u64 = 256 << 10;

/// One bit per guest page: sent or not.
#[derive(Debug)]
pub struct SentMap {
    index: PageIndex,
    bits: Vec<AtomicU64>,
}

impl SentMap {
    /// Nothing sent yet, for every page of `ram`.
    pub fn new(ram: &GuestRam) -> Self {
        let index = PageIndex::of(ram);
        let words = index.pages().div_ceil(64);
        SentMap {
            index,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Every page sent except `stale` (ascending guest-physical addresses).
    pub fn all_but(ram: &GuestRam, stale: &[u64]) -> Self {
        let map = Self::new(ram);
        for w in &map.bits {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        for &gpa in stale {
            if let Some(i) = map.index.index(gpa) {
                if let Some(w) = map.bits.get(i / 64) {
                    w.fetch_and(!(1u64 << (i % 64)), Ordering::Relaxed);
                }
            }
        }
        map
    }

    /// Marks the page at `gpa` sent; true if it was not already (the caller sends it).
    pub fn claim(&self, gpa: u64) -> bool {
        let Some(i) = self.index.index(gpa) else {
            return false;
        };
        let Some(word) = self.bits.get(i / 64) else {
            return false;
        };
        let bit = 1u64 << (i % 64);
        word.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

/// Answers page requests until the demand connection ends. Returns the pages served.
pub fn serve_demand<R: Read>(
    mut dec: Decoder<BufReader<R>>,
    mut enc: Encoder<BufWriter<Stream>>,
    ram: &GuestRam,
    sent: &SentMap,
    status: &SharedStatus,
) -> Result<(), ProtocolError> {
    let page = usize::try_from(ram.page_size()).unwrap_or(4096);
    let shift = u8::try_from(ram.page_size().trailing_zeros()).unwrap_or(12);
    let mut buf = vec![0u8; page];
    loop {
        let Message::PageRequest(req) = dec.recv_expecting(&[MessageType::PageRequest])? else {
            continue;
        };
        let mut data = Vec::with_capacity(page * usize::try_from(req.count).unwrap_or(1));
        let mut all_zero = true;
        for k in 0..u64::from(req.count) {
            let gpa = req.gpa + k * page as u64;
            if let Err(e) = ram.read(gpa, &mut buf) {
                log::warn!(
                    "Postcopy: the destination asked for {gpa:#x}, which cannot be read: {e}"
                );
                buf.fill(0);
            }
            all_zero &= is_zero(&buf);
            data.extend_from_slice(&buf);
            sent.claim(gpa);
        }
        let run = if all_zero {
            PageRun::zero(req.gpa, shift, req.count)
        } else {
            PageRun::bytes(req.gpa, shift, data)
        };
        enc.send(&Message::PageResponse {
            request_id: req.request_id,
            run,
        })?;
        enc.flush()?;
        status.update(|s| {
            let p = s.postcopy.get_or_insert_with(PostcopyStatus::default);
            p.demand_pages += u64::from(req.count);
        });
    }
}

/// Pushes every page the demand thread has not sent, then `PostcopyDone`.
pub fn push_background<W: Write>(
    enc: &mut Encoder<W>,
    ram: &GuestRam,
    sent: &SentMap,
    status: &SharedStatus,
) -> Result<(), super::source::SourceError> {
    let page = ram.page_size();
    let shift = u8::try_from(page.trailing_zeros()).unwrap_or(12);
    let per_run = (BACKGROUND_RUN_BYTES / page).max(1);
    let mut buf = Vec::new();
    let total = ram.size() / page;
    status.update(|s| {
        s.round_pages = total;
        s.round_done = 0;
    });
    for r in ram.regions() {
        let mut gpa = r.start;
        while gpa < r.end() {
            let end = (gpa + per_run * page).min(r.end());
            // Runs of consecutive pages this thread claims.
            let mut at = gpa;
            while at < end {
                if !sent.claim(at) {
                    at += page;
                    continue;
                }
                let start = at;
                at += page;
                while at < end && sent.claim(at) {
                    at += page;
                }
                let sent_now = super::source::encode_range(
                    ram,
                    enc,
                    start,
                    (at - start) / page,
                    shift,
                    &mut buf,
                )?;
                let bytes = enc.bytes_written();
                status.update(|s| {
                    s.bytes_sent = bytes;
                    s.pages_sent += sent_now.data;
                    s.zero_pages += sent_now.zero;
                    s.ballooned_pages += sent_now.ballooned;
                    let p = s.postcopy.get_or_insert_with(PostcopyStatus::default);
                    p.background_pages += sent_now.data + sent_now.zero;
                });
            }
            let done = (end - gpa) / page;
            status.update(|s| s.round_done += done);
            gpa = end;
        }
    }
    enc.send(&Message::PostcopyDone)?;
    enc.flush()?;
    Ok(())
}

/// How long the destination may take, after `PostcopyDone`, to place the last pages.
pub const ALL_RECEIVED_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the demand server thread on the demand connection's decoder (past its
/// handshake) and writer.
pub fn spawn_demand(
    dec: Decoder<BufReader<Stream>>,
    writer: BufWriter<Stream>,
    ram: Arc<GuestRam>,
    sent: Arc<SentMap>,
    status: SharedStatus,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("postcopy-serve".into())
        .spawn(move || {
            let enc = Encoder::new(writer);
            match serve_demand(dec, enc, &ram, &sent, &status) {
                Err(ProtocolError::Closed) => log::info!("Postcopy: the demand connection closed"),
                Err(e) => log::warn!(
                    "Postcopy: the demand connection failed: {}",
                    super::chain(&e)
                ),
                Ok(()) => {}
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_page_is_claimed_once() {
        let ram = GuestRam::new(
            rangevm_memory::LockMode::Range,
            &[(0, 1 << 20), (4 << 20, 1 << 20)],
        )
        .unwrap();
        let map = SentMap::new(&ram);
        let page = ram.page_size();
        assert!(map.claim(0));
        assert!(!map.claim(0));
        assert!(map.claim(page));
        assert!(map.claim(4 << 20));
        assert!(!map.claim(4 << 20));
        assert!(!map.claim(2 << 20), "not guest RAM");
        assert!(map.claim((5 << 20) - page));
        let stale = SentMap::all_but(&ram, &[page, 4 << 20]);
        assert!(!stale.claim(0));
        assert!(stale.claim(page));
        assert!(!stale.claim(page));
        assert!(stale.claim(4 << 20));
        assert!(!stale.claim((4 << 20) + page));
    }
}
