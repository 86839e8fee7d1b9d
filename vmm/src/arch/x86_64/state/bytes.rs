//! The byte form of [`VcpuState`] and [`VmState`] (layout in the parent module's docs):
//! an explicit little-endian encoder and a checked decoder, field by field.

use crate::arch::codec::{CodecError, Reader, Writer};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_ioapic_state,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_channel_state,
    kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};

use super::{
    StateError, VcpuState, VmState, LAPIC_BYTES, MAX_XCRS, STATE_VERSION, XSAVE_LEGACY_WORDS,
    XSAVE_MAX_WORDS,
};

const VCPU_MAGIC: [u8; 4] = *b"RVCS";
const VM_MAGIC: [u8; 4] = *b"RVVS";
fn c_chars_to_bytes(chars: &[std::os::raw::c_char]) -> Vec<u8> {
    chars.iter().map(|c| c.to_ne_bytes()[0]).collect()
}

fn put_segment(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.u8(b);
    }
}

fn get_segment(r: &mut Reader<'_>) -> Result<kvm_segment, StateError> {
    let what = "segment register";
    Ok(kvm_segment {
        base: r.u64(what)?,
        limit: r.u32(what)?,
        selector: r.u16(what)?,
        type_: r.u8(what)?,
        present: r.u8(what)?,
        dpl: r.u8(what)?,
        db: r.u8(what)?,
        s: r.u8(what)?,
        l: r.u8(what)?,
        g: r.u8(what)?,
        avl: r.u8(what)?,
        unusable: r.u8(what)?,
        padding: 0,
    })
}

fn put_dtable(w: &mut Writer, d: &kvm_dtable) {
    w.u64(d.base);
    w.u16(d.limit);
}

fn get_dtable(r: &mut Reader<'_>) -> Result<kvm_dtable, StateError> {
    Ok(kvm_dtable {
        base: r.u64("descriptor table")?,
        limit: r.u16("descriptor table")?,
        padding: [0; 3],
    })
}

fn regs_fields(r: &mut kvm_regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rsp,
        &mut r.rbp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

fn put_sregs(w: &mut Writer, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg);
    }
    put_dtable(w, &s.gdt);
    put_dtable(w, &s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.u64(v);
    }
    for v in s.interrupt_bitmap {
        w.u64(v);
    }
}

fn get_sregs(r: &mut Reader<'_>) -> Result<kvm_sregs, StateError> {
    let mut s = kvm_sregs::default();
    for seg in [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
    ] {
        *seg = get_segment(r)?;
    }
    s.gdt = get_dtable(r)?;
    s.idt = get_dtable(r)?;
    for v in [
        &mut s.cr0,
        &mut s.cr2,
        &mut s.cr3,
        &mut s.cr4,
        &mut s.cr8,
        &mut s.efer,
        &mut s.apic_base,
    ] {
        *v = r.u64("control register")?;
    }
    for v in &mut s.interrupt_bitmap {
        *v = r.u64("interrupt bitmap")?;
    }
    Ok(s)
}

fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    for reg in &f.fpr {
        w.bytes(reg);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for reg in &f.xmm {
        w.bytes(reg);
    }
    w.u32(f.mxcsr);
}

fn get_fpu(r: &mut Reader<'_>) -> Result<kvm_fpu, StateError> {
    let what = "FPU state";
    let mut f = kvm_fpu::default();
    for reg in &mut f.fpr {
        *reg = r.array(what)?;
    }
    f.fcw = r.u16(what)?;
    f.fsw = r.u16(what)?;
    f.ftwx = r.u8(what)?;
    f.last_opcode = r.u16(what)?;
    f.last_ip = r.u64(what)?;
    f.last_dp = r.u64(what)?;
    for reg in &mut f.xmm {
        *reg = r.array(what)?;
    }
    f.mxcsr = r.u32(what)?;
    Ok(f)
}

fn put_xcrs(w: &mut Writer, x: &kvm_xcrs) -> Result<(), StateError> {
    let n = usize::try_from(x.nr_xcrs).unwrap_or(usize::MAX);
    w.count("XCRs", n, MAX_XCRS)?;
    w.u32(x.flags);
    for xcr in &x.xcrs[..n] {
        w.u32(xcr.xcr);
        w.u64(xcr.value);
    }
    Ok(())
}

