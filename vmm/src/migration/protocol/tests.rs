//! Tests of the wire protocol: round trips, corruption, truncation, compatibility.

use super::wire::put_run_fixed;
use super::*;

const SHIFT: u8 = 12;
const PAGE: usize = 4096;

fn header() -> Header {
    let mut h = Header::new(
        Arch::X86_64,
        SHIFT,
        2,
        vec![
            Region {
                gpa: 0,
                size: 0x8000_0000,
            },
            Region {
                gpa: 0x1_0000_0000,
                size: 0x4000_0000,
            },
        ],
        FEATURE_POSTCOPY | FEATURE_RESUME,
    );
    h.session_id = 0x1234_5678_9abc_def0;
    h
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0) ^ seed)
        .collect()
}

/// One message of every type (and of every variant of the enums inside).
fn every_message() -> Vec<Message> {
    let mut demand = header();
    demand.channel = Channel::Demand;
    let mut map = ReceivedPages::new(0x10_0000, SHIFT, 13);
    assert!(map.set(0));
    assert!(map.set(12));
    assert!(!map.set(13));
    vec![
        Message::Header(header()),
        Message::Header(demand),
        Message::Ack(AckKind::Accepted),
        Message::Pages(PageRun::bytes(0x2000, SHIFT, pattern(2 * PAGE, 7))),
        Message::Pages(PageRun::zero(0x10_0000, SHIFT, 100_000)),
        Message::RoundEnd(Round {
            round: 3,
            dirty_bytes: 12 << 20,
            dirty_rate: 400 << 20,
        }),
        Message::SwitchOver(SwitchMode::Precopy),
        Message::SwitchOver(SwitchMode::Postcopy),
        Message::VcpuState {
            vcpu_id: 1,
            blob: pattern(300, 1),
        },
        Message::VcpuState {
            vcpu_id: 0,
            blob: Vec::new(),
        },
        Message::DeviceState {
            id: "serial0".into(),
            blob: pattern(40, 2),
        },
        Message::Complete,
        Message::StalePages(map.clone()),
        Message::PageDigests(PageDigests {
            gpa: 0x4000,
            page_shift: SHIFT,
            digests: vec![1, 0xffff_ffff, 0x1234_5678],
        }),
        Message::Ack(AckKind::Running),
        Message::PageRequest(PageRequest {
            request_id: 99,
            gpa: 0x7000,
            page_shift: SHIFT,
            count: 4,
        }),
        Message::PageResponse {
            request_id: 99,
            run: PageRun::bytes(0x7000, SHIFT, pattern(PAGE, 3)),
        },
        Message::PageResponse {
            request_id: 100,
            run: PageRun::zero(0x9000, SHIFT, 1),
        },
        Message::PostcopyDone,
        Message::Ack(AckKind::AllPagesReceived),
        Message::Resume,
        Message::ReceivedPages(map),
        Message::ResumeReady { received: 2 },
        Message::Error("The destination ran out of memory.".into()),
    ]
}

/// The encoded stream and the offset at which each frame ends.
fn encode_all(msgs: &[Message]) -> (Vec<u8>, Vec<usize>) {
    let mut enc = Encoder::new(Vec::new());
    let mut ends = Vec::new();
    for m in msgs {
        enc.send(m).expect("encode");
        ends.push(enc.get_mut().len());
    }
    let bytes = enc.bytes_written();
    let out = enc.into_inner();
    assert_eq!(bytes, u64::try_from(out.len()).unwrap());
    (out, ends)
}

/// Decodes until the first error; returns the messages and that error.
fn decode_all(bytes: &[u8]) -> (Vec<Message>, ProtocolError) {
    let mut dec = Decoder::new(bytes);
    let mut out = Vec::new();
    loop {
        match dec.recv() {
            Ok(m) => out.push(m),
            Err(e) => return (out, e),
        }
    }
}

