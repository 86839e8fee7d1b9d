//! The userfaultfd kernel ABI (linux/userfaultfd.h), with the ioctl numbers built by
//! libc's `_IOR`/`_IOWR` for the target architecture and checked at compile time against
//! the kernel's values on x86_64 (on PowerPC the direction bits differ; libc encodes
//! them correctly there).

/// `UFFD_API`: the API version the handshake asks for.
pub(crate) const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

/// `UFFD_EVENT_PAGEFAULT`.
pub(crate) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFDIO_REGISTER_MODE_MISSING`.
pub(crate) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    pub(crate) api: u64,
    pub(crate) features: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioCopy {
    pub(crate) dst: u64,
    pub(crate) src: u64,
    pub(crate) len: u64,
    pub(crate) mode: u64,
    pub(crate) copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioZeropage {
    pub(crate) range: UffdioRange,
    pub(crate) mode: u64,
    pub(crate) zeropage: i64,
}

/// `struct uffd_msg`, packed, 32 bytes; only the page-fault member of its union is read.
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdMsg {
    pub(crate) event: u8,
    pub(crate) reserved1: u8,
    pub(crate) reserved2: u16,
    pub(crate) reserved3: u32,
    pub(crate) pf_flags: u64,
    pub(crate) pf_address: u64,
    pub(crate) pf_ptid: u32,
    pub(crate) pad: u32,
}

const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 32);
const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

pub(crate) const UFFDIO_API: libc::Ioctl = libc::_IOWR::<UffdioApi>(UFFDIO, 0x3F);
pub(crate) const UFFDIO_REGISTER: libc::Ioctl = libc::_IOWR::<UffdioRegister>(UFFDIO, 0x00);
pub(crate) const UFFDIO_WAKE: libc::Ioctl = libc::_IOR::<UffdioRange>(UFFDIO, 0x02);
pub(crate) const UFFDIO_COPY: libc::Ioctl = libc::_IOWR::<UffdioCopy>(UFFDIO, 0x03);
pub(crate) const UFFDIO_ZEROPAGE: libc::Ioctl = libc::_IOWR::<UffdioZeropage>(UFFDIO, 0x04);
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd.
pub(crate) const USERFAULTFD_IOC_NEW: libc::Ioctl = libc::_IO(UFFDIO, 0x00);

// The kernel's numbers, as `strace` and linux/userfaultfd.h give them on x86_64.
#[cfg(target_arch = "x86_64")]
const _: () = {
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
};