fn get_xcrs(r: &mut Reader<'_>) -> Result<kvm_xcrs, StateError> {
    let n = r.count("XCRs", MAX_XCRS, 12)?;
    let mut x = kvm_xcrs {
        nr_xcrs: u32::try_from(n).unwrap_or(0),
        flags: r.u32("XCRs")?,
        ..Default::default()
    };
    for xcr in &mut x.xcrs[..n] {
        xcr.xcr = r.u32("XCR")?;
        xcr.value = r.u64("XCR")?;
    }
    Ok(x)
}

fn put_events(w: &mut Writer, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for b in [x.injected, x.nr, x.has_error_code, x.pending] {
        w.u8(b);
    }
    w.u32(x.error_code);
    let i = &e.interrupt;
    for b in [i.injected, i.nr, i.soft, i.shadow] {
        w.u8(b);
    }
    let n = &e.nmi;
    for b in [n.injected, n.pending, n.masked] {
        w.u8(b);
    }
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let s = &e.smi;
    for b in [s.smm, s.pending, s.smm_inside_nmi, s.latched_init] {
        w.u8(b);
    }
    w.u8(e.triple_fault.pending);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

fn get_events(r: &mut Reader<'_>) -> Result<kvm_vcpu_events, StateError> {
    let what = "vCPU events";
    let mut e = kvm_vcpu_events::default();
    let x = &mut e.exception;
    for b in [
        &mut x.injected,
        &mut x.nr,
        &mut x.has_error_code,
        &mut x.pending,
    ] {
        *b = r.u8(what)?;
    }
    x.error_code = r.u32(what)?;
    let i = &mut e.interrupt;
    for b in [&mut i.injected, &mut i.nr, &mut i.soft, &mut i.shadow] {
        *b = r.u8(what)?;
    }
    let n = &mut e.nmi;
    for b in [&mut n.injected, &mut n.pending, &mut n.masked] {
        *b = r.u8(what)?;
    }
    e.sipi_vector = r.u32(what)?;
    e.flags = r.u32(what)?;
    let s = &mut e.smi;
    for b in [
        &mut s.smm,
        &mut s.pending,
        &mut s.smm_inside_nmi,
        &mut s.latched_init,
    ] {
        *b = r.u8(what)?;
    }
    e.triple_fault.pending = r.u8(what)?;
    e.exception_has_payload = r.u8(what)?;
    e.exception_payload = r.u64(what)?;
    Ok(e)
}

impl VcpuState {
    /// The state in the versioned byte form (module docs). Fails only for lists longer
    /// than the decoder accepts.
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut w = Writer::default();
        w.count("CPUID entries", self.cpuid.len(), KVM_MAX_CPUID_ENTRIES)?;
        for e in &self.cpuid {
            for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                w.u32(v);
            }
        }
        let mut regs = self.regs;
        for v in regs_fields(&mut regs) {
            w.u64(*v);
        }
        put_sregs(&mut w, &self.sregs);
        put_fpu(&mut w, &self.fpu);
        w.flag(self.xsave.is_some());
        if let Some(words) = &self.xsave {
            if words.len() < XSAVE_LEGACY_WORDS {
                return Err(StateError::Codec(CodecError::Invalid("XSAVE area size")));
            }
            w.count("XSAVE words", words.len(), XSAVE_MAX_WORDS)?;
            for &word in words {
                w.u32(word);
            }
        }
        w.flag(self.xcrs.is_some());
        if let Some(xcrs) = &self.xcrs {
            put_xcrs(&mut w, xcrs)?;
        }
        w.flag(self.debugregs.is_some());
        if let Some(d) = &self.debugregs {
            for v in d.db.iter().chain([&d.dr6, &d.dr7, &d.flags]) {
                w.u64(*v);
            }
        }
        w.bytes(&c_chars_to_bytes(&self.lapic.regs));
        w.count("MSRs", self.msrs.len(), KVM_MAX_MSR_ENTRIES)?;
        for m in &self.msrs {
            w.u32(m.index);
            w.u64(m.data);
        }
        w.u32(self.mp_state.mp_state);
        put_events(&mut w, &self.events);
        w.flag(self.tsc_khz.is_some());
        w.u32(self.tsc_khz.unwrap_or(0));
        Ok(w.finish_as(VCPU_MAGIC, STATE_VERSION)?)
    }

    /// Reads the byte form back; any damage, truncation or other version is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::unframe_as(VCPU_MAGIC, STATE_VERSION, "vCPU", bytes)?;
        let n = r.count("CPUID entries", KVM_MAX_CPUID_ENTRIES, 28)?;
        let mut cpuid = Vec::with_capacity(n);
        for _ in 0..n {
            let mut e = kvm_cpuid_entry2::default();
            for v in [
                &mut e.function,
                &mut e.index,
                &mut e.flags,
                &mut e.eax,
                &mut e.ebx,
                &mut e.ecx,
                &mut e.edx,
            ] {
                *v = r.u32("CPUID entry")?;
            }
            cpuid.push(e);
        }
        let mut regs = kvm_regs::default();
        for v in regs_fields(&mut regs) {
            *v = r.u64("general registers")?;
        }
        let sregs = get_sregs(&mut r)?;
        let fpu = get_fpu(&mut r)?;
        let xsave = if r.flag("XSAVE presence")? {
            let n = r.count("XSAVE words", XSAVE_MAX_WORDS, 4)?;
            if n < XSAVE_LEGACY_WORDS {
                return Err(StateError::Codec(CodecError::Invalid("XSAVE area size")));
            }
            let mut words = Vec::with_capacity(n);
            for _ in 0..n {
                words.push(r.u32("XSAVE area")?);
            }
            Some(words)
        } else {
            None
        };
        let xcrs = if r.flag("XCRs presence")? {
            Some(get_xcrs(&mut r)?)
        } else {
            None
        };
        let debugregs = if r.flag("debug registers presence")? {
            let mut d = kvm_debugregs::default();
            for v in
                d.db.iter_mut()
                    .chain([&mut d.dr6, &mut d.dr7, &mut d.flags])
            {
                *v = r.u64("debug registers")?;
            }
            Some(d)
        } else {
            None
        };
        let mut lapic = kvm_lapic_state::default();
        for (c, &b) in lapic.regs.iter_mut().zip(r.take(LAPIC_BYTES, "LAPIC")?) {
            *c = std::os::raw::c_char::from_ne_bytes([b]);
        }
        let n = r.count("MSRs", KVM_MAX_MSR_ENTRIES, 12)?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push(kvm_msr_entry {
                index: r.u32("MSR")?,
                data: r.u64("MSR")?,
                ..Default::default()
            });
        }
        let mp_state = kvm_mp_state {
            mp_state: r.u32("MP state")?,
        };
        let events = get_events(&mut r)?;
        let has_khz = r.flag("TSC frequency presence")?;
        let khz = r.u32("TSC frequency")?;
        r.end()?;
        Ok(VcpuState {
            cpuid,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            mp_state,
            events,
            tsc_khz: has_khz.then_some(khz),
        })
    }
}

