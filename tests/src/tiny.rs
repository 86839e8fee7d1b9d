//! Tiny x86 test guests: hand-assembled ELF kernels that `rangevm run --kernel FILE`
//! boots, and that run in milliseconds even where KVM emulates every instruction.
//!
//! A guest is a straight list of steps followed by one exit:
//!
//! ```
//! use rangevm_tests::tiny::{Exit, Mode, TinyGuest};
//!
//! let elf = TinyGuest::new(Mode::Long)
//!     .marker(b'!')
//!     .print("hello\n")
//!     .touch_pages(0x20_0000, 16, 0x1000)
//!     .check_pages(0x20_0000, 16, 0x1000)
//!     .exit(Exit::PowerOff)
//!     .build();
//! assert_eq!(&elf[..4], b"\x7fELF");
//! ```
//!
//! Both flavours are ELF64 files (`EM_X86_64`, `ET_EXEC`) with one `PT_LOAD` segment at
//! physical and virtual [`LOAD_ADDR`] (1 MiB), entered at `e_entry` = [`LOAD_ADDR`]:
//!
//! - [`Mode::Long`] has no PVH note; the VMM enters it in 64-bit mode with the first
//!   4 GiB identity-mapped. A guest that touches memory above 4 GiB carries its own
//!   identity page tables (2 MiB pages) and loads them into CR3 first.
//! - [`Mode::Pvh`] also has a `PT_NOTE` segment holding the Xen note
//!   `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name `"Xen\0"`, a 4-byte entry address), so the
//!   VMM enters it in 32-bit protected mode with paging off. It is ELF64, like a
//!   vmlinux with a PVH entry, because linux-loader's ELF loader reads only ELF64
//!   headers (an ELF32 file fails its program-header size check).
//!
//! The code uses no stack (the PVH entry state defines none) and no interrupts; it
//! writes only the pages the steps name (and [`COUNTER_ADDR`] for a
//! [`TinyGuest::counter`]; for a [`TinyGuest::counter_smp`], also the trampoline at
//! [`AP_TRAMPOLINE`] and one stack page per further vCPU). Guest memory addresses are
//! guest-physical.
//!
//! [`TinyGuest::counter`] is a last step that never ends, for live-migration tests:
//!
//! ```
//! use rangevm_tests::tiny::{check_consecutive, parse_counter_lines, Mode, TinyGuest};
//!
//! let elf = TinyGuest::new(Mode::Long)
//!     .counter(16 << 20, 256, 0x1000, 10)
//!     .build();
//! assert_eq!(&elf[..4], b"\x7fELF");
//! // What its console shows after 30 passes (and a line being written):
//! let console = "pass 000000000000000a\npass 0000000000000014\npass 000000000000001e\npa";
//! let passes = parse_counter_lines(console).unwrap();
//! assert_eq!(passes, [10, 20, 30]);
//! check_consecutive(&passes, 10).unwrap();
//! ```

use std::path::Path;

/// Where the guest image is loaded, and where it starts running (1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// COM1's data port.
pub const COM1: u16 = 0x3f8;
/// COM1's line status register; bit 5 set = the transmit holding register is empty.
pub const COM1_LSR: u16 = COM1 + 5;
/// The ACPI sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
/// The value that powers off: `SLP_EN | (_S5_ sleep type 5 << 2)`.
pub const ACPI_POWER_OFF: u8 = 0x34;
/// The ACPI reset register (FADT `RESET_REG`).
pub const ACPI_RESET_REGISTER: u16 = 0x602;
/// The value written to the ACPI reset register.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// The i8042 command port.
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that pulses the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;
/// The pvpanic port.
pub const PVPANIC: u16 = 0x505;
/// What a passing [`TinyGuest::check_pages`] prints.
pub const PATTERN_OK: &str = "PATTERN-OK\n";
/// What a failing [`TinyGuest::check_pages`] prints.
pub const PATTERN_BAD: &str = "PATTERN-BAD\n";
/// The seed of the memory pattern unless [`TinyGuest::seed`] sets another.
pub const DEFAULT_SEED: u64 = 0x5eed_c0de_0bad_f00d;
/// Where a [`TinyGuest::counter`] keeps its pass number `n` (a qword, also in RBX/EBX):
/// 64 KiB, in the free gap between the VMM's boot page tables (0x9000..0xf000) and the
/// kernel command line (0x20000), clear of the boot stack page (0x8000..0x9000).
pub const COUNTER_ADDR: u64 = 0x1_0000;
// Past the VMM's page tables (PDEs at 0xb000, four pages), before its command line.
const _: () = assert!(COUNTER_ADDR >= 0xf000 && COUNTER_ADDR + 8 <= 0x2_0000);
const _: () = assert!(COUNTER_ADDR % 8 == 0);
/// Where a [`TinyGuest::counter_smp`] guest's first vCPU puts the start-up code of the
/// others (16-bit real mode, entered by a start-up IPI with vector
/// `AP_TRAMPOLINE >> 12`): a page in the free gap between the VMM's boot GDT and IDT
/// (0x500..0x528) and its PVH start info (0x6000), below the zero page (0x7000), the
/// boot stack (0x8000..0x9000) and the page tables (0x9000..0xf000).
pub const AP_TRAMPOLINE: u64 = 0x1000;
const _: () = assert!(AP_TRAMPOLINE % PAGE == 0 && AP_TRAMPOLINE >= 0x528);
const _: () = assert!(AP_TRAMPOLINE + PAGE <= 0x6000 && AP_TRAMPOLINE >> 12 <= 0xff);
/// The most vCPUs a [`TinyGuest::counter_smp`] runs on: vCPU `i` > 0 keeps its stack
/// in the page at `COUNTER_ADDR + i * 4096`, all below the command line (0x20000), and
/// its pass number at `COUNTER_ADDR + 8 * i`, in the first page.
pub const MAX_SMP_CPUS: u32 = 16;
const _: () = assert!(COUNTER_ADDR + MAX_SMP_CPUS as u64 * PAGE <= 0x2_0000);
const _: () = assert!(MAX_SMP_CPUS as u64 * 8 <= PAGE);
/// The VMM's PML4 (its identity map of the first 4 GiB), which the other vCPUs of a
/// [`TinyGuest::counter_smp`] load into CR3.
const VMM_PML4: u64 = 0x9000;
/// The local APIC (xAPIC MMIO) and the registers the SMP counter uses.
const LAPIC: u32 = 0xfee0_0000;
const LAPIC_ID: u32 = 0x20;
const LAPIC_SVR: u32 = 0xf0;
const LAPIC_ICR_LOW: u32 = 0x300;
/// ICR high (destination APIC ID in bits 24..32), from ICR low.
const ICR_HIGH_DISP: u8 = 0x10;
/// Spurious-vector register: APIC software-enabled, vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// ICR low: INIT, level assert, physical destination.
const ICR_INIT: u32 = 0x4500;
/// ICR low: start-up, level assert, physical destination (the vector in bits 0..8).
const ICR_STARTUP: u32 = 0x4600;
/// `dec rcx; jnz` rounds after the INIT IPI and after each start-up IPI.
const INIT_DELAY: u32 = 20_000;
const STARTUP_DELAY: u32 = 2_000;
/// The constant [`counter_word`] mixes in.
pub const COUNTER_SEED: u64 = 0xc0de_cafe_f00d_5eed;
/// What starts each line a [`TinyGuest::counter`] prints; 16 hex digits and `\n`
/// follow.
pub const COUNTER_PREFIX: &str = "pass ";
/// How many hex digits a counter line has.
const COUNTER_DIGITS: usize = 16;
/// How many bytes a counter writes at the start of each page: `n`, then
/// [`counter_word`].
const COUNTER_BYTES: u64 = 16;

