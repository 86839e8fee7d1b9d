//! `rangevm host-check`: what this host offers rangevm.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use rangevm_memory::host_page_size;

/// Errors of the host check (only the unexpected ones; a missing KVM is a finding).
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// /proc or /sys could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// KVM ioctl numbers (`_IO(KVMIO, n)`), encoded by libc for the target architecture.
const KVMIO: u32 = 0xAE;
const KVM_GET_API_VERSION: libc::Ioctl = libc::_IO(KVMIO, 0x00);
const KVM_CHECK_EXTENSION: libc::Ioctl = libc::_IO(KVMIO, 0x03);
/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// Capabilities rangevm relies on, with their `KVM_CAP_*` numbers.
const CAPS: &[(&str, i32)] = &[
    ("KVM_CAP_USER_MEMORY", 3),
    ("KVM_CAP_IRQFD", 32),
    ("KVM_CAP_IOEVENTFD", 36),
    ("KVM_CAP_IMMEDIATE_EXIT", 136),
    ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", 168),
];

/// What the host offers.
#[derive(Debug)]
pub struct HostReport {
    arch: &'static str,
    kernel: String,
    page_size: u64,
    kvm: Result<KvmInfo, String>,
    userfaultfd: Result<(), String>,
}

#[derive(Debug)]
struct KvmInfo {
    api_version: i32,
    caps: Vec<(&'static str, i32)>,
}

impl HostReport {
    /// True if /dev/kvm opened and speaks API version 12.
    pub fn kvm_usable(&self) -> bool {
        self.kvm
            .as_ref()
            .is_ok_and(|k| k.api_version == KVM_API_VERSION)
    }

    /// The report as a JSON object (hand-written: flat, with string and number values).
    pub fn to_json(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let kvm = match &self.kvm {
            Ok(k) => {
                let caps: Vec<String> = k
                    .caps
                    .iter()
                    .map(|(name, v)| format!("\"{name}\":{v}"))
                    .collect();
                format!(
                    "{{\"api_version\":{},\"caps\":{{{}}}}}",
                    k.api_version,
                    caps.join(",")
                )
            }
            Err(e) => format!("{{\"error\":\"{}\"}}", esc(e)),
        };
        let uffd = match &self.userfaultfd {
            Ok(()) => "{\"available\":true}".to_string(),
            Err(e) => format!("{{\"available\":false,\"error\":\"{}\"}}", esc(e)),
        };
        format!(
            "{{\"arch\":\"{}\",\"kernel\":\"{}\",\"host_page_size\":{},\"kvm\":{},\"userfaultfd\":{}}}",
            self.arch,
            esc(&self.kernel),
            self.page_size,
            kvm,
            uffd
        )
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "architecture     {}", self.arch)?;
        writeln!(f, "kernel           {}", self.kernel)?;
        writeln!(f, "host page size   {} bytes", self.page_size)?;
        match &self.kvm {
            Ok(k) => {
                writeln!(f, "KVM              API version {}", k.api_version)?;
                for (name, v) in &k.caps {
                    let state = if *v > 0 { "yes" } else { "no" };
                    writeln!(f, "  {name:<34} {state}")?;
                }
            }
            Err(e) => writeln!(f, "KVM              unusable: {e}")?,
        }
        match &self.userfaultfd {
            Ok(()) => writeln!(f, "userfaultfd      available"),
            Err(e) => writeln!(f, "userfaultfd      unavailable: {e} (postcopy needs it)"),
        }
    }
}

fn probe_kvm() -> Result<KvmInfo, String> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no pointer (its argument must be 0, which we pass
    // explicitly: a missing variadic argument is garbage and makes KVM fail with EINVAL)
    // and only returns an integer; the
    // fd is an open /dev/kvm owned by `file` for the duration of the call.
    let api_version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if api_version < 0 {
        return Err(format!(
            "KVM_GET_API_VERSION failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let caps = CAPS
        .iter()
        .map(|&(name, cap)| {
            // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value and
            // returns an integer; `file` keeps the fd open.
            let v = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CHECK_EXTENSION, cap) };
            (name, v.max(0))
        })
        .collect();
    Ok(KvmInfo { api_version, caps })
}

fn probe_userfaultfd() -> Result<(), String> {
    // SAFETY: the userfaultfd syscall takes a flags integer and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let dev = std::path::Path::new("/dev/userfaultfd").exists();
        return Err(format!(
            "userfaultfd(2) failed: {err}{}",
            if dev {
                " (/dev/userfaultfd exists)"
            } else {
                ""
            }
        ));
    }
    let fd = i32::try_from(fd).map_err(|_| "userfaultfd(2) returned a bad fd".to_string())?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing else; the
    // OwnedFd closes it when dropped.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Runs the checks.
pub fn check() -> Result<HostReport, HostCheckError> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|source| HostCheckError::Read {
            path: "/proc/sys/kernel/osrelease",
            source,
        })?
        .trim()
        .to_string();
    Ok(HostReport {
        arch: std::env::consts::ARCH,
        kernel,
        page_size: host_page_size(),
        kvm: probe_kvm(),
        userfaultfd: probe_userfaultfd(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_renders_both_ways() {
        let report = HostReport {
            arch: "x86_64",
            kernel: "6.1 \"test\"".into(),
            page_size: 4096,
            kvm: Err("cannot open /dev/kvm: No such file".into()),
            userfaultfd: Ok(()),
        };
        assert!(!report.kvm_usable());
        let text = report.to_string();
        assert!(text.contains("unusable: cannot open /dev/kvm"));
        let json = report.to_json();
        assert!(json.contains("\"host_page_size\":4096"));
        assert!(json.contains("6.1 \\\"test\\\""));
    }

    #[test]
    fn live_check_reports_the_page_size() {
        let report = check().unwrap();
        assert_eq!(report.page_size, host_page_size());
        if report.kvm_usable() {
            let caps = &report.kvm.as_ref().unwrap().caps;
            assert!(caps
                .iter()
                .any(|(n, v)| *n == "KVM_CAP_USER_MEMORY" && *v > 0));
        }
    }
}
