//! A tiny PowerPC64 encoder: just the instructions the tiny ppc64 guests use, with
//! labels for branches and fix-ups for the addresses of the data after the code.
//!
//! Instructions are 32-bit words, stored little-endian (the guest runs with MSR[LE]).
//! Register operands are plain GPR numbers 0..=31.

/// A GPR number.
pub(super) type Gpr = u32;

/// A branch target, bound to a word of the code once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Label(usize);

/// A conditional branch's condition on CR0 (after a compare or a record form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cond {
    /// Less than (BO = 12, BI = 0).
    Lt,
    /// Not equal (BO = 4, BI = 2).
    Ne,
    /// Equal (BO = 12, BI = 2).
    #[cfg_attr(not(test), allow(dead_code))] // Kept with its encoding test for new guests.
    Eq,
}

impl Cond {
    /// (BO, BI).
    fn bo_bi(self) -> (u32, u32) {
        match self {
            Cond::Lt => (12, 0),
            Cond::Ne => (4, 2),
            Cond::Eq => (12, 2),
        }
    }
}

/// How a branch word holds its displacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// I-form `b`: 24-bit LI field (±32 MiB).
    Long,
    /// B-form `bc`: 14-bit BD field (±32 KiB).
    Short,
}

/// Code being assembled.
#[derive(Debug, Default)]
pub(super) struct Asm {
    /// The instruction words.
    pub(super) code: Vec<u32>,
    labels: Vec<Option<usize>>,
    branches: Vec<(usize, Label, Reach)>,
    /// `lis; ori` pairs (word index of the `lis`) to patch with the address of the data
    /// byte at the offset.
    data_refs: Vec<(usize, usize)>,
}

fn d_form(op: u32, rt: Gpr, ra: Gpr, imm: u16) -> u32 {
    assert!(rt < 32 && ra < 32, "GPRs are 0..=31");
    (op << 26) | (rt << 21) | (ra << 16) | u32::from(imm)
}

fn x_form(rs: Gpr, ra: Gpr, rb: Gpr, xo: u32, rc: bool) -> u32 {
    assert!(rs < 32 && ra < 32 && rb < 32, "GPRs are 0..=31");
    (31 << 26) | (rs << 21) | (ra << 16) | (rb << 11) | (xo << 1) | u32::from(rc)
}

/// MD-form rotates (`rldicl` xo 0, `rldicr` xo 1): a 6-bit shift and a 6-bit mask
/// bound, each with its high bit moved.
fn md_form(rs: Gpr, ra: Gpr, sh: u32, mb: u32, xo: u32) -> u32 {
    assert!(rs < 32 && ra < 32 && sh < 64 && mb < 64, "MD-form operands");
    let mb_field = ((mb & 0x1f) << 1) | (mb >> 5);
    (30 << 26)
        | (rs << 21)
        | (ra << 16)
        | ((sh & 0x1f) << 11)
        | (mb_field << 5)
        | (xo << 2)
        | ((sh >> 5) << 1)
}

/// The 16 bits of a signed immediate.
fn simm(v: i16) -> u16 {
    u16::from_ne_bytes(v.to_ne_bytes())
}

/// Bits `shift..shift + 16` of `v`.
fn half(v: u64, shift: u32) -> u16 {
    u16::try_from((v >> shift) & 0xffff).expect("masked to 16 bits")
}

impl Asm {
    pub(super) fn new() -> Self {
        Asm::default()
    }

    fn emit(&mut self, word: u32) {
        self.code.push(word);
    }

    /// A new, unbound label.
    pub(super) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the next instruction.
    pub(super) fn bind(&mut self, l: Label) {
        assert!(self.labels[l.0].is_none(), "a label is bound once");
        self.labels[l.0] = Some(self.code.len());
    }

    /// `addi rt, ra, v` (`ra` = 0 reads as the value 0).
    pub(super) fn addi(&mut self, rt: Gpr, ra: Gpr, v: i16) {
        self.emit(d_form(14, rt, ra, simm(v)));
    }