const LSR_THR_EMPTY: u8 = 0x20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 0x1000;
/// Where the image starts in the ELF file.
const IMAGE_OFFSET: u64 = 0x1000;
const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// One page directory pointer table maps at most this much.
const MAX_LONG_ADDR: u64 = 512 * GIB;

/// The first qword a pattern step writes into the page at `addr`: `addr ^ seed`.
pub fn pattern(addr: u64, seed: u64) -> u64 {
    addr ^ seed
}

/// The second qword a [`TinyGuest::counter`] writes into the page at `addr` in pass
/// `n`: `addr ^ n.rotate_left(32) ^ COUNTER_SEED`. Below 4 GiB (and for `n` below 2^32)
/// that is `(n << 32 | addr) ^ COUNTER_SEED`: a different value for every page and
/// pass.
pub fn counter_word(addr: u64, n: u64) -> u64 {
    addr ^ n.rotate_left(32) ^ COUNTER_SEED
}

/// The pass numbers of the complete [`TinyGuest::counter`] lines in `text` (console
/// output), in order: lines that do not start with [`COUNTER_PREFIX`] are skipped, as
/// is a last line without its `\n` (still being written). A counter line with anything
/// but 16 lowercase hex digits after the prefix is an error.
pub fn parse_counter_lines(text: &str) -> Result<Vec<u64>, String> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => return Ok(Vec::new()),
    };
    complete
        .split('\n')
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.strip_suffix('\r').unwrap_or(line);
            line.strip_prefix(COUNTER_PREFIX).map(|hex| (i, line, hex))
        })
        .map(|(i, line, hex)| {
            let digits = hex.len() == COUNTER_DIGITS
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !digits {
                return Err(format!(
                    "console line {} {line:?} is not {COUNTER_PREFIX:?} and 16 lowercase \
                     hex digits",
                    i + 1
                ));
            }
            u64::from_str_radix(hex, 16).map_err(|e| format!("console line {}: {e}", i + 1))
        })
        .collect()
}

/// Whether `passes` (from [`parse_counter_lines`]) go up by exactly `print_every` each
/// line: no pass lost, repeated or out of order. The error names the first bad pair.
pub fn check_consecutive(passes: &[u64], print_every: u64) -> Result<(), String> {
    for (i, pair) in passes.windows(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        if a.checked_add(print_every) != Some(b) {
            let what = match b.cmp(&a) {
                std::cmp::Ordering::Equal => "a repeat".to_string(),
                std::cmp::Ordering::Less => "going back".to_string(),
                std::cmp::Ordering::Greater if b - a > print_every => {
                    format!("a gap of {} passes", b - a - print_every)
                }
                std::cmp::Ordering::Greater => "too small a step".to_string(),
            };
            return Err(format!(
                "counter lines {} and {} show passes {a:#x} then {b:#x}, {what}: \
                 expected {:#x} after {a:#x} (one line every {print_every} passes)",
                i + 1,
                i + 2,
                a.wrapping_add(print_every)
            ));
        }
    }
    Ok(())
}

/// The CPU mode the guest is entered in, which also picks the ELF flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit long mode, identity paging (no PVH note).
    Long,
    /// 32-bit protected mode, paging off (PVH note).
    Pvh,
}

/// How the guest ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Writes [`ACPI_POWER_OFF`] to the ACPI sleep control register.
    PowerOff,
    /// Writes [`I8042_RESET`] to the i8042 command port.
    Reset,
    /// Writes [`ACPI_RESET_VALUE`] to the ACPI reset register.
    AcpiReset,
    /// Loads an IDT of limit 0 and executes `ud2`: #UD, #GP, double fault, shutdown.
    TripleFault,
    /// Writes 1 (guest panicked) to the pvpanic port.
    Panic,
    /// `cli; hlt` forever: the guest only ends when the VMM is told to stop it.
    Hang,
}

impl Exit {
    /// The exit status `rangevm run` documents for this exit (none for [`Exit::Hang`]).
    pub fn expected_status(self) -> Option<i32> {
        match self {
            Exit::PowerOff => Some(0),
            Exit::Reset | Exit::AcpiReset => Some(3),
            Exit::TripleFault => Some(4),
            Exit::Panic => Some(5),
            Exit::Hang => None,
        }
    }
}

/// A run of pages: the first `bytes` at `start`, `start + stride`, ... (`count` of
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pages {
    start: u64,
    count: u64,
    stride: u64,
    bytes: u64,
}

impl Pages {
    /// One past the last byte written.
    fn end(&self) -> u64 {
        self.start + (self.count - 1) * self.stride + self.bytes
    }

