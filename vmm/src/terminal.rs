//! The host terminal behind the serial console: raw mode while the guest owns it
//! (restored on every exit path by [`RawTerminal`]'s Drop), and the QEMU-style
//! escape `Ctrl-A x` to leave, since Ctrl-C goes to the guest in raw mode.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Puts stdin's terminal in raw mode and restores its previous settings when dropped.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` otherwise.
    pub fn stdin() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so the guest's "\n" still returns the carriage.
        raw.output_flags |= termios::OutputFlags::OPOST | termios::OutputFlags::ONLCR;
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
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
