//! Tiny PowerPC64 (little-endian) test guests for rangevm's sPAPR machine:
//! hand-assembled ELF kernels that `rangevm run --kernel FILE` boots inside the emulated
//! PowerPC host in milliseconds.
//!
//! ```
//! use rangevm_tests::tiny_ppc64::{PpcExit, TinyPpcGuest};
//!
//! let elf = TinyPpcGuest::new().print("hello\n").exit(PpcExit::PowerOff).build();
//! assert_eq!(&elf[..4], b"\x7fELF");
//! assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 21); // EM_PPC64
//! ```
//!
//! The file is an ELF64 little-endian `ET_EXEC` with one `PT_LOAD` segment at physical
//! and virtual [`LOAD_ADDR`], entered there. The VMM enters it as it enters a vmlinux:
//! real mode, MSR = SF | ME | LE, r3 = the device tree (unused). The code uses no stack
//! and no interrupts. It talks to the VMM with hypercalls (`sc 1`, r3 = the number):
//! H_PUT_TERM_CHAR for the console (terminal [`VTY_TERMNO`], up to 16 bytes packed
//! big-endian into r6/r7) and H_RTAS with a big-endian `rtas_args` kept after the code
//! for power-off, reboot or `ibm,os-term`.
//!
//! [`TinyPpcGuest::counter`] is a last step that never ends, for migration tests, with
//! the x86 counter's semantics and console lines (so [`crate::tiny::parse_counter_lines`]
//! and [`crate::tiny::check_consecutive`] read both): pass `n` (from 1) writes `n` and
//! [`crate::tiny::counter_word`] at the start of every page of its range, keeps `n` at
//! [`COUNTER_ADDR`], and every `print_every` passes prints `pass <16 hex digits>\n`.

mod asm;

use std::path::Path;

use asm::{Asm, Cond};

use crate::tiny::{COUNTER_PREFIX, COUNTER_SEED};

/// Where the image is loaded and entered (64 KiB: one host page, above the exception
/// vectors).
pub const LOAD_ADDR: u64 = 0x1_0000;
/// The console's terminal number (`/vdevice/vty@30000000`).
pub const VTY_TERMNO: u64 = 0x3000_0000;
/// Where a counter keeps its pass number (below the image).
pub const COUNTER_ADDR: u64 = 0x8000;
/// The RTAS tokens of rangevm's sPAPR machine.
pub const RTAS_POWER_OFF: u32 = 0x2004;
/// `system-reboot`.
pub const RTAS_SYSTEM_REBOOT: u32 = 0x2005;
/// `ibm,os-term`.
pub const RTAS_OS_TERM: u32 = 0x2009;
/// The message an [`PpcExit::OsTerm`] passes.
pub const OS_TERM_MESSAGE: &str = "tiny guest gives up";

const H_PUT_TERM_CHAR: i16 = 0x58;
const H_RTAS: u64 = 0xf000;
const EM_PPC64: u16 = 21;
/// File offset of the image.
const IMAGE_OFFSET: usize = 0x1000;

/// How the guest ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PpcExit {
    /// RTAS `power-off` (rangevm exits 0).
    PowerOff,
    /// RTAS `system-reboot` (rangevm exits 3).
    Reboot,
    /// RTAS `ibm,os-term` with [`OS_TERM_MESSAGE`] (rangevm exits 5).
    OsTerm,
    /// Spins forever.
    Spin,
}

#[derive(Debug, Clone)]
enum Step {
    Print(Vec<u8>),
    Counter {
        start: u64,
        pages: u64,
        stride: u64,
        print_every: u64,
    },
}

/// A tiny guest being described.
#[derive(Debug, Clone)]
pub struct TinyPpcGuest {
    steps: Vec<Step>,
    exit: PpcExit,
    termno: u64,
}

impl Default for TinyPpcGuest {
    fn default() -> Self {
        Self::new()
    }
}

/// Up to 8 bytes packed big-endian, the first in the top byte.
fn pack(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
    u64::from_be_bytes(w)
}

impl TinyPpcGuest {
    /// A guest that powers off at once.
    pub fn new() -> Self {
        TinyPpcGuest {
            steps: Vec::new(),
            exit: PpcExit::PowerOff,
            termno: VTY_TERMNO,
        }
    }

    /// Uses another terminal number (a bad one: the VMM answers H_PARAMETER).
    pub fn termno(mut self, termno: u64) -> Self {
        self.termno = termno;
        self
    }