/// A valid frame with any type, flags and payload, so inner checks can be reached.
fn raw_frame(code: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&code.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    f.extend_from_slice(payload);
    let crc = Crc32c::of(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

fn decode_one(bytes: &[u8]) -> Result<Message, ProtocolError> {
    Decoder::new(bytes).recv()
}

/// The payload of `msg` as the encoder writes it.
fn payload_of(msg: &Message) -> Vec<u8> {
    let f = encode_to_vec(msg).unwrap();
    f[FRAME_HEADER_LEN..f.len() - FRAME_TRAILER_LEN].to_vec()
}

fn malformed_reason(r: Result<Message, ProtocolError>) -> &'static str {
    match r {
        Err(ProtocolError::Malformed { reason, .. }) => reason,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn crc32c_known_values() {
    assert_eq!(Crc32c::of(b""), 0);
    assert_eq!(Crc32c::of(b"123456789"), 0xe306_9283);
    assert_eq!(Crc32c::of(&[0u8; 32]), 0x8a91_36aa);
    assert_eq!(Crc32c::of(&[0xffu8; 32]), 0x62a8_ab43);
    let mut c = Crc32c::new();
    c.update(b"1234");
    c.update(b"56789");
    assert_eq!(c.finish(), 0xe306_9283);
}

/// Bit-at-a-time CRC32C, the definition the sliced tables must agree with.
fn crc32c_bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32c_slicing_matches_bitwise() {
    let data = pattern(300, 0x3c);
    for start in 0..20 {
        for end in start..data.len() {
            let bytes = &data[start..end];
            assert_eq!(Crc32c::of(bytes), crc32c_bitwise(bytes), "{start}..{end}");
            let mut tables = Crc32c::new();
            tables.update_tables(bytes);
            assert_eq!(tables.finish(), crc32c_bitwise(bytes), "{start}..{end}");
        }
    }
    // Split updates at every point give the same result.
    let whole = Crc32c::of(&data);
    for cut in 0..data.len() {
        let mut c = Crc32c::new();
        c.update(&data[..cut]);
        c.update(&data[cut..]);
        assert_eq!(c.finish(), whole);
    }
}

#[test]
fn round_trip_every_message() {
    let msgs = every_message();
    let codes: Vec<MessageType> = msgs.iter().map(Message::message_type).collect();
    for t in MessageType::ALL {
        assert!(codes.contains(&t), "{} not covered", t.name());
        assert_eq!(MessageType::from_code(t.code()), Some(t));
    }
    let (bytes, _) = encode_all(&msgs);
    let (back, err) = decode_all(&bytes);
    assert_eq!(back, msgs);
    assert!(matches!(err, ProtocolError::Closed), "{err:?}");
    for m in &msgs {
        assert_eq!(decode_one(&encode_to_vec(m).unwrap()).unwrap(), *m);
    }
}

#[test]
fn zero_runs_carry_no_data() {
    let zero = encode_to_vec(&Message::Pages(PageRun::zero(0, SHIFT, 1 << 20))).unwrap();
    assert_eq!(zero.len(), FRAME_HEADER_LEN + 16 + FRAME_TRAILER_LEN);
    let full = encode_to_vec(&Message::Pages(PageRun::bytes(0, SHIFT, vec![1; PAGE]))).unwrap();
    assert_eq!(full.len(), FRAME_HEADER_LEN + 16 + PAGE + FRAME_TRAILER_LEN);
}

#[test]
fn send_pages_matches_send() {
    let data = pattern(3 * PAGE, 9);
    let mut enc = Encoder::new(Vec::new());
    enc.send_pages(0x3000, SHIFT, &data).unwrap();
    let borrowed = enc.into_inner();
    let owned = encode_to_vec(&Message::Pages(PageRun::bytes(0x3000, SHIFT, data))).unwrap();
    assert_eq!(borrowed, owned);

    let mut enc = Encoder::new(Vec::new());
    assert!(enc.send_pages(0x3000, SHIFT, &[0; 100]).is_err());
    assert!(enc.send_pages(0x3001, SHIFT, &[0; PAGE]).is_err());
    assert!(enc.send_pages(0, SHIFT, &[]).is_err());
    assert!(enc
        .send_pages(0, SHIFT, &vec![0; MAX_RUN_BYTES + PAGE])
        .is_err());
    assert!(enc.into_inner().is_empty(), "nothing written on refusal");
}

#[test]
fn largest_run_fits_the_payload_limit() {
    for shift in [MIN_PAGE_SHIFT, MAX_PAGE_SHIFT] {
        let data = vec![0xa5; MAX_RUN_BYTES];
        let msg = Message::PageResponse {
            request_id: u64::MAX,
            run: PageRun::bytes(0, shift, data),
        };
        let f = encode_to_vec(&msg).unwrap();
        assert_eq!(decode_one(&f).unwrap(), msg);
    }
}

#[test]
fn flipping_any_byte_is_detected() {
    // Small but with every type; the big runs would make this slow in debug builds.
    let mut msgs = every_message();
    msgs[3] = Message::Pages(PageRun::bytes(0x2000, SHIFT, pattern(PAGE, 7)));
    let (bytes, ends) = encode_all(&msgs);
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[i] ^= mask;
            let (back, err) = decode_all(&bad);
            let frame = ends.iter().position(|&end| i < end).unwrap();
            assert_eq!(back.len(), frame, "byte {i} mask {mask:#x}: {err:?}");
            assert_eq!(back[..], msgs[..frame]);
            assert!(!matches!(err, ProtocolError::Closed), "byte {i}");
        }
    }
}

#[test]
fn every_cut_point_is_an_error() {
    let mut msgs = every_message();
    msgs[3] = Message::Pages(PageRun::bytes(0x2000, SHIFT, pattern(PAGE, 7)));
    let (bytes, ends) = encode_all(&msgs);
    for cut in 0..bytes.len() {
        let (back, err) = decode_all(&bytes[..cut]);
        let whole = ends.iter().filter(|&&end| end <= cut).count();
        assert_eq!(back[..], msgs[..whole], "cut {cut}");
        let at_boundary = cut == 0 || ends.contains(&cut);
        if at_boundary {
            assert!(matches!(err, ProtocolError::Closed), "cut {cut}: {err:?}");
        } else {
            assert!(
                matches!(err, ProtocolError::Truncated),
                "cut {cut}: {err:?}"
            );
        }
    }
}

/// A reader that hands out one byte per call and an `Interrupted` error in between.
struct Trickle<'a> {
    data: &'a [u8],
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match (self.data.split_first(), buf.first_mut()) {
            (Some((&b, rest)), Some(out)) => {
                *out = b;
                self.data = rest;
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

#[test]
fn short_reads_and_interrupts() {
    let msgs = every_message();
    let (bytes, _) = encode_all(&msgs);
    let mut dec = Decoder::new(Trickle {
        data: &bytes,
        interrupt: false,
    });
    for m in &msgs {
        assert_eq!(dec.recv().unwrap(), *m);
    }
    assert!(matches!(dec.recv(), Err(ProtocolError::Closed)));
    assert_eq!(dec.bytes_read(), u64::try_from(bytes.len()).unwrap());
}

#[test]
fn frame_level_corruption() {
    let good = encode_to_vec(&Message::Complete).unwrap();

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode_one(&bad),
        Err(ProtocolError::BadMagic { found }) if &found == b"XVMG"
    ));

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        decode_one(&bad),
        Err(ProtocolError::BadChecksum { .. })
    ));

    assert!(matches!(
        decode_one(&raw_frame(0x7777, 0, &[])),
        Err(ProtocolError::UnknownType(0x7777))
    ));
    assert!(matches!(
        decode_one(&raw_frame(MessageType::Complete.code(), 0x8000, &[])),
        Err(ProtocolError::UnknownFlags { flags: 0x8000, .. })
    ));

    // A length over the limit is refused from the 12-byte header alone, before any
    // payload is read or allocated.
    for len in [MAX_PAYLOAD + 1, u32::MAX] {
        let mut head = good[..FRAME_HEADER_LEN].to_vec();
        head[8..12].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_one(&head),
            Err(ProtocolError::PayloadTooLarge { .. })
        ));
    }
    // At the limit it is accepted as far as reading goes: here, truncated.
    let mut head = good[..FRAME_HEADER_LEN].to_vec();
    head[8..12].copy_from_slice(&MAX_PAYLOAD.to_le_bytes());
    assert!(matches!(decode_one(&head), Err(ProtocolError::Truncated)));
}

