//! Why a run ended, and the exit status that reports it. Shared by the machine (which
//! ends runs) and the epoch engine (whose end-of-run policy depends on why).

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest wrote this value to the debug-exit port.
    GuestExit(u8),
    /// The guest reset the machine (i8042 0xfe: Linux's `reboot=k`, or a panic with
    /// `panic=N`).
    Reset,
    /// The VMM received this signal (SIGINT, SIGTERM).
    Signal(i32),
    /// The user typed Ctrl-A x on the console.
    Quit,
    /// The guest did something that stops it (internal error, triple fault, …).
    GuestError(String),
    /// The user handed the guest to the standby (`mirrorvm switchover`): a final
    /// checkpoint, then the standby resumes it and this host becomes its standby.
    Switchover,
}

/// Runs `f` with SIGINT and SIGTERM blocked on this thread, so the threads it
/// starts (and theirs) never take them: a machine reads them from a signalfd while
/// its own thread blocks them, and a signal the kernel handed to a service thread
/// that does not block it (the API server, the metrics endpoint) would kill the
/// process instead of stopping the run with its final checkpoint.
pub fn without_stop_signals<T>(f: impl FnOnce() -> T) -> T {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    let mut old = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), Some(&mut old)).is_ok();
    let r = f();
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    r
}

impl RunEnd {
    /// The process exit status that reports this end: the guest's own value for a
    /// debug exit, 0 for a reset or quit, 128+signal for a signal, 2 for a guest error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunEnd::GuestExit(v) => i32::from(*v),
            RunEnd::Reset | RunEnd::Quit | RunEnd::Switchover => 0,
            RunEnd::Signal(s) => 128 + s,
            RunEnd::GuestError(_) => 2,
        }
    }

    /// Whether the user stopped the run (a signal, Ctrl-A x) rather than the guest
    /// ending it: a stopped guest is meant to be continued later.
    pub fn is_user_stop(&self) -> bool {
        matches!(self, RunEnd::Signal(_) | RunEnd::Quit | RunEnd::Switchover)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_user_stops() {
        assert_eq!(RunEnd::GuestExit(7).exit_code(), 7);
        assert_eq!(RunEnd::Signal(15).exit_code(), 143);
        assert_eq!(RunEnd::GuestError("x".into()).exit_code(), 2);
        assert_eq!(RunEnd::Reset.exit_code(), 0);
        assert!(RunEnd::Quit.is_user_stop());
        assert!(RunEnd::Signal(2).is_user_stop());
        assert!(!RunEnd::GuestExit(0).is_user_stop());
        assert!(!RunEnd::Reset.is_user_stop());
    }
}
