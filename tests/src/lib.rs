//! Integration-test harness for rangevm with real guests.
//!
//! - [`DefaultGuest`] builds (or finds in the cache) the default x86_64 guest of
//!   `resources/build-guest.sh` (or the ppc64le one of `resources/build-guest-ppc64.sh`):
//!   Debian's kernel and a busybox initramfs whose `/init` prints [`MARKER`], runs a
//!   command from the kernel command line, prints `RANGEVM-CMD-EXIT=<status>` and powers
//!   off.
//! - [`EmuHost`] runs a command inside an *emulated host* (`resources/build-emuhost.sh`,
//!   or `resources/build-emuhost-ppc64.sh` for PowerPC64): Debian's kernel under QEMU
//!   software emulation with real nested KVM, for what this machine's own KVM cannot run.
//! - [`run_qemu`] (and [`run_qemu_arch`]) boots a kernel under QEMU TCG and returns its
//!   console.
//! - [`static_rangevm_ppc64le`] builds a statically linked rangevm for the emulated
//!   PowerPC64 host.

pub mod tiny;
pub mod tiny_ppc64;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The line prefix the default guest prints once `/init` runs.
pub const MARKER: &str = "RANGEVM-GUEST-UP";

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A helper program could not be run or failed.
    #[error("{0}")]
    Tool(String),
}

