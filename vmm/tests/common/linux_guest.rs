//! What the Linux-guest scenarios share across the x86_64 and the PowerPC64 emulated
//! hosts: how the guest boots there ([`Setup`]), and reading a script's output
//! ([`Report`], [`section`], the tick parsers).

#![allow(dead_code)] // Each test file uses its own subset.

use std::time::Duration;

use rangevm_tests::{static_rangevm_ppc64le, Console, DefaultGuest, EmuHost, MARKER};

/// The emulated host, the default guest of its architecture, and how that guest boots.
pub struct Setup {
    /// The emulated host, with `rangevm` among its files (the guest's are added).
    pub host: EmuHost,
    /// The default guest.
    pub guest: DefaultGuest,
    /// The guest's memory (`--memory`).
    pub memory: &'static str,
    /// Added to the guest's command line (`pci=off` where the balloon is not on PCI).
    pub extra_cmdline: &'static str,
    /// The emulated host's page size (what migration counts pages in).
    pub host_page: u64,
}

impl Setup {
    /// The x86_64 emulated host with this build's rangevm; the balloon is on
    /// virtio-mmio, so the guest skips PCI.
    pub fn x86_64() -> Self {
        Setup {
            host: EmuHost::new().with_file(env!("CARGO_BIN_EXE_rangevm")),
            guest: DefaultGuest::build().expect("build the default guest"),
            memory: "256M",
            extra_cmdline: "pci=off",
            host_page: 4096,
        }
    }

    /// The PowerPC64 emulated host with a static ppc64le rangevm; the guest's kernel is
    /// larger than the x86_64 one and its pages are 64 KiB, so it gets more memory.
    pub fn ppc64() -> Self {
        let rangevm = static_rangevm_ppc64le().expect("build a static rangevm for ppc64le");
        Setup {
            host: EmuHost::ppc64().with_file(&rangevm),
            guest: DefaultGuest::build_ppc64().expect("build the default ppc64le guest"),
            memory: "384M",
            extra_cmdline: "",
            host_page: 65536,
        }
    }

    /// The guest's command line, running `command` (shell text) after boot.
    pub fn cmdline_running(&self, command: &str) -> String {
        format!(
            "{} {}",
            self.guest.cmdline_running(command),
            self.extra_cmdline
        )
    }

    /// The guest's command line for a shell on its console (`rangevm.shell=1`).
    pub fn cmdline_running_shell(&self) -> String {
        format!(
            "{} {} rangevm.shell=1",
            self.guest.cmdline, self.extra_cmdline
        )
    }

    /// Boots the emulated host with the guest in `/payload` and runs `script` there,
    /// at most `limit`.
    pub fn run(self, script: &str, limit: Duration) -> Console {
        let console = self
            .host
            .with_file(&self.guest.kernel)
            .with_file(&self.guest.initrd)
            .run(script, limit)
            .expect("boot the emulated host");
        eprintln!("emulated host ran {:.1} s", console.elapsed.as_secs_f64());
        console
    }
}

/// The text between the line `begin` and the line `end` (exclusive, without the line
/// breaks around it).
pub fn section<'a>(out: &'a str, begin: &str, end: &str) -> &'a str {
    let start = out
        .find(&format!("{begin}\n"))
        .map(|i| i + begin.len() + 1)
        .unwrap_or_else(|| panic!("no {begin}:\n{out}"));
    let stop = out[start..]
        .find(&format!("\n{end}"))
        .map(|i| start + i)
        .unwrap_or_else(|| panic!("no {end} after {begin}:\n{out}"));
    &out[start..stop]
}

/// The numbers of the `tick-N` lines of `text` that end with a line break (a partial
/// last line does not count).
pub fn ticks(text: &str) -> Vec<u64> {
    let whole = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
    whole
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect()
}

/// The `(tick, MemAvailable KiB)` pairs of the `tick-N avail=K end` lines of `text` that
/// end with a line break (a partial last line does not count).
pub fn avail_ticks(text: &str) -> Vec<(u64, u64)> {
    let whole = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
    whole
        .lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("tick-")?;
            let mut words = rest.split_whitespace();
            let tick = words.next()?.parse().ok()?;
            let avail = words.next()?.strip_prefix("avail=")?.parse().ok()?;
            (words.next() == Some("end")).then_some((tick, avail))
        })
        .collect()
}

