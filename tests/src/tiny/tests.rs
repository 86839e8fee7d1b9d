//! Tests of the tiny guests' builder: instruction encodings against GNU as, layouts and
//! the counter checkers.
use super::*;

/// `f`'s code in 32-bit (`long` false) or 64-bit mode.
fn asm(long: bool, f: impl FnOnce(&mut Asm)) -> Vec<u8> {
    let mut a = Asm::new(long);
    f(&mut a);
    a.code
}

/// `f` assembles to `want`, which GNU objdump (`-D -b binary -mi386` or
/// `-mi386:x86-64`, Intel syntax) shows as `objdump`.
fn check(long: bool, want: &[u8], objdump: &str, f: impl FnOnce(&mut Asm)) {
    assert_eq!(asm(long, f), want, "{objdump} (64-bit: {long})");
}

#[test]
fn encodings_match_the_reference_disassembler() {
    for long in [false, true] {
        let imm = [0xbe, 0x40, 0x00, 0x10, 0x00];
        check(long, &imm, "mov esi,0x100040", |a| {
            a.mov_r32(Reg::Si, 0x10_0040)
        });
        check(long, &[0xb9, 5, 0, 0, 0], "mov ecx,0x5", |a| {
            a.mov_r32(Reg::Cx, 5)
        });
        check(long, &[0x66, 0xba, 0xfd, 0x03], "mov dx,0x3fd", |a| {
            a.mov_dx(0x3fd)
        });
        check(long, &[0xb0, 0x34], "mov al,0x34", |a| a.mov_al(0x34));
        check(long, &[0xee], "out dx,al", |a| a.out_dx_al());
        check(long, &[0xec], "in al,dx", |a| a.in_al_dx());
        check(long, &[0xa8, 0x20], "test al,0x20", |a| a.test_al(0x20));
        check(long, &[0xac], "lods al,BYTE PTR ds:[esi]", |a| a.lodsb());
        check(long, &[0xfc], "cld", |a| a.cld());
        check(long, &[0xfa], "cli", |a| a.cli());
        check(long, &[0xf4], "hlt", |a| a.hlt());
        check(long, &[0x0f, 0x0b], "ud2", |a| a.ud2());
        check(long, &[0x0f, 0x22, 0xd8], "mov cr3,eax", |a| {
            a.mov_cr3(Reg::Ax)
        });
        let mov = [0xc7, 0x47, 0x04, 0x44, 0x33, 0x22, 0x11];
        check(long, &mov, "mov DWORD PTR [edi+0x4],0x11223344", |a| {
            a.mov_mem32_imm(Reg::Di, 4, 0x1122_3344)
        });
        let cmp = [0x81, 0x7f, 0x04, 0xef, 0xbe, 0xad, 0xde];
        check(long, &cmp, "cmp DWORD PTR [edi+0x4],0xdeadbeef", |a| {
            a.cmp_mem32_imm(Reg::Di, 4, 0xdead_beef)
        });
    }

    // Word-sized instructions: 32-bit operands in PVH code...
    check(false, &[0x89, 0xf8], "mov eax,edi", |a| {
        a.alu(Alu::Mov, Reg::Ax, Reg::Di)
    });
    check(false, &[0x31, 0xd8], "xor eax,ebx", |a| {
        a.alu(Alu::Xor, Reg::Ax, Reg::Bx)
    });
    check(false, &[0x01, 0xf7], "add edi,esi", |a| {
        a.alu(Alu::Add, Reg::Di, Reg::Si)
    });
    check(false, &[0x89, 0x07], "mov DWORD PTR [edi],eax", |a| {
        a.alu_mem(Alu::Mov, Reg::Di, Reg::Ax)
    });
    check(false, &[0x39, 0x07], "cmp DWORD PTR [edi],eax", |a| {
        a.alu_mem(Alu::Cmp, Reg::Di, Reg::Ax)
    });
    check(false, &[0xff, 0xc9], "dec ecx", |a| a.dec(Reg::Cx));
    // ... 64-bit (REX.W) in long mode.
    let w = |bytes: &[u8]| [&[0x48], bytes].concat();
    check(true, &w(&[0x89, 0xf8]), "mov rax,rdi", |a| {
        a.alu(Alu::Mov, Reg::Ax, Reg::Di)
    });
    check(true, &w(&[0x31, 0xd8]), "xor rax,rbx", |a| {
        a.alu(Alu::Xor, Reg::Ax, Reg::Bx)
    });
    check(true, &w(&[0x01, 0xf7]), "add rdi,rsi", |a| {
        a.alu(Alu::Add, Reg::Di, Reg::Si)
    });
    check(true, &w(&[0x89, 0x07]), "mov QWORD PTR [rdi],rax", |a| {
        a.alu_mem(Alu::Mov, Reg::Di, Reg::Ax)
    });
    check(true, &w(&[0x39, 0x07]), "cmp QWORD PTR [rdi],rax", |a| {
        a.alu_mem(Alu::Cmp, Reg::Di, Reg::Ax)
    });
    check(true, &w(&[0xff, 0xc9]), "dec rcx", |a| a.dec(Reg::Cx));
    let movabs = [0x48, 0xbf, 0x89, 0x67, 0x45, 0x23, 0x01, 0, 0, 0];
    check(true, &movabs, "movabs rdi,0x123456789", |a| {
        a.mov_r64(Reg::Di, 0x1_2345_6789)
    });
    let movabs = [0x48, 0xbb, 0x0d, 0xf0, 0xad, 0x0b, 0xde, 0xc0, 0xed, 0x5e];
    check(true, &movabs, "movabs rbx,0x5eedc0de0badf00d", |a| {
        a.mov_r64(Reg::Bx, DEFAULT_SEED)
    });

    // The counter's instructions (GNU as 2.x, `.intel_syntax noprefix`).
    check(false, &[0xff, 0xc3], "inc ebx", |a| a.inc(Reg::Bx));
    check(true, &[0x48, 0xff, 0xc3], "inc rbx", |a| a.inc(Reg::Bx));
    check(false, &[0xc1, 0xc5, 0x04], "rol ebp,0x4", |a| {
        a.rol(Reg::Bp, 4)
    });
    check(true, &[0x48, 0xc1, 0xc5, 0x04], "rol rbp,0x4", |a| {
        a.rol(Reg::Bp, 4)
    });
    check(true, &[0x48, 0xc1, 0xc5, 0x20], "rol rbp,0x20", |a| {
        a.rol(Reg::Bp, 32)
    });
    check(false, &[0xf7, 0xf1], "div ecx", |a| a.div(Reg::Cx));
    check(true, &[0x48, 0xf7, 0xf1], "div rcx", |a| a.div(Reg::Cx));
    check(false, &[0x85, 0xd2], "test edx,edx", |a| {
        a.alu(Alu::Test, Reg::Dx, Reg::Dx)
    });
    check(true, &[0x48, 0x85, 0xd2], "test rdx,rdx", |a| {
        a.alu(Alu::Test, Reg::Dx, Reg::Dx)
    });
    check(true, &[0x48, 0x89, 0xdd], "mov rbp,rbx", |a| {
        a.alu(Alu::Mov, Reg::Bp, Reg::Bx)
    });
    check(true, &[0x48, 0x31, 0xc5], "xor rbp,rax", |a| {
        a.alu(Alu::Xor, Reg::Bp, Reg::Ax)
    });
    check(false, &[0x31, 0xd0], "xor eax,edx", |a| {
        a.alu(Alu::Xor, Reg::Ax, Reg::Dx)
    });
    check(true, &[0x48, 0x89, 0x1f], "mov QWORD PTR [rdi],rbx", |a| {
        a.alu_mem(Alu::Mov, Reg::Di, Reg::Bx)
    });
    check(false, &[0x89, 0x1f], "mov DWORD PTR [edi],ebx", |a| {
        a.alu_mem(Alu::Mov, Reg::Di, Reg::Bx)
    });
    check(
        true,
        &[0x48, 0x89, 0x47, 0x08],
        "mov QWORD PTR [rdi+0x8],rax",
        |a| a.alu_mem_disp(Alu::Mov, Reg::Di, 8, Reg::Ax),
    );
    check(
        false,
        &[0x89, 0x47, 0x08],
        "mov DWORD PTR [edi+0x8],eax",
        |a| a.alu_mem_disp(Alu::Mov, Reg::Di, 8, Reg::Ax),
    );
    check(
        false,
        &[0x89, 0x6f, 0x0c],
        "mov DWORD PTR [edi+0xc],ebp",
        |a| a.alu_mem_disp(Alu::Mov, Reg::Di, 12, Reg::Bp),
    );
    for long in [false, true] {
        check(long, &[0x31, 0xd2], "xor edx,edx", |a| {
            a.alu32(Alu::Xor, Reg::Dx, Reg::Dx)
        });
        check(long, &[0x89, 0xe8], "mov eax,ebp", |a| {
            a.alu32(Alu::Mov, Reg::Ax, Reg::Bp)
        });
        check(long, &[0x83, 0xe0, 0x0f], "and eax,0xf", |a| {
            a.alu32_imm8(AluImm::And, Reg::Ax, 0xf)
        });
        check(long, &[0x83, 0xf8, 0x0a], "cmp eax,0xa", |a| {
            a.alu32_imm8(AluImm::Cmp, Reg::Ax, 10)
        });
        check(long, &[0x83, 0xc0, 0x27], "add eax,0x27", |a| {
            a.alu32_imm8(AluImm::Add, Reg::Ax, 0x27)
        });
        let mut a = Asm::new(long);
        let l = a.label();
        a.jcc(Cond::Below, l);
        assert_eq!(&a.code[..2], &[0x0f, 0x82], "jb rel32");
    }

    // lidt with an absolute address: disp32 in 32-bit code, SIB + disp32 in 64-bit
    // code (where plain disp32 is RIP-relative).
    check(
        false,
        &[0x0f, 0x01, 0x1d, 0, 0, 0, 0],
        "lidtd ds:0x0",
        |a| a.lidt(Target::Data(0)),
    );
    check(
        true,
        &[0x0f, 0x01, 0x1c, 0x25, 0, 0, 0, 0],
        "lidt ds:0x0",
        |a| a.lidt(Target::Data(0)),
    );
}

