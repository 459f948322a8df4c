//! How the VMM's own threads share the host's cores with the guest's vCPUs.
//!
//! A cut pauses the vCPUs and the device loop does the cut's work alone; the
//! exporter (writing the previous checkpoint) and the fold (merging checkpoint
//! files into the memory image) run beside it. On a host with few cores the
//! scheduler would otherwise share a core between them and the device loop, and
//! the pause would last as long as their time slice. So the threads that do
//! background work run at a lower priority (a higher nice value): whatever is
//! left over after the vCPUs and the device loop, which is most of a core on a
//! host with a spare one.

/// Nice value of the exporter thread: behind the vCPUs and the device loop, ahead
/// of the fold (its checkpoint is what the next cut waits for).
pub const EXPORTER_NICE: i32 = 5;

/// Nice value of the thread that folds checkpoint files into the memory image:
/// nothing waits for it until 32 files have piled up.
pub const FOLD_NICE: i32 = 10;

/// Gives the calling thread the nice value `nice` (Linux sets it per thread).
/// Best effort: a failure leaves the thread as it was.
pub fn set_own_nice(nice: i32) {
    let tid = nix::unistd::gettid().as_raw();
    let Ok(tid) = libc::id_t::try_from(tid) else {
        return;
    };
    // SAFETY: setpriority takes plain integers and touches no memory of ours; on
    // our own thread id it changes only this thread's nice value. Raising the nice
    // value needs no privilege; a failure is ignored.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
    if r != 0 {
        tracing::debug!(
            "cannot set thread {tid}'s nice value to {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
}
