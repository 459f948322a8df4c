//! How the VMM's own threads share the host's cores with the guest's vCPUs.
//!
//! A cut pauses the vCPUs and the device loop does the cut's work alone; the fold
//! (merging checkpoint files into the memory image, `checkpoint::directory`) may
//! run beside it, and beside the vCPUs the rest of the time. Nothing waits for a
//! fold until 32 checkpoint files have piled up behind it, so it runs at a lower
//! priority (a higher nice value than the process's): on a host with few cores
//! the scheduler then does not leave a cut's work or the vCPUs waiting for its
//! time slice. Only threads that start no others are lowered: a thread inherits
//! its creator's nice value, and an unprivileged process cannot raise it back.

/// How much the fold thread's nice value exceeds the process's.
pub const FOLD_NICE_ABOVE: i32 = 10;

/// Raises the calling thread's nice value by `by` (Linux keeps one per thread),
/// up to 19. Best effort: a failure leaves the thread as it was.
pub fn lower_own_priority(by: i32) {
    let tid = nix::unistd::gettid().as_raw();
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // getpriority returns the nice value, which may be -1: errno tells an error.
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers and touches no memory of ours; it
    // only reads this thread's nice value.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        return;
    }
    let nice = now.saturating_add(by).min(19);
    // SAFETY: setpriority takes plain integers and touches no memory of ours; on
    // our own thread id it changes only this thread's nice value. Raising it needs
    // no privilege; a failure is ignored.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if r != 0 {
        tracing::debug!(
            "cannot set thread {tid}'s nice value to {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
}
