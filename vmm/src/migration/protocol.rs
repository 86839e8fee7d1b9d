//! The migration wire protocol, version 1: framing, messages, encoder and decoder.
//!
//! Every message travels in one frame (all integers little-endian):
//!
//! ```text
//! offset  size  field
//!      0     4  magic "RVMG"
//!      4     2  message type
//!      6     2  flags (none defined in version 1; must be 0)
//!      8     4  payload length N, at most MAX_PAYLOAD
//!     12     N  payload (layout per message type)
//!   12+N     4  CRC32C of bytes 0 .. 12+N
//! ```
//!
//! `docs/migration-protocol.md` gives each payload's layout, the order of messages in a
//! precopy and a postcopy migration, the resume handshake and the versioning rules.
//!
//! The module is pure Rust with no KVM, memory or arch dependency, so the fuzz target
//! can include it on its own. The [`Decoder`] never panics on bad input: every defect
//! is a [`ProtocolError`], and the only buffer it sizes from the wire is one payload,
//! allocated after the length was checked against [`MAX_PAYLOAD`].

use std::fmt;
use std::io::{self, Read, Write};

/// The protocol version this rangevm speaks. See "Versioning" in the protocol document.
pub const PROTOCOL_VERSION: u32 = 1;
/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"RVMG";
/// Bytes before the payload: magic, type, flags, length.
pub const FRAME_HEADER_LEN: usize = 12;
/// Bytes after the payload: the CRC32C.
pub const FRAME_TRAILER_LEN: usize = 4;
/// Most page bytes one frame carries: 1024 pages of 4 KiB or 64 pages of 64 KiB. Also the
/// largest state blob and the largest received-pages bitmap.
pub const MAX_RUN_BYTES: usize = 4 << 20;
/// Largest payload a frame may declare: one full run of page data plus 4 KiB for the
/// fixed fields of any message. Big enough that the 16 bytes of framing cost under
/// 0.001% on full runs; small enough that a lying length costs the receiver at most
/// this much memory, and that one frame holds a 10 Gbit/s link for only about 3.4 ms.
pub const MAX_PAYLOAD: u32 = (4 << 20) + 4096;
/// Most memory regions a header may list (1024 * 16 bytes = 16 KiB of payload).
pub const MAX_REGIONS: usize = 1024;
/// Longest error sentence, in bytes of UTF-8.
pub const MAX_ERROR_TEXT: usize = 4096;
/// Longest device id, in bytes of UTF-8.
pub const MAX_DEVICE_ID: usize = 64;
/// Smallest host page the protocol accepts (4 KiB).
pub const MIN_PAGE_SHIFT: u8 = 12;
/// Largest host page the protocol accepts (64 KiB, ppc64le).
pub const MAX_PAGE_SHIFT: u8 = 16;
/// Most pages one `ReceivedPages` map describes (its bitmap is at most
/// [`MAX_RUN_BYTES`]).
pub const MAX_MAP_PAGES: u32 = 8 << 22;

/// Most pages one data run (or one page request) may hold at this page size: the
/// source splits longer ranges into runs of this many pages.
pub const fn max_run_pages(page_shift: u8) -> u32 {
    if page_shift >= MIN_PAGE_SHIFT && page_shift <= MAX_PAGE_SHIFT {
        1 << (22 - page_shift)
    } else {
        0
    }
}

/// Feature bit: the source may switch to postcopy.
pub const FEATURE_POSTCOPY: u64 = 1 << 0;
/// Feature bit: a dropped postcopy link may be resumed (`Resume` handshake).
pub const FEATURE_RESUME: u64 = 1 << 1;
/// Feature bit: demand requests and responses travel on a second connection.
pub const FEATURE_DEMAND_CHANNEL: u64 = 1 << 2;
/// Feature bit: at switch-over the source sends a CRC32C of every page
/// ([`Message::PageDigests`]) and the destination compares them with what it holds
/// before it starts the guest (`migrate send --verify`).
pub const FEATURE_VERIFY: u64 = 1 << 3;
/// Every feature bit this rangevm knows.
pub const KNOWN_FEATURES: u64 =
    FEATURE_POSTCOPY | FEATURE_RESUME | FEATURE_DEMAND_CHANNEL | FEATURE_VERIFY;
