//! Liveness, both ways, on a connection of its own so bulk data never delays it.
//!
//! Each side sends a Heartbeat frame every [`LivenessConfig::heartbeat`] on the
//! liveness connection and reads the other side's. Any frame from the peer, on either
//! connection, is a sign of life ([`Pulse::touch`]). A peer silent for
//! [`LivenessConfig::dead_after`] is dead; so is one whose liveness connection fails.
//! An extra check (the primary's lag deadline: no acknowledgement, or no progress of
//! the initial copy) can declare the peer dead too. Death is reported once, through a
//! callback that closes the data connection, so whoever is blocked on it returns at
//! once.
//!
//! A heartbeat's epoch field carries the sender's latest: on the primary the last
//! epoch whose console output it released (a standby taking over shows only what
//! comes after), on the standby the last checkpoint it applied.

use std::io::{BufReader, BufWriter};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{Body, FrameReader, FrameWriter};
use super::transport::Connection;

/// How often heartbeats go, when silence means death, and how long acknowledgement
/// may lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Silence after which the peer is dead.
    pub dead_after: Duration,
    /// Longest a checkpoint may stay unacknowledged, and the initial copy go without
    /// progress (at least `peer::COPY_STALL_DEADLINE`): the primary's lag deadline.
    pub max_lag: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat: Duration::from_millis(10),
            dead_after: Duration::from_millis(100),
            max_lag: Duration::from_secs(2),
        }
    }
}

/// The time of the peer's last sign of life.
#[derive(Debug)]
pub struct Pulse {
    start: Instant,
    last_us: AtomicU64,
}

impl Default for Pulse {
    fn default() -> Self {
        Pulse {
            start: Instant::now(),
            last_us: AtomicU64::new(0),
        }
    }
}

impl Pulse {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The peer showed a sign of life now.
    pub fn touch(&self) {
        self.last_us.fetch_max(self.now_us(), Ordering::Relaxed);
    }

    /// How long the peer has been silent.
    pub fn silent_for(&self) -> Duration {
        Duration::from_micros(
            self.now_us()
                .saturating_sub(self.last_us.load(Ordering::Relaxed)),
        )
    }
}

/// Why the peer was declared dead, once.
#[derive(Debug, Default)]
pub struct Verdict(Mutex<Option<String>>);

impl Verdict {
    /// Records `why` unless a reason is already recorded; true if this was the first.
    pub fn declare(&self, why: String) -> bool {
        let mut v = devices::bus::lock_recover(&self.0);
        if v.is_none() {
            *v = Some(why);
            true
        } else {
            false
        }
    }

    /// The recorded reason, if the peer was declared dead.
    pub fn get(&self) -> Option<String> {
        devices::bus::lock_recover(&self.0).clone()
    }
}

/// The liveness thread of one side of a session. Dropping it stops the thread.
pub struct Liveness {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What to send as the thread ends (an orderly end's Shutdown, or a give-up).
    last_word: Arc<Mutex<Option<Body>>>,
}

/// What the liveness thread watches and reports.
pub struct Watch {
    /// The peer's last sign of life (touched by the data path too).
    pub pulse: Arc<Pulse>,
    /// This side's latest epoch, sent in heartbeats.
    pub ours: Arc<AtomicU64>,
    /// The highest epoch the peer's heartbeats carried.
    pub theirs: Arc<AtomicU64>,
    /// Where the reason for death is recorded.
    pub verdict: Arc<Verdict>,
    /// An extra reason for death, checked at every heartbeat (the lag deadline).
    pub extra: Box<dyn Fn() -> Option<String> + Send>,
    /// Called once when the peer is declared dead (closes the data connection).
    pub on_dead: Box<dyn Fn() + Send>,
    /// Sent on the liveness connection when this side declares its peer dead, or
    /// gives it up ([`Liveness::give_up`]): the primary's `Shutdown::Abandoned`.
    pub farewell: Option<Body>,
    /// The peer's Shutdown frame, when one arrives on the liveness connection: the
    /// peer ended the session on purpose (an orderly end, or it gave this side up),
    /// which is not a death.
    pub said: Arc<Mutex<Option<super::protocol::Shutdown>>>,
    /// Set when the liveness reader has finished (the connection ended or failed).
    pub reader_done: Arc<AtomicBool>,
}

/// Real-time priority of the liveness threads (SCHED_RR, low: above every normal
/// thread, below the kernel's own real-time work).
const LIVENESS_RT_PRIORITY: libc::c_int = 10;

/// Puts the calling thread in the real-time round-robin class if allowed, else
/// lowers its nice value if allowed, so heartbeats keep their cadence on a busy host
/// (a 2-core machine running two VMMs, their vCPUs spinning, and a disk copy):
/// a starved heartbeat thread would look like a dead peer. The threads sleep
/// between heartbeats, so they take almost no CPU. Best effort: without the
/// privilege nothing changes.
fn raise_priority() {
    let param = libc::sched_param {
        sched_priority: LIVENESS_RT_PRIORITY,
    };
    // SAFETY: `param` is a valid sched_param that lives across the call, which only
    // reads it; pid 0 is the calling thread, whose scheduling class alone changes.
    let rt = unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, std::ptr::addr_of!(param)) };
    if rt == 0 {
        return;
    }
    let tid = nix::unistd::gettid().as_raw();
    if let Ok(tid) = libc::id_t::try_from(tid) {
        // SAFETY: setpriority takes plain integers and touches no memory of ours; on
        // our own thread id it only changes this thread's nice value. Its failure
        // (no privilege) is ignored.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -10) };
    }
}