/// The default guest's files.
#[derive(Debug, Clone)]
pub struct DefaultGuest {
    /// The kernel (a bzImage on x86_64, an ELF vmlinux on ppc64le).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The base kernel command line for a serial console.
    pub cmdline: String,
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `resources/<name>` with `args` and returns its standard output, trimmed.
fn run_script(name: &str, args: &[&std::ffi::OsStr]) -> Result<String, HarnessError> {
    let script = repo_root().join("resources").join(name);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| HarnessError::Tool(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(HarnessError::Tool(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl DefaultGuest {
    /// Builds the guest with `resources/build-guest.sh` (a no-op when the cache is up
    /// to date) and returns its files.
    pub fn build() -> Result<Self, HarnessError> {
        let dir = PathBuf::from(run_script("build-guest.sh", &["--print-dir".as_ref()])?);
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map_err(|e| HarnessError::Tool(format!("no cmdline in {}: {e}", dir.display())))?;
        Ok(DefaultGuest {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio.gz"),
            cmdline: cmdline.trim().to_string(),
        })
    }

    /// Builds the ppc64le guest with `resources/build-guest-ppc64.sh` (a no-op when the
    /// cache is up to date): Debian's ppc64el ELF vmlinux, the same `/init`, and a
    /// command line with `console=hvc0`.
    pub fn build_ppc64() -> Result<Self, HarnessError> {
        let dir = PathBuf::from(run_script(
            "build-guest-ppc64.sh",
            &["--print-dir".as_ref()],
        )?);
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map_err(|e| HarnessError::Tool(format!("no cmdline in {}: {e}", dir.display())))?;
        Ok(DefaultGuest {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio.gz"),
            cmdline: cmdline.trim().to_string(),
        })
    }

    /// The command line that makes `/init` run `command` (any shell text).
    pub fn cmdline_running(&self, command: &str) -> String {
        format!(
            "{} rangevm.cmd64={}",
            self.cmdline,
            base64(command.as_bytes())
        )
    }

    /// The kernel's file name, as it is called in an emulated host's `/payload`.
    pub fn kernel_name(&self) -> String {
        self.kernel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// What a QEMU run printed on its serial console, and how long it took.
#[derive(Debug, Clone)]
pub struct Console {
    /// Everything the guest printed.
    pub output: String,
    /// Wall time from QEMU's start to its exit.
    pub elapsed: Duration,
}

impl Console {
    /// The status `/init` printed for the command (`RANGEVM-CMD-EXIT=<status>`).
    pub fn command_status(&self) -> Option<i32> {
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix("RANGEVM-CMD-EXIT="))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// The machine [`run_qemu_arch`] emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QemuArch {
    /// `qemu-system-x86_64 -accel tcg -cpu max` (SVM included, so KVM works inside);
    /// the console is `ttyS0`.
    #[default]
    X86_64,
    /// `qemu-system-ppc64 -M pseries,cap-nested-hv=on,... -cpu POWER9` (nested HV, so
    /// kvm-hv works inside, for radix guests); the console is `hvc0`.
    Ppc64,
}

impl QemuArch {
    /// The QEMU program.
    pub fn qemu(self) -> &'static str {
        match self {
            QemuArch::X86_64 => "qemu-system-x86_64",
            QemuArch::Ppc64 => "qemu-system-ppc64",
        }
    }

    /// The Linux console device of the machine's first serial port.
    pub fn console(self) -> &'static str {
        match self {
            QemuArch::X86_64 => "ttyS0",
            QemuArch::Ppc64 => "hvc0",
        }
    }

    /// The machine and CPU options.
    fn machine_args(self) -> &'static [&'static str] {
        match self {
            QemuArch::X86_64 => &["-accel", "tcg", "-cpu", "max"],
            // The cap-* settings: TCG implements none of the speculation mitigations,
            // and pseries refuses to start with them at their defaults.
            QemuArch::Ppc64 => &[
                "-accel",
                "tcg",
                "-M",
                "pseries,cap-nested-hv=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
                "-cpu",
                "POWER9",
            ],
        }
    }

    /// The debian package that holds [`QemuArch::qemu`].
    fn package(self) -> &'static str {
        match self {
            QemuArch::X86_64 => "qemu-system-x86",
            QemuArch::Ppc64 => "qemu-system-ppc",
        }
    }
}

/// Boots `kernel` + `initrd` with `cmdline` under `qemu-system-x86_64 -accel tcg -cpu
/// max` (SVM included, so KVM works inside) and waits for the guest to power off, at
/// most `timeout`. [`run_qemu_arch`] with [`QemuArch::X86_64`].
pub fn run_qemu(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    memory_mib: u32,
    timeout: Duration,
) -> Result<Console, HarnessError> {
    run_qemu_arch(
        QemuArch::X86_64,
        kernel,
        initrd,
        cmdline,
        memory_mib,
        timeout,
    )
}

/// Boots `kernel` + `initrd` with `cmdline` on the machine `arch`, under software
/// emulation, with its first serial port on the returned console, and waits for the
/// guest to power off, at most `timeout`.
pub fn run_qemu_arch(
    arch: QemuArch,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    memory_mib: u32,
    timeout: Duration,
) -> Result<Console, HarnessError> {
    let start = Instant::now();
    let mut child = Command::new(arch.qemu())
        .args(arch.machine_args())
        .args(["-smp", "1"])
        .args(["-m", &format!("{memory_mib}M")])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            HarnessError::Tool(format!(
                "cannot start {} (package {}; scripts/ensure-deps.sh installs it): {e}",
                arch.qemu(),
                arch.package()
            ))
        })?;
    // Read the console on a thread so a chatty guest never blocks on a full pipe.
    let mut stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(out) = stdout.as_mut() {
            let _ = out.read_to_string(&mut text);
        }
        text
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let output = reader.join().unwrap_or_default();
                return Err(HarnessError::Tool(format!(
                    "the guest did not power off within {timeout:?}; console:\n{output}"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(HarnessError::Tool(format!("waiting for qemu: {e}"))),
        }
    };
    let output = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(HarnessError::Tool(format!(
            "qemu exited with {status}; console:\n{output}"
        )));
    }
    Ok(Console {
        output,
        elapsed: start.elapsed(),
    })
}

/// The emulated host: x86_64 ([`EmuHost::new`]) or PowerPC64 ([`EmuHost::ppc64`]).
#[derive(Debug, Default)]
pub struct EmuHost {
    arch: QemuArch,
    payload: Vec<PathBuf>,
}

impl EmuHost {
    /// An emulated x86_64 host with nothing in `/payload` yet.
    pub fn new() -> Self {
        EmuHost::default()
    }

    /// An emulated PowerPC64 host (`resources/build-emuhost-ppc64.sh`: Debian's ppc64el
    /// kernel on QEMU's pseries machine with nested HV, kvm-hv loaded) with nothing in
    /// `/payload` yet. Its programs must be statically linked ppc64le ones (see
    /// [`static_rangevm_ppc64le`]).
    pub fn ppc64() -> Self {
        EmuHost {
            arch: QemuArch::Ppc64,
            payload: Vec::new(),
        }
    }

    /// The emulated machine.
    pub fn arch(&self) -> QemuArch {
        self.arch
    }