/// Most digests one `PageDigests` message holds (4 MiB of them).
pub const MAX_DIGESTS: u32 = 1 << 20;
const _: () = assert!(MAX_DIGESTS as usize * 4 == MAX_RUN_BYTES);

/// Errors of the migration protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the stream failed.
    #[error("I/O error on the migration stream.")]
    Io(#[from] io::Error),
    /// EOF exactly between two frames.
    #[error("The peer closed the migration stream.")]
    Closed,
    /// EOF inside a frame.
    #[error("The migration stream ended in the middle of a message.")]
    Truncated,
    /// The frame does not start with [`MAGIC`].
    #[error("Bad frame magic {found:02x?}: not a rangevm migration stream, or out of sync.")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The declared (or, when encoding, needed) payload length is over [`MAX_PAYLOAD`].
    #[error("A payload of {len} bytes exceeds the limit of {max} bytes.")]
    PayloadTooLarge {
        /// Length declared or needed.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The CRC32C of the frame does not match.
    #[error("Checksum mismatch (frame says {sent:#010x}, bytes give {computed:#010x}): the stream is corrupted.")]
    BadChecksum {
        /// CRC in the frame.
        sent: u32,
        /// CRC computed over the bytes received.
        computed: u32,
    },
    /// The message type is not one this version knows.
    #[error("Unknown message type {0:#06x}.")]
    UnknownType(u16),
    /// Flag bits are set that this version does not define.
    #[error("The {message} message has unknown flags {flags:#06x} set.")]
    UnknownFlags {
        /// Message name.
        message: &'static str,
        /// The flags field.
        flags: u16,
    },
    /// The payload's inner fields are inconsistent or out of range.
    #[error("The {message} message is malformed: {reason}.")]
    Malformed {
        /// Message name.
        message: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A page range runs past the end of the 64-bit guest-physical address space.
    #[error("The page range at {gpa:#x} of {count} pages of {page_size} bytes overflows the guest-physical address space.")]
    RangeOverflow {
        /// First address.
        gpa: u64,
        /// Pages.
        count: u32,
        /// Page size in bytes.
        page_size: u64,
    },
    /// The peer speaks another protocol version.
    #[error("The source speaks migration protocol version {theirs}; this rangevm speaks version {ours}.")]
    UnsupportedVersion {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The peer's host page size differs from ours.
    #[error("The source's host page size is {theirs} bytes; this host's is {ours} bytes.")]
    PageSizeMismatch {
        /// Ours, in bytes.
        ours: u64,
        /// Theirs, in bytes.
        theirs: u64,
    },
    /// The peer runs on another architecture.
    #[error("The source is a {theirs} VM; this host runs {ours} VMs.")]
    ArchMismatch {
        /// Ours.
        ours: Arch,
        /// Theirs.
        theirs: Arch,
    },
    /// The guest memory regions differ.
    #[error("The source's guest memory ({theirs}) differs from this VM's ({ours}).")]
    MemoryLayoutMismatch {
        /// Ours, described.
        ours: String,
        /// Theirs, described.
        theirs: String,
    },
    /// The vCPU counts differ.
    #[error("The source has {theirs} vCPUs; this VM has {ours}.")]
    VcpuCountMismatch {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// A message arrived that the protocol does not allow at this point.
    #[error("Expected {expected}, got a {got} message.")]
    Unexpected {
        /// The type received.
        got: &'static str,
        /// The types allowed, e.g. "Ack or Error".
        expected: String,
    },
    /// The peer sent an `Error` message.
    #[error("The peer gave up: {0}")]
    Peer(String),
    /// The source asks for features we lack.
    #[error("The source asks for features {missing:#x} that this rangevm does not support.")]
    MissingFeatures {
        /// The feature bits we lack.
        missing: u64,
    },
}

fn malformed(message: &'static str, reason: &'static str) -> ProtocolError {
    ProtocolError::Malformed { message, reason }
}

// The path attributes are spelled out so that these files resolve the same when the
// fuzz target includes this module by path.
#[path = "protocol/crc.rs"]
mod crc;
#[path = "protocol/wire.rs"]
mod wire;

pub use crc::Crc32c;
use wire::{decode_payload, encode_parts, message_page_shift, put_run_fixed};

// ---------------------------------------------------------------------------------------
// Message types.

/// Architecture of the source and destination hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// 64-bit little-endian PowerPC.
    Ppc64le,
}

impl Arch {
    /// The architecture this rangevm was built for, if the protocol knows it.
    pub fn host() -> Option<Self> {
        if cfg!(target_arch = "x86_64") {
            Some(Self::X86_64)
        } else if cfg!(all(target_arch = "powerpc64", target_endian = "little")) {
            Some(Self::Ppc64le)
        } else {
            None
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::X86_64 => 1,
            Self::Ppc64le => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::X86_64),
            2 => Some(Self::Ppc64le),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86_64",
            Self::Ppc64le => "ppc64le",
        })
    }
}

/// Which connection of a migration a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The main stream: state, precopy pages, background postcopy pages.
    Main,
    /// The postcopy demand channel: page requests and responses only.
    Demand,
}