#[test]
fn inner_lengths_must_agree() {
    // Pages: data one byte short, one byte long.
    let p = payload_of(&Message::Pages(PageRun::bytes(0, SHIFT, vec![1; PAGE])));
    let code = MessageType::Pages.code();
    for bad in [&p[..p.len() - 1], &[&p[..], &[0u8][..]].concat()[..]] {
        assert_eq!(
            malformed_reason(decode_one(&raw_frame(code, 0, bad))),
            "the payload length disagrees with its fields"
        );
    }
    // A zero run with data after it.
    let mut z = payload_of(&Message::Pages(PageRun::zero(0, SHIFT, 2)));
    z.push(0);
    assert!(decode_one(&raw_frame(code, 0, &z)).is_err());
    // Trailing byte on an empty message; payload shorter than fixed fields.
    assert!(decode_one(&raw_frame(MessageType::Complete.code(), 0, &[0])).is_err());
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(
            MessageType::RoundEnd.code(),
            0,
            &[0; 7]
        ))),
        "the payload is shorter than its fields"
    );
    // Blob length field larger and smaller than what follows.
    let v = payload_of(&Message::VcpuState {
        vcpu_id: 0,
        blob: vec![5; 10],
    });
    for delta in [1u32, u32::MAX - 10] {
        let mut bad = v.clone();
        let len = 10u32.wrapping_add(delta);
        bad[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(decode_one(&raw_frame(MessageType::VcpuState.code(), 0, &bad)).is_err());
    }
    // Header claiming more regions than its payload holds, or more than MAX_REGIONS.
    let h = payload_of(&Message::Header(header()));
    for count in [3u32, u32::MAX, 1025] {
        let mut bad = h.clone();
        bad[28..32].copy_from_slice(&count.to_le_bytes());
        assert!(decode_one(&raw_frame(MessageType::Header.code(), 0, &bad)).is_err());
    }
    // Device id length past the payload.
    let d = payload_of(&Message::DeviceState {
        id: "balloon".into(),
        blob: vec![],
    });
    let mut bad = d.clone();
    bad[0..2].copy_from_slice(&60u16.to_le_bytes());
    assert!(decode_one(&raw_frame(MessageType::DeviceState.code(), 0, &bad)).is_err());
}