    /// Puts `file` into `/payload` (which is on `PATH` and the working directory of
    /// the command); on x86_64 a dynamically linked program brings its shared libraries
    /// (the PowerPC64 host takes static programs only).
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.payload.push(file.into());
        self
    }

    /// Boots the host and runs `command` (shell text, any length: it travels as the file
    /// `/payload/rangevm-cmd.sh`) in it.
    ///
    /// The emulated host itself (QEMU TCG with nested KVM) freezes now and then, about
    /// once in 40 guest boots, under rangevm and under QEMU/KVM alike. A run that does
    /// not power off within `timeout` is therefore tried once more, saying so on
    /// standard error; a second timeout is the error.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<Console, HarnessError> {
        match self.run_once(command, timeout) {
            Err(HarnessError::Tool(why)) if why.contains("did not power off") => {
                eprintln!("emulated host: no power-off within {timeout:?}; trying once more");
                self.run_once(command, timeout)
            }
            other => other,
        }
    }

    fn run_once(&self, command: &str, timeout: Duration) -> Result<Console, HarnessError> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rangevm-emuhost-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let payload = dir.join("payload");
        std::fs::create_dir_all(&payload)
            .map_err(|e| HarnessError::Tool(format!("cannot create {}: {e}", payload.display())))?;
        let result = (|| {
            for file in &self.payload {
                let name = file.file_name().ok_or_else(|| {
                    HarnessError::Tool(format!("{} has no file name", file.display()))
                })?;
                std::fs::copy(file, payload.join(name)).map_err(|e| {
                    HarnessError::Tool(format!("cannot copy {}: {e}", file.display()))
                })?;
            }
            // The command goes in a file: the kernel command line holds only 2 KiB.
            std::fs::write(payload.join("rangevm-cmd.sh"), command).map_err(|e| {
                HarnessError::Tool(format!(
                    "cannot write the command into {}: {e}",
                    payload.display()
                ))
            })?;
            let initrd = dir.join("host.cpio.gz");
            let (script, memory_mib, extra) = match self.arch {
                QemuArch::X86_64 => ("build-emuhost.sh", 1024, "reboot=k panic=1"),
                QemuArch::Ppc64 => ("build-emuhost-ppc64.sh", 2048, "panic=1"),
            };
            let kernel = PathBuf::from(run_script(
                script,
                &[
                    "--payload".as_ref(),
                    payload.as_os_str(),
                    "--out".as_ref(),
                    initrd.as_os_str(),
                ],
            )?);
            let cmdline = format!(
                "console={} loglevel=4 {extra} rangevm.cmd64={}",
                self.arch.console(),
                base64(b"sh /payload/rangevm-cmd.sh")
            );
            run_qemu_arch(self.arch, &kernel, &initrd, &cmdline, memory_mib, timeout)
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

/// The Rust target of the emulated PowerPC64 host's programs.
pub const PPC64LE_TARGET: &str = "powerpc64le-unknown-linux-gnu";

/// Builds the `rangevm` binary for `powerpc64le-unknown-linux-gnu`, statically linked
/// (`-C target-feature=+crt-static`, debug profile), and returns its path. The build has
/// its own target folder, `<target dir>/ppc64le-static` (the target dir is
/// `$CARGO_TARGET_DIR`, or `target` in the repository), so that its `RUSTFLAGS` do not
/// invalidate the normal build; a second call only checks that it is up to date.
pub fn static_rangevm_ppc64le() -> Result<PathBuf, HarnessError> {
    let root = repo_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ppc64le-static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "-p", "rangevm", "--bin", "rangevm", "--target"])
        .arg(PPC64LE_TARGET)
        .env("CARGO_TARGET_DIR", &target_dir)
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .output()
        .map_err(|e| {
            HarnessError::Tool(format!("cannot run {}: {e}", Path::new(&cargo).display()))
        })?;
    if !out.status.success() {
        return Err(HarnessError::Tool(format!(
            "building a static rangevm for {PPC64LE_TARGET} failed (scripts/ensure-deps.sh \
             installs the target and its linker): {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let bin = target_dir
        .join(PPC64LE_TARGET)
        .join("debug")
        .join("rangevm");
    if !bin.is_file() {
        return Err(HarnessError::Tool(format!(
            "cargo built no {}",
            bin.display()
        )));
    }
    Ok(bin)
}

/// Standard base64 (RFC 4648, with padding), as busybox's `base64 -d` reads it.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