/// One guest memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Guest-physical start.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The first message of every connection: who the source is and what it migrates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Protocol version; [`PROTOCOL_VERSION`] when we build it.
    pub version: u32,
    /// Host architecture.
    pub arch: Arch,
    /// log2 of the host page size.
    pub page_shift: u8,
    /// Which connection this is.
    pub channel: Channel,
    /// Feature bits the source will use (`FEATURE_*`).
    pub features: u64,
    /// Random id the source picks per migration; a resume must present the same one.
    pub session_id: u64,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory regions, sorted by address, not overlapping.
    pub regions: Vec<Region>,
}

/// What a page run carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    /// `count << page_shift` bytes of page contents.
    Bytes(Vec<u8>),
    /// Every page is all zeros; no bytes on the wire.
    Zero,
}

/// A run of consecutive guest pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page, page aligned.
    pub gpa: u64,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Number of pages, at least 1.
    pub count: u32,
    /// Contents.
    pub data: PageData,
}

impl PageRun {
    /// A run with contents; `count` comes from `data.len()`. Checked when encoded.
    pub fn bytes(gpa: u64, page_shift: u8, data: Vec<u8>) -> Self {
        let count = u32::try_from(data.len() >> page_shift.min(63)).unwrap_or(u32::MAX);
        Self {
            gpa,
            page_shift,
            count,
            data: PageData::Bytes(data),
        }
    }

    /// A run of zero pages.
    pub fn zero(gpa: u64, page_shift: u8, count: u32) -> Self {
        Self {
            gpa,
            page_shift,
            count,
            data: PageData::Zero,
        }
    }

    fn validate(&self, message: &'static str) -> Result<(), ProtocolError> {
        check_range(message, self.gpa, self.page_shift, self.count)?;
        if let PageData::Bytes(data) = &self.data {
            if Some(data.len()) != run_bytes(self.page_shift, self.count) {
                return Err(malformed(
                    message,
                    "the data length disagrees with the page count",
                ));
            }
            if data.len() > MAX_RUN_BYTES {
                return Err(malformed(message, "the run is longer than MAX_RUN_BYTES"));
            }
        }
        Ok(())
    }
}

/// End of one precopy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Round number, 0 for the full pass.
    pub round: u32,
    /// Bytes still dirty when the round ended.
    pub dirty_bytes: u64,
    /// Measured dirty rate during the round, bytes per second.
    pub dirty_rate: u64,
}

/// How the source switches over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// All remaining pages come before `Complete`.
    Precopy,
    /// The destination starts after `Complete`; the rest of memory follows.
    Postcopy,
}

/// What the destination acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// The header is compatible; the source may go on.
    Accepted,
    /// The guest runs on the destination.
    Running,
    /// Postcopy: every page has arrived; the source may exit.
    AllPagesReceived,
}

impl AckKind {
    fn code(self) -> u32 {
        match self {
            Self::Accepted => 1,
            Self::Running => 2,
            Self::AllPagesReceived => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Accepted),
            2 => Some(Self::Running),
            3 => Some(Self::AllPagesReceived),
            _ => None,
        }
    }
}

/// Postcopy: the destination asks for pages a vCPU faulted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// Echoed in the response.
    pub request_id: u64,
    /// First page, aligned.
    pub gpa: u64,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Pages, at least 1, at most one frame's worth.
    pub count: u32,
}