#[test]
fn page_ranges_are_checked() {
    let zero = |gpa, shift, count| Message::Pages(PageRun::zero(gpa, shift, count));
    let code = MessageType::Pages.code();
    // gpa + count pages past 2^64, for the encoder and for a hand-made frame.
    let over = PageRun::zero(u64::MAX - 0xfff, SHIFT, 2);
    assert!(matches!(
        encode_to_vec(&Message::Pages(over.clone())),
        Err(ProtocolError::RangeOverflow { .. })
    ));
    let mut p = Vec::new();
    put_run_fixed(&mut p, over.gpa, SHIFT, over.count, true);
    assert!(matches!(
        decode_one(&raw_frame(code, 0, &p)),
        Err(ProtocolError::RangeOverflow { count: 2, .. })
    ));
    // The end address must fit in 64 bits: the last page of the address space cannot
    // be described, the one before it can.
    assert!(encode_to_vec(&zero(u64::MAX - 0xfff, SHIFT, 1)).is_err());
    let last = zero(u64::MAX - 0x1fff, SHIFT, 1);
    assert_eq!(decode_one(&encode_to_vec(&last).unwrap()).unwrap(), last);
    // A data run whose count << shift overflows is refused without reading the data.
    let mut p = Vec::new();
    put_run_fixed(&mut p, 0, MAX_PAGE_SHIFT, u32::MAX, false);
    assert!(decode_one(&raw_frame(code, 0, &p)).is_err());
    // Misaligned, empty, bad page size, unknown encoding, reserved field.
    for (gpa, shift, count) in [(0x800, SHIFT, 1), (0, SHIFT, 0), (0, 11, 1), (0, 17, 1)] {
        let mut p = Vec::new();
        put_run_fixed(&mut p, gpa, shift, count, true);
        assert!(
            decode_one(&raw_frame(code, 0, &p)).is_err(),
            "{gpa} {shift} {count}"
        );
        assert!(encode_to_vec(&zero(gpa, shift, count)).is_err());
    }
    let mut p = Vec::new();
    put_run_fixed(&mut p, 0, SHIFT, 1, true);
    p[13] = 2;
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(code, 0, &p))),
        "the run encoding is unknown"
    );
    p[13] = 1;
    p[14] = 1;
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(code, 0, &p))),
        "a reserved field is not zero"
    );
    // Requests larger than one frame's response.
    let req = Message::PageRequest(PageRequest {
        request_id: 1,
        gpa: 0,
        page_shift: SHIFT,
        count: 1025,
    });
    assert!(encode_to_vec(&req).is_err());
    let data_len_mismatch = Message::Pages(PageRun {
        gpa: 0,
        page_shift: SHIFT,
        count: 2,
        data: PageData::Bytes(vec![0; PAGE]),
    });
    assert!(encode_to_vec(&data_len_mismatch).is_err());
}

