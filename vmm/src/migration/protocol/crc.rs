//! CRC32C (Castagnoli, reflected polynomial 0x82f63b78), computed "slicing by 16":
//! sixteen 256-entry tables (16 KiB) built at compile time let the loop take 16 bytes per
//! step. Table 0 is the classic byte-at-a-time table; table k advances a byte's
//! contribution by k more zero bytes. On x86_64 hosts with SSE4.2 the `crc32`
//! instruction computes the same CRC several times faster; both paths are tested to agree.

const CRC32C_POLY: u32 = 0x82f6_3b78;

const CRC32C_TABLES: [[u32; 256]; 16] = {
    let mut t = [[0u32; 256]; 16];
    let mut i = 0usize;
    let mut byte = 0u32;
    while i < 256 {
        let mut crc = byte;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        t[0][i] = crc;
        i += 1;
        byte += 1;
    }
    let mut k = 1;
    while k < 16 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        k += 1;
    }
    t
};

/// An incremental CRC32C.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// A fresh CRC.
    pub const fn new() -> Self {
        Self(!0)
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("sse4.2") {
                // SAFETY: the CPU has SSE4.2 (checked just above), the only target
                // feature `update_sse42` is compiled with.
                self.0 = unsafe { update_sse42(self.0, bytes) };
                return;
            }
        }
        self.update_tables(bytes);
    }

    /// Feeds `bytes` through the tables (every host).
    pub fn update_tables(&mut self, bytes: &[u8]) {
        let t = &CRC32C_TABLES;
        let mut crc = self.0;
        let mut chunks = bytes.chunks_exact(16);
        for c in &mut chunks {
            let lo = (crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes();
            crc = t[15][usize::from(lo[0])]
                ^ t[14][usize::from(lo[1])]
                ^ t[13][usize::from(lo[2])]
                ^ t[12][usize::from(lo[3])]
                ^ t[11][usize::from(c[4])]
                ^ t[10][usize::from(c[5])]
                ^ t[9][usize::from(c[6])]
                ^ t[8][usize::from(c[7])]
                ^ t[7][usize::from(c[8])]
                ^ t[6][usize::from(c[9])]
                ^ t[5][usize::from(c[10])]
                ^ t[4][usize::from(c[11])]
                ^ t[3][usize::from(c[12])]
                ^ t[2][usize::from(c[13])]
                ^ t[1][usize::from(c[14])]
                ^ t[0][usize::from(c[15])];
        }
        for &b in chunks.remainder() {
            crc = (crc >> 8) ^ t[0][usize::from(crc.to_le_bytes()[0] ^ b)];
        }
        self.0 = crc;
    }

    /// The CRC of everything fed so far.
    pub const fn finish(self) -> u32 {
        !self.0
    }

    /// The CRC of `bytes`.
    pub fn of(bytes: &[u8]) -> u32 {
        let mut crc = Self::new();
        crc.update(bytes);
        crc.finish()
    }
}

/// CRC32C with the SSE4.2 `crc32` instruction, 8 bytes at a time.
///
/// # Safety
/// The CPU must support SSE4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn update_sse42(mut crc: u32, bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut chunks = bytes.chunks_exact(8);
    let mut wide = u64::from(crc);
    for c in &mut chunks {
        let word = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        wide = _mm_crc32_u64(wide, word);
    }
    // The instruction leaves the 32-bit CRC in the low half.
    crc = u32::try_from(wide & 0xffff_ffff).unwrap_or(0);
    for &b in chunks.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    crc
}