    /// Whether the `len` bytes at `addr` share a byte with those written.
    fn overlaps(&self, addr: u64, len: u64) -> bool {
        (0..self.count).any(|i| {
            let at = self.start + i * self.stride;
            at < addr + len && addr < at + self.bytes
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Out {
        port: u16,
        value: u8,
    },
    Print(Vec<u8>),
    Touch(Pages),
    Check(Pages),
    Counter {
        pages: Pages,
        print_every: u64,
    },
    /// `pages`: the pages of all `cpus`, `per_cpu` of them each, in vCPU order.
    CounterSmp {
        pages: Pages,
        per_cpu: u64,
        print_every: u64,
        cpus: u32,
    },
}

impl Step {
    /// The pages the step writes or reads.
    fn pages(&self) -> Option<&Pages> {
        match self {
            Step::Touch(p)
            | Step::Check(p)
            | Step::Counter { pages: p, .. }
            | Step::CounterSmp { pages: p, .. } => Some(p),
            Step::Out { .. } | Step::Print(_) => None,
        }
    }
}

/// A tiny guest program: steps, then an exit. See the module documentation.
#[derive(Debug, Clone)]
pub struct TinyGuest {
    mode: Mode,
    seed: u64,
    steps: Vec<Step>,
    exit: Exit,
}

impl TinyGuest {
    /// An empty program for `mode` that hangs (until [`TinyGuest::exit`] says otherwise).
    pub fn new(mode: Mode) -> Self {
        TinyGuest {
            mode,
            seed: DEFAULT_SEED,
            steps: Vec::new(),
            exit: Exit::Hang,
        }
    }

    /// The mode the guest runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Writes one byte to COM1 without waiting for the UART: as the first step, this is
    /// the guest's first port access (three instructions after entry), for timing
    /// process start to first guest instruction.
    pub fn marker(self, byte: u8) -> Self {
        self.out(COM1, byte)
    }

    /// Writes `value` to I/O port `port`.
    pub fn out(mut self, port: u16, value: u8) -> Self {
        self.steps.push(Step::Out { port, value });
        self
    }

    /// Prints `text` on COM1, waiting for LSR bit 5 (transmitter empty) before each
    /// byte.
    pub fn print(mut self, text: &str) -> Self {
        if !text.is_empty() {
            self.steps.push(Step::Print(text.as_bytes().to_vec()));
        }
        self
    }

    /// Sets the seed of the memory pattern of every touch and check step.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Writes [`pattern`]`(addr, seed)` to the first qword of each of `count` pages:
    /// `addr = start, start + stride, ...`.
    ///
    /// # Panics
    /// If `count` is 0, `start` or `stride` is not a multiple of 8, `stride` is 0, or
    /// the pages reach beyond 4 GiB in PVH mode (paging off) or 512 GiB in long mode.
    /// [`TinyGuest::build`] panics if they overlap the guest's own image.
    pub fn touch_pages(mut self, start: u64, count: u64, stride: u64) -> Self {
        let pages = self.pages(start, count, stride, 8);
        self.steps.push(Step::Touch(pages));
        self
    }

    /// Reads the pages [`TinyGuest::touch_pages`] with the same arguments wrote and
    /// prints [`PATTERN_OK`] if all hold the pattern, else [`PATTERN_BAD`].
    ///
    /// # Panics
    /// As [`TinyGuest::touch_pages`].
    pub fn check_pages(mut self, start: u64, count: u64, stride: u64) -> Self {
        let pages = self.pages(start, count, stride, 8);
        self.steps.push(Step::Check(pages));
        self
    }

    /// Counts passes forever, for live-migration tests; the last step (nothing after it
    /// runs, the exit included).
    ///
    /// Pass `n` = 1, 2, 3, ... first stores `n` at [`COUNTER_ADDR`], then, every
    /// `print_every` passes (when `n % print_every == 0`), prints `pass ` and `n` as 16
    /// lowercase hex digits and `\n` on COM1 (see [`parse_counter_lines`]), then writes
    /// to each of the `pages` pages at `addr = start, start + stride, ...` the qwords `n`
    /// (offset 0) and [`counter_word`]`(addr, n)` (offset 8). `n` lives in RBX
    /// throughout (EBX in PVH mode), so it travels with the vCPU state; everything else
    /// is recomputed from it each pass. A page's two qwords are written in this order,
    /// pages in ascending order, one pass after the other.
    ///
    /// In PVH mode the counter is 32 bits: the high halves of `n` written and printed
    /// are 0 and `n` would wrap after 2^32 passes (months at emulator speed).
    ///
    /// # Panics
    /// If `pages` or `print_every` is 0, `start` or `stride` is not a multiple of 4096,
    /// `stride` is 0, the pages reach beyond 4 GiB in PVH mode or 512 GiB in long mode,
    /// or, in PVH mode, `print_every` does not fit in 32 bits. [`TinyGuest::build`]
    /// panics if the pages overlap the guest's image or [`COUNTER_ADDR`], or if another
    /// step follows.
    pub fn counter(mut self, start: u64, pages: u64, stride: u64, print_every: u64) -> Self {
        assert!(
            print_every > 0,
            "a counter prints every print_every > 0 passes"
        );
        assert!(
            start % PAGE == 0 && stride % PAGE == 0,
            "counter start {start:#x} and stride {stride:#x} must be multiples of {PAGE:#x}"
        );
        if self.mode == Mode::Pvh {
            u32_of(print_every, "a PVH counter's print_every");
        }
        let pages = self.pages(start, pages, stride, COUNTER_BYTES);
        self.steps.push(Step::Counter { pages, print_every });
        self
    }

    /// [`TinyGuest::counter`] on `cpus` vCPUs at once (`rangevm run --cpus N`, N >=
    /// `cpus`), for migration tests where several vCPUs fault at the same time; the
    /// last step. Long mode only.
    ///
    /// vCPU 0 (the BSP) software-enables its local APIC, copies the start-up code of
    /// the others to [`AP_TRAMPOLINE`] and starts vCPUs 1..`cpus` (the APs) through its
    /// xAPIC ICR: an INIT IPI to each (by APIC ID), then twice a start-up IPI with
    /// vector `AP_TRAMPOLINE >> 12`. Each AP goes from real mode straight to long mode
    /// (a 3-entry GDT in the trampoline page: 64-bit code 0x08, data 0x10, as the
    /// VMM's; PAE; CR3 = the VMM's PML4 at 0x9000; EFER.LME; CR0.PG|PE; far jump), takes
    /// its index `i` from its LAPIC ID (`[0xfee00020] >> 24`) and its stack from the
    /// page at `COUNTER_ADDR + i * 4096`.
    ///
    /// vCPU `i` (0 included) then counts passes as [`TinyGuest::counter`] does, its own
    /// `n` in RBX, over its own `pages_per_cpu` pages from `start + i * pages_per_cpu *
    /// stride`, storing `n` at `COUNTER_ADDR + 8 * i` each pass; only vCPU 0 prints its
    /// `pass` lines (so [`parse_counter_lines`] and [`check_consecutive`] read the
    /// console as for [`TinyGuest::counter`]). Together the vCPUs write the first 16
    /// bytes of the `cpus * pages_per_cpu` pages from `start`, every `stride`, and the
    /// page at [`COUNTER_ADDR`] (and, once, the top of each AP's stack page).
    ///
    /// # Panics
    /// If the mode is not [`Mode::Long`], `cpus` is not in 1..=[`MAX_SMP_CPUS`],
    /// `pages_per_cpu` or `print_every` is 0, `start` or `stride` is not a multiple of
    /// 4096, `stride` is 0, or the pages reach beyond 4 GiB (the APs use the VMM's
    /// page tables). [`TinyGuest::build`] panics if the pages overlap the guest's image
    /// or anything below `COUNTER_ADDR + cpus * 4096` (pass numbers, stacks, the VMM's
    /// tables, the trampoline), or if another step follows.
    pub fn counter_smp(
        mut self,
        start: u64,
        pages_per_cpu: u64,
        stride: u64,
        print_every: u64,
        cpus: u32,
    ) -> Self {
        assert!(
            self.mode == Mode::Long,
            "an SMP counter runs in long mode only"
        );
        assert!(
            (1..=MAX_SMP_CPUS).contains(&cpus),
            "an SMP counter runs on 1..={MAX_SMP_CPUS} vCPUs, not {cpus}"
        );
        assert!(
            print_every > 0,
            "a counter prints every print_every > 0 passes"
        );
        assert!(
            start % PAGE == 0 && stride % PAGE == 0,
            "counter start {start:#x} and stride {stride:#x} must be multiples of {PAGE:#x}"
        );
        assert!(pages_per_cpu > 0, "a pattern needs at least one page");
        let count = pages_per_cpu
            .checked_mul(u64::from(cpus))
            .expect("the SMP counter's page count fits in u64");
        let pages = self.pages(start, count, stride, COUNTER_BYTES);
        assert!(
            pages.end() <= 4 * GIB,
            "the SMP counter's pages {start:#x}..{:#x} go beyond 4 GiB, which the VMM's page \
             tables the APs use map",
            pages.end()
        );
        self.steps.push(Step::CounterSmp {
            pages,
            per_cpu: pages_per_cpu,
            print_every,
            cpus,
        });
        self
    }

    /// Sets how the guest ends once its steps are done.
    pub fn exit(mut self, exit: Exit) -> Self {
        self.exit = exit;
        self
    }

    fn pages(&self, start: u64, count: u64, stride: u64, bytes: u64) -> Pages {
        assert!(count > 0, "a pattern needs at least one page");
        assert!(
            start % 8 == 0 && stride % 8 == 0 && stride > 0,
            "pattern start {start:#x} and stride {stride:#x} must be non-zero multiples of 8"
        );
        let limit = match self.mode {
            Mode::Pvh => 1 << 32,
            Mode::Long => MAX_LONG_ADDR,
        };
        let end = (count - 1)
            .checked_mul(stride)
            .and_then(|span| span.checked_add(start))
            .and_then(|last| last.checked_add(bytes));
        assert!(
            end.is_some_and(|end| end <= limit),
            "pattern of {count} pages from {start:#x} every {stride:#x} goes beyond {limit:#x}, \
             the most {:?} mode reaches",
            self.mode
        );
        Pages {
            start,
            count,
            stride,
            bytes,
        }
    }

    /// The ELF file.
    ///
    /// # Panics
    /// If a pattern or counter step overlaps the guest's image, a counter's pages
    /// overlap [`COUNTER_ADDR`], or a step follows a counter.
    pub fn build(&self) -> Vec<u8> {
        if let Some(at) = self
            .steps
            .iter()
            .position(|s| matches!(s, Step::Counter { .. } | Step::CounterSmp { .. }))
        {
            assert!(
                at + 1 == self.steps.len(),
                "a counter never ends: it must be the last step, not followed by {:?}",
                self.steps[at + 1]
            );
        }
        let image = self.image();
        let image_end = LOAD_ADDR + len_u64(&image);
        for step in &self.steps {
            if let Some(p) = step.pages() {
                assert!(
                    p.end() <= LOAD_ADDR || p.start >= image_end,
                    "the pattern {:#x}..{:#x} overlaps the guest image {LOAD_ADDR:#x}..{image_end:#x}",
                    p.start,
                    p.end()
                );
            }
            if let Step::Counter { pages, .. } = step {
                assert!(
                    !pages.overlaps(COUNTER_ADDR, 8),
                    "the counter pages {:#x}..{:#x} overlap the pass number at {COUNTER_ADDR:#x}",
                    pages.start,
                    pages.end()
                );
            }
            if let Step::CounterSmp { pages, cpus, .. } = step {
                let low_end = COUNTER_ADDR + u64::from(*cpus) * PAGE;
                assert!(
                    !pages.overlaps(0, low_end),
                    "the counter pages {:#x}..{:#x} overlap the pass numbers, stacks, VMM \
                     tables or AP trampoline below {low_end:#x}",
                    pages.start,
                    pages.end()
                );
            }
        }
        elf(&image, self.mode == Mode::Pvh)
    }

    /// Writes the ELF file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.build())
    }

    /// The loaded image: code, then data (strings, the null IDT descriptor), then, if
    /// needed, page tables on a page boundary.
    fn image(&self) -> Vec<u8> {
        let mut asm = Asm::new(self.mode == Mode::Long);
        let mut data = Data::default();
        let ok = data.add(PATTERN_OK.as_bytes());
        let bad = data.add(PATTERN_BAD.as_bytes());
        let gib_mapped = self.gib_to_map();
        let mut own_paging = false;
        for step in &self.steps {
            match step {
                Step::Out { port, value } => asm.out_port(*port, *value),
                Step::Print(text) => {
                    let at = data.add(text);
                    asm.print(Target::Data(at), text.len());
                }
                Step::Counter { pages, print_every } => {
                    if gib_mapped.is_some() && !own_paging {
                        asm.mov_r32_abs(Reg::Ax, Target::PageTables);
                        asm.mov_cr3(Reg::Ax);
                        own_paging = true;
                    }
                    // The line's prefix (PVH: with the 8 zero high digits), the low
                    // digits computed from n, then the newline.
                    let digits = if self.mode == Mode::Long { 16 } else { 8 };
                    let prefix = format!("{COUNTER_PREFIX}{}", "0".repeat(COUNTER_DIGITS - digits));
                    let text = (data.add(prefix.as_bytes()), prefix.len());
                    let newline = (data.add(b"\n"), 1);
                    let line = CounterLine {
                        text,
                        digits,
                        newline,
                    };
                    asm.counter(pages, *print_every, Some(line), false);
                }
                Step::CounterSmp {
                    pages,
                    per_cpu,
                    print_every,
                    cpus,
                } => {
                    if gib_mapped.is_some() && !own_paging {
                        asm.mov_r32_abs(Reg::Ax, Target::PageTables);
                        asm.mov_cr3(Reg::Ax);
                        own_paging = true;
                    }
                    let trampoline = ap_trampoline(&ap_code(pages, *per_cpu, *cpus));
                    let at = data.add(&trampoline);
                    asm.start_aps(Target::Data(at), trampoline.len(), *cpus);
                    let prefix = COUNTER_PREFIX.as_bytes();
                    let line = CounterLine {
                        text: (data.add(prefix), prefix.len()),
                        digits: COUNTER_DIGITS,
                        newline: (data.add(b"\n"), 1),
                    };
                    let mine = Pages {
                        count: *per_cpu,
                        ..*pages
                    };
                    asm.counter(&mine, *print_every, Some(line), false);
                }
                Step::Touch(pages) | Step::Check(pages) => {
                    if gib_mapped.is_some() && !own_paging {
                        asm.mov_r32_abs(Reg::Ax, Target::PageTables);
                        asm.mov_cr3(Reg::Ax);
                        own_paging = true;
                    }
                    asm.pattern_setup(pages, self.seed);
                    if matches!(step, Step::Touch(_)) {
                        asm.pattern_write(self.seed);
                    } else {
                        asm.pattern_check(
                            self.seed,
                            (ok, PATTERN_OK.len()),
                            (bad, PATTERN_BAD.len()),
                        );
                    }
                }
            }
        }
        match self.exit {
            Exit::PowerOff => asm.out_port(ACPI_SLEEP_CONTROL, ACPI_POWER_OFF),
            Exit::Reset => asm.out_port(I8042_COMMAND, I8042_RESET),
            Exit::AcpiReset => asm.out_port(ACPI_RESET_REGISTER, ACPI_RESET_VALUE),
            Exit::Panic => asm.out_port(PVPANIC, 1),
            Exit::TripleFault => {
                // A 10-byte descriptor (limit 0, base 0); 32-bit lidt reads 6 of them.
                let idt = data.add(&[0; 10]);
                asm.lidt(Target::Data(idt));
                asm.ud2();
            }
            Exit::Hang => {}
        }
        // Every exit ends here, so a VMM that lets the guest go on finds it parked
        // rather than running into the data.
        asm.park();
        asm.link(&data.bytes, gib_mapped)
    }

    /// How many GiB the guest's own page tables map: `None` if the VMM's 4 GiB do.
    fn gib_to_map(&self) -> Option<u64> {
        if self.mode != Mode::Long {
            return None;
        }
        let end = self
            .steps
            .iter()
            .filter_map(|s| s.pages().map(Pages::end))
            .max()?;
        (end > 4 * GIB).then(|| end.div_ceil(GIB))
    }
}

fn len_u64(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).expect("a length fits in u64")
}

fn u32_of(value: u64, what: &str) -> u32 {
    u32::try_from(value).unwrap_or_else(|_| panic!("{what} {value:#x} does not fit in 32 bits"))
}

/// Identity page tables for the first `gib` GiB, to be placed at `at`: PML4, PDPT, then
/// one page directory of 2 MiB pages per GiB.
fn page_tables(at: u64, gib: u64) -> Vec<u8> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let pdpt = at + PAGE;
    let mut t = Vec::new();
    let mut entry = |v: u64| t.extend_from_slice(&v.to_le_bytes());
    entry(pdpt | PRESENT_RW);
    (1..512).for_each(|_| entry(0));
    for i in 0..512 {
        entry(if i < gib {
            (pdpt + PAGE * (i + 1)) | PRESENT_RW
        } else {
            0
        });
    }
    for i in 0..gib {
        for j in 0..512 {
            entry(((i << 30) | (j << 21)) | PAGE_SIZE_2M | PRESENT_RW);
        }
    }
    t
}

