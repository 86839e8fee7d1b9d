//! The guest console: a 16550 UART on vm-superio's [`vm_superio::Serial`].
//!
//! - Output: every byte the guest writes to THR goes to a `Box<dyn Write + Send>`
//!   (stdout, a file, a sink). A failing writer (stdout closed, disk full) loses the
//!   byte: counted in [`SerialMetrics::write_errors`], logged rate-limited, never a
//!   panic. The write happens on the vCPU thread, so a writer that blocks stalls that
//!   vCPU; give it something that does not block for long.
//! - Interrupt: vm-superio raises it by writing 1 to an [`EventFd`]; the VMM registers
//!   that eventfd as a KVM irqfd (GSI 4 for COM1).
//! - Input: the FIFO holds 64 bytes. [`Serial::enqueue_input`] takes what fits and
//!   counts the rest as dropped; callers that do not want to drop anything read at
//!   most [`Serial::input_capacity`] bytes from their source, and wait for
//!   [`Serial::input_drained_eventfd`] (signalled when the guest empties the FIFO)
//!   before offering more.
//! - State: [`Serial::save_state`] and [`Serial::restore_state`] carry the UART's
//!   registers and input FIFO in the versioned format of [`crate::persist`]; the
//!   output writer, the eventfds and the counters stay the device's own.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::{Error as UartError, SerialEvents, SerialState};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::{answer, check_width, register};
use crate::bus::BusDevice;
use crate::persist::{PersistError, Reader, Writer, SERIAL_MAGIC};
use crate::{log_limited, LogLimiter};

/// Ports a 16550 takes.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Registers of a 16550 (offsets 0..8).
const REGISTERS: u8 = 8;
/// The input FIFO of vm-superio's UART, in bytes.
const FIFO_SIZE: usize = 64;
/// Interrupt-enable bits a 16550 has (vm-superio keeps only these).
const IER_VALID: u8 = 0x0f;
/// Interrupt-identification bits vm-superio keeps (none pending, THR empty, RDA).
const IIR_VALID: u8 = 0x07;

/// Errors of [`Serial`].
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The eventfd that signals a drained input FIFO could not be created.
    #[error("Cannot create the serial input eventfd")]
    EventFd(#[source] io::Error),
}

/// vm-superio's [`Trigger`] on an [`EventFd`]: each trigger adds 1 to the counter.
/// Clones share the eventfd (a restored UART keeps its interrupt line).
#[derive(Debug, Clone)]
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    /// Wraps `eventfd`.
    pub fn new(eventfd: EventFd) -> Self {
        EventFdTrigger(Arc::new(eventfd))
    }

    /// The wrapped eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> Result<(), io::Error> {
        self.0.write(1)
    }
}

/// The serial port's counters, shared (`Arc`) so the VMM can read them without
/// taking the device's lock.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Bytes the guest wrote that reached the output.
    pub bytes_out: AtomicU64,
    /// Bytes the host put into the input FIFO.
    pub bytes_in: AtomicU64,
    /// Input bytes refused because the FIFO was full (or the UART in loopback mode).
    pub bytes_dropped: AtomicU64,
    /// Output bytes lost because the writer failed.
    pub write_errors: AtomicU64,
    /// Interrupts that could not be raised (the eventfd write failed).
    pub interrupt_errors: AtomicU64,
}

/// A copy of [`SerialMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialCounters {
    /// See [`SerialMetrics::bytes_out`].
    pub bytes_out: u64,
    /// See [`SerialMetrics::bytes_in`].
    pub bytes_in: u64,
    /// See [`SerialMetrics::bytes_dropped`].
    pub bytes_dropped: u64,
    /// See [`SerialMetrics::write_errors`].
    pub write_errors: u64,
    /// See [`SerialMetrics::interrupt_errors`].
    pub interrupt_errors: u64,
}

impl SerialMetrics {
    /// The counters now.
    pub fn snapshot(&self) -> SerialCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SerialCounters {
            bytes_out: get(&self.bytes_out),
            bytes_in: get(&self.bytes_in),
            bytes_dropped: get(&self.bytes_dropped),
            write_errors: get(&self.write_errors),
            interrupt_errors: get(&self.interrupt_errors),
        }
    }
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// What vm-superio tells us: output bytes for the counters, and the guest draining the
/// input FIFO for the event loop.
struct Events {
    drained: Arc<EventFd>,
    metrics: Arc<SerialMetrics>,
    signal_log: LogLimiter,
}