#[test]
fn smp_encodings_match_the_reference_disassembler() {
    // The AP's long-mode start and the BSP's trampoline copy (GNU as 2.x,
    // `.intel_syntax noprefix`, `.code64`).
    check(true, &[0x8e, 0xd8], "mov ds,eax", |a| {
        a.mov_sreg(Sreg::Ds, Reg::Ax)
    });
    check(true, &[0x8e, 0xc0], "mov es,eax", |a| {
        a.mov_sreg(Sreg::Es, Reg::Ax)
    });
    check(true, &[0x8e, 0xd0], "mov ss,eax", |a| {
        a.mov_sreg(Sreg::Ss, Reg::Ax)
    });
    check(true, &[0x8b, 0x06], "mov eax,DWORD PTR [rsi]", |a| {
        a.load32(Reg::Ax, Reg::Si)
    });
    check(true, &[0xc1, 0xe8, 0x18], "shr eax,0x18", |a| {
        a.shift32(Shift::Shr, Reg::Ax, 24)
    });
    check(true, &[0xc1, 0xe2, 0x0c], "shl edx,0xc", |a| {
        a.shift32(Shift::Shl, Reg::Dx, 12)
    });
    let add = [0x81, 0xc2, 0xf0, 0x0f, 0x01, 0x00];
    check(true, &add, "add edx,0x10ff0", |a| {
        a.add32_imm32(Reg::Dx, 0x1_0ff0)
    });
    check(true, &[0x89, 0xd4], "mov esp,edx", |a| {
        a.alu32(Alu::Mov, Reg::Sp, Reg::Dx)
    });
    let lea = [0x8d, 0x0c, 0xc5, 0x00, 0x00, 0x01, 0x00];
    check(true, &lea, "lea ecx,[rax*8+0x10000]", |a| {
        a.lea32_index8(Reg::Cx, Reg::Ax, 0x1_0000)
    });
    check(
        true,
        &[0x48, 0x89, 0x0c, 0x24],
        "mov QWORD PTR [rsp],rcx",
        |a| a.store_stack(0, Reg::Cx),
    );
    check(
        true,
        &[0x48, 0x89, 0x4c, 0x24, 0x08],
        "mov QWORD PTR [rsp+0x8],rcx",
        |a| a.store_stack(8, Reg::Cx),
    );
    check(
        true,
        &[0x48, 0x8b, 0x3c, 0x24],
        "mov rdi,QWORD PTR [rsp]",
        |a| a.load_stack(Reg::Di, 0),
    );
    check(
        true,
        &[0x48, 0x8b, 0x7c, 0x24, 0x08],
        "mov rdi,QWORD PTR [rsp+0x8]",
        |a| a.load_stack(Reg::Di, 8),
    );
    check(true, &[0x48, 0x0f, 0xaf, 0xc8], "imul rcx,rax", |a| {
        a.imul(Reg::Cx, Reg::Ax)
    });
    check(
        true,
        &[0xf3, 0xa4],
        "rep movs BYTE PTR es:[rdi],BYTE PTR ds:[rsi]",
        |a| a.rep_movsb(),
    );
    let mut a = Asm::new(true);
    let l = a.label();
    a.jcc(Cond::AboveOrEqual, l);
    assert_eq!(&a.code[..2], &[0x0f, 0x83], "jae rel32");
}