/// The ELF64 file around `image`; with `pvh`, a PT_NOTE segment with the PVH entry.
fn elf(image: &[u8], pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let note_offset = u64::from(EHDR_SIZE) + u64::from(PHDR_SIZE) * u64::from(phnum);
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz: "Xen\0"
    note.extend_from_slice(&4u32.to_le_bytes()); // n_descsz: a 32-bit address
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u32_of(LOAD_ADDR, "the PVH entry").to_le_bytes());

    let mut f = Vec::new();
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE, padding.
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    f.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let size = len_u64(image);
    // PT_LOAD, RWX.
    phdr(&mut f, 1, 7, IMAGE_OFFSET, LOAD_ADDR, size, PAGE);
    if pvh {
        // PT_NOTE, R.
        phdr(&mut f, 4, 4, note_offset, 0, len_u64(&note), 4);
        f.extend_from_slice(&note);
    }
    assert!(len_u64(&f) <= IMAGE_OFFSET);
    f.resize(
        usize::try_from(IMAGE_OFFSET).expect("4 KiB fits in usize"),
        0,
    );
    f.extend_from_slice(image);
    f
}

fn phdr(f: &mut Vec<u8>, p_type: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64) {
    f.extend_from_slice(&p_type.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&size.to_le_bytes()); // p_filesz
    f.extend_from_slice(&size.to_le_bytes()); // p_memsz
    f.extend_from_slice(&align.to_le_bytes());
}

/// The data that follows the code.
#[derive(Debug, Default)]
struct Data {
    bytes: Vec<u8>,
}