    /// Prints `text` on the console.
    pub fn print(mut self, text: &str) -> Self {
        self.steps.push(Step::Print(text.as_bytes().to_vec()));
        self
    }

    /// The never-ending counter (module docs) over `pages` pages of `stride` bytes from
    /// `start`, printing every `print_every` passes (at least 1).
    pub fn counter(mut self, start: u64, pages: u64, stride: u64, print_every: u64) -> Self {
        self.steps.push(Step::Counter {
            start,
            pages,
            stride,
            print_every: print_every.max(1),
        });
        self
    }

    /// How it ends (after the steps; a counter never gets there).
    pub fn exit(mut self, exit: PpcExit) -> Self {
        self.exit = exit;
        self
    }

    /// One H_PUT_TERM_CHAR of up to 16 constant bytes.
    fn put(&self, a: &mut Asm, chunk: &[u8]) {
        a.li(3, H_PUT_TERM_CHAR);
        a.load64(4, self.termno);
        a.li(5, i16::try_from(chunk.len()).expect("at most 16 bytes"));
        a.load64(6, pack(&chunk[..chunk.len().min(8)]));
        a.load64(7, pack(chunk.get(8..).unwrap_or(&[])));
        a.sc1();
    }

    fn counter_code(&self, a: &mut Asm, start: u64, pages: u64, stride: u64, every: u64) {
        // r14 n, r15 page, r16 end, r17 stride, r18 seed, r20 &n, r23 print_every.
        a.li(14, 0);
        a.load64(16, start + pages * stride);
        a.load64(17, stride);
        a.load64(18, COUNTER_SEED);
        a.load64(20, COUNTER_ADDR);
        a.load64(23, every);
        let pass = a.label();
        a.bind(pass);
        a.addi(14, 14, 1);
        a.std(14, 0, 20);
        a.load64(15, start);
        let page = a.label();
        a.bind(page);
        a.std(14, 0, 15);
        a.rotldi(21, 14, 32);
        a.xor(21, 21, 15);
        a.xor(21, 21, 18);
        a.std(21, 8, 15);
        a.add(15, 15, 17);
        a.cmpld(15, 16);
        a.bc(Cond::Lt, page);
        // Print when n is a multiple of print_every.
        a.divdu(22, 14, 23);
        a.mulld(22, 22, 23);
        a.cmpld(22, 14);
        a.bc(Cond::Ne, pass);
        self.put(a, COUNTER_PREFIX.as_bytes());
        a.mr(24, 14);
        for _ in 0..2 {
            // Eight hex digits, top nibble first, shifted into r6.
            a.li(6, 0);
            a.li(25, 8);
            a.mtctr(25);
            let digit = a.label();
            let decimal = a.label();
            let got = a.label();
            a.bind(digit);
            a.rotldi(24, 24, 4);
            a.andi_dot(26, 24, 0xf);
            a.cmpldi(26, 10);
            a.bc(Cond::Lt, decimal);
            a.addi(26, 26, i16::from(b'a') - 10);
            a.b(got);
            a.bind(decimal);
            a.addi(26, 26, i16::from(b'0'));
            a.bind(got);
            a.sldi(6, 6, 8);
            a.or(6, 6, 26);
            a.bdnz(digit);
            a.li(3, H_PUT_TERM_CHAR);
            a.load64(4, self.termno);
            a.li(5, 8);
            a.li(7, 0);
            a.sc1();
        }
        self.put(a, b"\n");
        a.b(pass);
    }