/// Resume: which pages of one range the destination already holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedPages {
    /// Address of the page bit 0 describes, aligned.
    pub gpa: u64,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Pages described.
    pub count: u32,
    /// `count` bits, least significant bit first; bit set = page received. Unused bits of
    /// the last byte are zero.
    pub bitmap: Vec<u8>,
}

impl ReceivedPages {
    /// A map of `count` pages from `gpa`, none received.
    pub fn new(gpa: u64, page_shift: u8, count: u32) -> Self {
        let bytes = usize::try_from(count.div_ceil(8)).unwrap_or(0);
        Self {
            gpa,
            page_shift,
            count,
            bitmap: vec![0; bytes],
        }
    }

    /// Marks page `index` received; false if `index` is out of range.
    pub fn set(&mut self, index: u32) -> bool {
        if index >= self.count {
            return false;
        }
        match usize::try_from(index / 8)
            .ok()
            .and_then(|i| self.bitmap.get_mut(i))
        {
            Some(byte) => {
                *byte |= 1 << (index % 8);
                true
            }
            None => false,
        }
    }

    /// Whether page `index` was received.
    pub fn get(&self, index: u32) -> bool {
        index < self.count
            && usize::try_from(index / 8)
                .ok()
                .and_then(|i| self.bitmap.get(i))
                .is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    /// Number of pages marked received.
    pub fn received(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        const M: &str = "ReceivedPages";
        check_range(M, self.gpa, self.page_shift, self.count)?;
        if usize::try_from(self.count.div_ceil(8)).ok() != Some(self.bitmap.len()) {
            return Err(malformed(
                M,
                "the bitmap length disagrees with the page count",
            ));
        }
        if self.bitmap.len() > MAX_RUN_BYTES {
            return Err(malformed(M, "the bitmap is longer than MAX_RUN_BYTES"));
        }
        let used = self.count % 8;
        if used != 0 && self.bitmap.last().is_some_and(|b| b >> used != 0) {
            return Err(malformed(M, "bits past the page count are set"));
        }
        Ok(())
    }
}

/// Verification: the CRC32C of each of `count` consecutive pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDigests {
    /// First page, aligned.
    pub gpa: u64,
    /// log2 of the page size.
    pub page_shift: u8,
    /// One CRC32C per page, at least 1, at most [`MAX_DIGESTS`].
    pub digests: Vec<u32>,
}

