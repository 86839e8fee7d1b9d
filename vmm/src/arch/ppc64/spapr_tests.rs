//! Tests of the sPAPR hypercall and RTAS handling, against fake KVM and console.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;

use rangevm_memory::LockMode;

use super::*;

#[derive(Default)]
struct FakeMmu {
    calls: StdMutex<Vec<(u64, u64)>>,
    fail: bool,
}

impl MmuControl for FakeMmu {
    fn configure_v3_mmu(&self, flags: u64, table: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push((flags, table));
        if self.fail {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            Ok(())
        }
    }
}

/// The console's registers: output collected, input queued (LSR bit 0 while any).
#[derive(Default)]
struct FakeConsole {
    out: RefCell<Vec<u8>>,
    input: RefCell<VecDeque<u8>>,
}

impl IoHandler for FakeConsole {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data[0] = match port - CONSOLE_PORT {
            0 => self.input.borrow_mut().pop_front().unwrap_or(0),
            5 => 0x60 | u8::from(!self.input.borrow().is_empty()),
            _ => 0xff,
        };
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        assert_eq!(port, CONSOLE_PORT);
        self.out.borrow_mut().extend_from_slice(data);
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) {}
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn platform() -> (Spapr, Arc<GuestRam>, Arc<FakeMmu>) {
    let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, 4 << 20)]).unwrap());
    let mmu = Arc::new(FakeMmu::default());
    (Spapr::new(Arc::clone(&ram), mmu.clone()), ram, mmu)
}

fn args(a: &[u64]) -> [u64; 9] {
    let mut out = [0; 9];
    out[..a.len()].copy_from_slice(a);
    out
}

/// Writes `rtas_args` {token, nargs, nret, args} at `addr`.
fn rtas_args(ram: &GuestRam, addr: u64, token: u32, argv: &[u32], nret: u32) {
    let mut words = vec![token, u32::try_from(argv.len()).unwrap(), nret];
    words.extend_from_slice(argv);
    words.extend(std::iter::repeat_n(0xdead_beef, nret as usize));
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
    ram.write(addr, &bytes).unwrap();
}

fn rets(ram: &GuestRam, addr: u64, nargs: u64, nret: u64) -> Vec<i32> {
    (0..nret)
        .map(|i| read_be32(ram, addr + 12 + 4 * (nargs + i)).unwrap() as i32)
        .collect()
}

#[test]
fn put_term_char_writes_the_packed_bytes_in_order() {
    let (spapr, _, _) = platform();
    let con = FakeConsole::default();
    let a = args(&[VTY_TERMNO, 12, pack(b"hello, w"), pack(b"orld")]);
    assert_eq!(spapr.hcall(0, H_PUT_TERM_CHAR, &a, &con).ret, H_SUCCESS);
    assert_eq!(&*con.out.borrow(), b"hello, world");
    // Another terminal, or more than 16 bytes, is a parameter error and writes nothing.
    let a = args(&[0x3000_0001, 1, pack(b"x")]);
    assert_eq!(spapr.hcall(0, H_PUT_TERM_CHAR, &a, &con).ret, H_PARAMETER);
    let a = args(&[VTY_TERMNO, 17]);
    assert_eq!(spapr.hcall(0, H_PUT_TERM_CHAR, &a, &con).ret, H_PARAMETER);
    assert_eq!(con.out.borrow().len(), 12);
}

#[test]
fn get_term_char_returns_what_the_console_holds() {
    let (spapr, _, _) = platform();
    let con = FakeConsole::default();
    let a = args(&[VTY_TERMNO]);
    let empty = spapr.hcall(0, H_GET_TERM_CHAR, &a, &con);
    assert_eq!(empty.outputs, Some(vec![0, 0, 0]));
    con.input.borrow_mut().extend(b"0123456789abcdefXYZ");
    let got = spapr.hcall(0, H_GET_TERM_CHAR, &a, &con);
    assert_eq!(got.ret, H_SUCCESS);
    assert_eq!(
        got.outputs,
        Some(vec![16, pack(b"01234567"), pack(b"89abcdef")])
    );
    let rest = spapr.hcall(0, H_GET_TERM_CHAR, &a, &con);
    assert_eq!(rest.outputs, Some(vec![3, pack(b"XYZ"), 0]));
}