/// Sets its flag when dropped (however the thread holding it ends).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Liveness {
    /// Starts heartbeats on `conn` (stamped with fence generation `generation`, in
    /// the session's protocol `version`) and watches the peer as `watch` says.
    pub fn spawn(
        conn: Connection,
        generation: u64,
        version: u16,
        config: LivenessConfig,
        watch: Watch,
    ) -> Result<Liveness, std::io::Error> {
        let stop = Arc::new(AtomicBool::new(false));
        // A peer that stops reading must not block heartbeats (and with them every
        // verdict): a write that cannot go out within the deadline is a death.
        conn.set_write_timeout(Some(config.dead_after))
            .map_err(std::io::Error::other)?;
        let (r, w, closer) = conn.split().map_err(std::io::Error::other)?;
        let Watch {
            pulse,
            ours,
            theirs,
            verdict,
            extra,
            on_dead,
            farewell,
            said,
            reader_done,
        } = watch;
        let (rsaid, rdone) = (said.clone(), reader_done);
        let reader_stop = stop.clone();
        let (rp, rv) = (pulse.clone(), verdict.clone());
        let reader = std::thread::Builder::new()
            .name("liveness-rx".into())
            .spawn(move || {
                raise_priority();
                // Only Heartbeats and Shutdowns come this way: small control frames.
                let mut fr = FrameReader::with_max_payload(
                    BufReader::new(r),
                    super::protocol::MAX_CONTROL_PAYLOAD,
                );
                fr.pin(version);
                let _done = SetOnDrop(rdone);
                loop {
                    match fr.read_frame() {
                        Ok(Some(f)) => {
                            rp.touch();
                            match f.body {
                                Body::Heartbeat => {
                                    theirs.fetch_max(f.epoch, Ordering::Relaxed);
                                }
                                Body::Shutdown(s) => {
                                    *devices::bus::lock_recover(&rsaid) = Some(s);
                                    return;
                                }
                                _ => {}
                            }
                        }
                        Ok(None) => {
                            if !reader_stop.load(Ordering::Relaxed) {
                                rv.declare("the liveness connection closed".into());
                            }
                            return;
                        }
                        Err(e) => {
                            if !reader_stop.load(Ordering::Relaxed) {
                                rv.declare(format!(
                                    "the liveness connection failed: {}",
                                    devices::ErrorChain(&e)
                                ));
                            }
                            return;
                        }
                    }
                }
            })?;
        let thread_stop = stop.clone();
        let last_word: Arc<Mutex<Option<Body>>> = Arc::default();
        let say_last = last_word.clone();
        let thread = std::thread::Builder::new()
            .name("liveness".into())
            .spawn(move || {
                raise_priority();
                let mut fw = FrameWriter::new(BufWriter::new(w), generation);
                fw.set_version(version);
                pulse.touch();
                let mut next = Instant::now();
                let mut last_turn = Instant::now();
                while !thread_stop.load(Ordering::Relaxed) {
                    // This thread itself did not run for longer than the deadline
                    // (its process was stopped, or starved): the silence may be ours.
                    // Let the reader catch up on what arrived meanwhile first.
                    let own_gap = last_turn.elapsed();
                    last_turn = Instant::now();
                    if own_gap > config.dead_after {
                        std::thread::sleep(config.heartbeat);
                        next = Instant::now();
                        continue;
                    }
                    let sent = fw
                        .write(ours.load(Ordering::Relaxed), &Body::Heartbeat)
                        .and_then(|()| fw.flush());
                    if let Err(e) = sent {
                        verdict.declare(format!(
                            "cannot send heartbeats: {}",
                            devices::ErrorChain(&e)
                        ));
                    }
                    if devices::bus::lock_recover(&said).is_some() {
                        verdict.declare("it ended the session".into());
                    }
                    let silent = pulse.silent_for();
                    // Bytes from the peer already wait in our receive queue: it
                    // spoke, and our reader was not scheduled to read it yet (a busy
                    // host). Give the reader its turn rather than call the peer dead,
                    // within a bound, so a reader that never catches up still ends
                    // in a verdict.
                    let heard_unread = || silent <= 4 * config.dead_after && closer.has_unread();
                    if silent > config.dead_after && !heard_unread() {
                        verdict.declare(format!("silent for {} ms", silent.as_millis()));
                    }
                    if let Some(why) = extra() {
                        verdict.declare(why);
                    }
                    if verdict.get().is_some() {
                        // The farewell goes out before the data connection closes, so
                        // a peer that sees the close has the farewell to read.
                        if let Some(body) = &farewell {
                            let _ = fw
                                .write(ours.load(Ordering::Relaxed), body)
                                .and_then(|()| fw.flush());
                        }
                        on_dead();
                        break;
                    }
                    next += config.heartbeat;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
                // Ended on purpose while the peer was alive (a death already sent
                // its farewell above).
                let last = devices::bus::lock_recover(&say_last).take();
                if let Some(body) = last.filter(|_| verdict.get().is_none()) {
                    let _ = fw
                        .write(ours.load(Ordering::Relaxed), &body)
                        .and_then(|()| fw.flush());
                }
                closer.close();
                let _ = reader.join();
            })?;
        Ok(Liveness {
            stop,
            thread: Some(thread),
            last_word,
        })
    }

    /// Ends the session on purpose: sends `word` (a Shutdown: the orderly end, or
    /// `Abandoned`), stops heartbeats and closes the liveness connection. The peer
    /// reads it there even if the data connection is stuck behind bulk data.
    pub fn end_with(&mut self, word: Body) {
        *devices::bus::lock_recover(&self.last_word) = Some(word);
        self.stop();
    }

    /// Stops heartbeats and closes the liveness connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.stop();
    }
}
