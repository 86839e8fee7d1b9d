//! Writes a tiny test guest kernel (an ELF64 for `rangevm run --kernel`), for scripts
//! that measure rangevm with the same guests the tests use.
//!
//! ```text
//! tiny-guest counter --out FILE [--start ADDR] [--pages N] [--stride BYTES] [--print-every N] [--cpus N]
//! ```
//!
//! `counter`: a guest that counts passes forever, writing its pass number into each of
//! `--pages` pages from `--start` (default 16 MiB, 1 page, stride 4096) and printing
//! `pass N` every `--print-every` passes (default 1024). One page is an idle guest; many
//! pages a busy one. With `--cpus N` (2 to 16), every vCPU counts over `--pages` pages of
//! its own (run it with `rangevm run --cpus N`); only vCPU 0 prints.

use std::process::ExitCode;

use rangevm_tests::tiny::{Mode, TinyGuest};

fn number(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse()
    };
    n.ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a number"))
}

fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: tiny-guest counter --out FILE [--start ADDR] [--pages N] \
                 [--stride BYTES] [--print-every N] [--cpus N]";
    let Some((what, rest)) = args.split_first() else {
        return Err(usage.into());
    };
    if what != "counter" {
        return Err(format!("unknown guest '{what}'; {usage}"));
    }
    let (mut out, mut start, mut pages, mut stride, mut every, mut cpus) =
        (None, 16u64 << 20, 1u64, 4096u64, 1024u64, 1u64);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--out" => out = Some(value.clone()),
            "--start" => start = number(value)?,
            "--pages" => pages = number(value)?,
            "--stride" => stride = number(value)?,
            "--print-every" => every = number(value)?,
            "--cpus" => cpus = number(value)?,
            _ => return Err(format!("unknown option {flag}; {usage}")),
        }
    }
    let out = out.ok_or_else(|| format!("--out is needed; {usage}"))?;
    if pages == 0 || every == 0 || start % 4096 != 0 || stride == 0 || stride % 4096 != 0 {
        return Err(
            "--pages and --print-every must be > 0, --start and --stride multiples of 4096".into(),
        );
    }
    let guest = TinyGuest::new(Mode::Long);
    let guest = match cpus {
        1 => guest.counter(start, pages, stride, every),
        2..=16 => guest.counter_smp(
            start,
            pages,
            stride,
            every,
            u32::try_from(cpus).unwrap_or(1),
        ),
        _ => return Err("--cpus must be 1 to 16".into()),
    };
    guest
        .write_to(&out)
        .map_err(|e| format!("cannot write {out}: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tiny-guest: {e}");
            ExitCode::from(2)
        }
    }
}