#[test]
fn set_mode_sets_endianness_and_interrupt_location_for_every_vcpu() {
    let (spapr, _, _) = platform();
    let con = FakeConsole::default();
    let before = spapr.modes();
    let a = args(&[1, SET_MODE_LE, 0, 0]);
    assert_eq!(spapr.hcall(0, H_SET_MODE, &a, &con).ret, H_SUCCESS);
    let m = spapr.modes();
    assert!(m.ile && m.generation > before.generation);
    assert_eq!(m.apply(0), super::super::kvm::LPCR_ILE);
    let a = args(&[3, SET_MODE_ADDR_TRANS, 0, 0]);
    assert_eq!(spapr.hcall(0, H_SET_MODE, &a, &con).ret, H_SUCCESS);
    assert_eq!(
        spapr.modes().apply(!0),
        !0,
        "ILE and AIL 3 set every bit of their fields"
    );
    assert_eq!(
        spapr.modes().apply(0) & super::super::kvm::LPCR_AIL,
        super::super::kvm::LPCR_AIL
    );
    for (a, want) in [
        (args(&[2, SET_MODE_LE, 0, 0]), H_UNSUPPORTED_FLAG),
        (args(&[1, SET_MODE_ADDR_TRANS, 0, 0]), H_UNSUPPORTED_FLAG),
        (args(&[1, SET_MODE_LE, 5, 0]), H_P3),
        (args(&[1, SET_MODE_LE, 0, 5]), H_P4),
        (args(&[0, 99, 0, 0]), H_P2),
    ] {
        assert_eq!(spapr.hcall(0, H_SET_MODE, &a, &con).ret, want, "{a:?}");
    }
    let a = args(&[0, SET_MODE_LE, 0, 0]);
    spapr.hcall(0, H_SET_MODE, &a, &con);
    assert!(!spapr.modes().ile);
}

#[test]
fn a_radix_process_table_goes_to_kvm_with_the_guest_radix_bit() {
    let (spapr, _, mmu) = platform();
    let con = FakeConsole::default();
    let flags = PROC_TBL_MODIFY | PROC_TBL_REGISTER | PROC_TBL_RADIX | PROC_TBL_GTSE;
    let a = args(&[flags, 0x10_0000, 0, 12]);
    assert_eq!(spapr.hcall(0, H_REGISTER_PROC_TBL, &a, &con).ret, H_SUCCESS);
    let want = (
        super::super::kvm::MMUV3_RADIX | super::super::kvm::MMUV3_GTSE,
        PATE_GR | 0x10_0000 | 12,
    );
    assert_eq!(*mmu.calls.lock().unwrap(), vec![want]);
    assert_eq!(spapr.process_table().entry, want.1);
    // Bad alignment, page size, table size, reserved bits, hash: refused, KVM untouched.
    for (a, ret) in [
        (args(&[flags, 0x10_0800, 0, 12]), H_P2),
        (args(&[flags, 0x10_0000, 1, 12]), H_P3),
        (args(&[flags, 0x10_0000, 0, 25]), H_P4),
        (args(&[0x20 | flags, 0x10_0000, 0, 12]), H_PARAMETER),
        (
            args(&[PROC_TBL_MODIFY | PROC_TBL_REGISTER, 0x10_0000, 0, 12]),
            H_PARAMETER,
        ),
    ] {
        assert_eq!(spapr.hcall(0, H_REGISTER_PROC_TBL, &a, &con).ret, ret);
    }
    assert_eq!(mmu.calls.lock().unwrap().len(), 1);
    // Keeping the registration re-applies it.
    let a = args(&[PROC_TBL_RADIX | PROC_TBL_GTSE]);
    assert_eq!(spapr.hcall(0, H_REGISTER_PROC_TBL, &a, &con).ret, H_SUCCESS);
    assert_eq!(mmu.calls.lock().unwrap()[1], want);
}

