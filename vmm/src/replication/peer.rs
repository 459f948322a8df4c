//! The primary's side of mirroring: [`PeerSink`], the checkpoint sink whose
//! destination is a standby host.
//!
//! ```text
//!  open: witness lock (if any), connect the data connection
//!  begin(manifest):   Hello ──▶            ◀── HelloAck (Accept | Refuse → Lost)
//!                     liveness connection: Heartbeat ⇄ Heartbeat every 10 ms
//!  write_base(mem):   Base × n, DiskBase × n (the initial copy; a progress line)
//!  write(N):          Pages*, Region*, Console*, State, EndOfCheckpoint ──▶
//!                     ◀── Ack(N)  (write returns only now: N is complete)
//!  end(how):          Shutdown ──▶  (an orderly end: the standby does not take over)
//!
//!  standby silent for dead-after, no Ack within max-lag, no byte of the initial
//!  copy taken within max-lag (at least 10 s), or a connection error:
//!     record "unprotected since" in the witness, then SinkError::Lost
//!     (the engine releases held output, retires locally and runs on)
//! ```
//!
//! A second connection carries only heartbeats ([`super::liveness`]), so a large
//! checkpoint in flight never delays them. An acknowledgement reader thread reads the
//! data connection's return direction (Acks, and any frame counts as a sign of life).

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::fence::{Fence, FenceError, Witness};
use super::join::Joined;
use super::liveness::{Liveness, LivenessConfig, Pulse, Verdict, Watch};
use super::protocol::{
    Body, CopyPlan, DiskChunk, FrameError, FrameReader, FrameWriter, Hello, HelloAck, Holdings,
    RefuseReason, Shutdown, WireConfig, WireStorage, MAX_BATCH_PAGES, MAX_DISK_BASE_CHUNK,
    OLDEST_VERSION, PACKED_SINCE,
};
use super::transport::{Closer, Connection, Transport, TransportError};
use crate::checkpoint::sink::{BaseDelta, CheckpointSink, SinkEnd, SinkError, StorageMode};
use crate::checkpoint::{Checkpoint, Manifest};
use crate::dirty::{StagedPages, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::progress::Progress;

/// How long the primary keeps trying to reach its standby at start.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(10);
/// How long the primary waits for its standby to confirm a Shutdown (by closing).
pub const SHUTDOWN_CONFIRM: Duration = Duration::from_secs(2);
/// How long a standby may take to answer the Hello.
pub const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// How long a standby may take to send its Holdings after accepting: it hashes
/// every disk first (about a second per GiB here).
pub const HOLDINGS_DEADLINE: Duration = Duration::from_secs(300);

/// The fence, shared by every sink of one primary (a standby that joins later uses
/// the same), so dropping a lost sink never lets the witness lock go.
pub type SharedFence = Arc<Mutex<Fence>>;
/// The least time the initial copy may go without the standby taking a byte before
/// the standby is lost (the lag deadline if that is longer): a standby pauses
/// legitimately while it creates its journals at the start of the copy.
pub const COPY_STALL_DEADLINE: Duration = Duration::from_secs(10);

/// Where and how to mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The standby's address, `HOST:PORT`.
    pub addr: String,
    /// The witness file holding the fence, if any.
    pub witness: Option<PathBuf>,
    /// Heartbeats and deadlines.
    pub liveness: LivenessConfig,
    /// How to reach it.
    pub transport: Transport,
    /// The most bytes per second the initial copy may send (`max-rate=`), so a
    /// copy leaves room on a shared link; checkpoints are never held back.
    pub max_rate: Option<u64>,
    /// Where standbys that dial this primary (`standby --join`) are accepted, once
    /// it runs unprotected (`--listen`).
    pub listen: Option<String>,
    /// The newest protocol version to offer, and how pages are packed.
    pub wire: WireConfig,
}

/// The least `max-rate` accepted: one 4 MiB frame must go out well within the
/// copy's stall deadline.
pub const MIN_RATE: u64 = 1 << 20;

/// A `--peer` value that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum PeerSpecError {
    /// No address before the options.
    #[error("--peer needs an address: HOST:PORT[,max-rate=R]")]
    NoAddress,
    /// An option mirrorvm does not know.
    #[error(
        "unknown --peer option '{0}': the one option is max-rate=R (bytes per second, e.g. 100M)"
    )]
    Unknown(String),
    /// A rate that does not parse.
    #[error("--peer max-rate: {0}")]
    Rate(crate::config::ConfigError),
    /// A rate below the least accepted.
    #[error("--peer max-rate={0} is below the least accepted, 1M (1 MiB/s)")]
    RateTooLow(String),
}

/// Splits `HOST:PORT[,max-rate=R]` into the address and the rate, bytes/s (R takes
/// K, M, G suffixes as sizes do: 100M is 100 MiB/s).
pub fn parse_peer(spec: &str) -> Result<(String, Option<u64>), PeerSpecError> {
    let mut parts = spec.split(',');
    let addr = parts
        .next()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or(PeerSpecError::NoAddress)?;
    let mut rate = None;
    for opt in parts {
        let Some(v) = opt.trim().strip_prefix("max-rate=") else {
            return Err(PeerSpecError::Unknown(opt.to_string()));
        };
        let r = crate::config::parse_size(v).map_err(PeerSpecError::Rate)?;
        if r < MIN_RATE {
            return Err(PeerSpecError::RateTooLow(v.to_string()));
        }
        rate = Some(r);
    }
    Ok((addr.to_string(), rate))
}

