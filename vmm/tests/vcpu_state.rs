//! vCPU and VM state moved between two KVM VMs on this machine, as precopy's
//! switch-over will: a tiny long-mode guest counts on VM A, A is stopped mid-loop, its
//! vCPU and VM state go through the byte form, its memory is copied page by page into a
//! second guest RAM, and VM B, restored from that, goes on counting exactly where A
//! stopped. The counter lives in memory, a general register, an SSE register and in
//! memory reached through the FS base the guest set by WRMSR, so memory, registers,
//! the FPU/XSAVE area and the segment state must all arrive.

#![cfg(target_arch = "x86_64")]

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_VCPUEVENT_VALID_NMI_PENDING};
use rangevm::arch::{layout, EntryPoint, IoHandler, KvmVcpu, KvmVm, VcpuState, VmState};
use rangevm_memory::{host_page_size, GuestRam, LockMode};

const MEM: u64 = 4 << 20;
/// Where the guest's code goes.
const CODE: u64 = 0x10_0000;
/// Where it keeps its memory copy of the counter (the code below says 0x5000).
const COUNTER: u64 = 0x5000;
const COM1: u16 = 0x3f8;
/// The FS base the guest sets.
const FS_BASE: u64 = 0x6000;

/// 64-bit code (assembled with GNU as, Intel syntax). This host's KVM may emulate every
/// instruction, and KVM's emulator knows no VEX (AVX) encodings and few SSE ones, so
/// the SSE register is reached with MOVDQU only:
///
/// ```text
///   xor ecx, ecx ; mov eax, 7 ; xor edx, edx
///   xsetbv                          ; XCR0 = x87 | SSE | AVX
///   mov ecx, 0xc0000100 ; mov eax, 0x6000 ; xor edx, edx
///   wrmsr                           ; FS base = 0x6000
///   mov dx, 0x3f8 ; xor ebx, ebx
///   mov qword [0x5000], 0 ; mov qword [0x5020], 0 ; mov qword [0x5028], 0
///   mov qword fs:[0x8], 0
///   movdqu xmm1, [0x5020]
/// top:
///   mov rax, [0x5000]               ; out: the counter in memory
///   out dx, al
///   movdqu [0x5010], xmm1           ; out: the counter in xmm1
///   mov rax, [0x5010]
///   out dx, al
///   mov eax, ebx                    ; out: the counter in rbx
///   out dx, al
///   mov rax, fs:[0x8]               ; out: the counter at FS base + 8
///   out dx, al
///   in al, 0x80                     ; out: what the VMM gives it (its IN count)
///   out dx, al
///   inc rbx ; inc qword [0x5000] ; inc qword fs:[0x8]
///   mov [0x5020], rbx ; movdqu xmm1, [0x5020]
///   jmp top
/// ```
///
/// So byte `k` of its output is `k / 5` (mod 256), as long as the VMM answers the
/// `i`-th IN with `i`.
const GUEST: [u8; 172] = [
    0x31, 0xc9, 0xb8, 0x07, 0x00, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x01, 0xd1, 0xb9, 0x00, 0x01, 0x00,
    0xc0, 0xb8, 0x00, 0x60, 0x00, 0x00, 0x31, 0xd2, 0x0f, 0x30, 0x66, 0xba, 0xf8, 0x03, 0x31, 0xdb,
    0x48, 0xc7, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25,
    0x20, 0x50, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x04, 0x25, 0x28, 0x50, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x64, 0x48, 0xc7, 0x04, 0x25, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0x0c, 0x25, 0x20, 0x50, 0x00, 0x00, 0x48, 0x8b, 0x04, 0x25, 0x00, 0x50,
    0x00, 0x00, 0xee, 0xf3, 0x0f, 0x7f, 0x0c, 0x25, 0x10, 0x50, 0x00, 0x00, 0x48, 0x8b, 0x04, 0x25,
    0x10, 0x50, 0x00, 0x00, 0xee, 0x89, 0xd8, 0xee, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x08, 0x00, 0x00,
    0x00, 0xee, 0xe4, 0x80, 0xee, 0x48, 0xff, 0xc3, 0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00,
    0x64, 0x48, 0xff, 0x04, 0x25, 0x08, 0x00, 0x00, 0x00, 0x48, 0x89, 0x1c, 0x25, 0x20, 0x50, 0x00,
    0x00, 0xf3, 0x0f, 0x6f, 0x0c, 0x25, 0x20, 0x50, 0x00, 0x00, 0xeb, 0xae,
];

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const MSR_IA32_TSC: u32 = 0x10;
/// SYSENTER_CS/ESP/EIP, STAR, LSTAR, CSTAR, SYSCALL_MASK, KERNEL_GS_BASE, TSC,
/// MISC_ENABLE.
const BOOT_MSRS: [u32; 10] = [
    0x174,
    0x175,
    0x176,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0x10,
    0x1a0,
];
/// The LAPIC ID register's offset in the LAPIC page.
const APIC_ID: usize = 0x20;

