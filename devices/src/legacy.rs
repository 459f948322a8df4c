//! Legacy PC devices: the i8042 keyboard controller (just enough of it to reset the
//! machine) and the debug-exit port.
//!
//! Both sit on the port I/O bus: the i8042 on `0x60` (data) and `0x64` (status and
//! command), which the VMM registers as one range of 5 ports at `0x60` (offsets 0 and 4;
//! the ports in between are the PIT's speaker gate and read as `0xff`), and the debug
//! exit on one port at `0xf4`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::snapshot::Snapshot;

/// Offset of the data port (`0x60`) in the i8042's range.
pub const I8042_DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (`0x64`) in the i8042's range.
pub const I8042_COMMAND_OFFSET: u64 = 4;
/// Port the i8042's range starts at.
pub const I8042_PORT_BASE: u64 = 0x60;
/// Number of ports of the i8042's range (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;

/// Status register: output buffer full (a byte waits at the data port).
const SB_OUT_FULL: u8 = 0x01;
/// Status register: system flag (self test passed).
const SB_SYSTEM_FLAG: u8 = 0x04;
/// Status register: the last write was to the command port.
const SB_LAST_WAS_COMMAND: u8 = 0x08;
/// Status register: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;

/// Controller command: read the command byte.
const CMD_READ_CTR: u8 = 0x20;
/// Controller command: write the command byte (next data byte).
const CMD_WRITE_CTR: u8 = 0x60;
/// Controller command: disable the aux port.
const CMD_DISABLE_AUX: u8 = 0xa7;
/// Controller command: enable the aux port.
const CMD_ENABLE_AUX: u8 = 0xa8;
/// Controller command: test the aux port.
const CMD_TEST_AUX: u8 = 0xa9;
/// Controller command: self test.
const CMD_SELF_TEST: u8 = 0xaa;
/// Controller command: test the keyboard port.
const CMD_TEST_KBD: u8 = 0xab;
/// Controller command: disable the keyboard.
const CMD_DISABLE_KBD: u8 = 0xad;
/// Controller command: enable the keyboard.
const CMD_ENABLE_KBD: u8 = 0xae;
/// Controller command: read the output port.
const CMD_READ_OUTP: u8 = 0xd0;
/// Controller command: write the output port (next data byte).
const CMD_WRITE_OUTP: u8 = 0xd1;
/// Controller command: write the next data byte to the keyboard output buffer.
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
/// Controller command: write the next data byte to the aux output buffer.
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
/// Controller command: write the next data byte to the aux device.
const CMD_WRITE_AUX: u8 = 0xd4;
/// Controller command: pulse the reset line (bit 0 clear in a 0xf0..=0xff command).
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard acknowledgement.
const KBD_ACK: u8 = 0xfa;
/// Keyboard self-test passed.
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Bound of the output buffer: a real controller holds one byte; keeping a few lets a
/// keyboard reset answer ACK and then its self-test result.
pub const I8042_OUT_QUEUE_MAX: usize = 4;
const OUT_QUEUE_MAX: usize = I8042_OUT_QUEUE_MAX;

/// Default command byte: keyboard interrupt on, system flag, translation on.
const DEFAULT_CTR: u8 = 0x45;

/// Errors of the legacy devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LegacyError {
    /// a saved i8042 state holds more output bytes than the controller keeps
    #[error(
        "the saved i8042 state holds {len} output bytes, more than the {} the controller keeps",
        I8042_OUT_QUEUE_MAX
    )]
    I8042OutputTooLong {
        /// Bytes in the saved output queue.
        len: usize,
    },
}

/// The i8042's plain state (what save/restore carries). `Default` is the power-on
/// state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct I8042State {
    /// Controller command byte ("CTR").
    pub command_byte: u8,
    /// A controller command waiting for its data byte at port 0x60.
    pub pending_command: Option<u8>,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Bytes waiting to be read at the data port, oldest first.
    pub output: VecDeque<u8>,
    /// Output port (bit 0: reset line, active low; bit 1: A20).
    pub output_port: u8,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            command_byte: DEFAULT_CTR,
            pending_command: None,
            last_was_command: false,
            output: VecDeque::new(),
            output_port: 0x03,
        }
    }
}

