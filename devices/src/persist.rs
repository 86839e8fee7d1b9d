//! Device state for snapshot and live migration: one small versioned byte format (the
//! VMM frames its vCPU and VM state with it too, under versions of their own).
//!
//! Every blob is framed the same way (all integers little-endian):
//!
//! ```text
//! magic [4] | version u16 | reserved u16 (0) | payload length u32 | payload | CRC-32 u32
//! ```
//!
//! The CRC-32 (IEEE 802.3, as zlib computes it) covers everything before it. The magic
//! names the kind of state ([`SERIAL_MAGIC`], [`VIRTIO_MMIO_MAGIC`]), so one device's
//! blob given to another is refused. The payload is written field by field with a
//! [`Writer`] and read back with a [`Reader`], whose every read is checked: damaged,
//! truncated or foreign input is an error, never a panic, and no length read from the
//! input is allocated before it is checked against a bound and the bytes left.
//!
//! Devices decode a whole blob and check it before they change anything, so a failed
//! restore leaves the device as it was.

use std::io;

/// Magic of a serial port's state ([`Serial::save_state`](crate::Serial::save_state)).
pub const SERIAL_MAGIC: [u8; 4] = *b"RVSR";
/// Magic of a virtio-mmio transport's state, with its device's
/// ([`MmioTransport::save_state`](crate::MmioTransport::save_state)).
pub const VIRTIO_MMIO_MAGIC: [u8; 4] = *b"RVVM";
/// Magic of a virtio PCI transport's state, with its device's
/// ([`PciTransport::save_state`](crate::PciTransport::save_state)).
pub const VIRTIO_PCI_MAGIC: [u8; 4] = *b"RVVP";
/// The format version this build writes and reads.
pub const PERSIST_VERSION: u16 = 1;

/// Magic, version, reserved, payload length.
const HEADER_LEN: usize = 12;
const CRC_LEN: usize = 4;

