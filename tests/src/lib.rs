//! Integration-test harness for rangevm with real guests.
//!
//! [`DefaultGuest`] builds (or finds in the cache) the default x86_64 guest of
//! `resources/build-guest.sh`: Debian's kernel and a busybox initramfs whose `/init`
//! prints [`MARKER`], runs a command from the kernel command line, prints
//! `RANGEVM-CMD-EXIT=<status>` and powers off. The boot issue adds running it under
//! rangevm, directly and inside an emulated host.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// The kernel (bzImage).
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

impl DefaultGuest {
    /// Builds the guest with `resources/build-guest.sh` (a no-op when the cache is up
    /// to date) and returns its files.
    pub fn build() -> Result<Self, HarnessError> {
        let script = repo_root().join("resources/build-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--print-dir")
            .output()
            .map_err(|e| HarnessError::Tool(format!("cannot run {}: {e}", script.display())))?;
        if !out.status.success() {
            return Err(HarnessError::Tool(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map_err(|e| HarnessError::Tool(format!("no cmdline in {}: {e}", dir.display())))?;
        Ok(DefaultGuest {
            kernel: dir.join("vmlinuz"),
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