fn pic_fields(p: &mut kvm_pic_state) -> [&mut u8; 16] {
    [
        &mut p.last_irr,
        &mut p.irr,
        &mut p.imr,
        &mut p.isr,
        &mut p.priority_add,
        &mut p.irq_base,
        &mut p.read_reg_select,
        &mut p.poll,
        &mut p.special_mask,
        &mut p.init_state,
        &mut p.auto_eoi,
        &mut p.rotate_on_auto_eoi,
        &mut p.special_fully_nested_mode,
        &mut p.init4,
        &mut p.elcr,
        &mut p.elcr_mask,
    ]
}

fn put_channel(w: &mut Writer, c: &kvm_pit_channel_state) {
    w.u32(c.count);
    w.u16(c.latched_count);
    for b in [
        c.count_latched,
        c.status_latched,
        c.status,
        c.read_state,
        c.write_state,
        c.write_latch,
        c.rw_mode,
        c.mode,
        c.bcd,
        c.gate,
    ] {
        w.u8(b);
    }
    w.bytes(&c.count_load_time.to_le_bytes());
}

fn get_channel(r: &mut Reader<'_>) -> Result<kvm_pit_channel_state, StateError> {
    let what = "PIT channel";
    let mut c = kvm_pit_channel_state {
        count: r.u32(what)?,
        latched_count: r.u16(what)?,
        ..Default::default()
    };
    for b in [
        &mut c.count_latched,
        &mut c.status_latched,
        &mut c.status,
        &mut c.read_state,
        &mut c.write_state,
        &mut c.write_latch,
        &mut c.rw_mode,
        &mut c.mode,
        &mut c.bcd,
        &mut c.gate,
    ] {
        *b = r.u8(what)?;
    }
    c.count_load_time = i64::from_le_bytes(r.array(what)?);
    Ok(c)
}