/// A script's output that shows files as `NAME-BEGIN` / `NAME-END` sections and
/// prints `KEY=value` lines, with everything it showed gathered for failure messages.
pub struct Report {
    /// The whole output, carriage returns removed.
    pub out: String,
    /// The script's own lines (before its first section, `first`) and every section.
    pub logs: String,
}

impl Report {
    /// `sections` are the names the script shows, `first` the first of them.
    pub fn new(console: &Console, sections: &[&str]) -> Self {
        let out = console.output.replace('\r', "");
        let parts = sections
            .iter()
            .map(|name| {
                let text = section(&out, &format!("{name}-BEGIN"), &format!("{name}-END"));
                format!("--- {name}:\n{text}\n--- end of {name}\n")
            })
            .collect::<String>();
        let first = sections.first().map(|s| format!("{s}-BEGIN"));
        let script_out = first
            .and_then(|f| out.split_once(f.as_str()).map(|(s, _)| s.to_string()))
            .unwrap_or_else(|| out.clone());
        let logs = format!("--- script output:\n{script_out}\n--- end of script output\n{parts}");
        Report { out, logs }
    }

    /// The section `name`.
    pub fn part(&self, name: &str) -> &str {
        section(&self.out, &format!("{name}-BEGIN"), &format!("{name}-END"))
    }

    /// The rest of the first line that starts with `key`, trimmed.
    pub fn status(&self, key: &str) -> &str {
        self.out
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key}\n{}", self.logs))
    }

    /// The first word of [`status`](Self::status) as a number.
    pub fn number(&self, key: &str) -> u64 {
        let value = self.status(key);
        value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{key}{value:?} is not a number\n{}", self.logs))
    }

    /// The section `name` as JSON.
    pub fn json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(self.part(name))
            .unwrap_or_else(|e| panic!("{name}'s JSON: {e}\n{}", self.logs))
    }
}

/// The source exited with `source_status` 0 after handing the guest over, and the
/// destination's log says the guest runs there.
pub fn assert_handed_over(source_status: &str, src_err: &str, dst_err: &str, logs: &str) {
    assert_eq!(source_status, "0", "the source's exit status\n{logs}");
    assert!(
        src_err.contains("the guest was migrated and runs on the destination"),
        "{logs}"
    );
    assert!(dst_err.contains("the guest runs here"), "{logs}");
}

/// The guest booted once, on the source: the destination's console shows no boot.
pub fn assert_booted_once(src_out: &str, dst_out: &str, logs: &str) {
    assert_eq!(src_out.matches(MARKER).count(), 1, "{logs}");
    assert!(
        !dst_out.contains(MARKER) && !dst_out.contains("Linux version"),
        "the destination rebooted\n{logs}"
    );
}

/// The `tick-N avail=K end` lines of the source's and the destination's consoles are
/// one sequence from 0, at least 4 on the source and 6 more on the destination; the
/// tick numbers and how many the source printed.
pub fn assert_avail_ticks_go_on(src_out: &str, dst_out: &str, logs: &str) -> (Vec<u64>, usize) {
    let all = avail_ticks(&format!("{src_out}{dst_out}"));
    let seq: Vec<u64> = all.iter().map(|&(tick, _)| tick).collect();
    let expected: Vec<u64> = (0..seq.len() as u64).collect();
    assert_eq!(seq, expected, "the ticks are not one sequence\n{logs}");
    let on_src = avail_ticks(src_out).len();
    assert!(on_src >= 4, "too few ticks on the source\n{logs}");
    assert!(
        all.len() >= on_src + 6,
        "too few ticks on the destination\n{logs}"
    );
    (seq, on_src)
}

/// `vm shutdown` on the destination answered 0 and the destination exited with 0.
pub fn assert_shut_down(shutdown: &str, status: &str, logs: &str) {
    assert_eq!(shutdown, "0", "vm shutdown\n{logs}");
    assert_eq!(status, "0", "the destination's exit status\n{logs}");
}