#[test]
fn ap_trampoline_starts_with_the_reference_real_mode_code() {
    // `as --32` of `.code16`: cli; xor ax,ax; mov ds,ax; data32 lgdt ds:0x1058;
    // mov eax,0x20; mov cr4,eax; mov eax,0x9000; mov cr3,eax; mov ecx,0xc0000080;
    // xor edx,edx; mov eax,0x100; wrmsr; mov eax,0x80000011; mov cr0,eax;
    // ljmpl $0x8,$0x1060 (objdump -m i8086: "jmp 0x8:0x1060").
    let want = [
        0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16, 0x58, 0x10, 0x66, 0xb8, 0x20, 0x00,
        0x00, 0x00, 0x0f, 0x22, 0xe0, 0x66, 0xb8, 0x00, 0x90, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x66,
        0xb9, 0x80, 0x00, 0x00, 0xc0, 0x66, 0x31, 0xd2, 0x66, 0xb8, 0x00, 0x01, 0x00, 0x00, 0x0f,
        0x30, 0x66, 0xb8, 0x11, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x60, 0x10, 0x00,
        0x00, 0x08, 0x00,
    ];
    assert_eq!(AP_TRAMPOLINE, 0x1000, "the reference bytes' addresses");
    assert_eq!(trampoline16(), want);
    let t = ap_trampoline(&[0xf4]);
    assert_eq!(&t[..want.len()], &want);
    // The GDT (the VMM's 64-bit code and data descriptors), its pointer, the code.
    assert_eq!(u64_at(&t, 0x40), 0);
    assert_eq!(u64_at(&t, 0x48), 0x00af_9b00_0000_ffff);
    assert_eq!(u64_at(&t, 0x50), 0x00cf_9300_0000_ffff);
    assert_eq!(u16_at(&t, 0x58), 23);
    assert_eq!(u32_at(&t, 0x5a), 0x1040);
    assert_eq!(&t[0x60..], &[0xf4]);
}

