//! Tiny hand-made guests on this machine's KVM: real-mode code that prints over port
//! 0x3f8, writes guest memory, and faults on userfaultfd-backed memory.

#![cfg(target_arch = "x86_64")]

use std::sync::Arc;

use rangevm::arch::{KvmVm, VcpuStop};
use rangevm_memory::{
    host_page_size, FaultEngine, FaultEngineConfig, GuestRam, LockMode, PageContent, PageSource,
};

const ENTRY: u16 = 0x1000;

/// mov dx, 0x3f8
const MOV_DX_COM1: [u8; 3] = [0xBA, 0xF8, 0x03];
/// out dx, al
const OUT_DX_AL: u8 = 0xEE;
const HLT: u8 = 0xF4;

fn run(vm: &KvmVm) -> (VcpuStop, Vec<u8>) {
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    vcpu.setup_real_mode(ENTRY).expect("real mode");
    let mut serial = Vec::new();
    let stop = vcpu
        .run(|port, data| {
            if port == 0x3f8 {
                serial.extend_from_slice(data);
            }
        })
        .expect("KVM_RUN");
    (stop, serial)
}

#[test]
fn guest_prints_over_the_serial_port_and_writes_memory() {
    let page = host_page_size();
    let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, 16 * page)]).unwrap());
    let mut code = Vec::new();
    code.extend(MOV_DX_COM1);
    code.extend([0xB0, b'O', OUT_DX_AL, 0xB0, b'K', OUT_DX_AL]);
    // mov byte [0x2000], 0x5a
    code.extend([0xC6, 0x06, 0x00, 0x20, 0x5A]);
    code.push(HLT);
    ram.write(u64::from(ENTRY), &code).unwrap();
    let vm = KvmVm::new(Arc::clone(&ram)).expect("create VM");
    let (stop, serial) = run(&vm);
    assert_eq!(stop, VcpuStop::Halted);
    assert_eq!(serial, b"OK");
    assert_eq!(ram.read_obj::<u8>(0x2000).unwrap(), 0x5a);
}

/// The code page holds the guest program; page `p` of the rest is filled with
/// `p + 0x40`.
struct Program {
    code: Vec<u8>,
    page_size: u64,
}

impl PageSource for Program {
    fn read_page(&self, gpa: u64, buf: &mut [u8]) -> std::io::Result<PageContent> {
        let entry_page = u64::from(ENTRY) / self.page_size * self.page_size;
        if gpa == entry_page {
            buf.fill(HLT);
            let at = usize::from(ENTRY) - usize::try_from(entry_page).unwrap_or(0);
            buf[at..at + self.code.len()].copy_from_slice(&self.code);
        } else {
            buf.fill(u8::try_from(gpa / self.page_size % 64).unwrap_or(0) + 0x40);
        }
        Ok(PageContent::Data)
    }
}

#[test]
fn guest_faults_on_missing_memory_are_served_by_the_fault_engine() {
    let page = host_page_size();
    // Addresses in real mode stay below 64 KiB: with 64 KiB pages everything is one
    // page, so read from the last 4 KiB of it, in a page of its own on 4 KiB hosts.
    let data = 0xF000u16;
    let mut code = Vec::new();
    code.extend(MOV_DX_COM1);
    // mov al, [data]; out dx, al; hlt
    code.extend([
        0xA0,
        data.to_le_bytes()[0],
        data.to_le_bytes()[1],
        OUT_DX_AL,
        HLT,
    ]);
    let ram =
        Arc::new(GuestRam::new_missing(LockMode::Range, &[(0, 16 * page.max(0x10000))]).unwrap());
    let engine = FaultEngine::start(
        Arc::clone(&ram),
        Arc::new(Program {
            code,
            page_size: page,
        }),
        FaultEngineConfig {
            handlers: 1,
            shards: 1,
        },
    )
    .expect("start the fault engine");
    let vm = KvmVm::new(Arc::clone(&ram)).expect("create VM");
    let (stop, serial) = run(&vm);
    let stats = engine.stop();
    assert_eq!(stop, VcpuStop::Halted);
    let data_page = u64::from(data) / page;
    let want = u8::try_from(data_page % 64).unwrap() + 0x40;
    let want = if data_page == u64::from(ENTRY) / page {
        HLT
    } else {
        want
    };
    assert_eq!(serial, vec![want]);
    assert!(stats.copied >= 1, "{stats:?}");
    assert_eq!(stats.errors, 0);
    assert!(ram.page_state(u64::from(ENTRY)).unwrap().present);
}

