//! The host terminal behind the serial console: raw mode while the guest owns it
//! (restored on every exit path by [`RawTerminal`]'s Drop), and the QEMU-style
//! escape `Ctrl-A x` to leave, since Ctrl-C goes to the guest in raw mode.

use std::os::fd::BorrowedFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Puts a terminal in raw mode and restores its previous settings when dropped.
pub struct RawTerminal {
    fd: i32,
    saved: Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` otherwise.
    pub fn stdin() -> Option<RawTerminal> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: fd 0 stays open for the life of the process; the borrow is used only
        // inside this function and in Drop, while the process runs.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        let saved = termios::tcgetattr(bfd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so the guest's "\n" still returns the carriage.
        raw.output_flags |= termios::OutputFlags::OPOST | termios::OutputFlags::ONLCR;
        termios::tcsetattr(bfd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: see `stdin`: the descriptor is stdin, open for the whole process.
        let bfd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(bfd, SetArg::TCSANOW, &self.saved);
    }
}

/// What a byte typed on the console means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keystroke {
    /// Pass this byte to the guest.
    Guest(u8),
    /// The user asked to quit (Ctrl-A x).
    Quit,
    /// Swallowed (the escape prefix).
    None,
}

/// Recognises the `Ctrl-A x` escape; `Ctrl-A Ctrl-A` sends one Ctrl-A to the guest.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    after_prefix: bool,
}

/// The escape prefix byte (Ctrl-A).
pub const ESCAPE_PREFIX: u8 = 0x01;

impl EscapeDecoder {
    /// Feeds one byte typed by the user.
    pub fn feed(&mut self, b: u8) -> Keystroke {
        if self.after_prefix {
            self.after_prefix = false;
            match b {
                b'x' | b'X' => Keystroke::Quit,
                _ => Keystroke::Guest(b),
            }
        } else if b == ESCAPE_PREFIX {
            self.after_prefix = true;
            Keystroke::None
        } else {
            Keystroke::Guest(b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.feed(b'a'), Keystroke::Guest(b'a'));
        assert_eq!(d.feed(ESCAPE_PREFIX), Keystroke::None);
        assert_eq!(d.feed(b'x'), Keystroke::Quit);
        assert_eq!(d.feed(ESCAPE_PREFIX), Keystroke::None);
        assert_eq!(d.feed(ESCAPE_PREFIX), Keystroke::Guest(ESCAPE_PREFIX));
        assert_eq!(d.feed(b'x'), Keystroke::Guest(b'x'));
    }
}
