//! Payload layouts: encoding a message into its fixed fields and a borrowed tail, and
//! decoding a checked payload back, with every inner field validated.

use super::*;

// ---------------------------------------------------------------------------------------
// Payload encoding.

fn put_u8(b: &mut Vec<u8>, v: u8) {
    b.push(v);
}
fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn len_u32(message: &'static str, len: usize) -> Result<u32, ProtocolError> {
    u32::try_from(len).map_err(|_| malformed(message, "a field is longer than 4 GiB"))
}

/// Run layout: gpa u64, count u32, page_shift u8, encoding u8 (0 bytes, 1 zero),
/// reserved u16 = 0, then the data for encoding 0.
pub(super) fn put_run_fixed(b: &mut Vec<u8>, gpa: u64, shift: u8, count: u32, zero: bool) {
    put_u64(b, gpa);
    put_u32(b, count);
    put_u8(b, shift);
    put_u8(b, u8::from(zero));
    put_u16(b, 0);
}

/// Splits a message into its fixed part and a borrowed tail (page data or blob), so
/// large data is written without a copy.
pub(super) fn encode_parts(msg: &Message) -> Result<(Vec<u8>, &[u8]), ProtocolError> {
    let name = msg.message_type().name();
    let mut b = Vec::with_capacity(64);
    let mut tail: &[u8] = &[];
    match msg {
        Message::Header(h) => {
            h.validate()?;
            put_u32(&mut b, h.version);
            put_u8(&mut b, h.arch.code());
            put_u8(&mut b, h.page_shift);
            put_u8(
                &mut b,
                match h.channel {
                    Channel::Main => 0,
                    Channel::Demand => 1,
                },
            );
            put_u8(&mut b, 0);
            put_u64(&mut b, h.features);
            put_u64(&mut b, h.session_id);
            put_u32(&mut b, h.vcpu_count);
            put_u32(&mut b, len_u32(name, h.regions.len())?);
            for r in &h.regions {
                put_u64(&mut b, r.gpa);
                put_u64(&mut b, r.size);
            }
        }
        Message::Ack(kind) => put_u32(&mut b, kind.code()),
        Message::Error(text) => {
            if text.len() > MAX_ERROR_TEXT {
                return Err(malformed(name, "the text is longer than MAX_ERROR_TEXT"));
            }
            tail = text.as_bytes();
        }
        Message::Pages(run) => {
            run.validate(name)?;
            tail = put_run(&mut b, run);
        }
        Message::RoundEnd(r) => {
            put_u32(&mut b, r.round);
            put_u32(&mut b, 0);
            put_u64(&mut b, r.dirty_bytes);
            put_u64(&mut b, r.dirty_rate);
        }
        Message::SwitchOver(mode) => put_u32(
            &mut b,
            match mode {
                SwitchMode::Precopy => 0,
                SwitchMode::Postcopy => 1,
            },
        ),
        Message::VcpuState { vcpu_id, blob } => {
            if blob.len() > MAX_RUN_BYTES {
                return Err(malformed(name, "the blob is longer than MAX_RUN_BYTES"));
            }
            put_u32(&mut b, *vcpu_id);
            put_u32(&mut b, len_u32(name, blob.len())?);
            tail = blob;
        }
        Message::DeviceState { id, blob } => {
            if id.is_empty() || id.len() > MAX_DEVICE_ID {
                return Err(malformed(name, "the device id is empty or too long"));
            }
            if blob.len() > MAX_RUN_BYTES {
                return Err(malformed(name, "the blob is longer than MAX_RUN_BYTES"));
            }
            put_u16(&mut b, u16::try_from(id.len()).unwrap_or(u16::MAX));
            b.extend_from_slice(id.as_bytes());
            put_u32(&mut b, len_u32(name, blob.len())?);
            tail = blob;
        }
        Message::Complete | Message::PostcopyDone | Message::Resume => {}
        Message::PageRequest(r) => {
            check_request(r)?;
            put_u64(&mut b, r.request_id);
            put_u64(&mut b, r.gpa);
            put_u32(&mut b, r.count);
            put_u8(&mut b, r.page_shift);
            put_u8(&mut b, 0);
            put_u16(&mut b, 0);
        }
        Message::PageResponse { request_id, run } => {
            run.validate(name)?;
            put_u64(&mut b, *request_id);
            tail = put_run(&mut b, run);
        }
        Message::ReceivedPages(map) | Message::StalePages(map) => {
            map.validate()?;
            put_u64(&mut b, map.gpa);
            put_u32(&mut b, map.count);
            put_u8(&mut b, map.page_shift);
            put_u8(&mut b, 0);
            put_u16(&mut b, 0);
            tail = &map.bitmap;
        }
        Message::ResumeReady { received } => put_u64(&mut b, *received),
        Message::PageDigests(d) => {
            d.validate()?;
            put_u64(&mut b, d.gpa);
            put_u32(&mut b, len_u32(name, d.digests.len())?);
            put_u8(&mut b, d.page_shift);
            put_u8(&mut b, 0);
            put_u16(&mut b, 0);
            b.reserve(d.digests.len() * 4);
            for &crc in &d.digests {
                put_u32(&mut b, crc);
            }
        }
    }
    Ok((b, tail))
}