impl PageDigests {
    fn validate(&self) -> Result<(), ProtocolError> {
        const M: &str = "PageDigests";
        let count = u32::try_from(self.digests.len())
            .ok()
            .filter(|&c| c <= MAX_DIGESTS)
            .ok_or_else(|| malformed(M, "there are more than MAX_DIGESTS digests"))?;
        check_range(M, self.gpa, self.page_shift, count)
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message of every connection, source to destination.
    Header(Header),
    /// Destination to source acknowledgement.
    Ack(AckKind),
    /// Either way: the sender gives up; a sentence saying why.
    Error(String),
    /// Source to destination: a run of pages (precopy, final pass, background postcopy).
    Pages(PageRun),
    /// Source to destination: end of a precopy round.
    RoundEnd(Round),
    /// Source to destination: vCPUs are paused; final state follows.
    SwitchOver(SwitchMode),
    /// Source to destination: one vCPU's state, opaque to the protocol.
    VcpuState {
        /// vCPU index.
        vcpu_id: u32,
        /// Arch-specific serialized state.
        blob: Vec<u8>,
    },
    /// Source to destination: one device's state, opaque to the protocol.
    DeviceState {
        /// Device id, e.g. "serial0".
        id: String,
        /// Device-specific serialized state.
        blob: Vec<u8>,
    },
    /// Source to destination: all state is sent (precopy: all memory too).
    Complete,
    /// Source to destination, with `FEATURE_VERIFY`, after the last pages: what the
    /// destination's pages must hold.
    PageDigests(PageDigests),
    /// Postcopy, destination to source: send these pages first.
    PageRequest(PageRequest),
    /// Postcopy, source to destination: the answer to a request.
    PageResponse {
        /// The request's id.
        request_id: u64,
        /// The pages.
        run: PageRun,
    },
    /// Postcopy, source to destination: every page has been sent.
    PostcopyDone,
    /// Postcopy after precopy rounds, source to destination, after `SwitchOver`: pages
    /// sent in a round and written since; the destination drops them (they become
    /// missing again) and gets them anew. The bitmap says which (bit set = stale).
    StalePages(ReceivedPages),
    /// Source to destination, after the header on a new connection: continue the
    /// postcopy migration the header's session id names.
    Resume,
    /// Resume, destination to source: pages already held.
    ReceivedPages(ReceivedPages),
    /// Resume, destination to source: end of the received-pages maps.
    ResumeReady {
        /// Total pages marked received in the maps, as a cross-check.
        received: u64,
    },
}

/// Wire codes of the message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum MessageType {
    /// [`Message::Header`].
    Header = 0x01,
    /// [`Message::Ack`].
    Ack = 0x02,
    /// [`Message::Error`].
    Error = 0x03,
    /// [`Message::Pages`].
    Pages = 0x10,
    /// [`Message::RoundEnd`].
    RoundEnd = 0x11,
    /// [`Message::SwitchOver`].
    SwitchOver = 0x12,
    /// [`Message::VcpuState`].
    VcpuState = 0x13,
    /// [`Message::DeviceState`].
    DeviceState = 0x14,
    /// [`Message::Complete`].
    Complete = 0x15,
    /// [`Message::PageDigests`].
    PageDigests = 0x16,
    /// [`Message::PageRequest`].
    PageRequest = 0x20,
    /// [`Message::PageResponse`].
    PageResponse = 0x21,
    /// [`Message::PostcopyDone`].
    PostcopyDone = 0x22,
    /// [`Message::StalePages`].
    StalePages = 0x23,
    /// [`Message::Resume`].
    Resume = 0x30,
    /// [`Message::ReceivedPages`].
    ReceivedPages = 0x31,
    /// [`Message::ResumeReady`].
    ResumeReady = 0x32,
}

impl MessageType {
    /// Every type, in code order.
    pub const ALL: [Self; 17] = [
        Self::Header,
        Self::Ack,
        Self::Error,
        Self::Pages,
        Self::RoundEnd,
        Self::SwitchOver,
        Self::VcpuState,
        Self::DeviceState,
        Self::Complete,
        Self::PageDigests,
        Self::PageRequest,
        Self::PageResponse,
        Self::PostcopyDone,
        Self::StalePages,
        Self::Resume,
        Self::ReceivedPages,
        Self::ResumeReady,
    ];

    /// The wire code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The type with wire code `code`.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.code() == code)
    }

    /// The name used in error sentences.
    pub fn name(self) -> &'static str {
        match self {
            Self::Header => "Header",
            Self::Ack => "Ack",
            Self::Error => "Error",
            Self::Pages => "Pages",
            Self::RoundEnd => "RoundEnd",
            Self::SwitchOver => "SwitchOver",
            Self::VcpuState => "VcpuState",
            Self::DeviceState => "DeviceState",
            Self::Complete => "Complete",
            Self::PageDigests => "PageDigests",
            Self::PageRequest => "PageRequest",
            Self::PageResponse => "PageResponse",
            Self::PostcopyDone => "PostcopyDone",
            Self::StalePages => "StalePages",
            Self::Resume => "Resume",
            Self::ReceivedPages => "ReceivedPages",
            Self::ResumeReady => "ResumeReady",
        }
    }
}