/// The port whose IN the VMM answers with the number of INs answered before.
const IN_PORT: u16 = 0x80;

/// Collects what the guest writes to COM1 and answers its INs from [`IN_PORT`] with a
/// count; every other port reads as all ones.
#[derive(Default)]
struct Io {
    out: RefCell<Vec<u8>>,
    ins: Cell<u64>,
}

impl IoHandler for Io {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if port == IN_PORT {
            data[0] = self.ins.get().to_le_bytes()[0];
            self.ins.set(self.ins.get() + 1);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == COM1 {
            self.out.borrow_mut().extend_from_slice(data);
        }
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// Runs `vcpu` until `done(io)`, checked after every exit.
fn run_until(vcpu: &mut KvmVcpu, io: &Io, done: impl Fn(&Io) -> bool) {
    while !done(io) {
        if let Some(stop) = vcpu.run_once(io).expect("KVM_RUN") {
            panic!(
                "the guest stopped after {} bytes: {stop:?}",
                io.out.borrow().len()
            );
        }
    }
}

/// Runs `vcpu` until the guest has written `bytes` more bytes to COM1.
fn run_for(vcpu: &mut KvmVcpu, bytes: usize) -> Vec<u8> {
    let io = Io::default();
    run_until(vcpu, &io, |io| io.out.borrow().len() >= bytes);
    io.out.into_inner()
}

fn new_ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(LockMode::Range, &[(0, MEM)]).unwrap())
}

fn new_vm(ram: &Arc<GuestRam>) -> KvmVm {
    let vm = KvmVm::new(Arc::clone(ram)).expect("create a VM (needs /dev/kvm)");
    vm.create_irqchip().expect("in-kernel irqchip");
    vm
}

/// Identity page tables for the first GiB (2 MiB pages) where the long-mode start state
/// points CR3, and the guest's code.
fn load_guest(ram: &GuestRam) {
    let pt = 0x3; // present, writable
    ram.write_obj(layout::PML4_START, layout::PDPTE_START | pt)
        .unwrap();
    ram.write_obj(layout::PDPTE_START, layout::PDE_START | pt)
        .unwrap();
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | pt | 0x80).to_le_bytes())
        .collect();
    ram.write(layout::PDE_START, &pd).unwrap();
    ram.write(CODE, &GUEST).unwrap();
}

/// vCPU 0 of `vm` in long mode at the guest's code, with SSE and XSAVE enabled in CR4
/// (set through the state API itself).
fn boot_vcpu(vm: &KvmVm) -> KvmVcpu {
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    vcpu.configure(vm, EntryPoint::Linux64 { entry: CODE }, 1)
        .expect("configure vCPU");
    let mut state = vcpu.save_state().expect("save the start state");
    state.sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    vcpu.restore_state(&state).expect("restore the start state");
    vcpu
}

/// Byte `k` of the guest's whole output is `k / 5` (mod 256).
fn assert_counts(output: &[u8]) {
    for (k, &b) in output.iter().enumerate() {
        let want = u8::try_from(k / 5 % 256).unwrap();
        assert_eq!(
            b,
            want,
            "output byte {k} is {b}, not {want}: {:?}",
            &output[k.saturating_sub(8)..(k + 8).min(output.len())]
        );
    }
}

