//! The 16550 UART at `0x3f8` (COM1), on `vm_superio::Serial`.
//!
//! Its interrupt is an `EventFd` that the VMM registers as an irqfd on GSI 4. Guest output
//! goes to a `Write` (stdout, a file, or the VMM's console buffer that holds an epoch's
//! output until the peer acknowledged it); host input is fed with
//! [`SerialDevice::enqueue_input`].

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::snapshot::Snapshot;
use crate::ErrorChain;

/// First port of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of ports of a 16550.
pub const SERIAL_PORT_LEN: u64 = 8;
/// The GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// Bytes the receive FIFO holds (vm-superio's FIFO size; a test checks they agree).
pub const SERIAL_FIFO_LEN: usize = 64;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// could not create the interrupt eventfd
    #[error("could not create the serial interrupt eventfd")]
    CreateEventFd(#[source] io::Error),
    /// could not duplicate the interrupt eventfd
    #[error("could not duplicate the serial interrupt eventfd")]
    CloneEventFd(#[source] io::Error),
    /// could not raise the serial interrupt
    #[error("could not raise the serial interrupt")]
    Trigger(#[source] io::Error),
    /// the receive FIFO is full
    #[error("the serial receive FIFO is full")]
    FifoFull,
    /// a saved state holds more input than the FIFO can
    #[error("the saved serial state holds {len} input bytes, more than the FIFO holds")]
    InvalidState {
        /// Bytes in the saved FIFO.
        len: usize,
    },
    /// could not write the guest's output
    #[error("could not write the guest's serial output")]
    Output(#[source] io::Error),
}

/// The saved state of the UART: vm-superio's own [`SerialState`] (its registers and
/// the bytes waiting in its receive FIFO, at most [`SERIAL_FIFO_LEN`]), made
/// serializable. `Default` is the power-on state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct SerialDeviceState(#[serde(with = "SerialStateDef")] pub SerialState);

/// serde's description of vm-superio's `SerialState`, which has no serde support of
/// its own. The compiler checks it against the real type field for field; the field
/// order is the encoding's (postcard writes the fields in this order), so never
/// reorder it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The interrupt line of the UART: an eventfd the VMM turns into GSI 4 with an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The output sink of the UART.
pub type SerialOutput = Box<dyn Write + Send>;

/// A 16550 UART on 8 ports of the PIO bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, SerialOutput>,
    busy: Option<BusyProbe>,
}

/// Says whether the output sink is full (held output at its bound): the UART then
/// reports its transmitter busy, so a driver that polls LSR waits.
pub type BusyProbe = Box<dyn Fn() -> bool + Send>;

/// Line status register offset, and its "transmitter holding register empty" and
/// "transmitter empty" bits.
const LSR_OFFSET: u8 = 5;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_IDLE: u8 = 0x40;

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.serial.state())
            .finish_non_exhaustive()
    }
}

fn convert_error(e: vm_superio::serial::Error<io::Error>) -> SerialError {
    match e {
        vm_superio::serial::Error::Trigger(e) => SerialError::Trigger(e),
        vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
        vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
    }
}

