//! The framing and field codec every architecture's vCPU and VM state uses for the
//! migration stream: an explicit little-endian encoder and a checked decoder.
//!
//! ```text
//! magic [4] | version u16 | reserved u16 (0) | payload length u32 | payload | CRC-32 u32
//! ```
//!
//! The CRC-32 (IEEE, the one the devices' state uses too) covers everything before it.
//! Lists carry a u32 count checked against a bound, and against the bytes left, before
//! anything is allocated, so bad bytes give a [`CodecError`], never a panic.

// CRC-32 (IEEE 802.3), the one the devices' state uses too.
pub(crate) use rangevm_devices::persist::crc32;

/// Magic, version, reserved, payload length.
pub(crate) const HEADER_LEN: usize = 12;
/// The trailing checksum.
pub(crate) const CRC_LEN: usize = 4;

/// Errors of encoding and decoding state bytes.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes end before the state does.
    #[error("The state ends early: the {what} needs {needed} bytes at offset {offset}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Where.
        offset: usize,
    },
    /// The bytes do not start with the magic of this kind of state.
    #[error("Not a {0} state")]
    Magic(&'static str),
    /// The bytes are in a layout version this build does not read.
    #[error("State layout version {found} is not the supported version {supported}")]
    Version {
        /// The version in the bytes.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The checksum does not match: the bytes were damaged.
    #[error("The state is corrupted (CRC-32 {found:#010x}, computed {computed:#010x})")]
    Checksum {
        /// The checksum in the bytes.
        found: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// Bytes are left over after the state.
    #[error("The state has {0} unexpected bytes at its end")]
    Trailing(usize),
    /// A list is longer than its bound.
    #[error("The state holds {len} {what}, more than the {max} allowed")]
    TooMany {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A field holds a value no saved state has.
    #[error("The state has an invalid {0}")]
    Invalid(&'static str),
}

/// Little-endian field writer.
#[derive(Default)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
    /// A list count, checked against its bound (so what is written can be read).
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        len: usize,
        max: usize,
    ) -> Result<(), CodecError> {
        match u32::try_from(len) {
            Ok(n) if len <= max => {
                self.u32(n);
                Ok(())
            }
            _ => Err(CodecError::TooMany { what, len, max }),
        }
    }
    pub(crate) fn flag(&mut self, present: bool) {
        self.u8(u8::from(present));
    }
}

/// Checked little-endian field reader.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(CodecError::Truncated {
            what,
            needed: n,
            offset: self.pos,
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A list count, checked against its bound and against the bytes left (each
    /// element takes at least `elem` bytes) before anything is allocated.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        max: usize,
        elem: usize,
    ) -> Result<usize, CodecError> {
        let len = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if len > max {
            return Err(CodecError::TooMany { what, len, max });
        }
        let needed = len.saturating_mul(elem);
        if needed > self.buf.len() - self.pos {
            return Err(CodecError::Truncated {
                what,
                needed,
                offset: self.pos,
            });
        }
        Ok(len)
    }
    pub(crate) fn flag(&mut self, what: &'static str) -> Result<bool, CodecError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(CodecError::Invalid(what)),
        }
    }
    pub(crate) fn end(&self) -> Result<(), CodecError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

/// Wraps a payload in the header (layout `version`) and checksum.
pub(crate) fn frame(magic: [u8; 4], version: u16, payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooMany {
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

/// Checks the header (magic, `version`) and checksum; returns the payload.
pub(crate) fn unframe<'a>(
    magic: [u8; 4],
    version: u16,
    kind: &'static str,
    bytes: &'a [u8],
) -> Result<&'a [u8], CodecError> {
    let mut r = Reader::new(bytes);
    if r.array::<4>("magic")? != magic {
        return Err(CodecError::Magic(kind));
    }
    let found = r.u16("version")?;
    if found != version {
        return Err(CodecError::Version {
            found,
            supported: version,
        });
    }
    if r.u16("reserved header field")? != 0 {
        return Err(CodecError::Invalid("reserved header field"));
    }
    let len = usize::try_from(r.u32("payload length")?).unwrap_or(usize::MAX);
    let payload = r.take(len, "payload")?;
    let covered = r.pos;
    let found = r.u32("checksum")?;
    r.end()?;
    let computed = crc32(&bytes[..covered]);
    if found != computed {
        return Err(CodecError::Checksum { found, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_and_every_damage_is_refused() {
        let bytes = frame(*b"TEST", 3, b"payload").unwrap();
        assert_eq!(unframe(*b"TEST", 3, "test", &bytes).unwrap(), b"payload");
        for len in 0..bytes.len() {
            assert!(unframe(*b"TEST", 3, "test", &bytes[..len]).is_err());
        }
        let mut bad = bytes.clone();
        for at in 0..bytes.len() {
            bad[at] ^= 0x10;
            assert!(unframe(*b"TEST", 3, "test", &bad).is_err(), "byte {at}");
            bad[at] ^= 0x10;
        }
        assert!(matches!(
            unframe(*b"TEST", 4, "test", &bytes),
            Err(CodecError::Version {
                found: 3,
                supported: 4
            })
        ));
        assert!(matches!(
            unframe(*b"OTHR", 3, "other", &bytes),
            Err(CodecError::Magic("other"))
        ));
        let mut r = Reader::new(&[5, 0, 0, 0, 1]);
        assert!(matches!(
            r.count("things", 4, 1),
            Err(CodecError::TooMany { len: 5, .. })
        ));
        let mut r = Reader::new(&[3, 0, 0, 0, 1]);
        assert!(matches!(
            r.count("things", 4, 1),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
