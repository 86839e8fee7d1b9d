//! Helpers shared by the `fault_engine_*` tests: a watchdog that turns a hang into a
//! failure, a page source whose page `p` is a function of `p`, and a vCPU stand-in
//! that touches guest pages through their host mapping.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rangevm_memory::{host_page_size, GuestRam, PageContent, PageSource};

/// How long any blocking test may run before the watchdog aborts the process.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Aborts the whole test process, with a message naming the test, if it is still armed
/// after its limit: a fault that is never resolved blocks the touching thread in the
/// kernel forever, and an abort is the only way to turn that into a failure instead of
/// a stalled CI job. Disarmed on drop (also when the test panics).
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a watchdog for the test `name` with the default limit.
    pub fn arm(name: &'static str) -> Self {
        Self::arm_for(name, LIMIT)
    }

    /// Arms a watchdog for the test `name` that fires after `limit`.
    pub fn arm_for(name: &'static str, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                    eprintln!("{name}: still running after {limit:?}; aborting (a hang)");
                    std::process::abort();
                }
            })
            .expect("cannot start the watchdog thread");
        Watchdog {
            disarm: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Dropping the sender disconnects the channel: the watchdog returns at once.
        drop(self.disarm.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The host page size as a usize.
pub fn page_len() -> usize {
    usize::try_from(host_page_size()).expect("page size fits a usize")
}

/// Word `w` (8 bytes, native endian) of guest page number `p` as [`PatternSource`]
/// serves it: a mix of both, never zero, so a zero-filled page always shows.
pub fn pattern_word(p: u64, w: u64) -> u64 {
    ((p + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w.wrapping_mul(0xff51_afd7_ed55_8ccd)) | 1
}

/// The whole content of guest page number `p` as [`PatternSource`] serves it.
pub fn pattern_page(p: u64) -> Vec<u8> {
    let mut buf = vec![0u8; page_len()];
    fill_pattern(p, &mut buf);
    buf
}

fn fill_pattern(p: u64, buf: &mut [u8]) {
    for (w, chunk) in (0u64..).zip(buf.chunks_exact_mut(8)) {
        chunk.copy_from_slice(&pattern_word(p, w).to_ne_bytes());
    }
}

/// Page `p` (guest-physical `p * page size`) holds `pattern_page(p)`. Counts how often
/// each page was read, so a test can tell that no page was fetched twice.
#[derive(Debug)]
pub struct PatternSource {
    reads: Vec<AtomicU32>,
}

impl PatternSource {
    /// A source covering guest-physical pages `0 .. pages`.
    pub fn new(pages: u64) -> Self {
        PatternSource {
            reads: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// How often page number `p` was read.
    pub fn reads(&self, p: u64) -> u32 {
        self.reads[usize::try_from(p).unwrap()].load(Ordering::SeqCst)
    }

    /// Total page reads.
    pub fn total_reads(&self) -> u64 {
        self.reads
            .iter()
            .map(|r| u64::from(r.load(Ordering::SeqCst)))
            .sum()
    }
}

impl PageSource for PatternSource {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> io::Result<PageContent> {
        let p = gpa / host_page_size();
        let counter = usize::try_from(p)
            .ok()
            .and_then(|i| self.reads.get(i))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page out of range"))?;
        counter.fetch_add(1, Ordering::SeqCst);
        fill_pattern(p, buf);
        Ok(PageContent::Data)
    }
}

/// Loads word `w` of the guest page at `gpa` straight from the host mapping, as a vCPU
/// would: a missing page blocks this thread in the kernel until a handler fills it.
pub fn touch(ram: &GuestRam, gpa: u64, w: u64) -> u64 {
    let host = ram.host_address(gpa).expect("gpa is guest RAM");
    let ptr = (host + w * 8) as *const u64;
    assert!(w * 8 < host_page_size());
    // SAFETY: `ptr` is 8-byte aligned (mappings are page-aligned, `gpa` is a page
    // start in every caller) and inside the region's mapping, which the caller's `ram`
    // keeps alive; a volatile load of plain data creates no reference into guest
    // memory, so a concurrent fill or discard by the kernel is no aliasing violation.
    unsafe { std::ptr::read_volatile(ptr) }
}

/// The page at `gpa` read under the range lock (DMA), once it is present.
pub fn read_page(ram: &GuestRam, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0u8; page_len()];
    ram.read(gpa, &mut buf).expect("page is present");
    buf
}

/// Waits (up to 10 s) for `cond` to hold. A vCPU's access returns as soon as the
/// kernel has filled its page, a moment before the handler drops the page's lock and
/// counts the fault, so checks of either right after an access must wait for them.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// The names of this process's threads that are fault handlers.
pub fn handler_threads() -> Vec<String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let comm = task.expect("task entry").path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            if name.starts_with("uffd-handler") {
                names.push(name.trim_end().to_owned());
            }
        }
    }
    names
}

/// A file under the temporary directory holding `content`, removed on drop.
#[derive(Debug)]
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    /// Creates the file.
    pub fn with(content: &[u8]) -> Self {
        use std::io::Write;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rangevm-fault-engine-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let mut file = std::fs::File::create(&path).expect("create a temporary file");
        file.write_all(content).expect("write a temporary file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