fn copy_memory(from: &GuestRam, to: &GuestRam) {
    let page = host_page_size();
    let mut buf = vec![0u8; usize::try_from(page).unwrap()];
    for gpa in (0..MEM).step_by(usize::try_from(page).unwrap()) {
        from.read(gpa, &mut buf).unwrap();
        to.write(gpa, &buf).unwrap();
    }
}

fn describe(state: &VcpuState) -> String {
    let msrs: Vec<String> = state
        .msrs
        .iter()
        .map(|m| format!("{:#x}", m.index))
        .collect();
    format!(
        "{} CPUID entries, XSAVE {:?} words, XCRs {}, debug regs {}, TSC kHz {:?}, {} MSRs [{}]",
        state.cpuid.len(),
        state.xsave.as_ref().map(Vec::len),
        state.xcrs.is_some(),
        state.debugregs.is_some(),
        state.tsc_khz,
        state.msrs.len(),
        msrs.join(" ")
    )
}

/// Where VM A is stopped.
#[derive(Clone, Copy, Debug)]
enum StopAt {
    /// Right after the exit for the OUT of output byte `n - 1`.
    Out(usize),
    /// Right after the exit for the `n`-th IN: KVM completes an IN (writes AL, moves
    /// RIP on) only on the next KVM_RUN, so the save must complete it first.
    In(u64),
}

fn migrate_counting_guest(stop: StopAt) {
    let ram_a = new_ram();
    load_guest(&ram_a);
    let vm_a = new_vm(&ram_a);
    let mut vcpu_a = boot_vcpu(&vm_a);
    let io_a = Io::default();
    match stop {
        StopAt::Out(n) => run_until(&mut vcpu_a, &io_a, |io| io.out.borrow().len() >= n),
        StopAt::In(n) => run_until(&mut vcpu_a, &io_a, |io| io.ins.get() >= n),
    }
    let first = io_a.out.take();
    assert_counts(&first);

    let saved = vcpu_a.save_state().expect("save vCPU state");
    eprintln!("saved vCPU state: {}", describe(&saved));
    let vm_saved = vm_a.save_state().expect("save VM state");
    let vcpu_bytes = saved.to_bytes().unwrap();
    let vm_bytes = vm_saved.to_bytes().unwrap();
    eprintln!(
        "vCPU state {} bytes, VM state {} bytes",
        vcpu_bytes.len(),
        vm_bytes.len()
    );
    assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert!(saved.xcrs.is_some_and(|x| x.xcrs[0].value & 0x7 == 0x7));
    assert_eq!(saved.sregs.fs.base, FS_BASE);
    // At least the MSRs a booting kernel gets set (regs.rs boot_msrs) are saved.
    for msr in BOOT_MSRS {
        assert!(
            saved.msrs.iter().any(|m| m.index == msr),
            "MSR {msr:#x} is not saved"
        );
    }

    // The destination: the same layout, memory copied page by page, state from bytes.
    let ram_b = new_ram();
    copy_memory(&ram_a, &ram_b);
    drop(vcpu_a);
    drop(vm_a);
    let vm_b = new_vm(&ram_b);
    vm_b.restore_state(&VmState::from_bytes(&vm_bytes).unwrap())
        .expect("restore VM state");
    let mut vcpu_b = vm_b.create_vcpu(0).expect("create vCPU");
    let restored = VcpuState::from_bytes(&vcpu_bytes).unwrap();
    vcpu_b.restore_state(&restored).expect("restore vCPU state");

    // B holds what A had (the TSC moves on by itself).
    let check = vcpu_b.save_state().expect("save B's state");
    assert_eq!(check.regs, saved.regs);
    assert_eq!(check.sregs, saved.sregs);
    assert_eq!(check.fpu, saved.fpu);
    assert_eq!(check.xsave, saved.xsave);
    assert_eq!(check.xcrs.map(|x| x.xcrs), saved.xcrs.map(|x| x.xcrs));
    assert_eq!(check.debugregs, saved.debugregs);
    assert_eq!(check.lapic, saved.lapic);
    assert_eq!(check.events.nmi, saved.events.nmi);
    assert_eq!(check.events.interrupt, saved.events.interrupt);
    assert_eq!(check.events.exception, saved.events.exception);
    assert_eq!(check.mp_state, saved.mp_state);
    assert_eq!(check.cpuid, saved.cpuid);
    assert_eq!(check.tsc_khz, saved.tsc_khz);
    let without_tsc = |s: &VcpuState| {
        s.msrs
            .iter()
            .filter(|m| m.index != MSR_IA32_TSC)
            .map(|m| (m.index, m.data))
            .collect::<Vec<_>>()
    };
    assert_eq!(without_tsc(&check), without_tsc(&saved));
    let tsc = |s: &VcpuState| {
        s.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    };
    if let (Some(a), Some(b)) = (tsc(&saved), tsc(&check)) {
        assert!(b >= a, "the TSC went back from {a} to {b}");
    }

    // B's VMM goes on answering INs from where A's stopped.
    let io_b = Io {
        ins: Cell::new(io_a.ins.get()),
        ..Io::default()
    };
    run_until(&mut vcpu_b, &io_b, |io| io.out.borrow().len() >= 1500);
    let mut all = first;
    all.extend_from_slice(&io_b.out.borrow());
    assert_counts(&all);
    let counter: u64 = ram_b.read_obj(COUNTER).unwrap();
    assert!(counter + 1 >= u64::try_from(all.len() / 5).unwrap());
}