/// Failures of the peer sink.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The standby cannot be reached.
    #[error("cannot reach the standby at {addr}")]
    Connect {
        /// Its address.
        addr: String,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// The address where standbys dial in cannot be listened on.
    #[error("cannot accept standbys on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// The witness cannot be taken.
    #[error("cannot take the fence")]
    Fence(#[source] FenceError),
    /// Sending or receiving frames failed.
    #[error("the connection to the standby at {addr} failed")]
    Frames {
        /// Its address.
        addr: String,
        /// Cause.
        #[source]
        source: FrameError,
    },
    /// The standby refused this primary.
    #[error("the standby at {addr} refused this primary ({reason:?}): {detail}")]
    Refused {
        /// Its address.
        addr: String,
        /// Why.
        reason: super::protocol::RefuseReason,
        /// Its sentence.
        detail: String,
    },
    /// The standby answered the Hello with something else, or not at all.
    #[error("the standby at {addr} did not answer the hello: {what}")]
    NoHelloAck {
        /// Its address.
        addr: String,
        /// What came instead.
        what: String,
    },
    /// The standby was declared dead.
    #[error("the standby at {addr} is lost: {why}")]
    Dead {
        /// Its address.
        addr: String,
        /// Why (silence, lag, a closed connection).
        why: String,
    },
    /// A disk's base image cannot be read for the initial copy.
    #[error("cannot read disk image {path} for the initial copy")]
    ReadDisk {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory cannot be read for the initial copy.
    #[error("cannot read guest memory at {0:#x} for the initial copy")]
    ReadMemory(u64),
    /// A thread cannot be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Whether `b` holds only zeros. Compared a page at a time against a zero page: slice
/// equality is a `memcmp`, fast in every build profile.
fn is_zero(b: &[u8]) -> bool {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    b.chunks(PAGE_SIZE).all(|c| c == &ZERO[..c.len()])
}

/// How long the checkpoint in flight may go unacknowledged, and what that deadline is
/// called. The checkpoint that completes the initial copy (none acknowledged yet) is
/// part of the copy: its Ack waits for the standby to create its disks' journals and
/// settle its copies, which is disk work, not lag, so it has the copy's deadline.
fn ack_deadline(back: &Back, max_lag: Duration) -> (Duration, &'static str) {
    if back.acked.load(Ordering::Acquire) == 0 {
        (
            max_lag.max(COPY_STALL_DEADLINE),
            "the deadline for the checkpoint that completes the initial copy",
        )
    } else {
        (max_lag, "the lag deadline")
    }
}

/// A rate the bytes written must keep to, counted from `base` bytes at `since`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    rate: u64,
    since: Instant,
    base: u64,
}

impl Pace {
    /// How long to wait, with `total` bytes written at `elapsed`, to be back at the
    /// rate.
    fn wait(&self, total: u64, elapsed: Duration) -> Duration {
        let due = Duration::from_secs_f64(
            total.saturating_sub(self.base) as f64 / self.rate.max(1) as f64,
        );
        due.saturating_sub(elapsed)
    }

    /// The most bytes one write may take: a tenth of a second's worth, so the pace
    /// is smooth and the stall deadline sees progress.
    fn slice(&self) -> usize {
        crate::arch::to_usize((self.rate / 10).max(64 << 10))
    }
}

/// A byte counter in front of a writer, which also paces it while a [`Pace`] is
/// set (the initial copy under `max-rate`).
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
    pace: Arc<Mutex<Option<Pace>>>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let pace = *devices::bus::lock_recover(&self.pace);
        let b = match &pace {
            Some(p) => &b[..b.len().min(p.slice())],
            None => b,
        };
        let n = self.inner.write(b)?;
        let total = self.count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if let Some(p) = pace {
            let wait = p.wait(total, p.since.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What the acknowledgement reader found: the highest epoch acknowledged, and why
/// the data connection ended (if it did). A wakeup channel of one slot tells the
/// waiting sender to look; a standby flooding Acks cannot grow anything.
#[derive(Default)]
struct Back {
    /// Highest epoch acknowledged + 1 (0: none).
    acked: AtomicU64,
    closed: Mutex<Option<String>>,
}

/// A data connection whose Hello was answered.
struct Greeting {
    fr: FrameReader<BufReader<Box<dyn Read + Send>>>,
    fw: FrameWriter<BufWriter<Counting<Box<dyn Write + Send>>>>,
    closer: Closer,
    sent: Arc<AtomicU64>,
    pace: Arc<Mutex<Option<Pace>>>,
    answer: Option<Body>,
}

/// A live session with the standby.
struct Session {
    w: FrameWriter<BufWriter<Counting<Box<dyn Write + Send>>>>,
    sent: Arc<AtomicU64>,
    back: Arc<Back>,
    wake: Receiver<()>,
    closer: Arc<Closer>,
    verdict: Arc<Verdict>,
    unacked_since: Arc<Mutex<Option<Instant>>>,
    /// While the initial copy is sent: the bytes sent at its last progress, and when.
    copy_progress: Arc<Mutex<Option<(u64, Instant)>>>,
    /// The pace of the data connection while the initial copy is sent under
    /// `max-rate`.
    pace: Arc<Mutex<Option<Pace>>>,
    liveness: Option<Liveness>,
    /// What the standby holds: its replica's name and its disks' digests.
    holdings: Holdings,
}

impl Session {
    /// Paces what follows to `rate` bytes/s (`None`: no pace).
    fn pace(&self, rate: Option<u64>) {
        *devices::bus::lock_recover(&self.pace) = rate.map(|rate| Pace {
            rate,
            since: Instant::now(),
            base: self.sent.load(Ordering::Relaxed),
        });
    }

    /// Ends the session in order (after a Shutdown frame).
    fn close(&mut self) {
        if let Some(mut l) = self.liveness.take() {
            l.stop();
        }
        self.closer.close();
    }

    /// Gives the standby up: it is told so on the liveness connection (it must not
    /// take over: this primary runs on), then both connections close.
    fn give_up(&mut self) {
        if let Some(mut l) = self.liveness.take() {
            l.end_with(Body::Shutdown(Shutdown::Abandoned));
        }
        self.closer.close();
    }
}

/// The checkpoint sink that mirrors to a standby host.
pub struct PeerSink {
    config: PeerConfig,
    fence: Option<SharedFence>,
    generation: u64,
    released: Arc<AtomicU64>,
    /// This primary's lineage, sent in the Hello.
    lineage: u64,
    /// The data connection, connected at open, until the Hello; and the liveness
    /// connection if the standby opened it (`--join`).
    pending: Option<(Connection, Option<Connection>)>,
    session: Option<Session>,
    /// The highest epoch sent (a base's or a checkpoint's).
    highest_sent: u64,
    /// The last checkpoint the standby acknowledged.
    last_acked: Option<u64>,
    /// The session's manifest (the base copy reads the disks it names).
    manifest: Option<Manifest>,
    /// Where the standby accepts standbys once it runs the guest (its Holdings'
    /// `listen`, else the address dialed).
    rejoin: Option<String>,
    /// The protocol version the Hello offers first: the configured newest, or for a
    /// standby that dialed, the older of that and the version of its Join.
    version: u16,
}

impl PeerSink {
    /// Takes the witness (if configured) and connects to the standby, trying for up
    /// to [`CONNECT_PATIENCE`]. `released` is the last epoch whose console output
    /// this host released, sent in heartbeats.
    pub fn open(
        config: &PeerConfig,
        released: Arc<AtomicU64>,
        lineage: u64,
    ) -> Result<PeerSink, PeerError> {
        let fence = open_fence(config)?;
        let generation = fence_generation(fence.as_ref());
        let end = Instant::now() + CONNECT_PATIENCE;
        let conn = loop {
            match config
                .transport
                .connect(&config.addr, Duration::from_secs(2))
            {
                Ok(c) => break c,
                Err(e) if Instant::now() < end && matches!(e, TransportError::Connect { .. }) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => {
                    return Err(PeerError::Connect {
                        addr: config.addr.clone(),
                        source,
                    })
                }
            }
        };
        Ok(PeerSink {
            config: config.clone(),
            fence,
            generation,
            released,
            lineage,
            pending: Some((conn, None)),
            session: None,
            highest_sent: 0,
            last_acked: None,
            manifest: None,
            rejoin: None,
            version: config.wire.max_version,
        })
    }

    /// A sink over a standby that dialed this primary (`--join`): `config` holds the
    /// session settings (its `addr` names the standby, for messages), `fence` the
    /// primary's fence if it has one.
    pub fn joined(
        config: &PeerConfig,
        fence: Option<SharedFence>,
        released: Arc<AtomicU64>,
        lineage: u64,
        joined: Joined,
    ) -> PeerSink {
        let generation = fence_generation(fence.as_ref());
        PeerSink {
            config: PeerConfig {
                addr: joined.peer.clone(),
                ..config.clone()
            },
            fence,
            generation,
            released,
            lineage,
            version: joined.version.min(config.wire.max_version),
            pending: Some((joined.data, Some(joined.live))),
            session: None,
            highest_sent: 0,
            last_acked: None,
            manifest: None,
            rejoin: None,
        }
    }

    /// The fence this sink holds, to share with sinks of standbys that join later.
    pub fn fence(&self) -> Option<SharedFence> {
        self.fence.clone()
    }

    /// The fence generation this primary stamps its frames with.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn frames_err(&self, source: FrameError) -> PeerError {
        PeerError::Frames {
            addr: self.config.addr.clone(),
            source,
        }
    }

    /// The standby is gone: record that this host runs unprotected from the next
    /// epoch it could have sent on (so no replica the standby may hold can resume),
    /// then report the loss. If the record cannot be written, nothing may be released.
    fn lose(&mut self, cause: PeerError) -> SinkError {
        // The reason the liveness thread found is better than "broken pipe".
        let cause = match self.session.as_ref().and_then(|s| s.verdict.get()) {
            Some(why) if !matches!(cause, PeerError::Refused { .. }) => PeerError::Dead {
                addr: self.config.addr.clone(),
                why,
            },
            _ => cause,
        };
        if let Some(mut s) = self.session.take() {
            s.give_up();
        }
        self.pending = None;
        let since = self.highest_sent.saturating_add(1);
        if let Some(f) = &self.fence {
            if let Err(e) = devices::bus::lock_recover(f).record_unprotected_since(since) {
                return SinkError::Fenced(Box::new(e));
            }
        }
        SinkError::Lost(Box::new(cause))
    }

    /// One more connection to the standby this sink dialed (the liveness
    /// connection, or a data connection offering an older version).
    fn connect(&self) -> Result<Connection, PeerError> {
        self.config
            .transport
            .connect(&self.config.addr, Duration::from_secs(2))
            .map_err(|source| PeerError::Connect {
                addr: self.config.addr.clone(),
                source,
            })
    }

    /// Sends the Hello on `conn` in protocol `version` and reads the answer.
    fn hello(
        &self,
        conn: Connection,
        version: u16,
        manifest: &Manifest,
    ) -> Result<Greeting, PeerError> {
        let addr = self.config.addr.clone();
        conn.set_read_timeout(Some(HELLO_DEADLINE))
            .map_err(|source| PeerError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let (r, w, closer) = conn.split().map_err(|source| PeerError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let sent = Arc::new(AtomicU64::new(0));
        let pace = Arc::new(Mutex::new(None));
        let mut fw = FrameWriter::new(
            BufWriter::with_capacity(
                1 << 20,
                Counting {
                    inner: w,
                    count: sent.clone(),
                    pace: pace.clone(),
                },
            ),
            self.generation,
        );
        fw.set_version(version);
        fw.set_packing(Some(self.config.wire.compression));
        fw.write(
            0,
            &Body::Hello(Hello {
                protocol_version: version,
                manifest: manifest.clone(),
                storage: WireStorage::Replicated,
                lineage: self.lineage,
            }),
        )
        .and_then(|()| fw.flush())
        .map_err(|e| self.frames_err(e))?;
        let mut fr = FrameReader::new(BufReader::new(r));
        let answer = fr.read_frame().map_err(|e| self.frames_err(e))?;
        Ok(Greeting {
            fr,
            fw,
            closer,
            sent,
            pace,
            answer: answer.map(|f| f.body),
        })
    }

    fn handshake(&mut self, manifest: &Manifest) -> Result<Session, PeerError> {
        let addr = self.config.addr.clone();
        let (mut conn, joined_live) = self.pending.take().ok_or_else(|| PeerError::NoHelloAck {
            addr: addr.clone(),
            what: "the session already began".into(),
        })?;
        // The newest version both speak: a standby that dialed said its own in its
        // Join; one this primary dials refuses a version it does not speak, and is
        // then offered the one before (docs/protocol.md, "Versions").
        let mut version = self.version;
        let Greeting {
            mut fr,
            fw,
            closer,
            sent,
            pace,
            ..
        } = loop {
            let mut g = self.hello(conn, version, manifest)?;
            match g.answer.take() {
                // An Accept comes in the version offered (a Version refusal may not).
                Some(Body::HelloAck(HelloAck::Accept)) if g.fr.version() == version => break g,
                Some(Body::HelloAck(HelloAck::Accept)) => {
                    return Err(PeerError::NoHelloAck {
                        addr,
                        what: format!(
                            "an Accept in protocol version {} to a version {version} Hello",
                            g.fr.version()
                        ),
                    })
                }
                Some(Body::HelloAck(HelloAck::Refuse {
                    reason: RefuseReason::Version,
                    detail,
                })) if joined_live.is_none() && version > OLDEST_VERSION => {
                    eprintln!(
                        "mirrorvm: the standby at {addr} does not speak protocol version {version} ({detail}); offering version {}",
                        version - 1
                    );
                    version -= 1;
                    g.closer.close();
                    conn = self.connect()?;
                }
                Some(Body::HelloAck(HelloAck::Refuse { reason, detail })) => {
                    return Err(PeerError::Refused {
                        addr,
                        reason,
                        detail,
                    })
                }
                Some(other) => {
                    return Err(PeerError::NoHelloAck {
                        addr,
                        what: format!("a {} frame", other.frame_type()),
                    })
                }
                None => {
                    return Err(PeerError::NoHelloAck {
                        addr,
                        what: "the connection closed".into(),
                    })
                }
            }
        };
        fr.pin(version);
        if version < self.config.wire.max_version {
            eprintln!(
                "mirrorvm: the standby at {addr} speaks protocol version {version}: this session uses it{}",
                if version < PACKED_SINCE {
                    " (pages travel raw)"
                } else {
                    ""
                }
            );
        }
        // What the standby holds comes next, once it hashed its disks.
        bound_reads(&closer, Some(HOLDINGS_DEADLINE), &addr)?;
        let holdings = match fr.read_frame().map_err(|e| self.frames_err(e))? {
            Some(super::protocol::Frame {
                body: Body::Holdings(h),
                ..
            }) => h,
            Some(f) => {
                return Err(PeerError::NoHelloAck {
                    addr,
                    what: format!("a {} frame instead of its Holdings", f.body.frame_type()),
                })
            }
            None => {
                return Err(PeerError::NoHelloAck {
                    addr,
                    what: "the connection closed before its Holdings".into(),
                })
            }
        };
        let shapes_fit = holdings.disks.len() == manifest.disks.len()
            && holdings
                .disks
                .iter()
                .zip(&manifest.disks)
                .all(|(d, m)| super::digest::fits(d, m.size));
        if !shapes_fit {
            return Err(PeerError::NoHelloAck {
                addr,
                what: "Holdings whose disk digests do not match the disks of the Hello".into(),
            });
        }
        // From here on reads block without a bound: liveness watches the standby.
        bound_reads(&closer, None, &addr)?;
        let inner = fr.into_inner();
        let closer = Arc::new(closer);
        let pulse = Arc::new(Pulse::default());
        let verdict = Arc::new(Verdict::default());
        let back = Arc::new(Back::default());
        let (tx, wake) = mpsc::sync_channel(1);
        {
            let pulse = pulse.clone();
            let back = back.clone();
            std::thread::Builder::new()
                .name("peer-acks".into())
                .spawn(move || read_acks(inner, version, pulse, &back, tx))
                .map_err(|e| PeerError::Thread("acknowledgement reader", e))?;
        }
        // Where the standby takes a standby once it runs the guest (a switchover):
        // its own word, else, for a standby this primary dialed, where it was dialed.
        self.rejoin = holdings
            .listen
            .clone()
            .or_else(|| joined_live.is_none().then(|| addr.clone()));
        let live = match joined_live {
            Some(live) => live,
            None => self.connect()?,
        };
        let unacked_since: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let copy_progress: Arc<Mutex<Option<(u64, Instant)>>> = Arc::new(Mutex::new(None));
        let max_lag = self.config.liveness.max_lag;
        let max_stall = max_lag.max(COPY_STALL_DEADLINE);
        let lag = unacked_since.clone();
        let acks = back.clone();
        let (copy, copied) = (copy_progress.clone(), sent.clone());
        let on_dead_closer = closer.clone();
        let liveness = Liveness::spawn(
            live,
            self.generation,
            version,
            self.config.liveness,
            Watch {
                pulse,
                ours: self.released.clone(),
                theirs: Arc::new(AtomicU64::new(0)),
                verdict: verdict.clone(),
                extra: Box::new(move || {
                    if let Some(since) = *devices::bus::lock_recover(&lag) {
                        let waited = since.elapsed();
                        let (limit, what) = ack_deadline(&acks, max_lag);
                        if waited > limit {
                            return Some(format!(
                                "no acknowledgement for {} ms ({what} is {} ms)",
                                waited.as_millis(),
                                limit.as_millis()
                            ));
                        }
                    }
                    // The initial copy has no acknowledgement to wait for: a standby
                    // that answers heartbeats but takes no data would block it forever.
                    let mut progress = devices::bus::lock_recover(&copy);
                    let (bytes, at) = (*progress)?;
                    let now = copied.load(Ordering::Relaxed);
                    if now != bytes {
                        *progress = Some((now, Instant::now()));
                        return None;
                    }
                    let stalled = at.elapsed();
                    (stalled > max_stall).then(|| {
                        format!(
                            "the standby took no data of the initial copy for {} ms (the deadline is {} ms)",
                            stalled.as_millis(),
                            max_stall.as_millis()
                        )
                    })
                }),
                on_dead: Box::new(move || on_dead_closer.close()),
                // However this primary ends the session but in order, the standby
                // learns that it was given up, not that its primary died.
                farewell: Some(Body::Shutdown(Shutdown::Abandoned)),
                said: Default::default(),
                reader_done: Default::default(),
            },
        )
        .map_err(|e| PeerError::Thread("liveness", e))?;
        Ok(Session {
            w: fw,
            sent,
            back,
            wake,
            closer,
            verdict,
            unacked_since,
            copy_progress,
            pace,
            liveness: Some(liveness),
            holdings,
        })
    }

    fn session(&mut self) -> Result<&mut Session, PeerError> {
        let addr = self.config.addr.clone();
        self.session.as_mut().ok_or(PeerError::Dead {
            addr,
            why: "no session".into(),
        })
    }

    fn send_base(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        manifest: &Manifest,
        delta: Option<&BaseDelta>,
    ) -> Result<u64, PeerError> {
        let addr = self.config.addr.clone();
        let total_disk: u64 = manifest.disks.iter().map(|d| d.size).sum();
        let rate = self.config.max_rate;
        let s = self.session()?;
        // Memory: only what changed since the replica the standby holds, if this
        // host can name it; else every page that is not zero (the standby starts
        // from zeros).
        let kept = s
            .holdings
            .replica
            .filter(|id| delta.is_some_and(|d| d.covers(id)));
        let only = kept.and(delta.map(|d| &d.pages));
        let mem_total = match only {
            Some(set) => set.count() as u64 * PAGE_SIZE as u64,
            None => mem.iter().map(|r| r.len()).sum::<u64>(),
        };
        let total = mem_total + total_disk;
        let mut progress = Progress::new(format!("initial copy to {addr}"), total);
        let start_bytes = s.sent.load(Ordering::Relaxed);
        // From now on the lag deadline watches the copy's progress.
        *devices::bus::lock_recover(&s.copy_progress) = Some((start_bytes, Instant::now()));
        s.pace(rate);
        s.w.write(epoch, &Body::CopyPlan(CopyPlan { memory: kept }))
            .map_err(|source| PeerError::Frames {
                addr: addr.clone(),
                source,
            })?;
        match (kept, only) {
            (Some(id), Some(set)) => {
                tracing::info!(
                    "initial copy to {addr}: the standby holds {id}: {} changed pages",
                    set.count()
                );
                self.send_changed_pages(mem, epoch, set, &mut progress)?;
            }
            _ => self.send_all_pages(mem, epoch, &mut progress)?,
        }
        let digests = self.session()?.holdings.disks.clone();
        let mut resent = 0u64;
        for (i, (d, theirs)) in manifest.disks.iter().zip(&digests).enumerate() {
            resent += self.send_disk(i, d, theirs, epoch, &mut progress)?;
        }
        let s = self.session()?;
        s.w.flush().map_err(|source| PeerError::Frames {
            addr: addr.clone(),
            source,
        })?;
        s.pace(None);
        *devices::bus::lock_recover(&s.copy_progress) = None;
        let took = progress.finish();
        let sent = s.sent.load(Ordering::Relaxed) - start_bytes;
        eprintln!(
            "mirrorvm: initial copy to {addr}: {sent} bytes sent for {total} bytes of {} and disks ({resent} bytes of disk chunks that differed) in {:.2} s",
            if kept.is_some() { "changed memory" } else { "memory" },
            took.as_secs_f64()
        );
        Ok(sent)
    }

    /// Notes progress of the copy (bytes skipped count too: the stall deadline
    /// watches it).
    fn copy_progressed(&mut self, progress: &mut Progress, n: u64) -> Result<(), PeerError> {
        let s = self.session()?;
        let now = s.sent.load(Ordering::Relaxed);
        *devices::bus::lock_recover(&s.copy_progress) = Some((now, Instant::now()));
        progress.add(n);
        Ok(())
    }

    /// Every page of `mem` that is not zero, as Base frames.
    fn send_all_pages(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        progress: &mut Progress,
    ) -> Result<(), PeerError> {
        let addr = self.config.addr.clone();
        let batch = MAX_BATCH_PAGES as usize;
        let mut pages = StagedPages {
            addrs: Vec::with_capacity(batch),
            data: Vec::with_capacity(batch * PAGE_SIZE),
        };
        let mut read = Vec::with_capacity(batch * PAGE_SIZE);
        let ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        for (start, len) in ranges {
            let mut gpa = start;
            while gpa < start + len {
                let n = ((start + len - gpa) / PAGE_SIZE as u64).min(batch as u64);
                let bytes = crate::arch::to_usize(n) * PAGE_SIZE;
                read.resize(bytes, 0);
                mem.read_slice(&mut read[..bytes], GuestAddress(gpa))
                    .map_err(|_| PeerError::ReadMemory(gpa))?;
                // The standby's replica starts as zeros: only the other pages travel.
                // (Only in this first pass: a page re-sent by a later round or a
                // checkpoint may have become zero, and travels whatever it holds.)
                pages.addrs.clear();
                pages.data.clear();
                for (i, page) in read[..bytes].chunks_exact(PAGE_SIZE).enumerate() {
                    if !is_zero(page) {
                        pages.addrs.push(gpa + (i * PAGE_SIZE) as u64);
                        pages.data.extend_from_slice(page);
                    }
                }
                let s = self.session()?;
                if !pages.addrs.is_empty() {
                    s.w.write_base(epoch, &pages)
                        .map_err(|source| PeerError::Frames {
                            addr: addr.clone(),
                            source,
                        })?;
                }
                gpa += n * PAGE_SIZE as u64;
                self.copy_progressed(progress, n * PAGE_SIZE as u64)?;
            }
        }
        Ok(())
    }

    /// The pages of `set` (zero or not: the standby's replica holds older contents),
    /// as Base frames.
    fn send_changed_pages(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        set: &crate::dirty::DirtySet,
        progress: &mut Progress,
    ) -> Result<(), PeerError> {
        let addr = self.config.addr.clone();
        let all: Vec<u64> = set.pages().collect();
        let mut pages = StagedPages::default();
        for chunk in all.chunks(MAX_BATCH_PAGES as usize) {
            pages.addrs.clear();
            pages.data.clear();
            pages.data.resize(chunk.len() * PAGE_SIZE, 0);
            for (i, gpa) in chunk.iter().enumerate() {
                mem.read_slice(
                    &mut pages.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                    GuestAddress(*gpa),
                )
                .map_err(|_| PeerError::ReadMemory(*gpa))?;
                pages.addrs.push(*gpa);
            }
            let s = self.session()?;
            s.w.write_base(epoch, &pages)
                .map_err(|source| PeerError::Frames {
                    addr: addr.clone(),
                    source,
                })?;
            self.copy_progressed(progress, (chunk.len() * PAGE_SIZE) as u64)?;
        }
        Ok(())
    }

    /// Disk `index`'s base image: every chunk whose hash differs from the standby's
    /// digest `theirs`, adjacent ones joined into DiskBase frames of at most 4 MiB.
    /// Returns the bytes of disk data sent.
    fn send_disk(
        &mut self,
        index: usize,
        d: &crate::checkpoint::DiskManifest,
        theirs: &super::protocol::Digest,
        epoch: u64,
        progress: &mut Progress,
    ) -> Result<u64, PeerError> {
        use std::os::unix::fs::FileExt;
        let addr = self.config.addr.clone();
        let path = &d.config.path;
        let read_err = |source| PeerError::ReadDisk {
            path: path.clone(),
            source,
        };
        let f = std::fs::File::open(path).map_err(read_err)?;
        let chunk = theirs.chunk;
        let max_run = u64::from(MAX_DISK_BASE_CHUNK).max(chunk);
        let mut run: Vec<u8> = Vec::new();
        let mut run_at = 0u64;
        let mut sent = 0u64;
        let mut buf = vec![0u8; crate::arch::to_usize(chunk)];
        let disk = u32::try_from(index).unwrap_or(u32::MAX);
        let mut offset = 0u64;
        for h in &theirs.hashes {
            let n = crate::arch::to_usize((d.size - offset).min(chunk));
            f.read_exact_at(&mut buf[..n], offset).map_err(read_err)?;
            let differs = super::digest::hash(&buf[..n]) != *h;
            // A run ends at a chunk that is equal, or when it is as long as a frame.
            if !run.is_empty() && (!differs || run.len() as u64 + n as u64 > max_run) {
                sent += run.len() as u64;
                self.send_disk_run(disk, run_at, &mut run, epoch, &addr)?;
            }
            if differs {
                if run.is_empty() {
                    run_at = offset;
                }
                run.extend_from_slice(&buf[..n]);
            }
            offset += n as u64;
            self.copy_progressed(progress, n as u64)?;
        }
        if !run.is_empty() {
            sent += run.len() as u64;
            self.send_disk_run(disk, run_at, &mut run, epoch, &addr)?;
        }
        Ok(sent)
    }

    fn send_disk_run(
        &mut self,
        disk: u32,
        offset: u64,
        run: &mut Vec<u8>,
        epoch: u64,
        addr: &str,
    ) -> Result<(), PeerError> {
        // Chunks are whole sectors (the disk's size is), and a run is at most one
        // frame's worth.
        for (i, part) in run.chunks(MAX_DISK_BASE_CHUNK as usize).enumerate() {
            let c = DiskChunk {
                disk,
                offset: offset + (i * MAX_DISK_BASE_CHUNK as usize) as u64,
                data: part.to_vec(),
            };
            let s = self.session()?;
            s.w.write(epoch, &Body::DiskBase(c))
                .map_err(|source| PeerError::Frames {
                    addr: addr.to_string(),
                    source,
                })?;
        }
        run.clear();
        Ok(())
    }

    fn send_checkpoint(&mut self, c: &Checkpoint) -> Result<u64, PeerError> {
        let max_lag = self.config.liveness.max_lag;
        let addr = self.config.addr.clone();
        let s = self.session()?;
        let start_bytes = s.sent.load(Ordering::Relaxed);
        {
            let mut since = devices::bus::lock_recover(&s.unacked_since);
            since.get_or_insert_with(Instant::now);
        }
        s.w.write_checkpoint(c)
            .and_then(|()| s.w.flush())
            .map_err(|source| PeerError::Frames {
                addr: addr.clone(),
                source,
            })?;
        let bytes = s.sent.load(Ordering::Relaxed) - start_bytes;
        loop {
            if s.back.acked.load(Ordering::Acquire) > c.epoch {
                *devices::bus::lock_recover(&s.unacked_since) = None;
                return Ok(bytes);
            }
            if let Some(why) = devices::bus::lock_recover(&s.back.closed).clone() {
                return Err(PeerError::Dead { addr, why });
            }
            if let Some(why) = s.verdict.get() {
                return Err(PeerError::Dead { addr, why });
            }
            let (limit, _) = ack_deadline(&s.back, max_lag);
            if let Some(since) = *devices::bus::lock_recover(&s.unacked_since) {
                if since.elapsed() > limit {
                    return Err(PeerError::Dead {
                        addr,
                        why: format!(
                            "no acknowledgement for {} ms (the lag deadline is {} ms)",
                            since.elapsed().as_millis(),
                            limit.as_millis()
                        ),
                    });
                }
            }
            match s.wake.recv_timeout(Duration::from_millis(20)) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    /// After a Shutdown frame: waits until the standby closes the session (it does
    /// once it has read the Shutdown, or it died: either way it will not resume),
    /// for at most `deadline`. False if it did not.
    fn wait_closed(s: &Session, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if devices::bus::lock_recover(&s.back.closed).is_some() {
                return true;
            }
            let _ = s.wake.recv_timeout(Duration::from_millis(10));
        }
        false
    }
}

/// Bounds each read of the data connection with the standby at `addr`.
fn bound_reads(closer: &Closer, t: Option<Duration>, addr: &str) -> Result<(), PeerError> {
    closer
        .set_read_timeout(t)
        .map_err(|source| PeerError::Connect {
            addr: addr.to_string(),
            source: TransportError::Setup {
                peer: addr.to_string(),
                source,
            },
        })
}

/// Takes the witness named in `config`, if any.
pub fn open_fence(config: &PeerConfig) -> Result<Option<SharedFence>, PeerError> {
    match &config.witness {
        Some(p) => Ok(Some(Arc::new(Mutex::new(
            Witness::new(p).open().map_err(PeerError::Fence)?,
        )))),
        None => Ok(None),
    }
}

fn fence_generation(fence: Option<&SharedFence>) -> u64 {
    fence.map_or(0, |f| devices::bus::lock_recover(f).generation())
}

/// Reads the standby's side of the data connection: Acks (any frame is a sign of
/// life); anything else ends the session.
fn read_acks(
    r: BufReader<Box<dyn Read + Send>>,
    version: u16,
    pulse: Arc<Pulse>,
    back: &Back,
    wake: mpsc::SyncSender<()>,
) {
    // Only Acks and Heartbeats come this way: both have empty payloads.
    let mut fr = FrameReader::with_max_payload(r, 0);
    fr.pin(version);
    let why = loop {
        match fr.read_frame() {
            Ok(Some(f)) => {
                pulse.touch();
                match f.body {
                    Body::Ack => {
                        back.acked
                            .fetch_max(f.epoch.saturating_add(1), Ordering::AcqRel);
                        let _ = wake.try_send(());
                    }
                    Body::Heartbeat => {}
                    other => {
                        break format!(
                            "the standby sent an unexpected {} frame",
                            other.frame_type()
                        )
                    }
                }
            }
            Ok(None) => break "the standby closed the connection".to_string(),
            Err(e) => break format!("{}", devices::ErrorChain(&e)),
        }
    };
    *devices::bus::lock_recover(&back.closed) = Some(why);
    let _ = wake.try_send(());
}

impl Drop for PeerSink {
    /// A sink dropped before its session began (its standby dialed in, and the run
    /// ended or the engine could not take it) says so, so the standby does not take
    /// the close for a primary of an older version.
    fn drop(&mut self) {
        if matches!(self.pending, Some((_, Some(_)))) {
            self.decline("the primary closed this session before it began");
        }
    }
}

impl CheckpointSink for PeerSink {
    fn storage(&self) -> StorageMode {
        StorageMode::Replicated
    }

    fn rejoin_addr(&self) -> Option<String> {
        self.rejoin.clone()
    }

    /// A standby that dialed and is turned away reads why as its first frame (a
    /// refusal in the direction it would answer one), so it does not mistake the
    /// close for a primary of an older version.
    fn decline(&mut self, why: &str) {
        let Some((data, _)) = self.pending.take() else {
            return;
        };
        let _ = data.set_write_timeout(Some(Duration::from_secs(1)));
        let mut fw = FrameWriter::new(data.unbuffered_writer(), self.generation);
        fw.set_version(self.version);
        let _ = fw
            .write(
                0,
                &Body::HelloAck(HelloAck::Refuse {
                    reason: RefuseReason::Busy,
                    detail: why.to_string(),
                }),
            )
            .and_then(|()| fw.flush());
    }

    fn begin(&mut self, manifest: &Manifest) -> Result<(), SinkError> {
        match self.handshake(manifest) {
            Ok(s) => {
                self.session = Some(s);
                self.manifest = Some(manifest.clone());
                Ok(())
            }
            Err(e) => Err(self.lose(e)),
        }
    }

    fn write_base(
        &mut self,
        mem: &GuestMemory,
        epoch: u64,
        delta: Option<&BaseDelta>,
    ) -> Result<u64, SinkError> {
        let Some(manifest) = &self.manifest else {
            let e = PeerError::Dead {
                addr: self.config.addr.clone(),
                why: "no session".into(),
            };
            return Err(self.lose(e));
        };
        let manifest = manifest.clone();
        self.highest_sent = self.highest_sent.max(epoch);
        match self.send_base(mem, epoch, &manifest, delta) {
            Ok(b) => Ok(b),
            Err(e) => Err(self.lose(e)),
        }
    }

    fn write_base_pages(&mut self, pages: &StagedPages, epoch: u64) -> Result<u64, SinkError> {
        let addr = self.config.addr.clone();
        let rate = self.config.max_rate;
        let r = match self.session() {
            Ok(s) => {
                let before = s.sent.load(Ordering::Relaxed);
                // The stall deadline watches a round as it watches the first pass,
                // and the rate holds for it too.
                *devices::bus::lock_recover(&s.copy_progress) = Some((before, Instant::now()));
                s.pace(rate);
                let r =
                    s.w.write_base(epoch, pages)
                        .and_then(|()| s.w.flush())
                        .map(|()| s.sent.load(Ordering::Relaxed) - before)
                        .map_err(|source| PeerError::Frames { addr, source });
                s.pace(None);
                *devices::bus::lock_recover(&s.copy_progress) = None;
                r
            }
            Err(e) => Err(e),
        };
        r.map_err(|e| self.lose(e))
    }

    fn write(&mut self, c: &Checkpoint) -> Result<u64, SinkError> {
        self.highest_sent = self.highest_sent.max(c.epoch);
        match self.send_checkpoint(c) {
            Ok(b) => {
                self.last_acked = Some(c.epoch);
                Ok(b)
            }
            Err(e) => Err(self.lose(e)),
        }
    }

    fn end(&mut self, how: &SinkEnd) -> Result<(), SinkError> {
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        let body = Body::Shutdown(match how {
            SinkEnd::Finished { how, exit_status } => Shutdown::Finished {
                exit_status: *exit_status,
                how: how.clone(),
            },
            SinkEnd::Stopped { exit_status } => Shutdown::Stopped {
                exit_status: *exit_status,
            },
            SinkEnd::Handover => Shutdown::Handover,
        });
        let handover = *how == SinkEnd::Handover;
        let epoch = self.highest_sent;
        let r = s.w.write(epoch, &body).and_then(|()| s.w.flush());
        // The standby closes the session once it read the Shutdown. Until it did (or
        // if it cannot be told), it might still take over: record that this host goes
        // on alone before its caller shows the rest of the output.
        // The same word on the liveness connection: an orderly end must not lose to
        // the liveness connection's close while the data connection is backed up.
        if let Some(mut l) = s.liveness.take() {
            l.end_with(body.clone());
        }
        let confirmed = r.is_ok() && Self::wait_closed(s, SHUTDOWN_CONFIRM);
        s.close();
        self.session = None;
        if handover {
            // The standby takes the fence and the guest now; this host must not
            // record that it goes on alone (it does not go on at all).
            if !confirmed {
                return Err(SinkError::Lost(Box::new(PeerError::Dead {
                    addr: self.config.addr.clone(),
                    why: "it did not confirm the handover: it may or may not have resumed the guest; look at it before starting the guest anywhere".into(),
                })));
            }
        } else if !confirmed {
            if let Some(f) = &self.fence {
                devices::bus::lock_recover(f)
                    .record_unprotected_since(self.highest_sent.saturating_add(1))
                    .map_err(|e| SinkError::Fenced(Box::new(e)))?;
            }
        }
        r.map_err(|e| {
            SinkError::Lost(Box::new(PeerError::Frames {
                addr: self.config.addr.clone(),
                source: e,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_spec_is_an_address_and_an_optional_rate() {
        assert_eq!(parse_peer("b:7000").unwrap(), ("b:7000".to_string(), None));
        assert_eq!(
            parse_peer("10.0.0.2:7000,max-rate=100M").unwrap(),
            ("10.0.0.2:7000".to_string(), Some(100 << 20))
        );
        assert!(matches!(parse_peer(""), Err(PeerSpecError::NoAddress)));
        assert!(matches!(
            parse_peer("b:1,max-rate=512K"),
            Err(PeerSpecError::RateTooLow(_))
        ));
        assert!(matches!(
            parse_peer("b:1,max-rate=x"),
            Err(PeerSpecError::Rate(_))
        ));
        assert!(matches!(
            parse_peer("b:1,rate=1G"),
            Err(PeerSpecError::Unknown(_))
        ));
    }

    #[test]
    fn a_pace_waits_exactly_as_long_as_the_rate_needs() {
        let p = Pace {
            rate: 1 << 20,
            since: Instant::now(),
            base: 1000,
        };
        // 2 MiB after the base at 1 MiB/s is due at 2 s.
        let total = 1000 + (2 << 20);
        assert_eq!(
            p.wait(total, Duration::from_millis(500)),
            Duration::from_millis(1500)
        );
        assert_eq!(p.wait(total, Duration::from_secs(3)), Duration::ZERO);
        assert_eq!(p.wait(0, Duration::ZERO), Duration::ZERO);
        // A write takes at most a tenth of a second's worth, never under 64 KiB.
        assert_eq!(p.slice(), (1 << 20) / 10);
        let slow = Pace { rate: 1, ..p };
        assert_eq!(slow.slice(), 64 << 10);
    }
}