#[test]
fn ap_code_picks_its_pages_from_its_lapic_id() {
    let pages = Pages {
        start: 16 << 20,
        count: 3 * 256,
        stride: 0x1000,
        bytes: COUNTER_BYTES,
    };
    let code = ap_code(&pages, 256, 3);
    let want = [
        &[0xb8, 0x10, 0, 0, 0][..],            // mov eax, 0x10
        &[0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0], // mov ds/es/ss, eax
        &[0xbe, 0x20, 0x00, 0xe0, 0xfe],       // mov esi, 0xfee00020
        &[0x8b, 0x06, 0xc1, 0xe8, 0x18],       // mov eax, [rsi]; shr eax, 24
        &[0x83, 0xf8, 0x03, 0x0f, 0x83],       // cmp eax, 3; jae park
    ]
    .concat();
    assert_eq!(&code[..want.len()], &want[..]);
    let after_jae = &code[want.len() + 4..];
    let stack = [
        &[0x89, 0xc2, 0xc1, 0xe2, 0x0c][..], // mov edx, eax; shl edx, 12
        &[0x81, 0xc2, 0xf0, 0x0f, 0x01, 0x00], // add edx, 0x10ff0
        &[0x89, 0xd4],                       // mov esp, edx
        &[0x8d, 0x0c, 0xc5, 0x00, 0x00, 0x01, 0x00], // lea ecx, [rax*8+0x10000]
        &[0x48, 0x89, 0x0c, 0x24],           // mov [rsp], rcx
        &[0x48, 0xb9, 0x00, 0x00, 0x10, 0, 0, 0, 0, 0], // movabs rcx, 256 pages
        &[0x48, 0x0f, 0xaf, 0xc8],           // imul rcx, rax
        &[0x48, 0xba, 0x00, 0x00, 0x00, 0x01, 0, 0, 0, 0], // movabs rdx, 16 MiB
        &[0x48, 0x01, 0xd1],                 // add rcx, rdx
        &[0x48, 0x89, 0x4c, 0x24, 0x08],     // mov [rsp+8], rcx
        // The counter: xor ebx, ebx; inc rbx; mov rdi, [rsp]; mov [rdi], rbx.
        &[
            0x31, 0xdb, 0x48, 0xff, 0xc3, 0x48, 0x8b, 0x3c, 0x24, 0x48, 0x89, 0x1f,
        ],
    ]
    .concat();
    assert_eq!(&after_jae[..stack.len()], &stack[..]);
    // No print (no port I/O: no `out dx, al` after `mov dx, imm16`).
    assert!(!code.windows(2).any(|w| w == [0x66, 0xba]), "{code:x?}");
    assert!(code.len() < 0x200);
}