/// The i8042 keyboard controller, reduced to what a guest without a keyboard needs:
/// status polls, the usual configuration commands, and the CPU reset command (`0xfe`
/// at port `0x64`), which calls the reset callback.
pub struct I8042 {
    state: I8042State,
    reset: Box<dyn FnMut() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller; `reset` is called each time the guest asks for a reset.
    pub fn new(reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            state: I8042State::default(),
            reset,
        }
    }

    /// The current state.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    /// Replaces the state (restore). The state is untrusted input: an output queue
    /// longer than the controller keeps ([`I8042_OUT_QUEUE_MAX`]) is refused and the
    /// current state kept. Every other field takes any value (unknown pending commands
    /// swallow their data byte, as they do when the guest sends them).
    pub fn set_state(&mut self, state: I8042State) -> Result<(), LegacyError> {
        if state.output.len() > OUT_QUEUE_MAX {
            return Err(LegacyError::I8042OutputTooLong {
                len: state.output.len(),
            });
        }
        self.state = state;
        Ok(())
    }

    fn push_output(&mut self, byte: u8) {
        if self.state.output.len() < OUT_QUEUE_MAX {
            self.state.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let mut status = SB_SYSTEM_FLAG | SB_KBD_ENABLED;
        if !self.state.output.is_empty() {
            status |= SB_OUT_FULL;
        }
        if self.state.last_was_command {
            status |= SB_LAST_WAS_COMMAND;
        }
        status
    }

    fn pulse_reset(&mut self) {
        tracing::info!("i8042: guest requested a CPU reset");
        (self.reset)();
    }

    fn command(&mut self, cmd: u8) {
        self.state.last_was_command = true;
        self.state.pending_command = None;
        match cmd {
            CMD_READ_CTR => self.push_output(self.state.command_byte),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.state.pending_command = Some(cmd),
            CMD_SELF_TEST => self.push_output(0x55),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push_output(0x00),
            CMD_DISABLE_KBD => self.state.command_byte |= 0x10,
            CMD_ENABLE_KBD => self.state.command_byte &= !0x10,
            CMD_DISABLE_AUX => self.state.command_byte |= 0x20,
            CMD_ENABLE_AUX => self.state.command_byte &= !0x20,
            CMD_READ_OUTP => self.push_output(self.state.output_port),
            CMD_RESET_CPU => self.pulse_reset(),
            // 0xf0..=0xff pulse the output lines whose bit is 0; bit 0 is the reset line.
            0xf0..=0xff if cmd & 0x01 == 0 => self.pulse_reset(),
            _ => tracing::debug!("i8042: ignoring controller command {cmd:#04x}"),
        }
    }

    fn data(&mut self, value: u8) {
        self.state.last_was_command = false;
        match self.state.pending_command.take() {
            Some(CMD_WRITE_CTR) => self.state.command_byte = value,
            Some(CMD_WRITE_OUTP) => {
                self.state.output_port = value;
                if value & 0x01 == 0 {
                    self.pulse_reset();
                }
            }
            Some(CMD_WRITE_KBD_OUTBUF) | Some(CMD_WRITE_AUX_OUTBUF) => self.push_output(value),
            // No mouse: swallow what is sent to it.
            Some(_) => {}
            // A byte for the keyboard. There is none behind the controller, but answer
            // like one so that a probing driver does not wait forever.
            None => {
                self.push_output(KBD_ACK);
                if value == 0xff {
                    self.push_output(KBD_SELF_TEST_OK);
                }
            }
        }
    }
}

impl Snapshot for I8042 {
    type State = I8042State;

    fn snapshot(&self) -> I8042State {
        self.state()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            I8042_DATA_OFFSET => self.state.output.pop_front().unwrap_or(0),
            I8042_COMMAND_OFFSET => self.status(),
            _ => 0xff,
        };
        if let Some((first, rest)) = data.split_first_mut() {
            *first = value;
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            I8042_DATA_OFFSET => self.data(*value),
            I8042_COMMAND_OFFSET => self.command(*value),
            _ => {}
        }
    }
}

/// The debug-exit port: a one-byte write of `v` calls the callback with `v` (the VMM ends
/// the run with exit status `v`). Reads return `0xff`; other access sizes are ignored.
pub struct DebugExit {
    on_exit: Box<dyn FnMut(u8) + Send>,
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit").finish_non_exhaustive()
    }
}