impl SerialDevice {
    /// Creates a UART writing the guest's output to `out`, with a fresh interrupt eventfd.
    pub fn new(out: SerialOutput) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::CreateEventFd)?;
        Ok(Self::with_interrupt(evt, out))
    }

    /// Creates a UART raising `interrupt` and writing the guest's output to `out`.
    pub fn with_interrupt(interrupt: EventFd, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(interrupt), out),
            busy: None,
        }
    }

    /// Recreates a UART from a saved state (restore), raising `interrupt` and writing the
    /// guest's output to `out`.
    ///
    /// The state is untrusted input: a receive FIFO longer than the UART's is refused.
    /// Register values are taken as they are (every byte value is one the guest could
    /// have written). When the saved registers show an interrupt pending and enabled,
    /// the interrupt eventfd is written once more (an irqfd injection may have landed
    /// after the interrupt controllers were saved); KVM delivers a count written before
    /// the irqfd is registered, so the VMM may register it after this call.
    pub fn restore(
        state: &SerialDeviceState,
        interrupt: EventFd,
        out: SerialOutput,
    ) -> Result<Self, SerialError> {
        let state = &state.0;
        if state.in_buffer.len() > SERIAL_FIFO_LEN {
            return Err(SerialError::InvalidState {
                len: state.in_buffer.len(),
            });
        }
        let serial = Serial::from_state(state, IrqTrigger(interrupt), NoEvents, out).map_err(
            |e| match e {
                vm_superio::serial::Error::FullFifo => SerialError::InvalidState {
                    len: state.in_buffer.len(),
                },
                e => convert_error(e),
            },
        )?;
        Ok(Self { serial, busy: None })
    }

    /// Back-pressure: while `busy` says so, LSR reports the transmitter busy (THRE
    /// and TEMT clear). A guest that writes anyway is not refused: nothing it writes
    /// is dropped.
    pub fn set_busy_probe(&mut self, busy: BusyProbe) {
        self.busy = Some(busy);
    }

    /// The register and FIFO state (for save/restore).
    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState(self.serial.state())
    }

    /// The interrupt eventfd, to register as an irqfd on GSI 4.
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.serial.interrupt_evt().0
    }

    /// A duplicate of the interrupt eventfd, to register as an irqfd on GSI 4.
    pub fn interrupt_evt_clone(&self) -> Result<EventFd, SerialError> {
        self.interrupt_evt()
            .try_clone()
            .map_err(SerialError::CloneEventFd)
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest, as much as the receive FIFO takes. Returns how
    /// many bytes were accepted (0 when the FIFO is full or the UART is in loopback);
    /// the caller keeps the rest and retries once the guest has read some.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, SerialError> {
        if input.is_empty() || self.serial.fifo_capacity() == 0 {
            return Ok(0);
        }
        self.serial.enqueue_raw_bytes(input).map_err(convert_error)
    }

    /// The output sink.
    pub fn output_mut(&mut self) -> &mut SerialOutput {
        self.serial.writer_mut()
    }
}

impl Snapshot for SerialDevice {
    type State = SerialDeviceState;