#[test]
fn page_size_is_pinned_by_the_header() {
    let mut stream = encode_to_vec(&Message::Header(header())).unwrap();
    stream.extend(encode_to_vec(&Message::Pages(PageRun::zero(0, MAX_PAGE_SHIFT, 1))).unwrap());
    let (back, err) = decode_all(&stream);
    assert_eq!(back.len(), 1);
    assert!(matches!(
        err,
        ProtocolError::PageSizeMismatch {
            ours: 4096,
            theirs: 65536
        }
    ));
    let stream = encode_to_vec(&Message::Header(header())).unwrap();
    let mut dec2 = Decoder::new(&stream[..]);
    dec2.expect_page_shift(MAX_PAGE_SHIFT);
    assert!(matches!(
        dec2.recv(),
        Err(ProtocolError::PageSizeMismatch { .. })
    ));
}

#[test]
fn bad_fields_in_small_messages() {
    let h = payload_of(&Message::Header(header()));
    let hc = MessageType::Header.code();
    // Unknown version: refused from the version field alone.
    let mut v2 = h.clone();
    v2[0..4].copy_from_slice(&2u32.to_le_bytes());
    v2.truncate(4);
    assert!(matches!(
        decode_one(&raw_frame(hc, 0, &v2)),
        Err(ProtocolError::UnsupportedVersion { ours: 1, theirs: 2 })
    ));
    for (offset, value, reason) in [
        (4, 9, "the architecture is unknown"),
        (5, 20, "the page size is not 4 KiB to 64 KiB"),
        (6, 2, "the channel is unknown"),
        (7, 1, "a reserved field is not zero"),
    ] {
        let mut bad = h.clone();
        bad[offset] = value;
        assert_eq!(
            malformed_reason(decode_one(&raw_frame(hc, 0, &bad))),
            reason
        );
    }
    let mut bad = h.clone();
    bad[24..28].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(hc, 0, &bad))),
        "the vCPU count is zero"
    );
    // Region defects.
    let regions = |rs: Vec<Region>| {
        let mut h = header();
        h.regions = rs;
        encode_to_vec(&Message::Header(h))
    };
    let r = |gpa, size| Region { gpa, size };
    assert!(regions(vec![]).is_err());
    assert!(regions(vec![r(0, 0)]).is_err());
    assert!(regions(vec![r(0x800, 0x1000)]).is_err());
    assert!(regions(vec![r(u64::MAX - 0xfff, 0x2000)]).is_err());
    assert!(regions(vec![r(0, 0x2000), r(0x1000, 0x1000)]).is_err());
    assert!(regions(vec![r(0x2000, 0x1000), r(0, 0x1000)]).is_err());
    assert!(regions(vec![r(0, 0x1000); MAX_REGIONS + 1]).is_err());
    assert!(regions(vec![r(0, 0x1000), r(0x1000, 0x1000)]).is_ok());

    let ack = MessageType::Ack.code();
    assert!(decode_one(&raw_frame(ack, 0, &7u32.to_le_bytes())).is_err());
    let sw = MessageType::SwitchOver.code();
    assert!(decode_one(&raw_frame(sw, 0, &2u32.to_le_bytes())).is_err());
    let err = MessageType::Error.code();
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(err, 0, &[0xff, 0xfe]))),
        "the text is not UTF-8"
    );
    assert!(decode_one(&raw_frame(err, 0, &vec![b'a'; MAX_ERROR_TEXT + 1])).is_err());
    assert!(encode_to_vec(&Message::Error("x".repeat(MAX_ERROR_TEXT + 1))).is_err());
    let dev = |id: &str| Message::DeviceState {
        id: id.into(),
        blob: vec![],
    };
    assert!(encode_to_vec(&dev("")).is_err());
    assert!(encode_to_vec(&dev(&"d".repeat(MAX_DEVICE_ID + 1))).is_err());
    let mut bad = payload_of(&dev("serial0"));
    bad[2] = 0xff;
    assert!(decode_one(&raw_frame(MessageType::DeviceState.code(), 0, &bad)).is_err());
    assert!(encode_to_vec(&Message::VcpuState {
        vcpu_id: 0,
        blob: vec![0; MAX_RUN_BYTES + 1]
    })
    .is_err());
}