impl DebugExit {
    /// Creates the device; `on_exit` receives the byte the guest wrote.
    pub fn new(on_exit: Box<dyn FnMut(u8) + Send>) -> Self {
        Self { on_exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, [value]) = (offset, data) {
            (self.on_exit)(*value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn counting_i8042() -> (I8042, Arc<AtomicU32>) {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let dev = I8042::new(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        (dev, resets)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn linux_reboot_k_sequence_resets() {
        let (mut dev, resets) = counting_i8042();
        // kb_wait(): the input buffer (bit 1) must read empty.
        assert_eq!(read(&mut dev, I8042_COMMAND_OFFSET) & 0x02, 0);
        dev.write(I8042_COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        dev.write(I8042_COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn other_commands_do_not_reset() {
        let (mut dev, resets) = counting_i8042();
        for cmd in [0x00, 0xa7, 0xa8, 0xad, 0xae, 0xff, 0xf1, 0xc0, 0xdd, 0xdf] {
            dev.write(I8042_COMMAND_OFFSET, &[cmd]);
        }
        // Wrong access size, wrong port.
        dev.write(I8042_COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        dev.write(1, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn command_byte_and_self_test() {
        let (mut dev, resets) = counting_i8042();
        assert_eq!(read(&mut dev, I8042_COMMAND_OFFSET) & SB_OUT_FULL, 0);
        dev.write(I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, I8042_COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, I8042_DATA_OFFSET), DEFAULT_CTR);
        assert_eq!(read(&mut dev, I8042_COMMAND_OFFSET) & SB_OUT_FULL, 0);

        dev.write(I8042_COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(I8042_DATA_OFFSET, &[0x20]);
        dev.write(I8042_COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, I8042_DATA_OFFSET), 0x20);

        dev.write(I8042_COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, I8042_DATA_OFFSET), 0x55);

        // Keyboard reset: ACK then self-test passed; the queue stays bounded.
        for _ in 0..100 {
            dev.write(I8042_DATA_OFFSET, &[0xff]);
        }
        assert_eq!(dev.state().output.len(), OUT_QUEUE_MAX);
        assert_eq!(read(&mut dev, I8042_DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut dev, I8042_DATA_OFFSET), KBD_SELF_TEST_OK);

        // Writing the output port with the reset line low resets.
        dev.write(I8042_COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        dev.write(I8042_DATA_OFFSET, &[0x02]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn state_round_trip() {
        let (mut dev, _) = counting_i8042();
        dev.write(I8042_COMMAND_OFFSET, &[CMD_SELF_TEST]);
        dev.write(I8042_COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        let saved = dev.snapshot();
        assert_eq!(saved.pending_command, Some(CMD_WRITE_CTR));
        let bytes = postcard::to_allocvec(&saved).unwrap();
        let decoded: I8042State = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, saved);
        let (mut other, _) = counting_i8042();
        other.set_state(decoded).unwrap();
        assert_eq!(other.state(), saved);
        other.write(I8042_DATA_OFFSET, &[0x11]);
        assert_eq!(other.state().command_byte, 0x11);
        assert_eq!(read(&mut other, I8042_DATA_OFFSET), 0x55);
        assert_eq!(I8042State::default().command_byte, DEFAULT_CTR);
        // A hostile saved state cannot grow the output queue past its bound: refused,
        // and the device keeps its state.
        let before = other.state();
        let mut big = saved;
        big.output = (0..100).collect();
        assert_eq!(
            other.set_state(big),
            Err(LegacyError::I8042OutputTooLong { len: 100 })
        );
        assert_eq!(other.state(), before);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes into the decoder, then a restore and port traffic: errors, never
            /// a panic, and the output queue stays bounded.
            #[test]
            fn hostile_states_do_not_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..40),
                ops in proptest::collection::vec((0u64..5, any::<u8>(), any::<bool>()), 0..40),
            ) {
                let Ok(state) = postcard::from_bytes::<I8042State>(&bytes) else {
                    return Ok(());
                };
                let (mut dev, _) = counting_i8042();
                match dev.set_state(state.clone()) {
                    Ok(()) => prop_assert_eq!(dev.state(), state),
                    Err(_) => prop_assert!(state.output.len() > OUT_QUEUE_MAX),
                }
                for (offset, value, is_write) in ops {
                    if is_write {
                        dev.write(offset, &[value]);
                    } else {
                        let _ = read(&mut dev, offset);
                    }
                    prop_assert!(dev.state().output.len() <= OUT_QUEUE_MAX);
                }
            }
        }
    }

    #[test]
    fn debug_exit_reports_the_byte() {
        let seen = Arc::new(AtomicU32::new(u32::MAX));
        let s = seen.clone();
        let mut dev = DebugExit::new(Box::new(move |v| s.store(v.into(), Ordering::SeqCst)));
        dev.write(0, &[1, 2]);
        assert_eq!(seen.load(Ordering::SeqCst), u32::MAX);
        dev.write(0, &[42]);
        assert_eq!(seen.load(Ordering::SeqCst), 42);
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