#[test]
fn a_process_table_kvm_refuses_is_a_parameter_error() {
    let ram = Arc::new(GuestRam::new(LockMode::Range, &[(0, 4 << 20)]).unwrap());
    let mmu = Arc::new(FakeMmu {
        fail: true,
        ..FakeMmu::default()
    });
    let spapr = Spapr::new(ram, mmu);
    let flags = PROC_TBL_MODIFY | PROC_TBL_REGISTER | PROC_TBL_RADIX;
    let ret = spapr.hcall(
        0,
        H_REGISTER_PROC_TBL,
        &args(&[flags, 0x1000, 0, 0]),
        &FakeConsole::default(),
    );
    assert_eq!(ret.ret, H_PARAMETER);
    assert_eq!(spapr.process_table(), ProcessTable::default());
}

#[test]
fn rtas_power_off_reboot_and_os_term_stop_the_machine() {
    let (spapr, ram, _) = platform();
    let con = FakeConsole::default();
    let at = 0x8000;
    rtas_args(&ram, at, rtas::POWER_OFF, &[0, 0], 1);
    let a = spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(a.effect, Effect::Stop(VcpuStop::PowerOffRequested));
    assert_eq!(rets(&ram, at, 2, 1), [0]);
    rtas_args(&ram, at, rtas::SYSTEM_REBOOT, &[], 1);
    let a = spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(a.effect, Effect::Stop(VcpuStop::ResetRequested));
    ram.write(0x9000, b"kernel panic\0").unwrap();
    rtas_args(&ram, at, rtas::IBM_OS_TERM, &[0x9000], 1);
    let a = spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(a.effect, Effect::Stop(VcpuStop::Crashed));
    rtas_args(&ram, at, rtas::DISPLAY_CHARACTER, &[u32::from(b'!')], 1);
    assert_eq!(
        spapr.hcall(0, H_RTAS, &args(&[at]), &con).effect,
        Effect::None
    );
    assert_eq!(&*con.out.borrow(), b"!");
}

#[test]
fn bad_rtas_calls_get_errors() {
    let (spapr, ram, _) = platform();
    let con = FakeConsole::default();
    // Outside RAM, too many words: the hypercall fails.
    assert_eq!(
        spapr.hcall(0, H_RTAS, &args(&[8 << 20]), &con).ret,
        H_PARAMETER
    );
    assert_eq!(
        spapr.hcall(0, H_RTAS, &args(&[u64::MAX - 2]), &con).ret,
        H_PARAMETER
    );
    rtas_args(&ram, 0x8000, rtas::POWER_OFF, &[0; 10], 10);
    let a = spapr.hcall(0, H_RTAS, &args(&[0x8000]), &con);
    assert_eq!((a.ret, a.effect), (H_PARAMETER, Effect::None));
    // An unknown token: RTAS parameter error in the status word.
    rtas_args(&ram, 0x8000, 0x7777, &[1], 1);
    let a = spapr.hcall(0, H_RTAS, &args(&[0x8000]), &con);
    assert_eq!(a.ret, H_SUCCESS);
    assert_eq!(rets(&ram, 0x8000, 1, 1), [RTAS_PARAM_ERROR]);
    // Arguments past the end of RAM.
    let end = (4 << 20) - 16;
    rtas_args(&ram, end, rtas::EVENT_SCAN, &[], 1);
    ram.write(end + 4, &8u32.to_be_bytes()).unwrap();
    assert_eq!(spapr.hcall(0, H_RTAS, &args(&[end]), &con).ret, H_PARAMETER);
    // An unknown hypercall.
    assert_eq!(spapr.hcall(0, 0x1234, &args(&[]), &con).ret, H_FUNCTION);
}