impl Data {
    /// Appends `bytes`, returning their offset in the data.
    fn add(&mut self, bytes: &[u8]) -> usize {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        at
    }
}

/// What an absolute 32-bit address field points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// This offset in the data.
    Data(usize),
    /// The PML4 of the guest's own page tables.
    PageTables,
}

/// The general registers the code uses (their encoding numbers; no REX.R/REX.B ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ax = 0,
    Cx = 1,
    Dx = 2,
    Bx = 3,
    /// Never the base of [`Asm::alu_mem`] (that needs a SIB byte).
    Sp = 4,
    Bp = 5,
    Si = 6,
    Di = 7,
}

/// `op r/m, reg` instructions (opcode of the `r/m, reg` form).
#[derive(Debug, Clone, Copy)]
enum Alu {
    Add = 0x01,
    Xor = 0x31,
    Cmp = 0x39,
    Mov = 0x89,
    Test = 0x85,
}

/// `op r/m32, imm8` instructions (the `/digit` of opcode `83`, sign-extended imm8).
#[derive(Debug, Clone, Copy)]
enum AluImm {
    Add = 0,
    And = 4,
    Cmp = 7,
}

/// Branch conditions (the low nibble of `Jcc`).
#[derive(Debug, Clone, Copy)]
enum Cond {
    Below = 0x2,
    AboveOrEqual = 0x3,
    Zero = 0x4,
    NotZero = 0x5,
}

#[derive(Debug, Clone, Copy)]
struct Label(usize);

/// The line a counter prints: `text` (offset and length in the data) is its prefix,
/// `digits` how many digits BX fills (16, or 8 in 32-bit code), `newline` the `\n`.
#[derive(Debug, Clone, Copy)]
struct CounterLine {
    text: (usize, usize),
    digits: usize,
    newline: (usize, usize),
}

/// `mov sreg, r32` segment register numbers.
#[derive(Debug, Clone, Copy)]
enum Sreg {
    Es = 0,
    Ss = 2,
    Ds = 3,
}

/// `op r/m32, imm8` shifts (the `/digit` of opcode `C1`).
#[derive(Debug, Clone, Copy)]
enum Shift {
    Shl = 4,
    Shr = 5,
}

fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | (reg << 3) | rm
}

/// A tiny x86 assembler: 32-bit protected-mode code, or 64-bit code with `long`, where
/// "word" instructions ([`Asm::alu`], [`Asm::alu_mem`], [`Asm::dec`]) take 64-bit
/// operands.
#[derive(Debug)]
struct Asm {
    long: bool,
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// rel32 fields to patch: (offset of the field, label).
    rel: Vec<(usize, Label)>,
    /// abs32 fields to patch: (offset of the field, what it points at).
    abs: Vec<(usize, Target)>,
}

impl Asm {
    fn new(long: bool) -> Self {
        Asm {
            long,
            code: Vec::new(),
            labels: Vec::new(),
            rel: Vec::new(),
            abs: Vec::new(),
        }
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }

    fn rex_w(&mut self) {
        if self.long {
            self.emit(&[0x48]);
        }
    }

    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    // ---- Instructions ----

    /// `mov r32, imm32` (zero-extends to 64 bits in long mode).
    fn mov_r32(&mut self, r: Reg, imm: u32) {
        self.emit(&[0xb8 + r as u8]);
        self.emit(&imm.to_le_bytes());
    }

    /// `mov r64, imm64` (long mode only).
    fn mov_r64(&mut self, r: Reg, imm: u64) {
        assert!(self.long, "mov r64, imm64 exists only in long mode");
        self.emit(&[0x48, 0xb8 + r as u8]);
        self.emit(&imm.to_le_bytes());
    }

    /// `mov r32, imm32` with the address of `t`.
    fn mov_r32_abs(&mut self, r: Reg, t: Target) {
        self.mov_r32(r, 0);
        self.abs.push((self.code.len() - 4, t));
    }

    /// `mov dx, imm16`.
    fn mov_dx(&mut self, imm: u16) {
        self.emit(&[0x66, 0xba]);
        self.emit(&imm.to_le_bytes());
    }

    /// `mov al, imm8`.
    fn mov_al(&mut self, imm: u8) {
        self.emit(&[0xb0, imm]);
    }

    /// `out dx, al`.
    fn out_dx_al(&mut self) {
        self.emit(&[0xee]);
    }

    /// `in al, dx`.
    fn in_al_dx(&mut self) {
        self.emit(&[0xec]);
    }

    /// `test al, imm8`.
    fn test_al(&mut self, imm: u8) {
        self.emit(&[0xa8, imm]);
    }

    fn lodsb(&mut self) {
        self.emit(&[0xac]);
    }

    fn cld(&mut self) {
        self.emit(&[0xfc]);
    }

    fn cli(&mut self) {
        self.emit(&[0xfa]);
    }

    fn hlt(&mut self) {
        self.emit(&[0xf4]);
    }

    fn ud2(&mut self) {
        self.emit(&[0x0f, 0x0b]);
    }

    /// `op dst, src` on words (`op r/m, reg` with a register r/m).
    fn alu(&mut self, op: Alu, dst: Reg, src: Reg) {
        self.rex_w();
        self.emit(&[op as u8, modrm(0b11, src as u8, dst as u8)]);
    }

    /// `op [base], src` on words. `base` is never SP or BP, whose plain forms mean
    /// something else.
    fn alu_mem(&mut self, op: Alu, base: Reg, src: Reg) {
        self.rex_w();
        self.emit(&[op as u8, modrm(0b00, src as u8, base as u8)]);
    }

    /// `dec r` on words (`FF /1`; the one-byte forms are REX prefixes in long mode).
    fn dec(&mut self, r: Reg) {
        self.rex_w();
        self.emit(&[0xff, modrm(0b11, 1, r as u8)]);
    }

    /// `inc r` on words (`FF /0`).
    fn inc(&mut self, r: Reg) {
        self.rex_w();
        self.emit(&[0xff, modrm(0b11, 0, r as u8)]);
    }

    /// `op dst, src` on 32-bit registers in either mode (no REX.W).
    fn alu32(&mut self, op: Alu, dst: Reg, src: Reg) {
        self.emit(&[op as u8, modrm(0b11, src as u8, dst as u8)]);
    }

    /// `op r32, imm8` (sign-extended; `83 /digit ib`).
    fn alu32_imm8(&mut self, op: AluImm, r: Reg, imm: i8) {
        self.emit(&[0x83, modrm(0b11, op as u8, r as u8)]);
        self.emit(&imm.to_le_bytes());
    }

    /// `op [base + disp8], src` on words; `base` as for [`Asm::alu_mem`].
    fn alu_mem_disp(&mut self, op: Alu, base: Reg, disp: u8, src: Reg) {
        self.rex_w();
        self.emit(&[op as u8, modrm(0b01, src as u8, base as u8), disp]);
    }

    /// `rol r, imm8` on words (`C1 /0 ib`).
    fn rol(&mut self, r: Reg, imm: u8) {
        self.rex_w();
        self.emit(&[0xc1, modrm(0b11, 0, r as u8), imm]);
    }

    /// Unsigned `div r` on words (`F7 /6`): DX:AX / r, quotient to AX, remainder to DX.
    fn div(&mut self, r: Reg) {
        self.rex_w();
        self.emit(&[0xf7, modrm(0b11, 6, r as u8)]);
    }

    /// `mov dword [base + disp8], imm32`.
    fn mov_mem32_imm(&mut self, base: Reg, disp: u8, imm: u32) {
        self.emit(&[0xc7, modrm(0b01, 0, base as u8), disp]);
        self.emit(&imm.to_le_bytes());
    }

    /// `cmp dword [base + disp8], imm32`.
    fn cmp_mem32_imm(&mut self, base: Reg, disp: u8, imm: u32) {
        self.emit(&[0x81, modrm(0b01, 7, base as u8), disp]);
        self.emit(&imm.to_le_bytes());
    }