#[test]
fn received_pages_bitmap_is_canonical() {
    let mut map = ReceivedPages::new(0, SHIFT, 10);
    assert!(map.set(9));
    assert!(map.get(9) && !map.get(8) && !map.get(10));
    assert_eq!(map.received(), 1);
    let code = MessageType::ReceivedPages.code();
    let good = payload_of(&Message::ReceivedPages(map.clone()));
    // A bit past the count.
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] |= 0x80;
    assert_eq!(
        malformed_reason(decode_one(&raw_frame(code, 0, &bad))),
        "bits past the page count are set"
    );
    // Bitmap one byte long or short.
    assert!(decode_one(&raw_frame(code, 0, &good[..good.len() - 1])).is_err());
    assert!(decode_one(&raw_frame(code, 0, &[&good[..], &[0]].concat())).is_err());
    map.bitmap.push(0);
    assert!(encode_to_vec(&Message::ReceivedPages(map)).is_err());
}

#[test]
fn compatible_headers() {
    let src = header();
    let local = header();
    src.check_compatible(&local).unwrap();

    // The destination may support more features than the source uses.
    let mut richer = header();
    richer.features = KNOWN_FEATURES;
    src.check_compatible(&richer).unwrap();

    let refuse = |change: &dyn Fn(&mut Header)| {
        let mut other = header();
        change(&mut other);
        let err = src.check_compatible(&other).unwrap_err();
        (err.to_string(), err)
    };

    let (text, err) = refuse(&|h| h.version = 2);
    assert!(matches!(
        err,
        ProtocolError::UnsupportedVersion { ours: 2, theirs: 1 }
    ));
    assert_eq!(
        text,
        "The source speaks migration protocol version 1; this rangevm speaks version 2."
    );
    let (text, err) = refuse(&|h| h.page_shift = 16);
    assert!(matches!(err, ProtocolError::PageSizeMismatch { .. }));
    assert_eq!(
        text,
        "The source's host page size is 4096 bytes; this host's is 65536 bytes."
    );
    let (text, err) = refuse(&|h| h.arch = Arch::Ppc64le);
    assert!(matches!(err, ProtocolError::ArchMismatch { .. }));
    assert_eq!(
        text,
        "The source is a x86_64 VM; this host runs ppc64le VMs."
    );
    let (text, err) = refuse(&|h| h.regions[1].size = 0x8000_0000);
    assert!(matches!(err, ProtocolError::MemoryLayoutMismatch { .. }));
    assert!(
        text.contains("3072 MiB") && text.contains("4096 MiB"),
        "{text}"
    );
    let (_, err) = refuse(&|h| h.regions.truncate(1));
    assert!(matches!(err, ProtocolError::MemoryLayoutMismatch { .. }));
    let (text, err) = refuse(&|h| h.vcpu_count = 4);
    assert!(matches!(
        err,
        ProtocolError::VcpuCountMismatch { ours: 4, theirs: 2 }
    ));
    assert_eq!(text, "The source has 2 vCPUs; this VM has 4.");
    let (text, err) = refuse(&|h| h.features = FEATURE_POSTCOPY);
    assert!(matches!(
        err,
        ProtocolError::MissingFeatures {
            missing: FEATURE_RESUME
        }
    ));
    assert_eq!(
        text,
        "The source asks for features 0x2 that this rangevm does not support."
    );
    // Session id and channel are not part of compatibility.
    let mut other = header();
    other.session_id = 1;
    other.channel = Channel::Demand;
    src.check_compatible(&other).unwrap();
}

