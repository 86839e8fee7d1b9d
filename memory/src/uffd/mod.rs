//! userfaultfd: missing-page faults on guest memory, resolved from user space.
//!
//! A small ioctl module of our own (`sys.rs`, numbers checked at compile time against
//! the kernel's) rather than the `userfaultfd` crate: we need only a handful of calls,
//! the crate pulls in bindgen-generated bindings and a nix version of its own, and
//! keeping the raw calls in one file puts every `unsafe` where it can be reviewed with
//! its invariant.
//!
//! [`Userfaultfd`] is the file descriptor: create it, register ranges for missing-page
//! faults, read fault events (non-blocking), and copy or zero-fill pages in. Copying
//! writes into a mapping, so it is crate-private: `GuestRam::resolve_fault` is the one
//! caller, under the write lock of the page (DESIGN.md).

mod sys;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither userfaultfd(2) nor /dev/userfaultfd gave a descriptor.
    #[error("Cannot create a userfaultfd (needs Linux 4.11+, and either privileges, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)")]
    Create(#[source] io::Error),
    /// The API handshake failed.
    #[error("userfaultfd API handshake failed")]
    Api(#[source] io::Error),
    /// Registering a range failed.
    #[error("Cannot register [{start:#x}, +{len:#x}) with userfaultfd")]
    Register {
        /// Host virtual start.
        start: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading an event failed.
    #[error("Cannot read a userfaultfd event")]
    Read(#[source] io::Error),
    /// Copying or zero-filling a page failed.
    #[error("Cannot fill the page at host address {addr:#x}")]
    Fill {
        /// Host virtual address.
        addr: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waking the threads blocked on a page failed.
    #[error("Cannot wake threads waiting on {addr:#x}")]
    Wake {
        /// Host virtual address.
        addr: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A missing-page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting host virtual address (not page-aligned).
    pub addr: u64,
    /// The access was a write.
    pub write: bool,
}

/// What filling a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The page was populated now.
    Now,
    /// Somebody populated it first (EEXIST): not an error; blocked threads were woken.
    AlreadyThere,
}

/// A userfaultfd registered for missing-page faults. Non-blocking: poll [`Self::as_fd`].
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Creates a non-blocking userfaultfd and does the API handshake.
    pub fn new() -> Result<Self, UffdError> {
        let fd = Self::open()?;
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, which `api` is
        // (size checked at compile time); `fd` is an open userfaultfd.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut api) };
        if ret != 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Userfaultfd { fd })
    }

    fn open() -> Result<OwnedFd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the userfaultfd syscall takes a flags integer and returns a new fd or
        // -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            let fd = i32::try_from(fd)
                .map_err(|_| UffdError::Create(io::ErrorKind::InvalidData.into()))?;
            // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let syscall_err = io::Error::last_os_error();
        // Unprivileged processes may still get one from /dev/userfaultfd (Linux 6.1+).
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(|_| UffdError::Create(syscall_err))?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or
        // -1; `dev` is an open /dev/userfaultfd.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW, flags) };
        if fd < 0 {
            return Err(UffdError::Create(io::Error::last_os_error()));
        }
        // SAFETY: as above, a fresh fd owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Registers `[start, start + len)` of this process's address space for
    /// missing-page faults: a thread touching a missing page there blocks until the page
    /// is filled. Both must be page-aligned.
    pub(crate) fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start, len },
            mode: sys::UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`, which `reg`
        // is; registering changes how faults in the range are served, it does not touch
        // memory.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER, &mut reg) };
        if ret != 0 {
            return Err(UffdError::Register {
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one fault, or `None` if none is pending. Events other than page faults
    /// (none are enabled) are skipped.
    pub fn read_fault(&self) -> Result<Option<Fault>, UffdError> {
        loop {
            let mut msg = sys::UffdMsg::default();
            let len = std::mem::size_of::<sys::UffdMsg>();
            // SAFETY: reads at most `len` bytes into `msg`, a plain-data struct of
            // exactly that size.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), std::ptr::addr_of_mut!(msg).cast(), len) };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(UffdError::Read(err)),
                };
            }
            if usize::try_from(n).ok() != Some(len) {
                return Err(UffdError::Read(io::ErrorKind::UnexpectedEof.into()));
            }
            if msg.event == sys::UFFD_EVENT_PAGEFAULT {
                const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
                let flags = msg.pf_flags;
                return Ok(Some(Fault {
                    addr: msg.pf_address,
                    write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                }));
            }
        }
    }

    /// Copies `src` into the missing page(s) at `dst` and wakes the threads waiting on
    /// them.
    ///
    /// # Safety
    ///
    /// `dst .. dst + src.len()` must be page-aligned, inside a range registered with this
    /// userfaultfd, and no Rust reference may exist into it: the kernel writes there.
    pub(crate) unsafe fn copy(&self, dst: u64, src: &[u8]) -> Result<Filled, UffdError> {
        let mut copy = sys::UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `uffdio_copy`; the kernel reads
        // `src.len()` bytes from `src` (a live slice) and writes them to `dst`, which the
        // caller guarantees is ours to write (see the function's contract).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY, &mut copy) };
        self.filled(ret, dst, src.len() as u64)
    }

    /// Maps zero pages at `dst .. dst + len` and wakes the threads waiting on them.
    ///
    /// # Safety
    ///
    /// As for [`Self::copy`].
    pub(crate) unsafe fn zero(&self, dst: u64, len: u64) -> Result<Filled, UffdError> {
        let mut zero = sys::UffdioZeropage {
            range: sys::UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`; it maps zero
        // pages at `dst`, which the caller guarantees is ours (see the contract).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE, &mut zero) };
        self.filled(ret, dst, len)
    }

    fn filled(&self, ret: i32, addr: u64, len: u64) -> Result<Filled, UffdError> {
        if ret == 0 {
            return Ok(Filled::Now);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            // Already populated by a racing resolution; the kernel does not wake the
            // waiters on this path, so do it here.
            self.wake(addr, len)?;
            return Ok(Filled::AlreadyThere);
        }
        Err(UffdError::Fill { addr, source: err })
    }

    /// Wakes the threads blocked on `[addr, addr + len)` (page-aligned).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = sys::UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`; it only wakes threads.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WAKE, &mut range) };
        if ret != 0 {
            return Err(UffdError::Wake {
                addr,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