#[test]
fn cpus_start_stop_and_report_their_state() {
    let (spapr, ram, _) = platform();
    let con = FakeConsole::default();
    let at = 0x8000;
    let query = |cpu: u32| {
        rtas_args(&ram, at, rtas::QUERY_CPU_STOPPED_STATE, &[cpu], 2);
        spapr.hcall(0, H_RTAS, &args(&[at]), &con);
        rets(&ram, at, 1, 2)
    };
    assert_eq!(query(0), [0, CPU_RUNNING as i32]);
    assert_eq!(query(1), [0, CPU_STOPPED as i32]);
    assert_eq!(query(999)[0], RTAS_PARAM_ERROR);
    assert_eq!(spapr.gate(1, Duration::ZERO), CpuRun::Stopped);
    rtas_args(&ram, at, rtas::START_CPU, &[1, 0x6000, 0x77], 1);
    spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(rets(&ram, at, 3, 1), [0]);
    // Starting it twice is a hardware error.
    rtas_args(&ram, at, rtas::START_CPU, &[1, 0x6000, 0x77], 1);
    spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(rets(&ram, at, 3, 1), [RTAS_HW_ERROR]);
    assert_eq!(
        spapr.gate(1, Duration::ZERO),
        CpuRun::Start {
            entry: 0x6000,
            r3: 0x77
        }
    );
    assert_eq!(spapr.gate(1, Duration::ZERO), CpuRun::Running);
    assert_eq!(query(1), [0, CPU_RUNNING as i32]);
    rtas_args(&ram, at, rtas::STOP_SELF, &[], 1);
    assert_eq!(
        spapr.hcall(1, H_RTAS, &args(&[at]), &con).effect,
        Effect::StoppedSelf
    );
    assert_eq!(query(1), [0, CPU_STOPPED as i32]);
    // A waiting vCPU wakes when another starts it.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| spapr.gate(2, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        spapr.set_run(
            2,
            CpuRun::Start {
                entry: 0x100,
                r3: 0,
            },
        );
        assert_eq!(
            waiter.join().unwrap(),
            CpuRun::Start {
                entry: 0x100,
                r3: 0
            }
        );
    });
}

#[test]
fn time_of_day_follows_set_time_of_day() {
    let (spapr, ram, _) = platform();
    let con = FakeConsole::default();
    let at = 0x8000;
    rtas_args(
        &ram,
        at,
        rtas::SET_TIME_OF_DAY,
        &[2001, 2, 3, 4, 5, 6, 0],
        1,
    );
    spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(rets(&ram, at, 7, 1), [0]);
    rtas_args(&ram, at, rtas::GET_TIME_OF_DAY, &[], 8);
    spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    let got = rets(&ram, at, 0, 8);
    assert_eq!(&got[..5], &[0, 2001, 2, 3, 4]);
    assert!((5..=7).contains(&got[5]), "{got:?}");
    rtas_args(
        &ram,
        at,
        rtas::SET_TIME_OF_DAY,
        &[2001, 13, 3, 4, 5, 6, 0],
        1,
    );
    spapr.hcall(0, H_RTAS, &args(&[at]), &con);
    assert_eq!(rets(&ram, at, 7, 1), [RTAS_PARAM_ERROR]);
}

#[test]
fn civil_dates_convert_both_ways() {
    assert_eq!(civil_from_unix(0), Some([1970, 1, 1, 0, 0, 0]));
    assert_eq!(civil_from_unix(951_782_400), Some([2000, 2, 29, 0, 0, 0]));
    assert_eq!(unix_from_civil(&[2000, 2, 29, 0, 0, 0]), Some(951_782_400));
    for t in [0i64, 86_399, 1_700_000_000, 4_102_444_800] {
        let c = civil_from_unix(t).unwrap();
        assert_eq!(unix_from_civil(&c), Some(t));
    }
}

/// A configuration space of one function at BUID 7, address 0: 0x40 bytes of pattern.
#[derive(Default)]
struct FakePci {
    writes: StdMutex<Vec<(u32, u32, u32)>>,
}

impl PciConfigSpace for FakePci {
    fn read(&self, buid: u64, addr: u32, size: u32) -> Result<u32, ConfigFault> {
        match (buid, size) {
            (7, 1 | 2 | 4) if addr < 0x40 => Ok(0x1000 + addr),
            (7, _) => Err(ConfigFault::BadAccess),
            _ => Err(ConfigFault::NoDevice),
        }
    }
    fn write(&self, buid: u64, addr: u32, size: u32, value: u32) -> Result<(), ConfigFault> {
        self.read(buid, addr, size)?;
        self.writes.lock().unwrap().push((addr, size, value));
        Ok(())
    }
}