#[test]
fn host_arch_is_known_on_supported_hosts() {
    #[cfg(target_arch = "x86_64")]
    assert_eq!(Arch::host(), Some(Arch::X86_64));
    assert_eq!(Arch::Ppc64le.to_string(), "ppc64le");
}

#[test]
fn recv_expecting_enforces_order() {
    let msgs = [
        Message::Ack(AckKind::Accepted),
        Message::Complete,
        Message::Error("The destination has no memory.".into()),
        Message::Error("Expected.".into()),
    ];
    let (bytes, _) = encode_all(&msgs);
    let mut dec = Decoder::new(&bytes[..]);
    let ack = dec.recv_expecting(&[MessageType::Ack]).unwrap();
    assert_eq!(ack, msgs[0]);
    let err = dec
        .recv_expecting(&[MessageType::Pages, MessageType::RoundEnd, MessageType::Ack])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Expected Pages, RoundEnd or Ack, got a Complete message."
    );
    let err = dec.recv_expecting(&[MessageType::Ack]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "The peer gave up: The destination has no memory."
    );
    let err = dec.recv_expecting(&[MessageType::Error]).unwrap();
    assert_eq!(err, msgs[3]);
}

#[test]
fn limits_and_helpers() {
    assert_eq!(max_run_pages(12), 1024);
    assert_eq!(max_run_pages(16), 64);
    assert_eq!(max_run_pages(11), 0);
    assert_eq!(max_run_pages(17), 0);
    assert_eq!(usize::try_from(MAX_MAP_PAGES / 8).unwrap(), MAX_RUN_BYTES);
    // The largest map fits one frame.
    let map = ReceivedPages::new(0, SHIFT, MAX_MAP_PAGES);
    let f = encode_to_vec(&Message::ReceivedPages(map.clone())).unwrap();
    assert_eq!(decode_one(&f).unwrap(), Message::ReceivedPages(map));
    assert!(encode_to_vec(&Message::ReceivedPages(ReceivedPages::new(
        0,
        SHIFT,
        MAX_MAP_PAGES + 8
    )))
    .is_err());
    // Over-long error text is cut at a character boundary and still encodes.
    let long = Message::error(format!("a{}", "é".repeat(MAX_ERROR_TEXT)));
    let Message::Error(text) = &long else {
        panic!("not an Error");
    };
    assert_eq!(text.len(), MAX_ERROR_TEXT - 1);
    assert!(encode_to_vec(&long).is_ok());
    assert_eq!(Message::error("Short."), Message::Error("Short.".into()));
}

#[test]
fn digests_are_bounded_and_checked() {
    let too_many = PageDigests {
        gpa: 0,
        page_shift: SHIFT,
        digests: vec![0; MAX_DIGESTS as usize + 1],
    };
    assert!(encode_to_vec(&Message::PageDigests(too_many)).is_err());
    let none = PageDigests {
        gpa: 0,
        page_shift: SHIFT,
        digests: Vec::new(),
    };
    assert!(encode_to_vec(&Message::PageDigests(none)).is_err());
    let unaligned = PageDigests {
        gpa: 0x10,
        page_shift: SHIFT,
        digests: vec![0],
    };
    assert!(encode_to_vec(&Message::PageDigests(unaligned)).is_err());
}