    /// The ELF file.
    pub fn build(&self) -> Vec<u8> {
        let mut a = Asm::new();
        // The data after the code: the rtas_args of the exit (token, nargs, nret, args,
        // rets; big-endian words), then the os-term message.
        let (token, args): (u32, Vec<u32>) = match self.exit {
            PpcExit::PowerOff => (RTAS_POWER_OFF, vec![0, 0]),
            PpcExit::Reboot => (RTAS_SYSTEM_REBOOT, vec![]),
            PpcExit::OsTerm => (RTAS_OS_TERM, vec![0]),
            PpcExit::Spin => (0, vec![]),
        };
        let words = 3 + args.len() + 1;
        let message_at = words * 4;
        for step in &self.steps {
            match step {
                Step::Print(text) => {
                    for chunk in text.chunks(16) {
                        self.put(&mut a, chunk);
                    }
                }
                &Step::Counter {
                    start,
                    pages,
                    stride,
                    print_every,
                } => self.counter_code(&mut a, start, pages, stride, print_every),
            }
        }
        let endless = self.steps.iter().any(|s| matches!(s, Step::Counter { .. }));
        if endless {
            // A counter loops for ever: no exit code after it.
        } else if self.exit == PpcExit::Spin {
            a.spin();
        } else {
            a.load64(3, H_RTAS);
            a.load_data_addr(4, 0);
            a.sc1();
            a.spin();
        }
        let code_len = a.code.len() * 4;
        let data_addr = LOAD_ADDR + code_len.next_multiple_of(8) as u64;
        let mut image = a.link(data_addr);
        image.resize(code_len.next_multiple_of(8), 0);
        let message_addr = u32::try_from(data_addr + message_at as u64).expect("low");
        let mut rtas = vec![token, u32::try_from(args.len()).expect("few"), 1];
        rtas.extend(args.iter().map(|_| {
            if self.exit == PpcExit::OsTerm {
                message_addr
            } else {
                0
            }
        }));
        rtas.push(0);
        image.extend(rtas.iter().flat_map(|w| w.to_be_bytes()));
        image.extend_from_slice(OS_TERM_MESSAGE.as_bytes());
        image.push(0);
        elf(&image)
    }

    /// Writes [`TinyPpcGuest::build`] to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.build())
    }
}

/// An ELF64 LE EM_PPC64 executable with `image` at [`LOAD_ADDR`].
fn elf(image: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; IMAGE_OFFSET];
    f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    let put =
        |f: &mut Vec<u8>, at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &EM_PPC64.to_le_bytes());
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &LOAD_ADDR.to_le_bytes());
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut f, 56, &1u16.to_le_bytes()); // e_phnum
    let len = image.len() as u64;
    put(&mut f, 64, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut f, 68, &7u32.to_le_bytes()); // RWX
    put(&mut f, 72, &(IMAGE_OFFSET as u64).to_le_bytes());
    put(&mut f, 80, &LOAD_ADDR.to_le_bytes());
    put(&mut f, 88, &LOAD_ADDR.to_le_bytes());
    put(&mut f, 96, &len.to_le_bytes());
    put(&mut f, 104, &len.to_le_bytes());
    put(&mut f, 112, &0x1_0000u64.to_le_bytes());
    f.extend_from_slice(image);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(elf: &[u8]) -> Vec<u32> {
        elf[IMAGE_OFFSET..]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
            .collect()
    }

    #[test]
    fn a_printing_guest_is_an_elf_whose_code_makes_the_console_hypercall() {
        let elf = TinyPpcGuest::new().print("0123456789abcdefXY").build();
        assert_eq!(&elf[..6], b"\x7fELF\x02\x01");
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            LOAD_ADDR
        );
        let w = words(&elf);
        // Two H_PUT_TERM_CHARs (16 then 2 bytes) and H_RTAS: three `sc 1`.
        assert_eq!(w.iter().filter(|&&x| x == 0x4400_0022).count(), 3);
        assert_eq!(w[0], 0x3860_0058, "li r3,H_PUT_TERM_CHAR first");
        // The power-off rtas_args are big-endian after the code.
        let token = RTAS_POWER_OFF.to_be_bytes();
        assert!(elf
            .windows(12)
            .any(|x| x == [&token[..], &[0, 0, 0, 2], &[0, 0, 0, 1]].concat()));
    }

    #[test]
    fn os_term_passes_the_address_of_its_message() {
        let elf = TinyPpcGuest::new().exit(PpcExit::OsTerm).build();
        let image = &elf[IMAGE_OFFSET..];
        let at = image
            .windows(4)
            .position(|x| x == RTAS_OS_TERM.to_be_bytes())
            .unwrap();
        let arg = u32::from_be_bytes(image[at + 12..at + 16].try_into().unwrap());
        let msg_off = usize::try_from(u64::from(arg) - LOAD_ADDR).unwrap();
        assert!(image[msg_off..].starts_with(OS_TERM_MESSAGE.as_bytes()));
    }

    #[test]
    fn a_counter_never_reaches_its_exit() {
        let elf = TinyPpcGuest::new()
            .counter(0x20_0000, 16, 0x1_0000, 10)
            .build();
        // No H_RTAS load (0xf000) in the code: the counter loops back.
        let w = words(&elf);
        assert!(!w.contains(&0x6063_f000));
        assert!(w.contains(&0x4400_0022));
    }
}