    /// `mov cr3, r`.
    fn mov_cr3(&mut self, r: Reg) {
        self.emit(&[0x0f, 0x22, modrm(0b11, 3, r as u8)]);
    }

    /// `mov sreg, r32` (`8E /r`).
    fn mov_sreg(&mut self, sreg: Sreg, r: Reg) {
        self.emit(&[0x8e, modrm(0b11, sreg as u8, r as u8)]);
    }

    /// `mov r32, dword [base]` (`8B /r`); `base` as for [`Asm::alu_mem`].
    fn load32(&mut self, dst: Reg, base: Reg) {
        self.emit(&[0x8b, modrm(0b00, dst as u8, base as u8)]);
    }

    /// `shl`/`shr r32, imm8` (`C1 /digit ib`).
    fn shift32(&mut self, op: Shift, r: Reg, imm: u8) {
        self.emit(&[0xc1, modrm(0b11, op as u8, r as u8), imm]);
    }

    /// `add r32, imm32` (`81 /0 id`).
    fn add32_imm32(&mut self, r: Reg, imm: u32) {
        self.emit(&[0x81, modrm(0b11, 0, r as u8)]);
        self.emit(&imm.to_le_bytes());
    }

    /// `lea r32, [index * 8 + disp32]` (`8D /r`, SIB with no base).
    fn lea32_index8(&mut self, dst: Reg, index: Reg, disp: u32) {
        self.emit(&[0x8d, modrm(0b00, dst as u8, 0b100)]);
        self.emit(&[modrm(0b11, index as u8, 0b101)]);
        self.emit(&disp.to_le_bytes());
    }

    /// `imul dst, src` on words (`0F AF /r`).
    fn imul(&mut self, dst: Reg, src: Reg) {
        self.rex_w();
        self.emit(&[0x0f, 0xaf, modrm(0b11, dst as u8, src as u8)]);
    }

    /// The ModRM (and SIB, displacement) of `[rsp + disp8]` with `reg`.
    fn stack_operand(&mut self, reg: Reg, disp: u8) {
        let sib = modrm(0b00, 0b100, Reg::Sp as u8);
        if disp == 0 {
            self.emit(&[modrm(0b00, reg as u8, 0b100), sib]);
        } else {
            self.emit(&[modrm(0b01, reg as u8, 0b100), sib, disp]);
        }
    }

    /// `mov [rsp + disp8], src` on words (`89 /r`).
    fn store_stack(&mut self, disp: u8, src: Reg) {
        self.rex_w();
        self.emit(&[0x89]);
        self.stack_operand(src, disp);
    }

    /// `mov dst, [rsp + disp8]` on words (`8B /r`).
    fn load_stack(&mut self, dst: Reg, disp: u8) {
        self.rex_w();
        self.emit(&[0x8b]);
        self.stack_operand(dst, disp);
    }

    /// `rep movsb`: CX bytes from SI to DI.
    fn rep_movsb(&mut self) {
        self.emit(&[0xf3, 0xa4]);
    }

    /// `lidt [abs32]` with the address of `t` (SIB form in long mode, where the plain
    /// disp32 form is RIP-relative).
    fn lidt(&mut self, t: Target) {
        if self.long {
            self.emit(&[0x0f, 0x01, modrm(0b00, 3, 0b100), 0x25]);
        } else {
            self.emit(&[0x0f, 0x01, modrm(0b00, 3, 0b101)]);
        }
        self.emit(&[0; 4]);
        self.abs.push((self.code.len() - 4, t));
    }

    /// `jmp rel32`.
    fn jmp(&mut self, l: Label) {
        self.emit(&[0xe9, 0, 0, 0, 0]);
        self.rel.push((self.code.len() - 4, l));
    }

    /// `jcc rel32`.
    fn jcc(&mut self, c: Cond, l: Label) {
        self.emit(&[0x0f, 0x80 + c as u8, 0, 0, 0, 0]);
        self.rel.push((self.code.len() - 4, l));
    }

    // ---- Sequences ----

    /// `value` to `port`.
    fn out_port(&mut self, port: u16, value: u8) {
        self.mov_dx(port);
        self.mov_al(value);
        self.out_dx_al();
    }

    /// Prints `len` bytes at `text` on COM1, polling the LSR before each.
    fn print(&mut self, text: Target, len: usize) {
        let len = u32::try_from(len).expect("a printed string is shorter than 4 GiB");
        self.cld();
        self.mov_r32_abs(Reg::Si, text);
        self.mov_r32(Reg::Cx, len);
        let next = self.label();
        let wait = self.label();
        self.bind(next);
        self.mov_dx(COM1_LSR);
        self.bind(wait);
        self.in_al_dx();
        self.test_al(LSR_THR_EMPTY);
        self.jcc(Cond::Zero, wait);
        self.mov_dx(COM1);
        self.lodsb();
        self.out_dx_al();
        self.dec(Reg::Cx);
        self.jcc(Cond::NotZero, next);
    }

    /// DI = first address, CX = count, BX = seed (its low half in 32-bit code), SI =
    /// stride.
    fn pattern_setup(&mut self, p: &Pages, seed: u64) {
        if self.long {
            self.mov_r64(Reg::Di, p.start);
            self.mov_r64(Reg::Cx, p.count);
            self.mov_r64(Reg::Bx, seed);
            self.mov_r64(Reg::Si, p.stride);
        } else {
            self.mov_r32(Reg::Di, u32_of(p.start, "a PVH pattern start"));
            self.mov_r32(Reg::Cx, u32_of(p.count, "a PVH pattern count"));
            self.mov_r32(Reg::Bx, low32(seed));
            self.mov_r32(Reg::Si, u32_of(p.stride, "a PVH pattern stride"));
        }
    }

    /// AX = the pattern at DI (the low half in 32-bit code).
    fn pattern_value(&mut self) {
        self.alu(Alu::Mov, Reg::Ax, Reg::Di);
        self.alu(Alu::Xor, Reg::Ax, Reg::Bx);
    }

    /// Advances DI by the stride and loops to `top` while CX counts down.
    fn pattern_next(&mut self, top: Label) {
        self.alu(Alu::Add, Reg::Di, Reg::Si);
        self.dec(Reg::Cx);
        self.jcc(Cond::NotZero, top);
    }

    fn pattern_write(&mut self, seed: u64) {
        let top = self.label();
        self.bind(top);
        self.pattern_value();
        self.alu_mem(Alu::Mov, Reg::Di, Reg::Ax);
        if !self.long {
            // The address is below 4 GiB: the high half is the seed's.
            self.mov_mem32_imm(Reg::Di, 4, high32(seed));
        }
        self.pattern_next(top);
    }

    fn pattern_check(&mut self, seed: u64, ok: (usize, usize), bad: (usize, usize)) {
        let top = self.label();
        let fail = self.label();
        let done = self.label();
        self.bind(top);
        self.pattern_value();
        self.alu_mem(Alu::Cmp, Reg::Di, Reg::Ax);
        self.jcc(Cond::NotZero, fail);
        if !self.long {
            self.cmp_mem32_imm(Reg::Di, 4, high32(seed));
            self.jcc(Cond::NotZero, fail);
        }
        self.pattern_next(top);
        self.print(Target::Data(ok.0), ok.1);
        self.jmp(done);
        self.bind(fail);
        self.print(Target::Data(bad.0), bad.1);
        self.bind(done);
    }

    /// `r = imm`: `mov r64, imm64` in long mode, `mov r32, imm32` in 32-bit code.
    fn mov_word(&mut self, r: Reg, imm: u64, what: &str) {
        if self.long {
            self.mov_r64(r, imm);
        } else {
            self.mov_r32(r, u32_of(imm, what));
        }
    }