impl Events {
    /// Events on the same eventfd and counters (for a restored UART).
    fn share(&self) -> Self {
        Events {
            drained: Arc::clone(&self.drained),
            metrics: Arc::clone(&self.metrics),
            signal_log: LogLimiter::default(),
        }
    }
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        add(&self.metrics.bytes_out, 1);
    }

    fn tx_lost_byte(&self) {
        add(&self.metrics.write_errors, 1);
    }

    fn in_buffer_empty(&self) {
        if let Err(e) = self.drained.write(1) {
            log_limited!(
                self.signal_log,
                log::Level::Warn,
                "Cannot signal the serial input eventfd: {e}"
            );
        }
    }
}

type Uart = vm_superio::Serial<EventFdTrigger, Events, Box<dyn Write + Send>>;

/// A 16550 UART. Goes on the port bus as a [`BusDevice`] at its base, 8 ports long.
pub struct Serial {
    uart: Uart,
    metrics: Arc<SerialMetrics>,
    write_log: LogLimiter,
    interrupt_log: LogLimiter,
    input_log: LogLimiter,
    access_log: LogLimiter,
}

impl Serial {
    /// A UART that raises its interrupt on `interrupt` and writes the guest's output to
    /// `out`. Creates the input-drained eventfd (non-blocking, close-on-exec).
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let metrics = Arc::new(SerialMetrics::default());
        let events = Events {
            drained: Arc::new(
                EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(SerialError::EventFd)?,
            ),
            metrics: metrics.clone(),
            signal_log: LogLimiter::default(),
        };
        Ok(Serial {
            uart: vm_superio::Serial::with_events(EventFdTrigger::new(interrupt), events, out),
            metrics,
            write_log: LogLimiter::default(),
            interrupt_log: LogLimiter::default(),
            input_log: LogLimiter::default(),
            access_log: LogLimiter::default(),
        })
    }

    /// The interrupt eventfd (to register as an irqfd).
    pub fn interrupt_eventfd(&self) -> &EventFd {
        self.uart.interrupt_evt().eventfd()
    }

    /// Signalled each time the guest reads the receive register and leaves the input
    /// FIFO empty. The event loop reads it to clear it, then offers more input.
    pub fn input_drained_eventfd(&self) -> &EventFd {
        &self.uart.events().drained
    }

    /// Free room in the input FIFO, in bytes.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Puts `bytes` into the input FIFO and raises the receive interrupt if the guest
    /// enabled it. Returns how many were taken (a prefix of `bytes`); the rest did not
    /// fit (or the UART is in loopback mode) and is counted in
    /// [`SerialMetrics::bytes_dropped`]. Never blocks.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        let room = self.uart.fifo_capacity();
        let result = self.uart.enqueue_raw_bytes(bytes);
        // Measured rather than taken from `result`: on an interrupt error the bytes are
        // in the FIFO already, and in loopback mode nothing is taken.
        let taken = room.saturating_sub(self.uart.fifo_capacity());
        match result {
            Ok(_) | Err(UartError::FullFifo) => {}
            Err(e) => self.uart_error(e),
        }
        add(&self.metrics.bytes_in, taken);
        let dropped = bytes.len() - taken;
        if dropped > 0 {
            add(&self.metrics.bytes_dropped, dropped);
            log_limited!(
                self.input_log,
                log::Level::Debug,
                "Serial input FIFO full: dropped {dropped} bytes"
            );
        }
        taken
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<SerialMetrics> {
        &self.metrics
    }

    /// The UART's state (registers and input FIFO) in the versioned byte form of
    /// [`crate::persist`], magic [`SERIAL_MAGIC`].
    pub fn save_state(&self) -> Vec<u8> {
        let state = self.uart.state();
        let mut w = Writer::new();
        for b in registers(&state) {
            w.u8(b);
        }
        // vm-superio never holds more than its FIFO size, and 64 fits a u8 count.
        let fifo = &state.in_buffer[..state.in_buffer.len().min(FIFO_SIZE)];
        w.u8(u8::try_from(fifo.len()).unwrap_or(0));
        w.bytes(fifo);
        // Infallible: the payload is at most 74 bytes.
        w.finish(SERIAL_MAGIC).unwrap_or_default()
    }

    /// Replaces the UART's registers and input FIFO with those of `bytes` (from
    /// [`save_state`](Self::save_state)). The output writer, the interrupt and
    /// input-drained eventfds and the counters stay this device's. As the hardware
    /// would, the restored UART raises its interrupt if the state has one enabled and
    /// pending. On any error the device is unchanged.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), PersistError> {
        let state = decode_state(bytes)?;
        // Keep the writer out of the old UART while the new one is built, so that a
        // failure can give it back.
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(io::sink()));
        let trigger = self.uart.interrupt_evt().clone();
        let events = self.uart.events().share();
        let placeholder: Box<dyn Write + Send> = Box::new(io::sink());
        match Uart::from_state(&state, trigger, events, placeholder) {
            Ok(mut uart) => {
                *uart.writer_mut() = out;
                self.uart = uart;
                Ok(())
            }
            Err(e) => {
                *self.uart.writer_mut() = out;
                Err(match e {
                    UartError::Trigger(e) | UartError::IOError(e) => PersistError::Interrupt(e),
                    // `decode_state` bounds the FIFO.
                    UartError::FullFifo => PersistError::TooMany {
                        what: "serial input bytes",
                        len: state.in_buffer.len(),
                        max: FIFO_SIZE,
                    },
                })
            }
        }
    }

    /// Reads register `reg` (0..8).
    fn read_register(&mut self, reg: u8) -> u8 {
        self.uart.read(reg)
    }

    /// Writes `value` to register `reg` (0..8).
    fn write_register(&mut self, reg: u8, value: u8) {
        if let Err(e) = self.uart.write(reg, value) {
            self.uart_error(e);
        }
    }

    fn uart_error(&mut self, error: UartError<io::Error>) {
        match error {
            // Counted by `Events::tx_lost_byte`.
            UartError::IOError(e) => log_limited!(
                self.write_log,
                log::Level::Warn,
                "Cannot write the guest's serial output: {e}"
            ),
            UartError::Trigger(e) => {
                add(&self.metrics.interrupt_errors, 1);
                log_limited!(
                    self.interrupt_log,
                    log::Level::Warn,
                    "Cannot raise the serial interrupt: {e}"
                );
            }
            UartError::FullFifo => {}
        }
    }
}