impl Message {
    /// An `Error` message with `text`, cut at a character boundary to fit
    /// [`MAX_ERROR_TEXT`] so that it always encodes.
    pub fn error(text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > MAX_ERROR_TEXT {
            let mut end = MAX_ERROR_TEXT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Self::Error(text)
    }

    /// This message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Header(_) => MessageType::Header,
            Self::Ack(_) => MessageType::Ack,
            Self::Error(_) => MessageType::Error,
            Self::Pages(_) => MessageType::Pages,
            Self::RoundEnd(_) => MessageType::RoundEnd,
            Self::SwitchOver(_) => MessageType::SwitchOver,
            Self::VcpuState { .. } => MessageType::VcpuState,
            Self::DeviceState { .. } => MessageType::DeviceState,
            Self::Complete => MessageType::Complete,
            Self::PageDigests(_) => MessageType::PageDigests,
            Self::PageRequest(_) => MessageType::PageRequest,
            Self::PageResponse { .. } => MessageType::PageResponse,
            Self::PostcopyDone => MessageType::PostcopyDone,
            Self::StalePages(_) => MessageType::StalePages,
            Self::Resume => MessageType::Resume,
            Self::ReceivedPages(_) => MessageType::ReceivedPages,
            Self::ResumeReady { .. } => MessageType::ResumeReady,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Shared checks.

fn valid_shift(shift: u8) -> bool {
    (MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&shift)
}

/// Bytes in `count` pages of `1 << shift`, if that fits a usize.
fn run_bytes(shift: u8, count: u32) -> Option<usize> {
    let bytes = u64::from(count).checked_shl(u32::from(shift))?;
    usize::try_from(bytes).ok()
}

/// A page range: valid page size, at least one page, aligned, not past 2^64.
fn check_range(
    message: &'static str,
    gpa: u64,
    shift: u8,
    count: u32,
) -> Result<(), ProtocolError> {
    if !valid_shift(shift) {
        return Err(malformed(message, "the page size is not 4 KiB to 64 KiB"));
    }
    if count == 0 {
        return Err(malformed(message, "the page count is zero"));
    }
    let page = 1u64 << shift;
    if gpa & (page - 1) != 0 {
        return Err(malformed(message, "the address is not page aligned"));
    }
    // count < 2^32 and shift <= 16, so the length fits in 48 bits.
    let len = u64::from(count) << shift;
    if gpa.checked_add(len).is_none() {
        return Err(ProtocolError::RangeOverflow {
            gpa,
            count,
            page_size: page,
        });
    }
    Ok(())
}

fn describe_regions(regions: &[Region]) -> String {
    let total: u128 = regions.iter().map(|r| u128::from(r.size)).sum();
    let list: Vec<String> = regions
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.gpa, r.size))
        .collect();
    format!(
        "{} region(s), {} MiB: {}",
        regions.len(),
        total >> 20,
        list.join(", ")
    )
}