    /// The [`TinyGuest::counter`] loop, which never ends. BX = `n` throughout; per pass
    /// AX, CX, DX, SI, DI and BP are recomputed. Prints every `print_every` passes with
    /// a `line`, never without one. With `on_stack` (an AP of
    /// [`TinyGuest::counter_smp`], long mode), where `n` goes and the first page are
    /// the qwords at `[rsp]` and `[rsp + 8]` instead of [`COUNTER_ADDR`] and `p.start`.
    fn counter(&mut self, p: &Pages, print_every: u64, line: Option<CounterLine>, on_stack: bool) {
        let pass = self.label();
        let fill = self.label();
        let page = self.label();
        // n = 0.
        self.alu32(Alu::Xor, Reg::Bx, Reg::Bx);
        self.bind(pass);
        // n += 1, and store it at COUNTER_ADDR.
        self.inc(Reg::Bx);
        if on_stack {
            self.load_stack(Reg::Di, 0);
        } else {
            self.mov_r32(Reg::Di, u32_of(COUNTER_ADDR, "the counter address"));
        }
        self.alu_mem(Alu::Mov, Reg::Di, Reg::Bx);
        if !self.long {
            self.mov_mem32_imm(Reg::Di, 4, 0);
        }
        if let Some(line) = line {
            self.counter_line(print_every, line, fill);
        }
        self.bind(fill);
        // BP = the part of counter_word that does not depend on the address.
        self.alu(Alu::Mov, Reg::Bp, Reg::Bx);
        if self.long {
            self.rol(Reg::Bp, 32);
            self.mov_r64(Reg::Ax, COUNTER_SEED);
            self.alu(Alu::Xor, Reg::Bp, Reg::Ax);
        } else {
            // The high half of the word; DX = its low half's seed.
            self.mov_r32(Reg::Ax, high32(COUNTER_SEED));
            self.alu(Alu::Xor, Reg::Bp, Reg::Ax);
            self.mov_r32(Reg::Dx, low32(COUNTER_SEED));
        }
        if on_stack {
            self.load_stack(Reg::Di, 8);
        } else {
            self.mov_word(Reg::Di, p.start, "a PVH counter start");
        }
        self.mov_word(Reg::Cx, p.count, "a PVH counter's page count");
        self.mov_word(Reg::Si, p.stride, "a PVH counter stride");
        self.bind(page);
        self.alu_mem(Alu::Mov, Reg::Di, Reg::Bx);
        if self.long {
            self.alu(Alu::Mov, Reg::Ax, Reg::Di);
            self.alu(Alu::Xor, Reg::Ax, Reg::Bp);
            self.alu_mem_disp(Alu::Mov, Reg::Di, 8, Reg::Ax);
        } else {
            self.mov_mem32_imm(Reg::Di, 4, 0);
            self.alu(Alu::Mov, Reg::Ax, Reg::Di);
            self.alu(Alu::Xor, Reg::Ax, Reg::Dx);
            self.alu_mem_disp(Alu::Mov, Reg::Di, 8, Reg::Ax);
            self.alu_mem_disp(Alu::Mov, Reg::Di, 12, Reg::Bp);
        }
        self.pattern_next(page);
        self.jmp(pass);
    }

    /// A counter pass's print: on to `fill` unless `n` (BX) is a multiple of
    /// `print_every`, else `line` with `n` in hex.
    fn counter_line(&mut self, print_every: u64, line: CounterLine, fill: Label) {
        let digit = self.label();
        let wait = self.label();
        let decimal = self.label();
        // Print when n % print_every == 0.
        self.alu32(Alu::Xor, Reg::Dx, Reg::Dx);
        self.alu(Alu::Mov, Reg::Ax, Reg::Bx);
        self.mov_word(Reg::Cx, print_every, "a PVH counter's print_every");
        self.div(Reg::Cx);
        self.alu(Alu::Test, Reg::Dx, Reg::Dx);
        self.jcc(Cond::NotZero, fill);
        self.print(Target::Data(line.text.0), line.text.1);
        // The digits of n from the top: rotate the next one into the low nibble of BP.
        self.alu(Alu::Mov, Reg::Bp, Reg::Bx);
        self.mov_r32(
            Reg::Cx,
            u32::try_from(line.digits).expect("16 digits at most"),
        );
        self.bind(digit);
        self.mov_dx(COM1_LSR);
        self.bind(wait);
        self.in_al_dx();
        self.test_al(LSR_THR_EMPTY);
        self.jcc(Cond::Zero, wait);
        self.rol(Reg::Bp, 4);
        self.alu32(Alu::Mov, Reg::Ax, Reg::Bp);
        self.alu32_imm8(AluImm::And, Reg::Ax, 0xf);
        self.alu32_imm8(AluImm::Cmp, Reg::Ax, 10);
        self.jcc(Cond::Below, decimal);
        self.alu32_imm8(AluImm::Add, Reg::Ax, 0x27); // 'a' - 10 - '0'
        self.bind(decimal);
        self.alu32_imm8(AluImm::Add, Reg::Ax, 0x30); // '0'
        self.mov_dx(COM1);
        self.out_dx_al();
        self.dec(Reg::Cx);
        self.jcc(Cond::NotZero, digit);
        self.print(Target::Data(line.newline.0), line.newline.1);
    }

    /// Spins `rounds` times (`dec cx; jnz`).
    fn delay(&mut self, rounds: u32) {
        let top = self.label();
        self.mov_r32(Reg::Cx, rounds);
        self.bind(top);
        self.dec(Reg::Cx);
        self.jcc(Cond::NotZero, top);
    }

    /// The BSP's part of a [`TinyGuest::counter_smp`] before its own counter:
    /// software-enables its local APIC, copies the `len` bytes of trampoline at `code`
    /// to [`AP_TRAMPOLINE`], then sends vCPUs 1..`cpus` an INIT IPI and, twice, a
    /// start-up IPI with the trampoline's vector, by APIC ID through the xAPIC ICR
    /// (high half, then the low half, whose write sends).
    fn start_aps(&mut self, code: Target, len: usize, cpus: u32) {
        self.mov_r32(Reg::Di, LAPIC + LAPIC_SVR);
        self.mov_mem32_imm(Reg::Di, 0, SVR_ENABLE);
        self.cld();
        self.mov_r32_abs(Reg::Si, code);
        self.mov_r32(Reg::Di, u32_of(AP_TRAMPOLINE, "the AP trampoline"));
        self.mov_r32(
            Reg::Cx,
            u32::try_from(len).expect("the trampoline is one page"),
        );
        self.rep_movsb();
        let vector = u32_of(AP_TRAMPOLINE >> 12, "the start-up vector");
        for (command, rounds) in [
            (ICR_INIT, INIT_DELAY),
            (ICR_STARTUP | vector, STARTUP_DELAY),
            (ICR_STARTUP | vector, STARTUP_DELAY),
        ] {
            for ap in 1..cpus {
                self.mov_r32(Reg::Di, LAPIC + LAPIC_ICR_LOW);
                self.mov_mem32_imm(Reg::Di, ICR_HIGH_DISP, ap << 24);
                self.mov_mem32_imm(Reg::Di, 0, command);
            }
            self.delay(rounds);
        }
    }

    /// `cli; hlt` in a loop.
    fn park(&mut self) {
        let top = self.label();
        self.bind(top);
        self.cli();
        self.hlt();
        self.jmp(top);
    }