/// The registers of `state`, in the order they are saved.
fn registers(state: &SerialState) -> [u8; 9] {
    [
        state.baud_divisor_low,
        state.baud_divisor_high,
        state.interrupt_enable,
        state.interrupt_identification,
        state.line_control,
        state.line_status,
        state.modem_control,
        state.modem_status,
        state.scratch,
    ]
}

/// The whole state of a serial blob, checked.
fn decode_state(bytes: &[u8]) -> Result<SerialState, PersistError> {
    let mut r = Reader::unframe(SERIAL_MAGIC, "serial", bytes)?;
    let mut regs = [0u8; 9];
    for b in &mut regs {
        *b = r.u8("UART register")?;
    }
    let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
        regs;
    if interrupt_enable & !IER_VALID != 0 {
        return Err(PersistError::Invalid("interrupt enable register"));
    }
    if interrupt_identification & !IIR_VALID != 0 || interrupt_identification == 0 {
        return Err(PersistError::Invalid("interrupt identification register"));
    }
    let len = usize::from(r.u8("serial input count")?);
    if len > FIFO_SIZE {
        return Err(PersistError::TooMany {
            what: "serial input bytes",
            len,
            max: FIFO_SIZE,
        });
    }
    let in_buffer = r.take(len, "serial input bytes")?.to_vec();
    r.end()?;
    Ok(SerialState {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer,
    })
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        check_width("serial", offset, data.len(), &self.access_log);
        if data.is_empty() {
            return;
        }
        let value = match register(offset, REGISTERS) {
            Some(reg) => self.read_register(reg),
            None => 0xff,
        };
        answer(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        check_width("serial", offset, data.len(), &self.access_log);
        if let (Some(reg), Some(&value)) = (register(offset, REGISTERS), data.first()) {
            self.write_register(reg, value);
        }
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.uart.state())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    // Register offsets and bits (16550).
    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const FIFO: usize = 64;

    /// A writer tests can look into.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer whose output is gone.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn eventfd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn serial(out: Box<dyn Write + Send>) -> Serial {
        Serial::new(eventfd(), out).unwrap()
    }

    fn read_reg(s: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        BusDevice::read(s, offset, &mut b);
        b[0]
    }

    fn write_reg(s: &mut Serial, offset: u64, value: u8) {
        BusDevice::write(s, offset, &[value]);
    }

    /// How many times an eventfd was signalled since the last call (0 if never).
    fn signals(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    #[test]
    fn output_reaches_the_writer() {
        let buf = SharedBuf::default();
        let mut s = serial(Box::new(buf.clone()));
        assert_ne!(read_reg(&mut s, LSR) & LSR_THRE, 0);
        for &b in b"hi\n" {
            write_reg(&mut s, RBR_THR, b);
            assert_ne!(read_reg(&mut s, LSR) & LSR_THRE, 0);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.metrics().snapshot().bytes_out, 3);
    }

    #[test]
    fn thr_empty_interrupt_fires_when_enabled() {
        let mut s = serial(Box::new(io::sink()));
        write_reg(&mut s, RBR_THR, b'x');
        assert_eq!(signals(s.interrupt_eventfd()), 0);
        write_reg(&mut s, IER, IER_THRE);
        assert_eq!(signals(s.interrupt_eventfd()), 1);
        // IIR says THR empty (0x2), then the interrupt is cleared.
        assert_eq!(read_reg(&mut s, IIR) & 0x0f, 0x2);
        assert_eq!(read_reg(&mut s, IIR) & 0x0f, 0x1);
        write_reg(&mut s, RBR_THR, b'y');
        assert_eq!(signals(s.interrupt_eventfd()), 1);
    }

    #[test]
    fn input_is_read_back_in_order() {
        let mut s = serial(Box::new(io::sink()));
        write_reg(&mut s, IER, IER_RDA);
        assert_eq!(read_reg(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(s.enqueue_input(b"abc"), 3);
        assert_eq!(signals(s.interrupt_eventfd()), 1);
        assert_eq!(s.input_capacity(), FIFO - 3);
        for &want in b"abc" {
            assert_ne!(read_reg(&mut s, LSR) & LSR_DR, 0);
            assert_eq!(signals(s.input_drained_eventfd()), 0);
            assert_eq!(read_reg(&mut s, RBR_THR), want);
        }
        assert_eq!(read_reg(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(signals(s.input_drained_eventfd()), 1);
        assert_eq!(s.input_capacity(), FIFO);
        let c = s.metrics().snapshot();
        assert_eq!((c.bytes_in, c.bytes_dropped), (3, 0));
    }

    #[test]
    fn overflow_is_counted() {
        let mut s = serial(Box::new(io::sink()));
        let input = [b'z'; FIFO + 10];
        assert_eq!(s.enqueue_input(&input), FIFO);
        assert_eq!(s.input_capacity(), 0);
        assert_eq!(s.enqueue_input(b"more"), 0);
        assert_eq!(s.enqueue_input(b""), 0);
        let c = s.metrics().snapshot();
        assert_eq!(c.bytes_in, u64::try_from(FIFO).unwrap());
        assert_eq!(c.bytes_dropped, 14);
        // Drained, the FIFO takes input again.
        for _ in 0..FIFO {
            read_reg(&mut s, RBR_THR);
        }
        assert_eq!(s.enqueue_input(b"ok"), 2);
    }

    #[test]
    fn a_failing_writer_is_counted() {
        let mut s = serial(Box::new(Broken));
        for _ in 0..5 {
            write_reg(&mut s, RBR_THR, b'x');
        }
        let c = s.metrics().snapshot();
        assert_eq!((c.bytes_out, c.write_errors), (0, 5));
        // The UART itself is unharmed.
        assert_ne!(read_reg(&mut s, LSR) & LSR_THRE, 0);
    }

    const LCR: u64 = 3;
    const SCR: u64 = 7;
    const LCR_DLAB: u8 = 0x80;

    /// A UART the guest has set up: divisor 3, 7E1 framing, receive interrupt on, a
    /// scratch value, and `input` waiting in the FIFO.
    fn configured(out: Box<dyn Write + Send>, input: &[u8]) -> Serial {
        let mut s = serial(out);
        write_reg(&mut s, LCR, LCR_DLAB);
        write_reg(&mut s, RBR_THR, 3);
        write_reg(&mut s, IER, 0);
        write_reg(&mut s, LCR, 0x1a);
        write_reg(&mut s, IER, IER_RDA);
        write_reg(&mut s, SCR, 0x5a);
        assert_eq!(s.enqueue_input(input), input.len());
        s
    }

    #[test]
    fn state_survives_save_and_restore() {
        let mut old = configured(Box::new(io::sink()), b"hello");
        let bytes = old.save_state();
        assert_eq!(&bytes[..4], b"RVSR");

        let buf = SharedBuf::default();
        let mut s = serial(Box::new(buf.clone()));
        let irq_fd = std::os::fd::AsRawFd::as_raw_fd(s.interrupt_eventfd());
        let drained_fd = std::os::fd::AsRawFd::as_raw_fd(s.input_drained_eventfd());
        let metrics = Arc::clone(s.metrics());
        s.restore_state(&bytes).unwrap();
        assert_eq!(s.save_state(), bytes, "the same state is saved again");

        // The device's own eventfds and counters are kept.
        assert_eq!(
            std::os::fd::AsRawFd::as_raw_fd(s.interrupt_eventfd()),
            irq_fd
        );
        assert_eq!(
            std::os::fd::AsRawFd::as_raw_fd(s.input_drained_eventfd()),
            drained_fd
        );
        assert!(Arc::ptr_eq(s.metrics(), &metrics));
        // Receive data pending with its interrupt enabled: the line is raised again.
        assert_eq!(signals(s.interrupt_eventfd()), 1);

        // The guest reads the registers it wrote and the input, in order.
        assert_eq!(read_reg(&mut s, LCR), 0x1a);
        assert_eq!(read_reg(&mut s, IER), IER_RDA);
        assert_eq!(read_reg(&mut s, SCR), 0x5a);
        assert_eq!(read_reg(&mut s, IIR) & 0x0f, 0x4, "receive data available");
        write_reg(&mut s, LCR, 0x1a | LCR_DLAB);
        assert_eq!((read_reg(&mut s, RBR_THR), read_reg(&mut s, IER)), (3, 0));
        write_reg(&mut s, LCR, 0x1a);
        assert_eq!(s.input_capacity(), FIFO - 5);
        for &want in b"hello" {
            assert_ne!(read_reg(&mut s, LSR) & LSR_DR, 0);
            assert_eq!(read_reg(&mut s, RBR_THR), want);
        }
        assert_eq!(read_reg(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(signals(s.input_drained_eventfd()), 1);

        // Output still goes to this device's writer.
        write_reg(&mut s, RBR_THR, b'!');
        assert_eq!(&*buf.0.lock().unwrap(), b"!");
        assert_eq!(s.metrics().snapshot().bytes_out, 1);
        // The old device is untouched.
        assert_eq!(read_reg(&mut old, RBR_THR), b'h');
    }

    #[test]
    fn bad_state_is_refused_and_changes_nothing() {
        let bytes = configured(Box::new(io::sink()), b"0123456789").save_state();
        crate::persist::tests::assert_damage_is_refused(&bytes, SERIAL_MAGIC, |b| {
            let mut s = configured(Box::new(io::sink()), b"zz");
            let before = s.save_state();
            let result = s.restore_state(b);
            if result.is_err() {
                assert_eq!(s.save_state(), before, "a failed restore changed the UART");
                assert_eq!(read_reg(&mut s, RBR_THR), b'z');
            }
            result
        });

        // Fields with a valid checksum that no UART has.
        let reframe = |p: &[u8]| crate::persist::tests::reframe(SERIAL_MAGIC, 1, p);
        let payload = crate::persist::tests::payload_of(&bytes).to_vec();
        let mut s = serial(Box::new(io::sink()));
        let mut p = payload.clone();
        p[2] = 0xf1;
        assert!(matches!(
            s.restore_state(&reframe(&p)).unwrap_err(),
            PersistError::Invalid("interrupt enable register")
        ));
        let mut p = payload.clone();
        p[3] = 0;
        assert!(s.restore_state(&reframe(&p)).is_err());
        let mut p = payload[..9].to_vec();
        p.push(65);
        p.extend_from_slice(&[0; 65]);
        assert!(matches!(
            s.restore_state(&reframe(&p)).unwrap_err(),
            PersistError::TooMany { len: 65, .. }
        ));
        // A full FIFO is fine.
        p[9] = 64;
        p.pop();
        s.restore_state(&reframe(&p)).unwrap();
        assert_eq!(s.input_capacity(), 0);
        assert!(matches!(
            s.restore_state(b"RVVM").unwrap_err(),
            PersistError::Magic("serial")
        ));
        assert!(s.restore_state(&[]).is_err());
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut s = serial(Box::new(io::sink()));
        let mut wide = [0u8; 4];
        BusDevice::read(&mut s, LSR, &mut wide);
        assert_eq!(wide, [LSR_THRE | 0x40, 0xff, 0xff, 0xff]);
        let mut beyond = [0u8];
        BusDevice::read(&mut s, 8, &mut beyond);
        assert_eq!(beyond, [0xff]);
        BusDevice::read(&mut s, u64::MAX, &mut []);
        BusDevice::write(&mut s, 9, &[1]);
        BusDevice::write(&mut s, RBR_THR, &[]);
        assert_eq!(s.metrics().snapshot(), SerialCounters::default());
        assert!(format!("{s:?}").starts_with("Serial"));
    }
}