    /// `li rt, v` (`addi rt, 0, v`).
    pub(super) fn li(&mut self, rt: Gpr, v: i16) {
        self.addi(rt, 0, v);
    }

    /// `lis rt, v` (`addis rt, 0, v`): `v << 16`, sign-extended.
    pub(super) fn lis(&mut self, rt: Gpr, v: i16) {
        self.emit(d_form(15, rt, 0, simm(v)));
    }

    /// `ori ra, rs, v`.
    pub(super) fn ori(&mut self, ra: Gpr, rs: Gpr, v: u16) {
        self.emit(d_form(24, rs, ra, v));
    }

    /// `oris ra, rs, v`.
    pub(super) fn oris(&mut self, ra: Gpr, rs: Gpr, v: u16) {
        self.emit(d_form(25, rs, ra, v));
    }

    /// `andi. ra, rs, v` (sets CR0).
    pub(super) fn andi_dot(&mut self, ra: Gpr, rs: Gpr, v: u16) {
        self.emit(d_form(28, rs, ra, v));
    }

    /// `rt = v`, in as few instructions as `v` needs: `li`; `lis; ori`; `li 0; oris;
    /// ori`; or `lis; ori; sldi 32; oris; ori`.
    pub(super) fn load64(&mut self, rt: Gpr, v: u64) {
        let signed = i64::from_ne_bytes(v.to_ne_bytes());
        if let Ok(small) = i16::try_from(signed) {
            self.li(rt, small);
        } else if i32::try_from(signed).is_ok() {
            self.lis(rt, i16::from_ne_bytes(half(v, 16).to_ne_bytes()));
            if half(v, 0) != 0 {
                self.ori(rt, rt, half(v, 0));
            }
        } else if v >> 32 == 0 {
            self.li(rt, 0);
            self.oris(rt, rt, half(v, 16));
            if half(v, 0) != 0 {
                self.ori(rt, rt, half(v, 0));
            }
        } else {
            self.lis(rt, i16::from_ne_bytes(half(v, 48).to_ne_bytes()));
            self.ori(rt, rt, half(v, 32));
            self.sldi(rt, rt, 32);
            self.oris(rt, rt, half(v, 16));
            self.ori(rt, rt, half(v, 0));
        }
    }

    /// `rt` = the guest address of byte `offset` of the data, patched by
    /// [`Asm::link`]: always `lis rt, hi; ori rt, rt, lo`.
    pub(super) fn load_data_addr(&mut self, rt: Gpr, offset: usize) {
        self.data_refs.push((self.code.len(), offset));
        self.lis(rt, 0);
        self.ori(rt, rt, 0);
    }

    /// `or ra, rs, rb`.
    pub(super) fn or(&mut self, ra: Gpr, rs: Gpr, rb: Gpr) {
        self.emit(x_form(rs, ra, rb, 444, false));
    }

    /// `mr ra, rs` (`or ra, rs, rs`).
    pub(super) fn mr(&mut self, ra: Gpr, rs: Gpr) {
        self.or(ra, rs, rs);
    }

    /// `xor ra, rs, rb`.
    pub(super) fn xor(&mut self, ra: Gpr, rs: Gpr, rb: Gpr) {
        self.emit(x_form(rs, ra, rb, 316, false));
    }

    /// `add rt, ra, rb`.
    pub(super) fn add(&mut self, rt: Gpr, ra: Gpr, rb: Gpr) {
        self.emit(x_form(rt, ra, rb, 266, false));
    }

    /// `mulld rt, ra, rb`.
    pub(super) fn mulld(&mut self, rt: Gpr, ra: Gpr, rb: Gpr) {
        self.emit(x_form(rt, ra, rb, 233, false));
    }

    /// `divdu rt, ra, rb`.
    pub(super) fn divdu(&mut self, rt: Gpr, ra: Gpr, rb: Gpr) {
        self.emit(x_form(rt, ra, rb, 457, false));
    }