/// Errors of saving and restoring device state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The input ends before a field does.
    #[error("Saved state truncated: {what} needs {needed} bytes at offset {offset}")]
    Truncated {
        /// The field.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Where it starts in the part being read.
        offset: usize,
    },
    /// The blob is not the kind of state expected.
    #[error("Not {0} state (wrong magic)")]
    Magic(&'static str),
    /// A format version this build does not read.
    #[error("Saved state version {found} is not supported (this build reads {supported})")]
    Version {
        /// The blob's version.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The checksum does not match: the blob is damaged.
    #[error("Saved state checksum {found:#010x} does not match {computed:#010x}")]
    Checksum {
        /// The checksum in the blob.
        found: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// Bytes after the end of the state.
    #[error("{0} bytes after the end of the device state")]
    Trailing(usize),
    /// A list longer than its bound.
    #[error("Saved state has {len} {what}; at most {max} are allowed")]
    TooMany {
        /// The list.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A field holds a value that cannot be.
    #[error("Saved state has an invalid {0}")]
    Invalid(&'static str),
    /// The state is of a device unlike the one restoring it.
    #[error("Device state {what} is {found}, but this device's is {expected}")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// The state's value.
        found: u64,
        /// This device's value.
        expected: u64,
    },
    /// A saved queue configuration that the driver could not have set.
    #[error("Saved queue {index} is invalid: {why}")]
    Queue {
        /// The queue index.
        index: usize,
        /// What is wrong with it.
        why: String,
    },
    /// The restored serial port could not raise its pending interrupt.
    #[error("Cannot raise the restored serial port's interrupt")]
    Interrupt(#[source] io::Error),
    /// The device refused the restored queues.
    #[error("Cannot activate the restored virtio device")]
    Activate(#[source] crate::VirtioError),
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i: u32 = 0;
        while i < 256 {
            let mut crc = i;
            let mut bit = 0;
            while bit < 8 {
                crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
                bit += 1;
            }
            table[i as usize] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = (crc >> 8) ^ TABLE[usize::from(crc.to_le_bytes()[0] ^ b)];
    }
    !crc
}

/// Builds a payload field by field (little-endian), then frames it.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends raw bytes (their length is the reader's to know).
    pub fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }

    /// Appends a boolean as 0 or 1.
    pub fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// Appends a list count as a `u32`, checked against the bound the reader applies
    /// (so whatever is written can be read back).
    pub fn count(
        &mut self,
        what: &'static str,
        len: usize,
        max: usize,
    ) -> Result<(), PersistError> {
        match u32::try_from(len) {
            Ok(n) if len <= max => {
                self.u32(n);
                Ok(())
            }
            _ => Err(PersistError::TooMany { what, len, max }),
        }
    }

    /// The payload so far.
    pub fn payload(&self) -> &[u8] {
        &self.0
    }

    /// The framed blob: header, payload, checksum (module docs).
    pub fn finish(self, magic: [u8; 4]) -> Result<Vec<u8>, PersistError> {
        self.finish_as(magic, PERSIST_VERSION)
    }

    /// The framed blob with a layout version of the caller's (the VMM's vCPU and VM
    /// state use this framing with versions of their own).
    pub fn finish_as(self, magic: [u8; 4], version: u16) -> Result<Vec<u8>, PersistError> {
        frame(magic, version, &self.0)
    }
}

/// Frames `payload` as version `version`.
fn frame(magic: [u8; 4], version: u16, payload: &[u8]) -> Result<Vec<u8>, PersistError> {
    let len = u32::try_from(payload.len()).map_err(|_| PersistError::TooMany {
        what: "payload bytes",
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut w = Writer(Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN));
    w.bytes(&magic);
    w.u16(version);
    w.u16(0);
    w.u32(len);
    w.bytes(payload);
    let crc = crc32(&w.0);
    w.u32(crc);
    Ok(w.0)
}

/// Reads a payload back, each read checked against the bytes left.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` (a payload, or a part of one).
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Checks the frame of `bytes` (magic, version, reserved field, length, checksum,
    /// nothing after it) and returns a reader over its payload. `kind` names the state
    /// in the error for a wrong magic.
    pub fn unframe(
        magic: [u8; 4],
        kind: &'static str,
        bytes: &'a [u8],
    ) -> Result<Self, PersistError> {
        Self::unframe_as(magic, PERSIST_VERSION, kind, bytes)
    }

    /// [`Reader::unframe`] for a blob of layout `version` (see [`Writer::finish_as`]).
    pub fn unframe_as(
        magic: [u8; 4],
        version: u16,
        kind: &'static str,
        bytes: &'a [u8],
    ) -> Result<Self, PersistError> {
        let mut r = Reader::new(bytes);
        if r.array::<4>("magic")? != magic {
            return Err(PersistError::Magic(kind));
        }
        let found = r.u16("version")?;
        if found != version {
            return Err(PersistError::Version {
                found,
                supported: version,
            });
        }
        if r.u16("reserved header field")? != 0 {
            return Err(PersistError::Invalid("reserved header field"));
        }
        let len = usize::try_from(r.u32("payload length")?).unwrap_or(usize::MAX);
        let payload = r.take(len, "payload")?;
        let covered = r.pos;
        let found = r.u32("checksum")?;
        r.end()?;
        let computed = crc32(&bytes[..covered]);
        if found != computed {
            return Err(PersistError::Checksum { found, computed });
        }
        Ok(Reader::new(payload))
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], PersistError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(PersistError::Truncated {
            what,
            needed: n,
            offset: self.pos,
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], PersistError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// A byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, PersistError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, PersistError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    /// A `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, PersistError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, PersistError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A boolean: 0 or 1, anything else is invalid.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, PersistError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(PersistError::Invalid(what)),
        }
    }

    /// A list count, checked against `max` and against the bytes left (each element
    /// takes at least `elem` bytes), so the caller may allocate that many elements.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        elem: usize,
    ) -> Result<usize, PersistError> {
        let len = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if len > max {
            return Err(PersistError::TooMany { what, len, max });
        }
        let needed = len.saturating_mul(elem);
        if needed > self.remaining() {
            return Err(PersistError::Truncated {
                what,
                needed,
                offset: self.pos,
            });
        }
        Ok(len)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Checks that everything was read.
    pub fn end(&self) -> Result<(), PersistError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(PersistError::Trailing(n)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Re-frames `payload` with a valid checksum, as a wrong encoder would.
    pub(crate) fn reframe(magic: [u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
        frame(magic, version, payload).unwrap()
    }

    /// The payload of a framed blob.
    pub(crate) fn payload_of(bytes: &[u8]) -> &[u8] {
        &bytes[HEADER_LEN..bytes.len() - CRC_LEN]
    }

    /// Every truncation, every single-byte change, a trailing byte, and another
    /// version of a valid blob is refused by `decode`, without a panic.
    pub(crate) fn assert_damage_is_refused(
        bytes: &[u8],
        magic: [u8; 4],
        mut decode: impl FnMut(&[u8]) -> Result<(), PersistError>,
    ) {
        assert!(decode(bytes).is_ok(), "the intact blob is accepted");
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        let mut bad = bytes.to_vec();
        for at in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                bad[at] ^= flip;
                assert!(decode(&bad).is_err(), "byte {at} xor {flip:#x}");
                bad[at] ^= flip;
            }
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            decode(&longer).unwrap_err(),
            PersistError::Trailing(1)
        ));
        let payload = payload_of(bytes);
        assert!(matches!(
            decode(&reframe(magic, PERSIST_VERSION + 1, payload)).unwrap_err(),
            PersistError::Version { found: 2, .. }
        ));
        assert!(matches!(
            decode(&reframe(*b"XXXX", PERSIST_VERSION, payload)).unwrap_err(),
            PersistError::Magic(_)
        ));
        assert!(decode(&reframe(magic, PERSIST_VERSION, payload)).is_ok());
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::new();
        w.u8(1);
        w.u16(0x0203);
        w.u32(0x0405_0607);
        w.u64(0x0809_0a0b_0c0d_0e0f);
        w.flag(true);
        w.count("things", 2, 2).unwrap();
        w.bytes(b"ab");
        assert!(w.count("things", 3, 2).is_err());
        let blob = w.finish(*b"TEST").unwrap();
        let mut r = Reader::unframe(*b"TEST", "test", &blob).unwrap();
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 0x0203);
        assert_eq!(r.u32("c").unwrap(), 0x0405_0607);
        assert_eq!(r.u64("d").unwrap(), 0x0809_0a0b_0c0d_0e0f);
        assert!(r.flag("e").unwrap());
        assert_eq!(r.count("things", 2, 1).unwrap(), 2);
        assert_eq!(r.take(2, "f").unwrap(), b"ab");
        r.end().unwrap();
        assert!(matches!(
            r.u8("past the end").unwrap_err(),
            PersistError::Truncated { .. }
        ));
    }

    #[test]
    fn counts_are_bounded_before_anything_is_allocated() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            r.count("x", 10, 1).unwrap_err(),
            PersistError::TooMany { len, .. } if len == u32::MAX as usize
        ));
        let mut r = Reader::new(&[5, 0, 0, 0, 1, 2]);
        assert!(matches!(
            r.count("x", 10, 1).unwrap_err(),
            PersistError::Truncated { needed: 5, .. }
        ));
        let mut r = Reader::new(&[2]);
        assert!(matches!(
            r.flag("flag").unwrap_err(),
            PersistError::Invalid("flag")
        ));
        let blob = Writer::new().finish(*b"TEST").unwrap();
        assert_damage_is_refused(&blob, *b"TEST", |b| {
            Reader::unframe(*b"TEST", "test", b).and_then(|r| r.end())
        });
    }

    #[test]
    fn a_frame_of_another_version_reads_back_only_as_that_version() {
        let mut w = Writer::new();
        w.bytes(b"payload");
        let bytes = w.finish_as(*b"TEST", 3).unwrap();
        let mut r = Reader::unframe_as(*b"TEST", 3, "test", &bytes).unwrap();
        assert_eq!(r.take(7, "payload").unwrap(), b"payload");
        r.end().unwrap();
        for len in 0..bytes.len() {
            assert!(Reader::unframe_as(*b"TEST", 3, "test", &bytes[..len]).is_err());
        }
        let mut bad = bytes.clone();
        for at in 0..bytes.len() {
            bad[at] ^= 0x10;
            assert!(
                Reader::unframe_as(*b"TEST", 3, "test", &bad).is_err(),
                "byte {at}"
            );
            bad[at] ^= 0x10;
        }
        assert!(matches!(
            Reader::unframe_as(*b"TEST", 4, "test", &bytes),
            Err(PersistError::Version {
                found: 3,
                supported: 4
            })
        ));
        assert!(matches!(
            Reader::unframe(*b"TEST", "test", &bytes),
            Err(PersistError::Version { found: 3, .. })
        ));
        assert!(matches!(
            Reader::unframe_as(*b"OTHR", 3, "other", &bytes),
            Err(PersistError::Magic("other"))
        ));
        let mut r = Reader::new(&[5, 0, 0, 0, 1]);
        assert!(matches!(
            r.count("things", 4, 1),
            Err(PersistError::TooMany { len: 5, .. })
        ));
        let mut r = Reader::new(&[3, 0, 0, 0, 1]);
        assert!(matches!(
            r.count("things", 4, 1),
            Err(PersistError::Truncated { .. })
        ));
    }
}
