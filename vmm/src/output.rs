//! Output commit for the console: with checkpoints, what the guest writes in epoch N
//! is held back until checkpoint N is complete, so nothing the outside world saw is
//! ever repeated or contradicted by a guest resumed from a checkpoint.
//!
//! The epoch engine drives the gate through [`crate::epoch::Output`]: it seals the
//! bytes of epoch N at cut N, releases them when checkpoint N is complete, and
//! releases everything when the run goes unprotected or ends cleanly. Without
//! checkpoints the gate is open and bytes pass straight through.

pub struct OutputGate {
    inner: std::sync::Mutex<GateState>,
    /// The last epoch released (a primary tells its standby in heartbeats).
    released: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct GateState {
    out: Box<dyn std::io::Write + Send>,
    held: bool,
    /// Written since the last cut.
    pending: Vec<u8>,
    /// Sealed at cut N, waiting for checkpoint N: (N, bytes).
    sealed: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// Bytes the guest wrote since boot (the console stream's length).
    written: u64,
    /// Bytes held (pending and sealed).
    held_bytes: usize,
}

/// Held bytes past which the serial port reports its transmitter busy (LSR), so a
/// driver that polls it waits for checkpoints to complete. Held output is never
/// dropped or released early; a guest that ignores LSR keeps being accepted.
pub const GATE_MAX_HELD: usize = 16 << 20;

impl OutputGate {
    /// A gate in front of `out`; `held` turns output commit on.
    pub fn new(out: Box<dyn std::io::Write + Send>, held: bool) -> std::sync::Arc<Self> {
        std::sync::Arc::new(OutputGate {
            released: Default::default(),
            inner: std::sync::Mutex::new(GateState {
                out,
                held,
                pending: Vec::new(),
                sealed: std::collections::VecDeque::new(),
                written: 0,
                held_bytes: 0,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        devices::bus::lock_recover(&self.inner)
    }

    /// At cut `epoch`: what was written since the previous cut belongs to it.
    /// Returns a copy of those bytes with their offset in the console stream.
    pub fn seal(&self, epoch: u64) -> crate::checkpoint::Console {
        let mut s = self.state();
        let offset = s.written - s.pending.len() as u64;
        if s.held && !s.pending.is_empty() {
            let bytes = std::mem::take(&mut s.pending);
            s.sealed.push_back((epoch, bytes.clone()));
            return crate::checkpoint::Console { offset, bytes };
        }
        crate::checkpoint::Console {
            offset: s.written,
            bytes: Vec::new(),
        }
    }

    /// Writes `bytes` straight out (they were held elsewhere and are now due) and
    /// continues the console stream after them.
    pub fn show(&self, offset: u64, bytes: &[u8]) {
        let mut s = self.state();
        let _ = s.out.write_all(bytes);
        let _ = s.out.flush();
        s.written = offset.saturating_add(bytes.len() as u64);
    }

    /// The last epoch whose output was released (0: none yet).
    pub fn released_epoch(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.released.clone()
    }

    /// Checkpoint `epoch` is complete: release its output and everything before.
    pub fn release(&self, epoch: u64) {
        let mut s = self.state();
        while s.sealed.front().is_some_and(|(e, _)| *e <= epoch) {
            if let Some((_, bytes)) = s.sealed.pop_front() {
                let _ = s.out.write_all(&bytes);
                s.held_bytes = s.held_bytes.saturating_sub(bytes.len());
            }
        }
        let _ = s.out.flush();
        self.released
            .fetch_max(epoch, std::sync::atomic::Ordering::Relaxed);
    }

    /// The run is ending cleanly: release everything, and stop holding.
    pub fn open(&self) {
        let mut s = self.state();
        while let Some((_, bytes)) = s.sealed.pop_front() {
            let _ = s.out.write_all(&bytes);
        }
        let pending = std::mem::take(&mut s.pending);
        let _ = s.out.write_all(&pending);
        let _ = s.out.flush();
        s.held = false;
        s.held_bytes = 0;
    }

    /// Holds output again from now on (after [`open`](Self::open)): a standby joined,
    /// and the next checkpoint must be complete before its output is seen.
    pub fn hold(&self) {
        self.state().held = true;
    }

    /// Console bytes held now (written, not yet released).
    pub fn held_bytes(&self) -> usize {
        self.state().held_bytes
    }

    /// Whether held output reached its bound ([`GATE_MAX_HELD`]): the serial port
    /// then reports its transmitter busy.
    pub fn is_full(&self) -> bool {
        let s = self.state();
        s.held && s.held_bytes >= GATE_MAX_HELD
    }

    /// A writer for the serial device.
    pub fn writer(self: &std::sync::Arc<Self>) -> GateWriter {
        GateWriter(self.clone())
    }
}

/// The serial device's end of an [`OutputGate`].
pub struct GateWriter(std::sync::Arc<OutputGate>);

impl std::io::Write for GateWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.state();
        if !s.held {
            let n = s.out.write(buf)?;
            s.written += n as u64;
            return Ok(n);
        }
        s.pending.extend_from_slice(buf);
        s.held_bytes += buf.len();
        s.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = self.0.state();
        if s.held {
            Ok(())
        } else {
            s.out.flush()
        }
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_waits_for_its_checkpoint() {
        let sink = Sink::default();
        let gate = OutputGate::new(Box::new(sink.clone()), true);
        let mut w = gate.writer();
        w.write_all(b"one ").unwrap();
        gate.seal(1);
        w.write_all(b"two ").unwrap();
        gate.seal(2);
        w.write_all(b"three").unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        gate.release(1);
        assert_eq!(&*sink.0.lock().unwrap(), b"one ");
        gate.release(2);
        assert_eq!(&*sink.0.lock().unwrap(), b"one two ");
        gate.open();
        assert_eq!(&*sink.0.lock().unwrap(), b"one two three");
        w.write_all(b"!").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"one two three!");
    }

    #[test]
    fn an_open_gate_passes_through() {
        let sink = Sink::default();
        let gate = OutputGate::new(Box::new(sink.clone()), false);
        gate.writer().write_all(b"now").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"now");
    }

    #[test]
    fn held_output_at_its_bound_reports_full_and_is_never_released_early() {
        let sink = Sink::default();
        let gate = OutputGate::new(Box::new(sink.clone()), true);
        let mut w = gate.writer();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(GATE_MAX_HELD >> 20) - 1 {
            w.write_all(&chunk).unwrap();
        }
        assert!(!gate.is_full());
        w.write_all(&chunk).unwrap();
        assert!(gate.is_full());
        // More is accepted (a guest that ignores LSR), and nothing is shown early.
        w.write_all(b"more").unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
        let c = gate.seal(1);
        assert_eq!(c.offset, 0);
        assert_eq!(c.bytes.len(), GATE_MAX_HELD + 4);
        assert!(gate.is_full());
        gate.release(1);
        assert!(!gate.is_full());
        assert_eq!(sink.0.lock().unwrap().len(), GATE_MAX_HELD + 4);
        assert_eq!(gate.seal(2).offset, GATE_MAX_HELD as u64 + 4);
    }
}