#[test]
fn a_guest_stopped_after_an_out_counts_on_where_it_stopped() {
    // Mid-iteration, with the counter in flight in RAX.
    migrate_counting_guest(StopAt::Out(1003));
}

#[test]
fn a_guest_stopped_after_an_in_counts_on_where_it_stopped() {
    migrate_counting_guest(StopAt::In(300));
}

#[test]
fn vm_state_moves_to_another_vm() {
    let ram_a = new_ram();
    let vm_a = new_vm(&ram_a);
    let mut state = vm_a.save_state().expect("save VM state");
    // Give every part a value a fresh VM does not have.
    state.pic_master.imr = 0xfa;
    state.pic_master.irq_base = 0x20;
    state.pic_slave.imr = 0x7f;
    state.pic_slave.irq_base = 0x28;
    state.ioapic.redirtbl[4].bits = 0x0001_0000 | 0x34; // masked, vector 0x34
    state.ioapic.redirtbl[9].bits = (1 << 56) | 0x39; // to APIC 1, vector 0x39
    state.pit.channels[0].count = 0x1234;
    state.pit.channels[0].mode = 2;
    state.pit.channels[0].rw_mode = 3;
    state.clock.clock += 5_000_000_000;
    vm_a.restore_state(&state).expect("restore VM state on A");
    let saved = vm_a.save_state().expect("save VM state again");
    let bytes = saved.to_bytes().unwrap();

    let ram_b = new_ram();
    let vm_b = new_vm(&ram_b);
    let fresh = vm_b.save_state().expect("save a fresh VM's state");
    vm_b.restore_state(&VmState::from_bytes(&bytes).unwrap())
        .expect("restore VM state on B");
    let got = vm_b.save_state().expect("save B's VM state");
    assert_ne!(fresh.pic_master.imr, 0xfa);
    assert_eq!((got.pic_master.imr, got.pic_master.irq_base), (0xfa, 0x20));
    assert_eq!((got.pic_slave.imr, got.pic_slave.irq_base), (0x7f, 0x28));
    // SAFETY: the redirection entries are plain 64-bit words, written through `bits`
    // above and by the kernel.
    let (e4, e9) = unsafe { (got.ioapic.redirtbl[4].bits, got.ioapic.redirtbl[9].bits) };
    assert_eq!(e4 & 0x1_00ff, 0x1_0034);
    assert_eq!((e9 >> 56, e9 & 0xff), (1, 0x39));
    let ch0 = got.pit.channels[0];
    assert_eq!((ch0.count, ch0.mode, ch0.rw_mode), (0x1234, 2, 3));
    // The guest's clock goes on from the saved value, not from B's own.
    assert!(got.clock.clock >= saved.clock.clock);
    assert!(
        got.clock.clock - saved.clock.clock < 2_000_000_000,
        "B's clock {} is far from the saved {}",
        got.clock.clock,
        saved.clock.clock
    );
    assert!(fresh.clock.clock < saved.clock.clock);
}