    fn snapshot(&self) -> SerialDeviceState {
        self.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        rest.fill(0);
        *first = match u8::try_from(offset) {
            // Registers are one byte wide; other sizes read as floating bus.
            Ok(offset) if rest.is_empty() => {
                let v = self.serial.read(offset);
                match &self.busy {
                    Some(busy) if offset == LSR_OFFSET && busy() => v & !(LSR_THR_EMPTY | LSR_IDLE),
                    _ => v,
                }
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, *value) {
            // Lost output or a lost interrupt must not stop the guest.
            tracing::warn!("serial: {}", ErrorChain(&convert_error(e)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A Write that appends to a shared buffer.
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

    const THR_RBR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn read(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn output_goes_to_the_writer() {
        let buf = SharedBuf::default();
        let mut dev = SerialDevice::new(Box::new(buf.clone())).unwrap();
        for b in b"hello\n" {
            dev.write(THR_RBR, &[*b]);
        }
        // Wrong sizes are ignored.
        dev.write(THR_RBR, b"xy");
        dev.write(THR_RBR, &[]);
        assert_eq!(buf.0.lock().unwrap().as_slice(), b"hello\n");
        // Transmitter empty.
        assert_ne!(read(&mut dev, LSR) & 0x60, 0);
    }

    #[test]
    fn input_respects_fifo_and_interrupts() {
        let mut dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        let irq = dev.interrupt_evt_clone().unwrap();
        // Enable the received-data interrupt.
        dev.write(IER, &[0x01]);
        let cap = dev.fifo_capacity();
        assert!(cap > 0);
        let input: Vec<u8> = (0..cap + 10).map(|i| i.to_le_bytes()[0]).collect();
        assert_eq!(dev.enqueue_input(&input).unwrap(), cap);
        assert_eq!(dev.enqueue_input(&input).unwrap(), 0);
        assert_eq!(dev.enqueue_input(&[]).unwrap(), 0);
        assert!(irq.read().unwrap() >= 1);

        // Data ready, then the bytes in order.
        assert_ne!(read(&mut dev, LSR) & 0x01, 0);
        assert_eq!(read(&mut dev, THR_RBR), 0);
        assert_eq!(read(&mut dev, THR_RBR), 1);
        assert_eq!(dev.fifo_capacity(), 2);
        assert_eq!(dev.enqueue_input(b"abc").unwrap(), 2);
    }

    #[test]
    fn fifo_len_is_vm_superio_s() {
        let dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        assert_eq!(dev.fifo_capacity(), SERIAL_FIFO_LEN);
        assert_eq!(SerialDeviceState::default(), dev.state());
    }

    #[test]
    fn state_round_trip() {
        let mut dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        dev.write(IER, &[0x01]);
        dev.write(7, &[0x5a]); // scratch
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x0c]); // divisor low
        dev.write(3, &[0x03]); // 8N1
        assert_eq!(dev.enqueue_input(b"abc").unwrap(), 3);
        let state = dev.snapshot();
        let bytes = postcard::to_allocvec(&state).unwrap();
        let decoded: SerialDeviceState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let mut restored =
            SerialDevice::restore(&decoded, irq.try_clone().unwrap(), Box::new(out.clone()))
                .unwrap();
        assert_eq!(restored.state(), state);
        // The received-data interrupt was pending and enabled: raised again.
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut restored, 7), 0x5a);
        assert_eq!(read(&mut restored, THR_RBR), b'a');
        assert_eq!(read(&mut restored, THR_RBR), b'b');
        restored.write(THR_RBR, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
        assert_eq!(restored.state().0.baud_divisor_low, 0x0c);

        // A saved FIFO longer than the hardware's is refused.
        let mut bad = state;
        bad.0.in_buffer = vec![0; SERIAL_FIFO_LEN + 1];
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(matches!(
            SerialDevice::restore(&bad, evt, Box::new(io::sink())),
            Err(SerialError::InvalidState { len }) if len == SERIAL_FIFO_LEN + 1
        ));
    }

    /// The postcard bytes of a non-default state, as the hand-written mirror of
    /// `SerialState` that `SerialDeviceState` used to be encoded them: checkpoints
    /// written by earlier builds must decode, and new ones must not change.
    const GOLDEN_STATE: &[u8] = &[
        0x0c, 0x01, 0x05, 0xc4, 0x83, 0x61, 0x0b, 0xb0, 0x5a, 0x03, b'a', b'b', b'c',
    ];

    fn golden_state() -> SerialState {
        SerialState {
            baud_divisor_low: 0x0c,
            baud_divisor_high: 0x01,
            interrupt_enable: 0x05,
            interrupt_identification: 0xc4,
            line_control: 0x83,
            line_status: 0x61,
            modem_control: 0x0b,
            modem_status: 0xb0,
            scratch: 0x5a,
            in_buffer: b"abc".to_vec(),
        }
    }

    #[test]
    fn state_encoding_is_stable() {
        let state = SerialDeviceState(golden_state());
        assert_eq!(postcard::to_allocvec(&state).unwrap(), GOLDEN_STATE);
        let decoded: SerialDeviceState = postcard::from_bytes(GOLDEN_STATE).unwrap();
        assert_eq!(decoded, state);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes into the decoder, then a restore and register traffic: errors,
            /// never a panic.
            #[test]
            fn hostile_states_do_not_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..120),
                ops in proptest::collection::vec((0u64..8, any::<u8>(), any::<bool>()), 0..40),
            ) {
                let Ok(state) = postcard::from_bytes::<SerialDeviceState>(&bytes) else {
                    return Ok(());
                };
                let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                match SerialDevice::restore(&state, evt, Box::new(io::sink())) {
                    Ok(mut dev) => {
                        prop_assert!(state.0.in_buffer.len() <= SERIAL_FIFO_LEN);
                        prop_assert_eq!(dev.state(), state);
                        for (offset, value, is_write) in ops {
                            if is_write {
                                dev.write(offset, &[value]);
                            } else {
                                let _ = read(&mut dev, offset);
                            }
                        }
                        let _ = dev.enqueue_input(b"xyz");
                    }
                    Err(e) => {
                        prop_assert!(state.0.in_buffer.len() > SERIAL_FIFO_LEN, "{}", e);
                    }
                }
            }
        }
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0, 0, 0]);
        dev.read(0x1_0000_0000, &mut wide);
        dev.read(3, &mut []);
        dev.write(u64::MAX, &[1]);
        for offset in 0..16 {
            dev.write(offset, &[0xff]);
            let _ = read(&mut dev, offset);
        }
    }

    #[test]
    fn a_full_output_shows_as_a_busy_transmitter() {
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(Box::new(out.clone())).unwrap();
        let b = busy.clone();
        dev.set_busy_probe(Box::new(move || {
            b.load(std::sync::atomic::Ordering::Relaxed)
        }));
        let lsr = |dev: &mut SerialDevice| {
            let mut v = [0u8];
            dev.read(5, &mut v);
            v[0]
        };
        assert_eq!(lsr(&mut dev) & 0x60, 0x60);
        busy.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(lsr(&mut dev) & 0x60, 0);
        // Written anyway: kept, not dropped.
        dev.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"x");
        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(lsr(&mut dev) & 0x60, 0x60);
    }
}