#[test]
fn smp_counter_starts_the_aps_then_counts_as_vcpu_0() {
    let f = TinyGuest::new(Mode::Long)
        .counter_smp(16 << 20, 256, 0x1000, 10, 3)
        .build();
    let image = image_of(&f);
    // mov edi, LAPIC SVR; mov dword [rdi+0], 0x1ff; cld; mov esi, trampoline;
    // mov edi, 0x1000; mov ecx, len; rep movsb.
    let svr = [
        &[
            0xbf, 0xf0, 0x00, 0xe0, 0xfe, 0xc7, 0x47, 0x00, 0xff, 0x01, 0, 0,
        ][..],
        &[0xfc, 0xbe],
    ]
    .concat();
    assert_eq!(&image[..svr.len()], &svr[..]);
    let src = u64::from(u32_at(image, svr.len()));
    let rest = &image[svr.len() + 4..];
    assert_eq!(rest[..5], [0xbf, 0x00, 0x10, 0x00, 0x00]);
    assert_eq!(rest[5], 0xb9);
    let len = at(u64::from(u32_at(rest, 6)));
    assert_eq!(&rest[10..12], &[0xf3, 0xa4]);
    let trampoline = &image[at(src - LOAD_ADDR)..][..len];
    assert_eq!(&trampoline[..0x3f], &trampoline16()[..]);
    // INIT to APIC IDs 1 and 2: mov edi, ICR low; ICR high = id << 24; ICR low.
    let init = |id: u8| {
        [
            &[0xbf, 0x00, 0x03, 0xe0, 0xfe][..],
            &[0xc7, 0x47, 0x10, 0, 0, 0, id],
            &[0xc7, 0x47, 0x00, 0x00, 0x45, 0, 0],
        ]
        .concat()
    };
    let rest = &rest[12..];
    assert_eq!(&rest[..38], &[init(1), init(2)].concat()[..]);
    // Start-up IPIs with vector 1, twice.
    let sipi = [0xc7, 0x47, 0x00, 0x01, 0x46, 0, 0];
    let sipis = image.windows(sipi.len()).filter(|w| *w == sipi).count();
    assert_eq!(sipis, 4, "2 APs x 2 start-up IPIs");
    // vCPU 0 prints: its counter's pass line is in the data.
    assert!(image.windows(5).any(|w| w == b"pass "));
    assert!(image.len() < 0x1000, "no page tables");
}

#[test]
fn smp_counter_on_one_vcpu_sends_no_ipi() {
    let f = TinyGuest::new(Mode::Long)
        .counter_smp(16 << 20, 4, 0x1000, 1, 1)
        .build();
    let image = image_of(&f);
    let icr = [0xbf, 0x00, 0x03, 0xe0, 0xfe];
    assert!(!image.windows(icr.len()).any(|w| w == icr));
}

#[test]
#[should_panic(expected = "long mode only")]
fn smp_counter_is_long_mode_only() {
    let _ = TinyGuest::new(Mode::Pvh).counter_smp(16 << 20, 4, 0x1000, 1, 2);
}

#[test]
#[should_panic(expected = "1..=16 vCPUs, not 17")]
fn smp_counter_runs_on_at_most_16_vcpus() {
    let _ = TinyGuest::new(Mode::Long).counter_smp(16 << 20, 4, 0x1000, 1, 17);
}

#[test]
#[should_panic(expected = "go beyond 4 GiB")]
fn smp_counter_stays_below_4gib() {
    let _ = TinyGuest::new(Mode::Long).counter_smp(0xffff_8000, 8, 0x1000, 1, 2);
}

#[test]
#[should_panic(expected = "overlap the pass numbers, stacks")]
fn smp_counter_pages_never_cover_the_stacks() {
    // vCPU 2's stack page is 0x12000.
    let _ = TinyGuest::new(Mode::Long)
        .counter_smp(0x12000, 1, 0x1000, 1, 3)
        .build();
}

#[test]
#[should_panic(expected = "must be the last step")]
fn nothing_follows_an_smp_counter() {
    let _ = TinyGuest::new(Mode::Long)
        .counter_smp(16 << 20, 1, 0x1000, 1, 2)
        .print("never\n")
        .build();
}

#[test]
fn jumps_are_relative_to_the_next_instruction() {
    let mut a = Asm::new(true);
    let top = a.label();
    let end = a.label();
    a.bind(top);
    a.hlt();
    a.jcc(Cond::Zero, end); // 0x1: 0f 84 rel32, next at 0x7
    a.jmp(top); // 0x7: e9 rel32, next at 0xc
    a.bind(end);
    let code = a.link(&[], None);
    assert_eq!(
        code,
        [0xf4, 0x0f, 0x84, 5, 0, 0, 0, 0xe9, 0xf4, 0xff, 0xff, 0xff]
    );
}