impl VmState {
    /// The state in the versioned byte form (module docs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateError> {
        let mut w = Writer::default();
        for pic in [self.pic_master, self.pic_slave] {
            let mut pic = pic;
            for b in pic_fields(&mut pic) {
                w.u8(*b);
            }
        }
        let io = &self.ioapic;
        w.u64(io.base_address);
        w.u32(io.ioregsel);
        w.u32(io.id);
        w.u32(io.irr);
        for entry in &io.redirtbl {
            // SAFETY: both members of the 8-byte union (`bits`, and `fields`: 1 + 2 + 4
            // + 1 bytes) cover all 8 bytes, so whichever was written, every byte is
            // initialized, and any bit pattern is a valid u64.
            w.u64(unsafe { entry.bits });
        }
        for c in &self.pit.channels {
            put_channel(&mut w, c);
        }
        w.u32(self.pit.flags);
        let clock = &self.clock;
        w.u64(clock.clock);
        w.u32(clock.flags);
        w.u64(clock.realtime);
        w.u64(clock.host_tsc);
        Ok(w.finish_as(VM_MAGIC, STATE_VERSION)?)
    }

    /// Reads the byte form back; any damage, truncation or other version is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::unframe_as(VM_MAGIC, STATE_VERSION, "VM", bytes)?;
        let mut pics = [kvm_pic_state::default(); 2];
        for pic in &mut pics {
            for b in pic_fields(pic) {
                *b = r.u8("PIC")?;
            }
        }
        let mut ioapic = kvm_ioapic_state {
            base_address: r.u64("IOAPIC")?,
            ioregsel: r.u32("IOAPIC")?,
            id: r.u32("IOAPIC")?,
            irr: r.u32("IOAPIC")?,
            ..Default::default()
        };
        for entry in &mut ioapic.redirtbl {
            entry.bits = r.u64("IOAPIC redirection entry")?;
        }
        let mut pit = kvm_pit_state2::default();
        for c in &mut pit.channels {
            *c = get_channel(&mut r)?;
        }
        pit.flags = r.u32("PIT")?;
        let clock = kvm_clock_data {
            clock: r.u64("kvm clock")?,
            flags: r.u32("kvm clock")?,
            realtime: r.u64("kvm clock")?,
            host_tsc: r.u64("kvm clock")?,
            ..Default::default()
        };
        r.end()?;
        Ok(VmState {
            pic_master: pics[0],
            pic_slave: pics[1],
            ioapic,
            pit,
            clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// The frame around a payload (module docs): magic, version, reserved, length;
    /// and the checksum after it.
    const HEADER_LEN: usize = 12;
    const CRC_LEN: usize = 4;

    /// A vCPU state with a distinct value in every encoded field.
    fn sample_vcpu() -> VcpuState {
        let mut n = 0u64;
        let mut next = || {
            n += 1;
            n
        };
        let mut regs = kvm_regs::default();
        for v in regs_fields(&mut regs) {
            *v = (next() << 40) | 0xabc;
        }
        let mut sregs = kvm_sregs {
            cr0: 0x8000_0011,
            cr4: 0x40620,
            efer: 0xd01,
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [1, 2, 3, 4],
            ..Default::default()
        };
        sregs.cs = kvm_segment {
            base: 0x1234,
            limit: 0xffff_ffff,
            selector: 8,
            type_: 11,
            present: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        sregs.gdt.base = 0x500;
        sregs.gdt.limit = 39;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x77,
            ..Default::default()
        };
        fpu.xmm[3][5] = 0x99;
        fpu.fpr[7][0] = 0x42;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 7;
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 0x11;
        lapic.regs[1023] = -3;
        let mut events = kvm_vcpu_events::default();
        events.exception.nr = 14;
        events.exception.error_code = 0xdead;
        events.nmi.masked = 1;
        events.flags = 0x3f;
        events.exception_payload = 0x1234_5678_9abc;
        VcpuState {
            cpuid: (0..5)
                .map(|i| kvm_cpuid_entry2 {
                    function: i,
                    index: i * 2,
                    eax: 0xa0 + i,
                    edx: 0xd0 + i,
                    ..Default::default()
                })
                .collect(),
            regs,
            sregs,
            fpu,
            xsave: Some((0..1100).collect()),
            xcrs: Some(xcrs),
            debugregs: Some(kvm_debugregs {
                db: [1, 2, 3, 4],
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            }),
            lapic,
            msrs: [
                (0x10, 123_456_789),
                (0xc000_0080, 0xd01),
                (0x277, 0x0007_0406),
            ]
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect(),
            mp_state: kvm_mp_state { mp_state: 3 },
            events,
            tsc_khz: Some(2_100_000),
        }
    }

    fn sample_vm() -> VmState {
        let mut pic_master = kvm_pic_state {
            imr: 0xfb,
            irq_base: 0x20,
            elcr_mask: 0xf8,
            ..Default::default()
        };
        pic_master.init4 = 1;
        let pic_slave = kvm_pic_state {
            imr: 0xff,
            irq_base: 0x28,
            ..Default::default()
        };
        let mut ioapic = kvm_ioapic_state {
            base_address: 0xfec0_0000,
            id: 2,
            irr: 0x10,
            ..Default::default()
        };
        for (i, e) in ioapic.redirtbl.iter_mut().enumerate() {
            e.bits = 0x1_0000 | (0x30 + u64::try_from(i).unwrap());
        }
        let mut pit = kvm_pit_state2 {
            flags: 1,
            ..Default::default()
        };
        pit.channels[0].count = 0x1_0000;
        pit.channels[0].mode = 2;
        pit.channels[2].gate = 1;
        pit.channels[1].count_load_time = -5;
        VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock: kvm_clock_data {
                clock: 987_654_321,
                flags: 6,
                realtime: 42,
                host_tsc: 43,
                ..Default::default()
            },
        }
    }

    #[test]
    fn vcpu_state_survives_the_round_trip() {
        let state = sample_vcpu();
        let bytes = state.to_bytes().unwrap();
        let back = VcpuState::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes().unwrap(), bytes);
        assert_eq!(back.regs, state.regs);
        assert_eq!(back.sregs, state.sregs);
        assert_eq!(back.fpu, state.fpu);
        assert_eq!(back.xsave, state.xsave);
        assert_eq!(back.xcrs.unwrap().xcrs[0].value, 7);
        assert_eq!(back.debugregs, state.debugregs);
        assert_eq!(back.lapic, state.lapic);
        assert_eq!(back.msrs, state.msrs);
        assert_eq!(back.mp_state, state.mp_state);
        assert_eq!(back.events, state.events);
        assert_eq!(back.cpuid, state.cpuid);
        assert_eq!(back.tsc_khz, Some(2_100_000));

        // The optional parts absent.
        let bare = VcpuState {
            xsave: None,
            xcrs: None,
            debugregs: None,
            tsc_khz: None,
            ..state
        };
        let back = VcpuState::from_bytes(&bare.to_bytes().unwrap()).unwrap();
        assert!(back.xsave.is_none() && back.xcrs.is_none() && back.debugregs.is_none());
        assert_eq!(back.tsc_khz, None);
    }

    #[test]
    fn vm_state_survives_the_round_trip() {
        let state = sample_vm();
        let bytes = state.to_bytes().unwrap();
        let back = VmState::from_bytes(&bytes).unwrap();
        assert_eq!(back.to_bytes().unwrap(), bytes);
        assert_eq!(back.pic_master, state.pic_master);
        assert_eq!(back.pic_slave, state.pic_slave);
        assert_eq!(back.pit, state.pit);
        assert_eq!(back.clock, state.clock);
        // SAFETY: both were written through `bits`.
        let (a, b) = unsafe {
            (
                back.ioapic.redirtbl[23].bits,
                state.ioapic.redirtbl[23].bits,
            )
        };
        assert_eq!(a, b);
    }

    /// Every truncation and every single-bit flip of a blob is refused.
    fn assert_damage_is_refused(bytes: &[u8], decode: impl Fn(&[u8]) -> Result<(), StateError>) {
        assert!(decode(bytes).is_ok());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        let mut bad = bytes.to_vec();
        for at in 0..bytes.len() {
            let bit = at % 8;
            bad[at] ^= 1 << bit;
            assert!(decode(&bad).is_err(), "bit {bit} of byte {at} flipped");
            bad[at] ^= 1 << bit;
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(matches!(
            decode(&longer).unwrap_err(),
            StateError::Codec(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn damaged_blobs_are_refused() {
        let vcpu = sample_vcpu().to_bytes().unwrap();
        assert_damage_is_refused(&vcpu, |b| VcpuState::from_bytes(b).map(drop));
        let vm = sample_vm().to_bytes().unwrap();
        assert_damage_is_refused(&vm, |b| VmState::from_bytes(b).map(drop));
        // The kinds do not mix.
        assert!(matches!(
            VmState::from_bytes(&vcpu).unwrap_err(),
            StateError::Codec(CodecError::Magic("VM"))
        ));
        assert!(matches!(
            VcpuState::from_bytes(&vm).unwrap_err(),
            StateError::Codec(CodecError::Magic("vCPU"))
        ));
        assert!(matches!(
            VcpuState::from_bytes(&[]).unwrap_err(),
            StateError::Codec(CodecError::Truncated { .. })
        ));
    }

    /// Re-frames `payload` with a valid checksum, as a well-meaning but wrong encoder
    /// (or an attacker) would.
    fn reframe(magic: [u8; 4], version: u16, payload: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(payload);
        w.finish_as(magic, version).unwrap()
    }

    #[test]
    fn other_versions_and_bad_fields_with_good_checksums_are_refused() {
        let bytes = sample_vcpu().to_bytes().unwrap();
        let payload = &bytes[HEADER_LEN..bytes.len() - CRC_LEN];
        assert!(VcpuState::from_bytes(&reframe(VCPU_MAGIC, 1, payload)).is_ok());
        assert!(matches!(
            VcpuState::from_bytes(&reframe(VCPU_MAGIC, 2, payload)).unwrap_err(),
            StateError::Codec(CodecError::Version {
                found: 2,
                supported: 1
            })
        ));
        // A CPUID count past its bound, and one past the bytes there are.
        let mut p = payload.to_vec();
        p[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            VcpuState::from_bytes(&reframe(VCPU_MAGIC, 1, &p)).unwrap_err(),
            StateError::Codec(CodecError::TooMany { .. })
        ));
        p[..4].copy_from_slice(&200u32.to_le_bytes());
        assert!(VcpuState::from_bytes(&reframe(VCPU_MAGIC, 1, &p)).is_err());
        // A presence flag that is neither 0 nor 1 (the XSAVE flag follows CPUID, regs,
        // sregs and FPU).
        let at = 4 + 5 * 28 + 18 * 8 + (8 * 23 + 2 * 10 + 7 * 8 + 4 * 8) + (128 + 23 + 256 + 4);
        let mut p = payload.to_vec();
        assert_eq!(p[at], 1, "the XSAVE presence flag is where the layout says");
        p[at] = 2;
        assert!(matches!(
            VcpuState::from_bytes(&reframe(VCPU_MAGIC, 1, &p)).unwrap_err(),
            StateError::Codec(CodecError::Invalid("XSAVE presence"))
        ));
        // An XSAVE area smaller than the legacy 4 KiB is refused on both sides.
        let small = VcpuState {
            xsave: Some(vec![0; 10]),
            ..sample_vcpu()
        };
        assert!(matches!(
            small.to_bytes().unwrap_err(),
            StateError::Codec(CodecError::Invalid("XSAVE area size"))
        ));
        let too_many = VcpuState {
            msrs: vec![kvm_msr_entry::default(); KVM_MAX_MSR_ENTRIES + 1],
            ..sample_vcpu()
        };
        assert!(matches!(
            too_many.to_bytes().unwrap_err(),
            StateError::Codec(CodecError::TooMany { what: "MSRs", .. })
        ));
    }
}