    /// `cmpld cr0, ra, rb` (unsigned doubleword compare).
    pub(super) fn cmpld(&mut self, ra: Gpr, rb: Gpr) {
        self.emit(x_form(1, ra, rb, 32, false));
    }

    /// `cmpldi cr0, ra, v`.
    pub(super) fn cmpldi(&mut self, ra: Gpr, v: u16) {
        self.emit(d_form(10, 1, ra, v));
    }

    /// `rldicl ra, rs, sh, mb`.
    pub(super) fn rldicl(&mut self, ra: Gpr, rs: Gpr, sh: u32, mb: u32) {
        self.emit(md_form(rs, ra, sh, mb, 0));
    }

    /// `rldicr ra, rs, sh, me`.
    pub(super) fn rldicr(&mut self, ra: Gpr, rs: Gpr, sh: u32, me: u32) {
        self.emit(md_form(rs, ra, sh, me, 1));
    }

    /// `sldi ra, rs, n` (`rldicr ra, rs, n, 63 - n`), `n` in 1..64.
    pub(super) fn sldi(&mut self, ra: Gpr, rs: Gpr, n: u32) {
        assert!((1..64).contains(&n), "a shift of 1..64");
        self.rldicr(ra, rs, n, 63 - n);
    }

    #[cfg_attr(not(test), allow(dead_code))] // Kept with its encoding test for new guests.
    /// `srdi ra, rs, n` (`rldicl ra, rs, 64 - n, n`), `n` in 1..64.
    pub(super) fn srdi(&mut self, ra: Gpr, rs: Gpr, n: u32) {
        assert!((1..64).contains(&n), "a shift of 1..64");
        self.rldicl(ra, rs, 64 - n, n);
    }

    /// `rotldi ra, rs, n` (`rldicl ra, rs, n, 0`).
    pub(super) fn rotldi(&mut self, ra: Gpr, rs: Gpr, n: u32) {
        self.rldicl(ra, rs, n, 0);
    }

    /// `std rs, disp(ra)`, `disp` a multiple of 4.
    pub(super) fn std(&mut self, rs: Gpr, disp: i16, ra: Gpr) {
        assert!(disp % 4 == 0, "a DS-form displacement is a multiple of 4");
        self.emit(d_form(62, rs, ra, simm(disp)));
    }

    #[cfg_attr(not(test), allow(dead_code))] // Kept with its encoding test for new guests.
    /// `ld rt, disp(ra)`, `disp` a multiple of 4.
    pub(super) fn ld(&mut self, rt: Gpr, disp: i16, ra: Gpr) {
        assert!(disp % 4 == 0, "a DS-form displacement is a multiple of 4");
        self.emit(d_form(58, rt, ra, simm(disp)));
    }

    /// `mtctr rs` (`mtspr 9, rs`).
    pub(super) fn mtctr(&mut self, rs: Gpr) {
        assert!(rs < 32, "GPRs are 0..=31");
        // The SPR number's two 5-bit halves are swapped: 9 → 9 << 5.
        self.emit((31 << 26) | (rs << 21) | (9 << 16) | (467 << 1));
    }

    /// `sc 1`: a hypercall.
    pub(super) fn sc1(&mut self) {
        self.emit((17 << 26) | (1 << 5) | 2);
    }

    /// `b l`.
    pub(super) fn b(&mut self, l: Label) {
        self.branches.push((self.code.len(), l, Reach::Long));
        self.emit(18 << 26);
    }

    /// `b .`: spins forever.
    pub(super) fn spin(&mut self) {
        let here = self.label();
        self.bind(here);
        self.b(here);
    }

    /// `bc` on `cond` to `l`.
    pub(super) fn bc(&mut self, cond: Cond, l: Label) {
        let (bo, bi) = cond.bo_bi();
        self.bc_raw(bo, bi, l);
    }