/// The fields of an ELF64 file the VMM's loader looks at.
struct Parsed {
    class: u8,
    machine: u16,
    kind: u16,
    entry: u64,
    /// (type, offset, paddr, vaddr, filesz, memsz)
    phdrs: Vec<(u32, u64, u64, u64, u64, u64)>,
}

fn u16_at(f: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(f[at..at + 2].try_into().unwrap())
}
fn u32_at(f: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(f[at..at + 4].try_into().unwrap())
}
fn u64_at(f: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(f[at..at + 8].try_into().unwrap())
}
fn at(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

fn parse(f: &[u8]) -> Parsed {
    assert_eq!(&f[..4], b"\x7fELF");
    assert_eq!(f[5], 1, "little endian");
    assert_eq!(u16_at(f, 52), EHDR_SIZE);
    assert_eq!(u16_at(f, 54), PHDR_SIZE);
    let phoff = at(u64_at(f, 32));
    let phdrs = (0..usize::from(u16_at(f, 56)))
        .map(|i| {
            let p = phoff + i * usize::from(PHDR_SIZE);
            (
                u32_at(f, p),
                u64_at(f, p + 8),
                u64_at(f, p + 24),
                u64_at(f, p + 16),
                u64_at(f, p + 32),
                u64_at(f, p + 40),
            )
        })
        .collect();
    Parsed {
        class: f[4],
        machine: u16_at(f, 18),
        kind: u16_at(f, 16),
        entry: u64_at(f, 24),
        phdrs,
    }
}

fn image_of(f: &[u8]) -> &[u8] {
    let p = parse(f);
    let (_, offset, _, _, size, _) = p.phdrs[0];
    &f[at(offset)..at(offset + size)]
}

#[test]
fn long_mode_guest_is_one_load_segment_at_1mib_without_a_note() {
    let f = TinyGuest::new(Mode::Long)
        .print("hi\n")
        .exit(Exit::PowerOff)
        .build();
    let p = parse(&f);
    assert_eq!((p.class, p.machine, p.kind), (2, 62, 2));
    assert_eq!(p.entry, LOAD_ADDR);
    assert_eq!(p.phdrs.len(), 1);
    let (kind, offset, paddr, vaddr, filesz, memsz) = p.phdrs[0];
    assert_eq!((kind, paddr, vaddr), (1, LOAD_ADDR, LOAD_ADDR));
    assert_eq!(offset % PAGE, paddr % PAGE);
    assert_eq!(filesz, memsz);
    assert_eq!(len_u64(&f), offset + filesz);
}

#[test]
fn pvh_guest_carries_the_xen_phys32_entry_note() {
    let f = TinyGuest::new(Mode::Pvh).exit(Exit::Panic).build();
    let p = parse(&f);
    assert_eq!((p.class, p.machine), (2, 62));
    assert_eq!(p.phdrs[0].0, 1);
    let (kind, offset, _, _, filesz, _) = p.phdrs[1];
    assert_eq!(kind, 4);
    assert_eq!(offset % 4, 0);
    let note = &f[at(offset)..at(offset + filesz)];
    assert_eq!(u32_at(note, 0), 4); // namesz
    assert_eq!(u32_at(note, 4), 4); // descsz
    assert_eq!(u32_at(note, 8), 18); // XEN_ELFNOTE_PHYS32_ENTRY
    assert_eq!(&note[12..16], b"Xen\0");
    assert_eq!(u64::from(u32_at(note, 16)), LOAD_ADDR);
}

#[test]
fn marker_is_the_first_port_write() {
    let f = TinyGuest::new(Mode::Long).marker(b'!').print("x").build();
    assert_eq!(
        &image_of(&f)[..7],
        &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee]
    );
}

#[test]
fn printed_text_is_addressed_where_it_lies() {
    for mode in [Mode::Long, Mode::Pvh] {
        let f = TinyGuest::new(mode).print("hello, guest\n").build();
        let image = image_of(&f);
        // The print starts with cld; mov esi, imm32.
        assert_eq!(&image[..2], &[0xfc, 0xbe]);
        let addr = u64::from(u32_at(image, 2));
        let text = &image[at(addr - LOAD_ADDR)..][..13];
        assert_eq!(text, b"hello, guest\n");
        assert_eq!(u32_at(image, 7), 13, "mov ecx, len");
    }
}