#[test]
fn saved_blobs_of_a_real_vcpu_survive_the_round_trip_and_refuse_damage() {
    let ram = new_ram();
    load_guest(&ram);
    let vm = new_vm(&ram);
    let mut vcpu = boot_vcpu(&vm);
    run_for(&mut vcpu, 10);
    let state = vcpu.save_state().expect("save vCPU state");
    let bytes = state.to_bytes().unwrap();
    let back = VcpuState::from_bytes(&bytes).unwrap();
    assert_eq!(back.to_bytes().unwrap(), bytes);
    assert_eq!(back.regs, state.regs);
    assert_eq!(back.xsave, state.xsave);
    assert_eq!(back.msrs, state.msrs);
    // KVM takes the decoded state back.
    vcpu.restore_state(&back).expect("restore decoded state");
    let more = run_for(&mut vcpu, 8);
    assert_eq!(&more[..2], &[2, 2][..], "{more:?}");

    let vm_bytes = vm.save_state().unwrap().to_bytes().unwrap();
    for (name, blob) in [("vCPU", &bytes), ("VM", &vm_bytes)] {
        let decode = |b: &[u8]| {
            if name == "vCPU" {
                VcpuState::from_bytes(b).map(drop)
            } else {
                VmState::from_bytes(b).map(drop)
            }
        };
        for len in [0, 3, 11, 12, blob.len() / 2, blob.len() - 1] {
            assert!(decode(&blob[..len]).is_err(), "{name} truncated to {len}");
        }
        for at in [0, 5, 13, blob.len() / 3, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 0x20;
            let err = decode(&bad).expect_err("corrupted");
            eprintln!("{name} byte {at} flipped: {err}");
        }
    }
    // The kernel's own events flags survive too.
    assert_eq!(
        back.events.flags & KVM_VCPUEVENT_VALID_NMI_PENDING,
        state.events.flags & KVM_VCPUEVENT_VALID_NMI_PENDING
    );
}

#[test]
fn an_application_processor_keeps_its_wait_for_sipi_state_and_apic_id() {
    let entry = EntryPoint::Linux64 { entry: CODE };
    let ram_a = new_ram();
    let vm_a = new_vm(&ram_a);
    let mut vcpus_a: Vec<KvmVcpu> = (0..2)
        .map(|id| {
            let mut v = vm_a.create_vcpu(id).expect("create vCPU");
            v.configure(&vm_a, entry, 2).expect("configure vCPU");
            v
        })
        .collect();
    let saved: Vec<VcpuState> = vcpus_a
        .iter_mut()
        .map(|v| v.save_state().expect("save vCPU state"))
        .collect();
    let apic_id = |s: &VcpuState| s.lapic.regs[APIC_ID + 3].to_ne_bytes()[0];
    assert_eq!((apic_id(&saved[0]), apic_id(&saved[1])), (0, 1));
    assert_eq!(saved[0].mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    assert_ne!(
        saved[1].mp_state.mp_state, KVM_MP_STATE_RUNNABLE,
        "the AP waits for INIT/SIPI"
    );

    let ram_b = new_ram();
    let vm_b = new_vm(&ram_b);
    for (id, state) in (0..2).zip(&saved) {
        let bytes = state.to_bytes().unwrap();
        let mut v = vm_b.create_vcpu(id).expect("create vCPU");
        v.restore_state(&VcpuState::from_bytes(&bytes).unwrap())
            .expect("restore vCPU state");
        let got = v.save_state().expect("save B's state");
        assert_eq!(got.mp_state, state.mp_state, "vCPU {id}");
        assert_eq!(got.lapic, state.lapic, "vCPU {id}");
        assert_eq!(got.cpuid, state.cpuid, "vCPU {id}");
        assert_eq!(got.sregs, state.sregs, "vCPU {id}");
        // CPUID leaf 1 names the APIC ID too.
        let leaf1 = got.cpuid.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(u64::from(leaf1.ebx >> 24), id);
    }
}