impl Header {
    /// A version-[`PROTOCOL_VERSION`] header for the main channel.
    pub fn new(
        arch: Arch,
        page_shift: u8,
        vcpu_count: u32,
        regions: Vec<Region>,
        features: u64,
    ) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            arch,
            page_shift,
            channel: Channel::Main,
            features,
            session_id: 0,
            vcpu_count,
            regions,
        }
    }

    /// Host page size in bytes, or 0 if the shift is out of range.
    pub fn page_size(&self) -> u64 {
        1u64.checked_shl(u32::from(self.page_shift)).unwrap_or(0)
    }

    /// Guest memory in bytes.
    pub fn memory_size(&self) -> u128 {
        self.regions.iter().map(|r| u128::from(r.size)).sum()
    }

    /// Whether the source described by `self` can migrate into the VM described by
    /// `local`: same version, architecture, page size, memory regions and vCPU count,
    /// and every feature `self` asks for supported by `local`.
    pub fn check_compatible(&self, local: &Header) -> Result<(), ProtocolError> {
        if self.version != local.version {
            return Err(ProtocolError::UnsupportedVersion {
                ours: local.version,
                theirs: self.version,
            });
        }
        if self.arch != local.arch {
            return Err(ProtocolError::ArchMismatch {
                ours: local.arch,
                theirs: self.arch,
            });
        }
        if self.page_shift != local.page_shift {
            return Err(ProtocolError::PageSizeMismatch {
                ours: local.page_size(),
                theirs: self.page_size(),
            });
        }
        if self.regions != local.regions {
            return Err(ProtocolError::MemoryLayoutMismatch {
                ours: describe_regions(&local.regions),
                theirs: describe_regions(&self.regions),
            });
        }
        if self.vcpu_count != local.vcpu_count {
            return Err(ProtocolError::VcpuCountMismatch {
                ours: local.vcpu_count,
                theirs: self.vcpu_count,
            });
        }
        let missing = self.features & !local.features;
        if missing != 0 {
            return Err(ProtocolError::MissingFeatures { missing });
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        const M: &str = "Header";
        if self.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        if !valid_shift(self.page_shift) {
            return Err(malformed(M, "the page size is not 4 KiB to 64 KiB"));
        }
        if self.vcpu_count == 0 {
            return Err(malformed(M, "the vCPU count is zero"));
        }
        if self.regions.is_empty() {
            return Err(malformed(M, "there are no memory regions"));
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(malformed(M, "there are more than MAX_REGIONS regions"));
        }
        let mask = self.page_size() - 1;
        let mut prev_end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.size == 0 {
                return Err(malformed(M, "a memory region is empty"));
            }
            if (r.gpa | r.size) & mask != 0 {
                return Err(malformed(M, "a memory region is not page aligned"));
            }
            let Some(end) = r.gpa.checked_add(r.size) else {
                return Err(malformed(M, "a memory region runs past 2^64"));
            };
            if i > 0 && r.gpa < prev_end {
                return Err(malformed(M, "memory regions overlap or are not sorted"));
            }
            prev_end = end;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Encoder and decoder.

/// Writes frames to any `Write`. Each message is written with a few `write_all` calls:
/// wrap sockets in a `BufWriter`, and flush at the points the peer waits on.
#[derive(Debug)]
pub struct Encoder<W> {
    writer: W,
    bytes: u64,
}

impl<W: Write> Encoder<W> {
    /// An encoder over `writer`.
    pub fn new(writer: W) -> Self {
        Self { writer, bytes: 0 }
    }

    /// Encodes and writes `msg`. Refuses (before writing anything) a message the decoder
    /// would refuse.
    pub fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let (fixed, tail) = encode_parts(msg)?;
        self.write_frame(msg.message_type(), &fixed, tail)
    }

    /// Writes a `Pages` message for the pages in `data`, starting at `gpa`, without
    /// copying `data`. `data` must be a whole number of pages, at most
    /// [`MAX_RUN_BYTES`].
    pub fn send_pages(
        &mut self,
        gpa: u64,
        page_shift: u8,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        const M: &str = "Pages";
        if data.len() > MAX_RUN_BYTES {
            return Err(malformed(M, "the run is longer than MAX_RUN_BYTES"));
        }
        let count = u32::try_from(data.len() >> page_shift.min(63))
            .map_err(|_| malformed(M, "the run is longer than MAX_RUN_BYTES"))?;
        check_range(M, gpa, page_shift, count)?;
        if run_bytes(page_shift, count) != Some(data.len()) {
            return Err(malformed(
                M,
                "the data length disagrees with the page count",
            ));
        }
        let mut fixed = Vec::with_capacity(16);
        put_run_fixed(&mut fixed, gpa, page_shift, count, false);
        self.write_frame(MessageType::Pages, &fixed, data)
    }

    fn write_frame(
        &mut self,
        ty: MessageType,
        fixed: &[u8],
        tail: &[u8],
    ) -> Result<(), ProtocolError> {
        let len = fixed.len().saturating_add(tail.len());
        let len32 = u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_PAYLOAD)
            .ok_or(ProtocolError::PayloadTooLarge {
                len: u64::try_from(len).unwrap_or(u64::MAX),
                max: MAX_PAYLOAD,
            })?;
        let mut head = [0u8; FRAME_HEADER_LEN];
        head[0..4].copy_from_slice(&MAGIC);
        head[4..6].copy_from_slice(&ty.code().to_le_bytes());
        head[6..8].copy_from_slice(&0u16.to_le_bytes());
        head[8..12].copy_from_slice(&len32.to_le_bytes());
        let mut crc = Crc32c::new();
        crc.update(&head);
        crc.update(fixed);
        crc.update(tail);
        self.writer.write_all(&head)?;
        self.writer.write_all(fixed)?;
        self.writer.write_all(tail)?;
        self.writer.write_all(&crc.finish().to_le_bytes())?;
        self.bytes = self
            .bytes
            .saturating_add(u64::from(len32))
            .saturating_add(16);
        Ok(())
    }

    /// Flushes the writer.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        Ok(self.writer.flush()?)
    }

    /// Bytes written so far, framing included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.writer
    }

    /// The writer, giving up the encoder.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

/// Reads frames from any `Read`. Never panics; a stream that ends returns
/// [`ProtocolError::Closed`] between frames and [`ProtocolError::Truncated`] inside one.
/// After the first `Header` it refuses page messages of another page size.
#[derive(Debug)]
pub struct Decoder<R> {
    reader: R,
    page_shift: Option<u8>,
    bytes: u64,
}