#[test]
fn exits_write_their_port() {
    let cases = [
        (Exit::PowerOff, ACPI_SLEEP_CONTROL, ACPI_POWER_OFF),
        (Exit::Reset, I8042_COMMAND, I8042_RESET),
        (Exit::AcpiReset, ACPI_RESET_REGISTER, ACPI_RESET_VALUE),
        (Exit::Panic, PVPANIC, 1),
    ];
    for (exit, port, value) in cases {
        let f = TinyGuest::new(Mode::Pvh).exit(exit).build();
        let [lo, hi] = port.to_le_bytes();
        // out, then the park loop: cli; hlt; jmp back to cli.
        let want = [0x66, 0xba, lo, hi, 0xb0, value, 0xee, 0xfa, 0xf4, 0xe9];
        assert_eq!(&image_of(&f)[..10], &want, "{exit:?}");
        assert_eq!(u32_at(image_of(&f), 10), 0xffff_fff9_u32, "{exit:?}");
    }
    let f = TinyGuest::new(Mode::Long).exit(Exit::TripleFault).build();
    let image = image_of(&f);
    assert_eq!(&image[..4], &[0x0f, 0x01, 0x1c, 0x25]);
    let idt = u64::from(u32_at(image, 4));
    assert_eq!(&image[at(idt - LOAD_ADDR)..][..10], &[0; 10]);
    assert_eq!(&image[8..10], &[0x0f, 0x0b]);
    assert_eq!(Exit::Hang.expected_status(), None);
    assert_eq!(Exit::TripleFault.expected_status(), Some(4));
}

#[test]
fn low_patterns_use_the_vmm_page_tables() {
    let f = TinyGuest::new(Mode::Long)
        .touch_pages(0x20_0000, 4, 0x1000)
        .build();
    let image = image_of(&f);
    assert_eq!(&image[..2], &[0x48, 0xbf], "starts with movabs rdi");
    assert!(
        image.len() < 0x1000,
        "no page tables: {} bytes",
        image.len()
    );
}

#[test]
fn patterns_above_4gib_bring_page_tables() {
    let start = 0x1_0000_0000;
    let f = TinyGuest::new(Mode::Long)
        .marker(b'.')
        .touch_pages(start, 2, 0x10_0000)
        .check_pages(start, 2, 0x10_0000)
        .build();
    let image = image_of(&f);
    // After the marker: mov eax, pml4; mov cr3, rax.
    assert_eq!(image[7], 0xb8);
    let pml4 = u64::from(u32_at(image, 8));
    assert_eq!(&image[12..15], &[0x0f, 0x22, 0xd8]);
    assert_eq!(pml4 % PAGE, 0);
    let t = &image[at(pml4 - LOAD_ADDR)..];
    let pdpt = u64_at(t, 0) & !0xfff;
    assert_eq!(pdpt, pml4 + PAGE);
    assert_eq!(u64_at(t, 8), 0);
    let pdpt = &t[0x1000..0x2000];
    // 5 GiB: 4 GiB + the 1 MiB + 8 bytes reached, rounded up.
    for i in 0..5u64 {
        assert_eq!(u64_at(pdpt, at(i * 8)), (pml4 + PAGE * (2 + i)) | 3);
    }
    assert_eq!(u64_at(pdpt, 5 * 8), 0);
    let pd4 = &t[0x6000..0x7000];
    assert_eq!(u64_at(pd4, 0), 0x1_0000_0000 | 0x83);
    assert_eq!(u64_at(pd4, 8), 0x1_0020_0000 | 0x83);
    assert_eq!(t.len(), 7 * 0x1000);
}

#[test]
#[should_panic(expected = "goes beyond")]
fn pvh_patterns_stay_below_4gib() {
    let _ = TinyGuest::new(Mode::Pvh).touch_pages(0xffff_f000, 2, 0x1000);
}

#[test]
#[should_panic(expected = "overlaps the guest image")]
fn patterns_never_overwrite_the_guest() {
    let _ = TinyGuest::new(Mode::Long)
        .touch_pages(0xf_f000, 4, 0x1000)
        .build();
}

#[test]
fn counter_starts_from_zero_in_rbx_and_stores_n_at_counter_addr() {
    for mode in [Mode::Long, Mode::Pvh] {
        let f = TinyGuest::new(mode)
            .counter(16 << 20, 256, 0x1000, 10)
            .build();
        let image = image_of(&f);
        let rex: &[u8] = if mode == Mode::Long { &[0x48] } else { &[] };
        // xor ebx, ebx; inc rbx; mov edi, COUNTER_ADDR; mov [rdi], rbx.
        let want = [
            &[0x31, 0xdb][..],
            rex,
            &[0xff, 0xc3, 0xbf],
            &u32_of(COUNTER_ADDR, "").to_le_bytes(),
            rex,
            &[0x89, 0x1f],
        ]
        .concat();
        assert_eq!(&image[..want.len()], &want[..], "{mode:?}");
        let prefix: &[u8] = if mode == Mode::Long {
            b"pass "
        } else {
            b"pass 00000000"
        };
        assert!(image.windows(prefix.len()).any(|w| w == prefix), "{mode:?}");
        assert!(image.len() < 0x1000, "{mode:?}: no page tables");
    }
}