    /// Code, then `data`, then (with `gib`) page tables mapping that many GiB on the
    /// next page boundary; every address field patched.
    fn link(mut self, data: &[u8], gib: Option<u64>) -> Vec<u8> {
        let data_addr = LOAD_ADDR + len_u64(&self.code);
        let tables_addr = (data_addr + len_u64(data)).next_multiple_of(PAGE);
        for &(at, label) in &self.rel {
            let to = self.labels[label.0].expect("every label is bound");
            let from = at + 4;
            let disp = i64::try_from(to)
                .ok()
                .zip(i64::try_from(from).ok())
                .and_then(|(to, from)| i32::try_from(to - from).ok())
                .expect("tiny code is shorter than 2 GiB");
            self.code[at..at + 4].copy_from_slice(&disp.to_le_bytes());
        }
        for &(at, target) in &self.abs {
            let addr = match target {
                Target::Data(offset) => data_addr + len_u64(&data[..offset]),
                Target::PageTables => tables_addr,
            };
            self.code[at..at + 4].copy_from_slice(&u32_of(addr, "an image address").to_le_bytes());
        }
        let mut image = self.code;
        image.extend_from_slice(data);
        if let Some(gib) = gib {
            let pad = tables_addr - LOAD_ADDR;
            image.resize(usize::try_from(pad).expect("the image is small"), 0);
            image.extend(page_tables(tables_addr, gib));
        }
        image
    }
}

/// Where the AP trampoline keeps its GDT, the GDT pointer and its 64-bit code.
const TRAMPOLINE_GDT: u64 = 0x40;
const TRAMPOLINE_GDT_POINTER: u64 = 0x58;
const TRAMPOLINE_CODE64: u64 = 0x60;
/// The trampoline's GDT: null, 64-bit code (selector 0x08), flat data (0x10), as the
/// VMM's boot GDT.
const TRAMPOLINE_GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const CODE64_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u32 = 0x10;

/// The 16-bit real-mode start of the AP trampoline at [`AP_TRAMPOLINE`] (entered at
/// `cs:ip` = `AP_TRAMPOLINE >> 4 : 0`): loads the trampoline's GDT, enables PAE,
/// loads the VMM's PML4, sets EFER.LME, then paging and protection at once, and far
/// jumps to the 64-bit code at `TRAMPOLINE_CODE64`.
fn trampoline16() -> Vec<u8> {
    let abs = |offset: u64| u32_of(AP_TRAMPOLINE + offset, "a trampoline address");
    let gdt_pointer = u16::try_from(AP_TRAMPOLINE + TRAMPOLINE_GDT_POINTER)
        .expect("the trampoline is below 64 KiB");
    let mut c = Vec::new();
    c.extend_from_slice(&[0xfa]); // cli
    c.extend_from_slice(&[0x31, 0xc0]); // xor ax, ax
    c.extend_from_slice(&[0x8e, 0xd8]); // mov ds, ax
    c.extend_from_slice(&[0x66, 0x0f, 0x01, 0x16]); // lgdtd [disp16]
    c.extend_from_slice(&gdt_pointer.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xb8, 0x20, 0, 0, 0]); // mov eax, CR4.PAE
    c.extend_from_slice(&[0x0f, 0x22, 0xe0]); // mov cr4, eax
    c.extend_from_slice(&[0x66, 0xb8]); // mov eax, VMM_PML4
    c.extend_from_slice(&u32_of(VMM_PML4, "the VMM's PML4").to_le_bytes());
    c.extend_from_slice(&[0x0f, 0x22, 0xd8]); // mov cr3, eax
    c.extend_from_slice(&[0x66, 0xb9, 0x80, 0, 0, 0xc0]); // mov ecx, IA32_EFER
    c.extend_from_slice(&[0x66, 0x31, 0xd2]); // xor edx, edx
    c.extend_from_slice(&[0x66, 0xb8, 0, 0x01, 0, 0]); // mov eax, EFER.LME
    c.extend_from_slice(&[0x0f, 0x30]); // wrmsr
    c.extend_from_slice(&[0x66, 0xb8, 0x11, 0, 0, 0x80]); // mov eax, PG | ET | PE
    c.extend_from_slice(&[0x0f, 0x22, 0xc0]); // mov cr0, eax
    c.extend_from_slice(&[0x66, 0xea]); // jmp far ptr16:32
    c.extend_from_slice(&abs(TRAMPOLINE_CODE64).to_le_bytes());
    c.extend_from_slice(&CODE64_SELECTOR.to_le_bytes());
    c
}

/// The AP trampoline page's contents: [`trampoline16`], the GDT and its pointer, then
/// `code64` (position-independent long-mode code) at `TRAMPOLINE_CODE64`.
fn ap_trampoline(code64: &[u8]) -> Vec<u8> {
    let mut t = trampoline16();
    assert!(
        len_u64(&t) <= TRAMPOLINE_GDT,
        "the 16-bit start fits before the GDT"
    );
    t.resize(at_usize(TRAMPOLINE_GDT), 0);
    for entry in TRAMPOLINE_GDT_ENTRIES {
        t.extend_from_slice(&entry.to_le_bytes());
    }
    assert_eq!(len_u64(&t), TRAMPOLINE_GDT_POINTER);
    let limit = u16::try_from(TRAMPOLINE_GDT_ENTRIES.len() * 8 - 1).expect("3 entries");
    t.extend_from_slice(&limit.to_le_bytes());
    t.extend_from_slice(&u32_of(AP_TRAMPOLINE + TRAMPOLINE_GDT, "the GDT").to_le_bytes());
    t.resize(at_usize(TRAMPOLINE_CODE64), 0);
    t.extend_from_slice(code64);
    assert!(len_u64(&t) <= PAGE, "the AP trampoline fits in a page");
    t
}

/// An AP's long-mode code in the trampoline (position-independent: no data, relative
/// jumps only): flat data segments; `i` = its LAPIC ID (parked unless below `cpus`);
/// RSP = the top of the page at `COUNTER_ADDR + i * 4096`, less the two qwords there:
/// `COUNTER_ADDR + 8 * i` and the first of its `per_cpu` pages of `pages`; then the
/// counter loop on those, without a line.
fn ap_code(pages: &Pages, per_cpu: u64, cpus: u32) -> Vec<u8> {
    let mut a = Asm::new(true);
    let park = a.label();
    a.mov_r32(Reg::Ax, DATA_SELECTOR);
    a.mov_sreg(Sreg::Ds, Reg::Ax);
    a.mov_sreg(Sreg::Es, Reg::Ax);
    a.mov_sreg(Sreg::Ss, Reg::Ax);
    a.mov_r32(Reg::Si, LAPIC + LAPIC_ID);
    a.load32(Reg::Ax, Reg::Si);
    a.shift32(Shift::Shr, Reg::Ax, 24);
    a.alu32_imm8(
        AluImm::Cmp,
        Reg::Ax,
        i8::try_from(cpus).expect("at most 16 vCPUs"),
    );
    a.jcc(Cond::AboveOrEqual, park);
    a.alu32(Alu::Mov, Reg::Dx, Reg::Ax);
    a.shift32(Shift::Shl, Reg::Dx, 12);
    a.add32_imm32(Reg::Dx, u32_of(COUNTER_ADDR + PAGE - 16, "the AP stacks"));
    a.alu32(Alu::Mov, Reg::Sp, Reg::Dx);
    a.lea32_index8(
        Reg::Cx,
        Reg::Ax,
        u32_of(COUNTER_ADDR, "the counter address"),
    );
    a.store_stack(0, Reg::Cx);
    a.mov_r64(Reg::Cx, per_cpu * pages.stride);
    a.imul(Reg::Cx, Reg::Ax);
    a.mov_r64(Reg::Dx, pages.start);
    a.alu(Alu::Add, Reg::Cx, Reg::Dx);
    a.store_stack(8, Reg::Cx);
    let mine = Pages {
        count: per_cpu,
        ..*pages
    };
    a.counter(&mine, 1, None, true);
    a.bind(park);
    a.park();
    a.link(&[], None)
}

fn at_usize(v: u64) -> usize {
    usize::try_from(v).expect("a trampoline offset fits in usize")
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked to 32 bits")
}

fn high32(v: u64) -> u32 {
    u32::try_from(v >> 32).expect("shifted to 32 bits")
}

#[cfg(test)]
mod tests;