    /// `bdnz l`: CTR -= 1, branch if it is not 0.
    pub(super) fn bdnz(&mut self, l: Label) {
        self.bc_raw(16, 0, l);
    }

    fn bc_raw(&mut self, bo: u32, bi: u32, l: Label) {
        self.branches.push((self.code.len(), l, Reach::Short));
        self.emit((16 << 26) | (bo << 21) | (bi << 16));
    }

    /// The code's bytes once `data_addr` is where the data goes: every branch and data
    /// address patched.
    pub(super) fn link(mut self, data_addr: u64) -> Vec<u8> {
        for &(at, l, reach) in &self.branches {
            let to = self.labels[l.0].expect("every label is bound");
            let disp =
                (i64::try_from(to).expect("small code") - i64::try_from(at).expect("small")) * 4;
            let (bits, mask) = match reach {
                Reach::Long => (26, 0x03ff_fffc),
                Reach::Short => (16, 0xfffc),
            };
            assert!(
                (-(1 << (bits - 1))..(1 << (bits - 1))).contains(&disp),
                "a branch of {disp} bytes is out of reach"
            );
            let field = u32::try_from(disp & mask).expect("masked");
            self.code[at] |= field;
        }
        for &(at, offset) in &self.data_refs {
            let addr = data_addr + u64::try_from(offset).expect("small data");
            assert!(
                addr < 0x8000_0000,
                "data at {addr:#x} is beyond lis/ori's reach"
            );
            self.code[at] |= u32::from(half(addr, 16));
            self.code[at + 1] |= u32::from(half(addr, 0));
        }
        self.code.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words `f` assembles to (linked with data at 0x1_0000).
    fn words(f: impl FnOnce(&mut Asm)) -> Vec<u32> {
        let mut a = Asm::new();
        f(&mut a);
        a.link(0x1_0000)
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("whole words")))
            .collect()
    }

    /// `f` assembles to `want`, which `powerpc64le-linux-gnu-objdump -D -b binary -m
    /// powerpc:common64 -EL` shows as `text`.
    fn check(want: &[u32], text: &str, f: impl FnOnce(&mut Asm)) {
        let got = words(f);
        assert_eq!(got, want, "{text}: got {got:08x?}, want {want:08x?}");
    }

    #[test]
    fn encodings_match_the_reference_disassembler() {
        check(&[0x3860_0058], "li r3,88", |a| a.li(3, 0x58));
        check(&[0x38a0_ffff], "li r5,-1", |a| a.li(5, -1));
        check(&[0x3929_0001], "addi r9,r9,1", |a| a.addi(9, 9, 1));
        check(&[0x3c80_3000], "lis r4,12288", |a| a.lis(4, 0x3000));
        check(&[0x6084_1234], "ori r4,r4,4660", |a| a.ori(4, 4, 0x1234));
        check(&[0x6484_8000], "oris r4,r4,32768", |a| a.oris(4, 4, 0x8000));
        check(&[0x7148_000f], "andi. r8,r10,15", |a| {
            a.andi_dot(8, 10, 0xf)
        });
        check(&[0x7d6b_4b78], "or r11,r11,r9", |a| a.or(11, 11, 9));
        check(&[0x7fea_fb78], "mr r10,r31", |a| a.mr(10, 31));
        check(&[0x7e89_b278], "xor r9,r20,r22", |a| a.xor(9, 20, 22));
        check(&[0x7e94_ba14], "add r20,r20,r23", |a| a.add(20, 20, 23));
        check(&[0x7d29_41d2], "mulld r9,r9,r8", |a| a.mulld(9, 9, 8));
        check(&[0x7d3f_4392], "divdu r9,r31,r8", |a| a.divdu(9, 31, 8));
        check(&[0x7c29_f840], "cmpld r9,r31", |a| a.cmpld(9, 31));
        check(&[0x2828_000a], "cmpldi r8,10", |a| a.cmpldi(8, 10));
        check(&[0x796b_4000], "rotldi r11,r11,8", |a| a.rotldi(11, 11, 8));
        check(&[0x7bf8_0002], "rotldi r24,r31,32", |a| {
            a.rotldi(24, 31, 32)
        });
        check(&[0x7863_07c6], "sldi r3,r3,32", |a| a.sldi(3, 3, 32));
        check(&[0x796b_45e4], "sldi r11,r11,8", |a| a.sldi(11, 11, 8));
        check(&[0x7989_4620], "srdi r9,r12,56", |a| a.srdi(9, 12, 56));
        check(&[0x7969_c220], "srdi r9,r11,40", |a| a.srdi(9, 11, 40));
        check(&[0x7a89_0020], "clrldi r9,r20,32", |a| {
            a.rldicl(9, 20, 0, 32)
        });
        check(&[0xfbf4_0000], "std r31,0(r20)", |a| a.std(31, 0, 20));
        check(&[0xf934_0008], "std r9,8(r20)", |a| a.std(9, 8, 20));
        check(&[0xe954_fff8], "ld r10,-8(r20)", |a| a.ld(10, -8, 20));
        check(&[0x7d29_03a6], "mtctr r9", |a| a.mtctr(9));
        check(&[0x4400_0022], "sc 1", |a| a.sc1());
        check(&[0x4800_0000], "b .", |a| a.spin());
    }

    #[test]
    fn branches_reach_their_labels() {
        let back_and_forth = |a: &mut Asm| {
            let top = a.label();
            let out = a.label();
            a.bind(top);
            a.bc(Cond::Ne, out); // +12
            a.bc(Cond::Lt, top); // -4
            a.bdnz(top); // -8
            a.bind(out);
            a.bc(Cond::Eq, top); // -12
            a.b(top); // -16
            a.b(out); // -8
        };
        check(
            &[
                0x4082_000c, // bne 0xc
                0x4180_fffc, // blt 0x0
                0x4200_fff8, // bdnz 0x0
                0x4182_fff4, // beq 0x0
                0x4bff_fff0, // b 0x0
                0x4bff_fff8, // b 0xc
            ],
            "branches",
            back_and_forth,
        );
    }

    #[test]
    fn constants_load_in_as_few_instructions_as_they_need() {
        check(&[0x3880_7fff], "li r4,32767", |a| a.load64(4, 0x7fff));
        check(&[0x3880_8000], "li r4,-32768", |a| {
            a.load64(4, u64::MAX - 0x7fff)
        });
        check(&[0x3c80_3000], "lis r4,12288", |a| a.load64(4, 0x3000_0000));
        check(
            &[0x3c60_0000, 0x6063_f000],
            "lis r3,0; ori r3,r3,61440",
            |a| a.load64(3, 0xf000),
        );
        check(
            &[0x3880_0000, 0x6484_8000, 0x6084_0001],
            "li r4,0; oris r4,r4,32768; ori r4,r4,1",
            |a| a.load64(4, 0x8000_0001),
        );
        check(
            &[
                0x3c80_c0de,
                0x6084_cafe,
                0x7884_07c6,
                0x6484_f00d,
                0x6084_5eed,
            ],
            "lis r4,-16162; ori r4,r4,51966; sldi r4,r4,32; oris r4,r4,61453; ori r4,r4,24301",
            |a| a.load64(4, 0xc0de_cafe_f00d_5eed),
        );
        check(
            &[0x3c80_0001, 0x6084_0020],
            "lis r4,1; ori r4,r4,32 (data at 0x1_0000 + 0x20)",
            |a| a.load_data_addr(4, 0x20),
        );
    }

    #[test]
    #[should_panic(expected = "out of reach")]
    fn a_conditional_branch_beyond_32_kib_is_refused() {
        let mut a = Asm::new();
        let far = a.label();
        a.bc(Cond::Eq, far);
        (0..0x2000).for_each(|_| a.li(0, 0));
        a.bind(far);
        a.link(0x1_0000);
    }
}