fn put_run<'a>(b: &mut Vec<u8>, run: &'a PageRun) -> &'a [u8] {
    match &run.data {
        PageData::Bytes(data) => {
            put_run_fixed(b, run.gpa, run.page_shift, run.count, false);
            data
        }
        PageData::Zero => {
            put_run_fixed(b, run.gpa, run.page_shift, run.count, true);
            &[]
        }
    }
}

fn check_request(r: &PageRequest) -> Result<(), ProtocolError> {
    const M: &str = "PageRequest";
    check_range(M, r.gpa, r.page_shift, r.count)?;
    if run_bytes(r.page_shift, r.count).is_none_or(|n| n > MAX_RUN_BYTES) {
        return Err(malformed(
            M,
            "more pages are asked for than one frame holds",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Payload decoding.

/// A cursor over one payload; every read past the end is a `Malformed` error.
struct Fields<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if n > self.buf.len() {
            return Err(malformed(
                self.message,
                "the payload is shorter than its fields",
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn zero_u8(&mut self) -> Result<(), ProtocolError> {
        match self.u8()? {
            0 => Ok(()),
            _ => Err(malformed(self.message, "a reserved field is not zero")),
        }
    }
    fn zero_u16(&mut self) -> Result<(), ProtocolError> {
        match self.u16()? {
            0 => Ok(()),
            _ => Err(malformed(self.message, "a reserved field is not zero")),
        }
    }

    fn len_prefixed_u32(&mut self) -> Result<usize, ProtocolError> {
        let len = self.u32()?;
        usize::try_from(len).map_err(|_| malformed(self.message, "a length does not fit"))
    }

    /// The rest of the payload must be exactly `n` bytes long.
    fn expect_rest(&self, n: usize) -> Result<(), ProtocolError> {
        if self.buf.len() != n {
            return Err(malformed(
                self.message,
                "the payload length disagrees with its fields",
            ));
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        self.expect_rest(0)
    }
}

/// Parses the fixed fields of a run and checks the data length that must follow.
fn decode_run(f: &mut Fields<'_>) -> Result<(u64, u8, u32, bool), ProtocolError> {
    let gpa = f.u64()?;
    let count = f.u32()?;
    let shift = f.u8()?;
    let zero = match f.u8()? {
        0 => false,
        1 => true,
        _ => return Err(malformed(f.message, "the run encoding is unknown")),
    };
    f.zero_u16()?;
    check_range(f.message, gpa, shift, count)?;
    if zero {
        f.finish()?;
    } else {
        match run_bytes(shift, count) {
            Some(n) if n <= MAX_RUN_BYTES => f.expect_rest(n)?,
            _ => return Err(malformed(f.message, "the run is longer than MAX_RUN_BYTES")),
        }
    }
    Ok((gpa, shift, count, zero))
}

/// Moves the last `tail` bytes of `payload` to the front, in place, and returns it: the
/// page data or blob without a second allocation.
fn take_tail(mut payload: Vec<u8>, tail: usize) -> Vec<u8> {
    let start = payload.len().saturating_sub(tail);
    payload.drain(..start);
    payload
}

pub(super) fn decode_payload(ty: MessageType, payload: Vec<u8>) -> Result<Message, ProtocolError> {
    let message = ty.name();
    let mut f = Fields {
        buf: &payload,
        message,
    };
    let msg = match ty {
        MessageType::Header => {
            let version = f.u32()?;
            if version != PROTOCOL_VERSION {
                // Only the version field is fixed across versions.
                return Err(ProtocolError::UnsupportedVersion {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            let arch = Arch::from_code(f.u8()?)
                .ok_or_else(|| malformed(message, "the architecture is unknown"))?;
            let page_shift = f.u8()?;
            let channel = match f.u8()? {
                0 => Channel::Main,
                1 => Channel::Demand,
                _ => return Err(malformed(message, "the channel is unknown")),
            };
            f.zero_u8()?;
            let features = f.u64()?;
            let session_id = f.u64()?;
            let vcpu_count = f.u32()?;
            let count = f.len_prefixed_u32()?;
            if count > MAX_REGIONS {
                return Err(malformed(
                    message,
                    "there are more than MAX_REGIONS regions",
                ));
            }
            // count <= MAX_REGIONS, so this cannot overflow.
            f.expect_rest(count * 16)?;
            let mut regions = Vec::with_capacity(count);
            for _ in 0..count {
                let gpa = f.u64()?;
                let size = f.u64()?;
                regions.push(Region { gpa, size });
            }
            let h = Header {
                version,
                arch,
                page_shift,
                channel,
                features,
                session_id,
                vcpu_count,
                regions,
            };
            h.validate()?;
            Message::Header(h)
        }
        MessageType::Ack => {
            let kind = AckKind::from_code(f.u32()?)
                .ok_or_else(|| malformed(message, "the acknowledgement kind is unknown"))?;
            f.finish()?;
            Message::Ack(kind)
        }
        MessageType::Error => {
            if payload.len() > MAX_ERROR_TEXT {
                return Err(malformed(message, "the text is longer than MAX_ERROR_TEXT"));
            }
            let text = String::from_utf8(payload)
                .map_err(|_| malformed(message, "the text is not UTF-8"))?;
            Message::Error(text)
        }
        MessageType::Pages => {
            let (gpa, page_shift, count, zero) = decode_run(&mut f)?;
            let rest = f.buf.len();
            Message::Pages(PageRun {
                gpa,
                page_shift,
                count,
                data: if zero {
                    PageData::Zero
                } else {
                    PageData::Bytes(take_tail(payload, rest))
                },
            })
        }
        MessageType::RoundEnd => {
            let round = f.u32()?;
            f.zero_u16()?;
            f.zero_u16()?;
            let dirty_bytes = f.u64()?;
            let dirty_rate = f.u64()?;
            f.finish()?;
            Message::RoundEnd(Round {
                round,
                dirty_bytes,
                dirty_rate,
            })
        }
        MessageType::SwitchOver => {
            let mode = match f.u32()? {
                0 => SwitchMode::Precopy,
                1 => SwitchMode::Postcopy,
                _ => return Err(malformed(message, "the switch-over mode is unknown")),
            };
            f.finish()?;
            Message::SwitchOver(mode)
        }
        MessageType::VcpuState => {
            let vcpu_id = f.u32()?;
            let len = f.len_prefixed_u32()?;
            f.expect_rest(len)?;
            Message::VcpuState {
                vcpu_id,
                blob: take_tail(payload, len),
            }
        }
        MessageType::DeviceState => {
            let id_len = usize::from(f.u16()?);
            if id_len == 0 || id_len > MAX_DEVICE_ID {
                return Err(malformed(message, "the device id is empty or too long"));
            }
            let id = std::str::from_utf8(f.take(id_len)?)
                .map_err(|_| malformed(message, "the device id is not UTF-8"))?
                .to_owned();
            let len = f.len_prefixed_u32()?;
            f.expect_rest(len)?;
            Message::DeviceState {
                id,
                blob: take_tail(payload, len),
            }
        }
        MessageType::Complete => {
            f.finish()?;
            Message::Complete
        }
        MessageType::PageRequest => {
            let request_id = f.u64()?;
            let gpa = f.u64()?;
            let count = f.u32()?;
            let page_shift = f.u8()?;
            f.zero_u8()?;
            f.zero_u16()?;
            f.finish()?;
            let r = PageRequest {
                request_id,
                gpa,
                page_shift,
                count,
            };
            check_request(&r)?;
            Message::PageRequest(r)
        }
        MessageType::PageResponse => {
            let request_id = f.u64()?;
            let (gpa, page_shift, count, zero) = decode_run(&mut f)?;
            let rest = f.buf.len();
            Message::PageResponse {
                request_id,
                run: PageRun {
                    gpa,
                    page_shift,
                    count,
                    data: if zero {
                        PageData::Zero
                    } else {
                        PageData::Bytes(take_tail(payload, rest))
                    },
                },
            }
        }
        MessageType::PostcopyDone => {
            f.finish()?;
            Message::PostcopyDone
        }
        MessageType::Resume => {
            f.finish()?;
            Message::Resume
        }
        MessageType::ReceivedPages | MessageType::StalePages => {
            let gpa = f.u64()?;
            let count = f.u32()?;
            let page_shift = f.u8()?;
            f.zero_u8()?;
            f.zero_u16()?;
            check_range(message, gpa, page_shift, count)?;
            let rest = f.buf.len();
            let map = ReceivedPages {
                gpa,
                page_shift,
                count,
                bitmap: take_tail(payload, rest),
            };
            map.validate()?;
            if ty == MessageType::StalePages {
                Message::StalePages(map)
            } else {
                Message::ReceivedPages(map)
            }
        }
        MessageType::ResumeReady => {
            let received = f.u64()?;
            f.finish()?;
            Message::ResumeReady { received }
        }
        MessageType::PageDigests => {
            let gpa = f.u64()?;
            let count = f.u32()?;
            let page_shift = f.u8()?;
            f.zero_u8()?;
            f.zero_u16()?;
            if count == 0 || count > MAX_DIGESTS {
                return Err(malformed(
                    message,
                    "the digest count is 0 or above MAX_DIGESTS",
                ));
            }
            let n = usize::try_from(count).map_err(|_| malformed(message, "too many digests"))?;
            f.expect_rest(n * 4)?;
            let mut digests = Vec::with_capacity(n);
            for _ in 0..n {
                digests.push(f.u32()?);
            }
            let d = PageDigests {
                gpa,
                page_shift,
                digests,
            };
            d.validate()?;
            Message::PageDigests(d)
        }
    };
    Ok(msg)
}

/// The page shift a message's page range uses, if it has one.
pub(super) fn message_page_shift(msg: &Message) -> Option<u8> {
    match msg {
        Message::Pages(run) | Message::PageResponse { run, .. } => Some(run.page_shift),
        Message::PageRequest(r) => Some(r.page_shift),
        Message::PageDigests(d) => Some(d.page_shift),
        Message::ReceivedPages(m) | Message::StalePages(m) => Some(m.page_shift),
        Message::Header(h) => Some(h.page_shift),
        _ => None,
    }
}