impl<R: Read> Decoder<R> {
    /// A decoder over `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            page_shift: None,
            bytes: 0,
        }
    }

    /// Refuses page messages whose page size is not `1 << page_shift`. Set automatically
    /// by the first `Header` received.
    pub fn expect_page_shift(&mut self, page_shift: u8) {
        self.page_shift = Some(page_shift);
    }

    /// Reads and decodes the next message.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        let mut head = [0u8; FRAME_HEADER_LEN];
        self.read_head(&mut head)?;
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&head[0..4]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let code = u16::from_le_bytes([head[4], head[5]]);
        let flags = u16::from_le_bytes([head[6], head[7]]);
        let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge {
                len: u64::from(len),
                max: MAX_PAYLOAD,
            });
        }
        let len = usize::try_from(len).map_err(|_| ProtocolError::PayloadTooLarge {
            len: u64::from(len),
            max: MAX_PAYLOAD,
        })?;
        let mut payload = vec![0u8; len];
        self.read_body(&mut payload)?;
        let mut trailer = [0u8; FRAME_TRAILER_LEN];
        self.read_body(&mut trailer)?;
        let sent = u32::from_le_bytes(trailer);
        let mut crc = Crc32c::new();
        crc.update(&head);
        crc.update(&payload);
        let computed = crc.finish();
        if sent != computed {
            return Err(ProtocolError::BadChecksum { sent, computed });
        }
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(len).unwrap_or(u64::MAX))
            .saturating_add(16);
        let ty = MessageType::from_code(code).ok_or(ProtocolError::UnknownType(code))?;
        if flags != 0 {
            return Err(ProtocolError::UnknownFlags {
                message: ty.name(),
                flags,
            });
        }
        let msg = decode_payload(ty, payload)?;
        if let Some(shift) = message_page_shift(&msg) {
            match self.page_shift {
                Some(expected) if expected != shift => {
                    return Err(ProtocolError::PageSizeMismatch {
                        ours: 1u64 << expected.min(63),
                        theirs: 1u64 << shift.min(63),
                    });
                }
                None if matches!(msg, Message::Header(_)) => self.page_shift = Some(shift),
                _ => {}
            }
        }
        Ok(msg)
    }

    /// Reads the next message and checks that its type is one of `expected`: the
    /// session code's way to follow the message order in the protocol document. An
    /// `Error` from the peer, unless expected, becomes [`ProtocolError::Peer`].
    pub fn recv_expecting(&mut self, expected: &[MessageType]) -> Result<Message, ProtocolError> {
        let msg = self.recv()?;
        let ty = msg.message_type();
        if expected.contains(&ty) {
            return Ok(msg);
        }
        if let Message::Error(text) = msg {
            return Err(ProtocolError::Peer(text));
        }
        let names: Vec<&str> = expected.iter().map(|t| t.name()).collect();
        Err(ProtocolError::Unexpected {
            got: ty.name(),
            expected: match names.split_last() {
                None => "nothing".to_owned(),
                Some((last, [])) => (*last).to_owned(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            },
        })
    }

    /// Fills the frame header; EOF before its first byte is `Closed`.
    fn read_head(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        let mut filled = 0;
        while filled < buf.len() {
            let Some(rest) = buf.get_mut(filled..) else {
                break;
            };
            match self.reader.read(rest) {
                Ok(0) if filled == 0 => return Err(ProtocolError::Closed),
                Ok(0) => return Err(ProtocolError::Truncated),
                Ok(n) => filled = filled.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_body(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        self.reader.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtocolError::Truncated
            } else {
                e.into()
            }
        })
    }

    /// Bytes of whole frames read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.reader
    }

    /// The reader, giving up the decoder.
    pub fn into_inner(self) -> R {
        self.reader
    }
}

/// Encodes `msg` into a new buffer, frame included.
pub fn encode_to_vec(msg: &Message) -> Result<Vec<u8>, ProtocolError> {
    let mut enc = Encoder::new(Vec::new());
    enc.send(msg)?;
    Ok(enc.into_inner())
}

#[cfg(test)]
#[path = "protocol/tests.rs"]
mod tests;