#[test]
fn counter_above_4gib_brings_page_tables() {
    let f = TinyGuest::new(Mode::Long)
        .counter(0x1_0000_0000, 2, 0x1000, 1)
        .build();
    let image = image_of(&f);
    // mov eax, pml4; mov cr3, rax; then the counter.
    assert_eq!(image[0], 0xb8);
    assert_eq!(&image[5..10], &[0x0f, 0x22, 0xd8, 0x31, 0xdb]);
    let pml4 = u64::from(u32_at(image, 1));
    assert_eq!(len_u64(image), pml4 - LOAD_ADDR + 7 * PAGE, "5 GiB mapped");
}

#[test]
#[should_panic(expected = "overlap the pass number")]
fn counter_pages_never_cover_the_pass_number() {
    let _ = TinyGuest::new(Mode::Pvh)
        .counter(0xe000, 4, 0x1000, 1)
        .build();
}

#[test]
#[should_panic(expected = "must be the last step")]
fn nothing_follows_a_counter() {
    let _ = TinyGuest::new(Mode::Long)
        .counter(16 << 20, 1, 0x1000, 1)
        .print("never\n")
        .build();
}

#[test]
#[should_panic(expected = "multiples of 0x1000")]
fn counter_pages_are_whole_pages() {
    let _ = TinyGuest::new(Mode::Long).counter(16 << 20, 4, 0x800, 1);
}

#[test]
#[should_panic(expected = "print_every > 0")]
fn counter_prints_every_some_passes() {
    let _ = TinyGuest::new(Mode::Long).counter(16 << 20, 4, 0x1000, 0);
}

#[test]
fn counter_word_mixes_address_and_pass() {
    assert_eq!(
        counter_word(0x100_0000, 0x1234),
        0x0000_1234_0100_0000 ^ COUNTER_SEED
    );
    assert_ne!(counter_word(0x1000, 1), counter_word(0x2000, 1));
    assert_ne!(counter_word(0x1000, 1), counter_word(0x1000, 2));
    // Above 2^32 passes the high half of n lands in the low half.
    assert_eq!(counter_word(0, 1 << 32), 1 ^ COUNTER_SEED);
}

#[test]
fn counter_lines_parse_and_skip_the_rest() {
    let console = "booting\npass 0000000000000005\r\nnoise pass 1\n\
                   pass 000000000000000a\npass 00000000000000ff\npass 000000";
    assert_eq!(parse_counter_lines(console), Ok(vec![5, 10, 255]));
    assert_eq!(parse_counter_lines(""), Ok(vec![]));
    assert_eq!(parse_counter_lines("pass 0000000000000001"), Ok(vec![]));
    assert_eq!(
        parse_counter_lines("pass ffffffffffffffff\n"),
        Ok(vec![u64::MAX])
    );
    let bad = parse_counter_lines("x\npass 00000000000000G1\n").unwrap_err();
    assert!(bad.contains("console line 2"), "{bad}");
    assert!(parse_counter_lines("pass 0001\n").is_err());
    assert!(parse_counter_lines("pass 000000000000000A\n").is_err());
}

#[test]
fn consecutive_counter_lines_go_up_by_print_every() {
    assert_eq!(check_consecutive(&[], 4), Ok(()));
    assert_eq!(check_consecutive(&[8], 4), Ok(()));
    assert_eq!(check_consecutive(&[4, 8, 12, 16], 4), Ok(()));
    let gap = check_consecutive(&[4, 8, 16, 20, 20], 4).unwrap_err();
    assert!(
        gap.contains("lines 2 and 3") && gap.contains("0x8 then 0x10") && gap.contains("gap"),
        "{gap}"
    );
    let repeat = check_consecutive(&[1, 2, 2], 1).unwrap_err();
    assert!(
        repeat.contains("lines 2 and 3") && repeat.contains("repeat"),
        "{repeat}"
    );
    let back = check_consecutive(&[5, 3], 1).unwrap_err();
    assert!(back.contains("going back"), "{back}");
    let small = check_consecutive(&[10, 15], 10).unwrap_err();
    assert!(small.contains("expected 0x14"), "{small}");
    assert!(check_consecutive(&[u64::MAX, 0], 1).is_err());
}

#[test]
fn pattern_is_address_xor_seed() {
    assert_eq!(pattern(0x1000, 0xff00), 0xef00);
    assert_eq!(pattern(0x1000, 0), 0x1000);
}