#[test]
fn rtas_pci_config_calls_reach_the_host_bridge() {
    let (spapr, ram, _) = platform();
    let con = FakeConsole::default();
    let at = 0x1000;
    let call = |token, argv: &[u32], nret: u32| {
        rtas_args(&ram, at, token, argv, nret);
        assert_eq!(spapr.hcall(0, H_RTAS, &args(&[at]), &con).ret, H_SUCCESS);
        rets(&ram, at, argv.len() as u64, u64::from(nret))
    };
    // Before a bridge is attached: a hardware error.
    assert_eq!(call(rtas::IBM_READ_PCI_CONFIG, &[0, 0, 7, 4], 2)[0], -1);

    let pci = Arc::new(FakePci::default());
    spapr.attach_pci(pci.clone());
    assert_eq!(
        call(rtas::IBM_READ_PCI_CONFIG, &[0x10, 0, 7, 4], 2),
        [0, 0x1010]
    );
    // BUID high and low words make one 64-bit BUID.
    assert_eq!(call(rtas::IBM_READ_PCI_CONFIG, &[0x10, 1, 7, 4], 2)[0], -1);
    assert_eq!(call(rtas::IBM_READ_PCI_CONFIG, &[0x10, 0, 7, 3], 2)[0], -3);
    assert_eq!(
        call(rtas::IBM_WRITE_PCI_CONFIG, &[0x4, 0, 7, 2, 0x6], 1),
        [0]
    );
    assert_eq!(*pci.writes.lock().unwrap(), [(0x4, 2, 0x6)]);
    // Too few arguments: a parameter error, nothing written.
    assert_eq!(call(rtas::IBM_WRITE_PCI_CONFIG, &[0x4, 0, 7, 2], 1), [-3]);
    assert_eq!(call(rtas::IBM_READ_PCI_CONFIG, &[0x4, 0, 7], 2)[0], -3);
    assert_eq!(pci.writes.lock().unwrap().len(), 1);
}

#[test]
fn cpu_characteristics_are_the_hosts_or_h_function() {
    let (spapr, _, _) = platform();
    let con = FakeConsole::default();
    let a = args(&[]);
    let none = spapr.hcall(0, H_GET_CPU_CHARACTERISTICS, &a, &con);
    assert_eq!(none.ret, H_FUNCTION);
    spapr.set_cpu_characteristics(0xa000_0000_0000_0000, 0x8000_0000_0000_0000);
    let got = spapr.hcall(0, H_GET_CPU_CHARACTERISTICS, &a, &con);
    assert_eq!(got.ret, H_SUCCESS);
    assert_eq!(
        got.outputs,
        Some(vec![0xa000_0000_0000_0000, 0x8000_0000_0000_0000])
    );
}

#[test]
fn tce_hypercalls_reach_the_dma_window() {
    let (spapr, _, _) = platform();
    let con = FakeConsole::default();
    let liobn = u64::from(super::super::tce::PHB_LIOBN);
    let put = spapr.hcall(0, H_PUT_TCE, &args(&[liobn, 0x5000, 0x7000_0003]), &con);
    assert_eq!(put.ret, H_SUCCESS);
    let get = spapr.hcall(0, H_GET_TCE, &args(&[liobn, 0x5000]), &con);
    assert_eq!((get.ret, get.outputs), (H_SUCCESS, Some(vec![0x7000_0003])));
    let stuff = spapr.hcall(0, H_STUFF_TCE, &args(&[liobn, 0x4000, 0, 2]), &con);
    assert_eq!(stuff.ret, H_SUCCESS);
    let get = spapr.hcall(0, H_GET_TCE, &args(&[liobn, 0x5000]), &con);
    assert_eq!(get.outputs, Some(vec![0]));
    let bad = spapr.hcall(0, H_PUT_TCE, &args(&[liobn + 1, 0, 0]), &con);
    assert_eq!(bad.ret, H_PARAMETER);
}
