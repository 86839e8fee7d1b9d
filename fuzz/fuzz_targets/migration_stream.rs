//! The migration stream decoder against arbitrary bytes.
//!
//! The input is read as a migration stream: decode messages until the first error. The
//! decoder must never panic or hang, and every message it returns must survive a round
//! trip: re-encoding it succeeds and decodes to the same message.
//!
//! Random mutations almost never keep a CRC32C right, so they would all stop at the
//! checksum. When the first input byte is odd, the rest is first walked frame by frame
//! and each frame's checksum is rewritten to match, which lets the fuzzer reach the
//! payload parsers; when it is even, the rest is decoded as it is.
//!
//! The protocol module is included by path: it depends on nothing but `std` and
//! `thiserror`, so this target builds without the KVM parts of the `rangevm` crate.

#![no_main]

#[allow(dead_code)]
#[path = "../../vmm/src/migration/protocol.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::{encode_to_vec, Crc32c, Decoder, FRAME_HEADER_LEN, FRAME_TRAILER_LEN};

/// Rewrites the checksum of every complete frame in `stream`.
fn fix_checksums(stream: &mut [u8]) {
    let mut at = 0usize;
    loop {
        let Some(len) = stream
            .get(at + 8..at + 12)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .and_then(|l| usize::try_from(l).ok())
        else {
            return;
        };
        let Some(end) = (at + FRAME_HEADER_LEN)
            .checked_add(len)
            .filter(|&e| e + FRAME_TRAILER_LEN <= stream.len())
        else {
            return;
        };
        let crc = Crc32c::of(&stream[at..end]);
        stream[end..end + FRAME_TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
        at = end + FRAME_TRAILER_LEN;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut stream = rest.to_vec();
    if mode & 1 == 1 {
        fix_checksums(&mut stream);
    }
    let mut decoder = Decoder::new(&stream[..]);
    while let Ok(msg) = decoder.recv() {
        let bytes = encode_to_vec(&msg).expect("a decoded message re-encodes");
        let again = Decoder::new(&bytes[..]).recv().expect("and decodes again");
        assert_eq!(again, msg);
    }
});
