//! How a run is told to end: the [`Shutdown`] latch every part of the machine can
//! pull, and the device loop's own events (signals, console input and its
//! `Ctrl-A x` escape).

use std::sync::{Arc, Mutex};

use devices::bus::lock_recover;
use devices::serial::SerialDevice;
use event_manager::{EventOps, Events, MutEventSubscriber};
use nix::sys::signalfd::SignalFd;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::run_end::RunEnd;
use crate::terminal::{EscapeDecoder, Keystroke};

/// The first reason to end the run, and the eventfd that wakes the event loop.
pub struct Shutdown {
    reason: Mutex<Option<RunEnd>>,
    evt: EventFd,
}

impl Shutdown {
    /// A latch that has not fired.
    pub fn new() -> std::io::Result<Self> {
        Ok(Shutdown {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Ends the run for `reason` unless it is already ending for another.
    pub fn request(&self, reason: RunEnd) {
        let mut r = lock_recover(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        let _ = self.evt.write(1);
    }

    /// Why the run is ending, once it is.
    pub fn reason(&self) -> Option<RunEnd> {
        lock_recover(&self.reason).clone()
    }
}

/// The device event loop's own events: shutdown requests, signals, console input.
pub(super) struct Control {
    pub shutdown: Arc<Shutdown>,
    pub signals: SignalFd,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub stdin: bool,
    pub escape: EscapeDecoder,
}

const TOKEN_SHUTDOWN: u32 = 0;
const TOKEN_SIGNAL: u32 = 1;
const TOKEN_STDIN: u32 = 2;

impl Control {
    fn read_stdin(&mut self, ops: &mut EventOps) {
        use std::os::fd::AsFd;
        let mut buf = [0u8; 64];
        // Unbuffered: whatever epoll saw is read now (std's Stdin would keep the rest
        // in its buffer, where epoll cannot see it).
        let n = match nix::unistd::read(std::io::stdin().as_fd(), &mut buf) {
            Ok(n) if n > 0 => n,
            _ => {
                // EOF or error: stop watching stdin; the guest keeps running.
                let _ = ops.remove(Events::with_data_raw(
                    libc::STDIN_FILENO,
                    TOKEN_STDIN,
                    EventSet::IN,
                ));
                return;
            }
        };
        let mut to_guest = Vec::with_capacity(n);
        for &b in &buf[..n] {
            match self.escape.feed(b) {
                Keystroke::Guest(b) => to_guest.push(b),
                Keystroke::Quit => self.shutdown.request(RunEnd::Quit),
                Keystroke::None => {}
            }
        }
        if !to_guest.is_empty() {
            // Bytes beyond the UART's FIFO are dropped, as a real UART would.
            let _ = lock_recover(&self.serial).enqueue_input(&to_guest);
        }
    }
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(
            &self.shutdown.evt,
            TOKEN_SHUTDOWN,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data(&self.signals, TOKEN_SIGNAL, EventSet::IN));
        // epoll refuses regular files (stdin redirected from a file): then there is
        // simply no console input.
        if self.stdin
            && ops
                .add(Events::with_data_raw(
                    libc::STDIN_FILENO,
                    TOKEN_STDIN,
                    EventSet::IN,
                ))
                .is_err()
        {
            self.stdin = false;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_SHUTDOWN => {
                let _ = self.shutdown.evt.read();
            }
            TOKEN_SIGNAL => {
                if let Ok(Some(info)) = self.signals.read_signal() {
                    let signo = i32::try_from(info.ssi_signo).unwrap_or(libc::SIGTERM);
                    self.shutdown.request(RunEnd::Signal(signo));
                }
            }
            TOKEN_STDIN => self.read_stdin(ops),
            _ => {}
        }
    }
}