/// The dirty set is KVM's dirty log (manual-protect mode) OR-ed with the VMM's own
/// bitmap: a real-mode guest writes pages A, signals, waits for a flag the host sets by
/// DMA, writes pages B and halts. The first harvest returns exactly A; the second
/// exactly B plus the flag page the host wrote; a third returns nothing.
#[test]
fn dirty_harvest_returns_exactly_the_pages_written_since_the_last_one() {
    let page = host_page_size();
    assert_eq!(
        page, 4096,
        "this real-mode guest's page numbers assume x86 pages"
    );
    let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, 1 << 20)]).unwrap());
    let set_a = [0x3000u64, 0x5000, 0x8000];
    let set_b = [0x4000u64, 0x9000];
    let flag = 0xC000u64;
    let mut code = Vec::new();
    // mov byte [addr], 1
    let store = |code: &mut Vec<u8>, addr: u64| {
        let a = u16::try_from(addr).unwrap().to_le_bytes();
        code.extend([0xC6, 0x06, a[0], a[1], 0x01]);
    };
    for &a in &set_a {
        store(&mut code, a);
    }
    code.extend(MOV_DX_COM1);
    code.extend([0xB0, b'A', OUT_DX_AL]);
    // wait: mov al, [flag]; test al, al; jz wait
    let f = u16::try_from(flag).unwrap().to_le_bytes();
    code.extend([0xA0, f[0], f[1], 0x84, 0xC0, 0x74, 0xF9]);
    for &b in &set_b {
        store(&mut code, b);
    }
    code.extend([0xB0, b'B', OUT_DX_AL, HLT]);
    ram.write(u64::from(ENTRY), &code).unwrap();

    let vm = KvmVm::new(Arc::clone(&ram)).expect("create VM");
    vm.set_dirty_logging(true).expect("enable dirty logging");
    eprintln!("KVM manual dirty protect: {}", vm.manual_dirty_protect());
    // Start clean: the program's own bytes were written by the VMM.
    ram.harvest_dirty(Some(&vm), 2 << 20).unwrap();
    let mut vcpu = vm.create_vcpu(0).expect("create vCPU");
    vcpu.setup_real_mode(ENTRY).expect("real mode");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let runner = s.spawn(move || {
            vcpu.run(|port, data| {
                if port == 0x3f8 {
                    let _ = tx.send(data[0]);
                }
            })
        });
        let timeout = std::time::Duration::from_secs(20);
        assert_eq!(rx.recv_timeout(timeout), Ok(b'A'));
        let (first, stats) = ram.harvest_dirty(Some(&vm), 2 << 20).unwrap();
        assert_eq!(first, set_a, "first harvest ({stats:?})");
        ram.write(flag, &[1]).unwrap();
        assert_eq!(rx.recv_timeout(timeout), Ok(b'B'));
        assert_eq!(runner.join().unwrap().unwrap(), VcpuStop::Halted);
    });
    let (second, _) = ram.harvest_dirty(Some(&vm), 2 << 20).unwrap();
    let mut want = set_b.to_vec();
    want.push(flag);
    want.sort_unstable();
    assert_eq!(
        second, want,
        "second harvest: B and the page the host wrote"
    );
    assert_eq!(
        ram.harvest_dirty(Some(&vm), 2 << 20).unwrap().0,
        Vec::<u64>::new()
    );
    vm.set_dirty_logging(false).expect("disable dirty logging");
}
