//! Hostile and broken peers: garbage, truncation, bad checksums, huge lengths, a
//! wrong version, epochs out of order, a mismatched machine. Whatever a peer sends,
//! neither side crashes, the primary never loses its guest, and the standby never
//! takes over on a protocol error nor lets a stranger touch its replica.
//!
//! - Against a real standby (`mirrorvm standby`), raw TCP connections send what a
//!   broken primary might, before a Hello and after a valid session started; after
//!   each, the standby must still be alive and answering, and must not have taken
//!   over (no `failover` line, no guest console file).
//! - Against a real primary (`mirrorvm run --peer`), a fake standby written here
//!   refuses it, sends garbage, never acknowledges, or stops reading; the primary
//!   must say once that it runs unprotected and why, and its guest must count on.
//! - Between a real primary and a real standby, a proxy corrupts one byte on the wire
//!   mid-session: the standby drops the session and keeps waiting, the primary goes
//!   on unprotected.
//!
//! Frames are built with `vmm::replication::protocol`'s writer (and, for what the
//! writer refuses to produce, by hand, with the header CRC recomputed so that only
//! the intended fault is present).

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use devices::store::{ExportExtent, RegionMeta};
use vmm::checkpoint::{encode_state, DiskManifest, MachineState, Manifest};
use vmm::config::DiskConfig;
use vmm::dirty::StagedPages;
use vmm::replication::fence::{Attempt, Witness};
use vmm::replication::protocol::{digest_chunk, CopyPlan, Digest, Holdings, ReplicaId};
use vmm::replication::protocol::{
    Body, DiskChunk, Frame, FrameError, FrameReader, FrameType, FrameWriter, Hello, HelloAck,
    RefuseReason, RegionChunk, Shutdown, Totals, WireStorage, HEADER_LEN, MAGIC, OLDEST_VERSION,
    VERSION,
};

/// Long enough for anything on a loaded two-core machine; a hang fails, not stalls.
const PATIENCE: Duration = Duration::from_secs(30);
/// The standby's disk in these tests.
const IMAGE_SIZE: u64 = 1 << 20;
/// Guest memory of every machine here.
const MEMORY: u64 = 64 << 20;
/// The primary's guest: a line every 20 ms, halting in between.
const COUNTER: &str = "counter interval_ms=20 idle=1";

/// The tests of this file start KVM processes and time heartbeats: one at a time.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------
// Frames

/// One frame as [`FrameWriter`] writes it.
fn frame(epoch: u64, generation: u64, body: &Body) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new(), generation);
    w.write(epoch, body).expect("encode a frame");
    w.into_inner()
}

/// A frame header with these fields and a correct header CRC.
fn header(
    version: u16,
    ty: u16,
    flags: u32,
    payload_len: u32,
    epoch: u64,
    payload_crc: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// A frame of generation 0 built by hand: any version, type and payload, with both
/// CRCs correct.
fn raw_frame(version: u16, ty: u16, epoch: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a test payload fits a u32");
    let mut f = header(version, ty, 0, len, epoch, crc32c::crc32c(payload));
    f.extend_from_slice(payload);
    f
}

/// Deterministic bytes that are no frame.
fn garbage(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.to_le_bytes()[0]
        })
        .collect()
}

/// A machine of `memory` bytes, one vCPU, these disks, and a CPU that asks nothing of
/// the standby's host.
fn manifest(memory: u64, disks: &[(&Path, u64)]) -> Manifest {
    Manifest {
        memory,
        cpus: 1,
        cmdline: "counter".into(),
        disks: disks
            .iter()
            .map(|(path, size)| DiskManifest {
                config: DiskConfig {
                    checkpoint: true,
                    ..DiskConfig::new(*path)
                },
                size: *size,
                journal_id: None,
                region_size: None,
            })
            .collect(),
        cpu: Default::default(),
    }
}

fn hello(manifest: Manifest) -> Body {
    Body::Hello(Hello {
        protocol_version: VERSION,
        manifest,
        storage: WireStorage::Replicated,
        lineage: 1,
    })
}

/// `n` pages at these addresses.
fn pages(addrs: &[u64]) -> StagedPages {
    StagedPages {
        addrs: addrs.to_vec(),
        data: vec![0xa5; addrs.len() * 4096],
    }
}

fn end(pages: u64, state_len: usize, full: bool) -> Body {
    Body::EndOfCheckpoint(Totals {
        pages,
        state_len: state_len as u64,
        console_bytes: 0,
        regions: 0,
        full,
    })
}

#[test]
fn forged_frames_differ_from_the_writers_only_where_meant() {
    // The hand-built frames below rely on this: same bytes as the writer's.
    let body = hello(manifest(MEMORY, &[]));
    let written = frame(3, 0, &body);
    let ty = FrameType::Hello.code();
    assert_eq!(
        raw_frame(VERSION, ty, 3, &written[HEADER_LEN..]),
        written,
        "a hand-built frame differs from the writer's"
    );
    // And a reader takes it back.
    let f = FrameReader::new(&written[..])
        .read_frame()
        .expect("read back")
        .expect("a frame");
    assert_eq!(f.body, body);
}

// ---------------------------------------------------------------------------------
// A real standby

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local address").port()
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 7 + 3) % 251).expect("below 251"))
        .collect()
}

/// `mirrorvm standby` with one disk (filled with a pattern) and its console in a file.
struct StandbyProc {
    run: Running,
    addr: String,
    image: PathBuf,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

impl StandbyProc {
    fn start() -> StandbyProc {
        let dir = tempdir();
        let image = dir.path().join("replica.img");
        std::fs::write(&image, pattern(IMAGE_SIZE)).expect("write the standby's image");
        let serial = dir.path().join("standby-console.txt");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut c = mirrorvm();
        // A long dead-after: these tests are about protocol errors, not silence.
        c.args(["standby", "--listen", &addr, "--dead-ms", "5000", "--disk"])
            .arg(format!("path={},checkpoint=on", image.display()))
            .arg("--serial")
            .arg(format!("file={}", serial.display()));
        let s = StandbyProc {
            run: Running::spawn(c),
            addr,
            image,
            serial,
            _dir: dir,
        };
        assert!(
            s.run
                .wait_stderr(PATIENCE, |l| l.contains("listening on"))
                .is_some(),
            "the standby did not start listening:\n{}",
            s.run.stderr_now()
        );
        s
    }

    fn connect(&self) -> TcpStream {
        let a: SocketAddr = self.addr.parse().expect("a socket address");
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    /// The machine the standby accepts: 64 MiB, its one disk at its size.
    fn good_manifest(&self) -> Manifest {
        manifest(MEMORY, &[(&self.image, IMAGE_SIZE)])
    }

    /// Waits for a stderr line holding every one of `needles`.
    fn line(&self, needles: &[&str]) -> String {
        self.run
            .wait_stderr(PATIENCE, |l| needles.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| {
                panic!(
                    "no standby stderr line with {needles:?}:\n{}",
                    self.run.stderr_now()
                )
            })
    }

    /// The standby runs, answers a new primary's Hello (here with a refusal: the
    /// machine has no disk), and has not taken over.
    fn assert_serving(&mut self, after: &str) {
        assert!(
            self.run.exited().is_none(),
            "after {after}: the standby exited:\n{}",
            self.run.stderr_now()
        );
        let mut s = self.connect();
        s.write_all(&frame(0, 0, &hello(manifest(MEMORY, &[]))))
            .expect("send a hello");
        match FrameReader::new(&s).read_frame() {
            Ok(Some(Frame {
                body:
                    Body::HelloAck(HelloAck::Refuse {
                        reason: RefuseReason::Machine,
                        ..
                    }),
                ..
            })) => {}
            other => panic!(
                "after {after}: the standby did not answer a Hello: {other:?}\n{}",
                self.run.stderr_now()
            ),
        }
        self.assert_not_taken_over(after);
    }

    fn assert_not_taken_over(&self, after: &str) {
        let err = self.run.stderr_now();
        for bad in ["failover", "taking over", "panicked"] {
            assert!(
                !err.contains(bad),
                "after {after}: the standby's stderr says '{bad}':\n{err}"
            );
        }
        assert!(
            !self.serial.exists(),
            "after {after}: the standby ran a guest (its console file exists)"
        );
    }

    /// The disk image still holds its pattern and the standby never started a copy
    /// into it (no incomplete-copy mark, no journal).
    fn assert_image_untouched(&self) {
        let now = std::fs::read(&self.image).expect("read the standby's image");
        assert!(
            now == pattern(IMAGE_SIZE),
            "the standby's disk image was changed"
        );
        assert!(
            !vmm::disk::incomplete_marker(&self.image).exists(),
            "the standby marked its disk as an incomplete copy"
        );
        assert!(
            !devices::store::journal_path(&self.image).exists(),
            "the standby created a journal for its disk"
        );
    }

    /// Sends `bytes` on a new connection (then, with `close`, ends its sending side):
    /// the standby must say it ignored the connection, naming `why`, say nothing
    /// back, close it, and go on serving.
    fn poke(&mut self, what: &str, bytes: &[u8], close: bool, why: &str) {
        let mut s = self.connect();
        let peer = s.local_addr().expect("local address").to_string();
        // The standby may close before it read everything: a failed write is fine.
        let _ = s.write_all(bytes);
        if close {
            let _ = s.shutdown(NetShutdown::Write);
        }
        self.line(&["ignored a connection from", &peer, why]);
        assert_closed_silently(&mut s, what);
        self.assert_serving(what);
    }

    /// Sends `hello_frame` on a new connection: the standby must refuse it for
    /// `reason` with a detail holding `detail_has`, log that detail on one line, close
    /// the connection and go on serving.
    fn refused(&mut self, what: &str, hello_frame: &[u8], reason: RefuseReason, detail_has: &str) {
        let mut s = self.connect();
        let peer = s.local_addr().expect("local address").to_string();
        s.write_all(hello_frame).expect("send the hello");
        // The answer comes in the Hello's own version: a primary of that version reads
        // no other.
        let version = u16::from_le_bytes([hello_frame[4], hello_frame[5]]);
        let mut r = FrameReader::new(&s);
        r.pin(version);
        let detail = match r.read_frame() {
            Ok(Some(Frame {
                body: Body::HelloAck(HelloAck::Refuse { reason: r, detail }),
                ..
            })) if r == reason => detail,
            other => panic!(
                "{what}: expected a refusal for {reason:?}, got {other:?}\n{}",
                self.run.stderr_now()
            ),
        };
        assert!(
            detail.contains(detail_has),
            "{what}: the refusal says '{detail}', not '{detail_has}'"
        );
        assert_closed_silently(&mut s, what);
        let line = self.line(&["refused the primary at", &peer]);
        assert_eq!(
            line,
            format!("mirrorvm: standby: refused the primary at {peer}: {detail}"),
            "{what}: the standby's line"
        );
        self.assert_serving(what);
    }

    /// A primary whose Hello was accepted, whose liveness connection heartbeats,
    /// and whose initial copy (epoch 5) began with its plan: from zeros.
    fn session(&self, generation: u64) -> FakePrimary {
        let mut p = self.session_unplanned(generation);
        p.send(5, &Body::CopyPlan(CopyPlan { memory: None }));
        p
    }

    /// As [`session`](Self::session), but no plan sent yet.
    fn session_unplanned(&self, generation: u64) -> FakePrimary {
        let mut data = self.connect();
        let peer = data.local_addr().expect("local address").to_string();
        data.write_all(&frame(0, generation, &hello(self.good_manifest())))
            .expect("send the hello");
        match FrameReader::new(&data).read_frame() {
            Ok(Some(Frame {
                body: Body::HelloAck(HelloAck::Accept),
                ..
            })) => {}
            other => panic!(
                "the standby did not accept a good Hello: {other:?}\n{}",
                self.run.stderr_now()
            ),
        }
        // What the standby holds: one digest for its one disk, no replica yet.
        match FrameReader::new(&data).read_frame() {
            Ok(Some(Frame {
                body: Body::Holdings(h),
                ..
            })) => {
                assert_eq!(h.disks.len(), 1, "one digest per disk");
                assert_eq!(h.disks[0].chunk, digest_chunk(IMAGE_SIZE));
            }
            other => panic!(
                "the standby sent no Holdings after accepting: {other:?}\n{}",
                self.run.stderr_now()
            ),
        }
        // As a primary does: the liveness connection right after the Holdings.
        let beats = Heartbeats::start(self.connect(), generation);
        FakePrimary {
            data,
            peer,
            generation,
            beats,
        }
    }
}

/// The peer closes `s` without sending anything.
fn assert_closed_silently(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what}: the standby answered with {n} bytes: {:02x?}",
            &buf[..n]
        ),
        Err(e) => panic!("{what}: the standby kept the connection open: {e}"),
    }
}

/// Heartbeat frames every 10 ms on a liveness connection, from a thread, until
/// stopped or the peer closes it; what the peer sends on it is read and dropped.
struct Heartbeats {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeats {
    fn start(live: TcpStream, generation: u64) -> Heartbeats {
        let stop = Arc::new(AtomicBool::new(false));
        let mut drain = live.try_clone().expect("clone the liveness connection");
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while matches!(drain.read(&mut b), Ok(n) if n > 0) {}
        });
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut w = FrameWriter::new(live, generation);
            while !s.load(Ordering::Relaxed) {
                if w.write(0, &Body::Heartbeat).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Heartbeats {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test's side of a session with a real standby.
struct FakePrimary {
    data: TcpStream,
    peer: String,
    generation: u64,
    beats: Heartbeats,
}

impl FakePrimary {
    fn send(&mut self, epoch: u64, body: &Body) {
        let f = frame(epoch, self.generation, body);
        self.send_raw(&f);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        // The standby may already have dropped the session: a failed write is fine.
        let _ = self.data.write_all(bytes);
    }

    /// The standby drops the session, saying `why`, without acknowledging anything;
    /// it keeps serving and has not taken over.
    fn expect_dropped(self, standby: &mut StandbyProc, what: &str, why: &str) {
        // Nothing comes back (no Ack above all): the connection just closes.
        match FrameReader::new(BufReader::new(&self.data)).read_frame() {
            Ok(None) => {}
            Ok(Some(f)) => panic!("{what}: the standby sent {f:?} instead of dropping"),
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "{what}: the standby kept the session open:\n{}",
                    standby.run.stderr_now()
                )
            }
            // A reset is a close too.
            Err(_) => {}
        }
        let line = standby.line(&["dropped the primary at", &self.peer]);
        assert!(
            line.contains(why) && line.ends_with("; waiting for a primary"),
            "{what}: expected '{why}' in the standby's line: {line}"
        );
        drop(self.beats);
        standby.assert_serving(what);
    }
}

#[test]
fn a_standby_ignores_malformed_connections_and_keeps_its_disk() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let mut sb = StandbyProc::start();
    let good = frame(0, 0, &hello(sb.good_manifest()));
    let hello_ty = FrameType::Hello.code();

    sb.poke(
        "random garbage",
        &garbage(4096, 0x9e37_79b9_7f4a_7c15),
        true,
        "not a mirrorvm replication frame",
    );

    // A header announcing 4 GiB, nothing after it, the connection left open: the
    // standby refuses on the header alone.
    sb.poke(
        "a huge payload length",
        &header(VERSION, hello_ty, 0, u32::MAX, 0, 0),
        false,
        "Hello payload of 4294967295 bytes exceeds the bound of 65536 bytes",
    );
    sb.poke(
        "a huge state frame first",
        &header(VERSION, FrameType::State.code(), 0, u32::MAX, 1, 0),
        false,
        "State payload of 4294967295 bytes exceeds the bound of 16777216 bytes",
    );

    let mut bad = good.clone();
    bad[16] ^= 1; // the epoch: the header CRC no longer matches
    sb.poke(
        "a bad header CRC",
        &bad,
        true,
        "frame header checksum mismatch",
    );

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40; // the payload's last byte
    sb.poke(
        "a bad payload CRC",
        &bad,
        true,
        "Hello payload checksum mismatch",
    );

    sb.poke(
        "an unknown frame type",
        &raw_frame(VERSION, 99, 0, &[]),
        true,
        "unknown frame type 99",
    );
    sb.poke(
        "unknown flags",
        &header(VERSION, hello_ty, 4, 0, 0, crc32c::crc32c(&[])),
        true,
        "Hello frame with unknown flags 0x4",
    );
    sb.poke(
        "a Hello payload that does not decode",
        &raw_frame(VERSION, hello_ty, 0, &[0xff; 32]),
        true,
        "malformed Hello payload",
    );

    sb.poke(
        "a heartbeat instead of a Hello",
        &frame(0, 0, &Body::Heartbeat),
        true,
        "it began with a Heartbeat frame, not a Hello",
    );
    sb.poke(
        "a checkpoint's end instead of a Hello",
        &frame(4, 0, &end(0, 0, true)),
        true,
        "it began with a EndOfCheckpoint frame, not a Hello",
    );

    sb.poke(
        "a truncated header then close",
        &good[..HEADER_LEN / 2],
        true,
        "the stream ended 20 bytes into a 40-byte header",
    );
    let half = good.len() / 2;
    sb.poke(
        "a truncated Hello then close",
        &good[..half],
        true,
        &format!(
            "the stream ended {} bytes into a {}-byte payload",
            half - HEADER_LEN,
            good.len() - HEADER_LEN
        ),
    );

    // A connection that closes at once says nothing and is forgotten.
    drop(sb.connect());
    sb.assert_serving("a connection closed at once");

    sb.assert_image_untouched();
}

#[test]
fn a_standby_refuses_a_foreign_or_mismatched_primary_with_the_right_reason() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let mut sb = StandbyProc::start();
    let good = sb.good_manifest();

    // Another protocol version in the header: the standby cannot read the rest, but
    // says which version it speaks.
    let payload = frame(0, 0, &hello(good.clone()))[HEADER_LEN..].to_vec();
    let mut s = sb.connect();
    let peer = s.local_addr().expect("local address").to_string();
    s.write_all(&raw_frame(
        VERSION + 1,
        FrameType::Hello.code(),
        0,
        &payload,
    ))
    .expect("send a hello of a newer version");
    match FrameReader::new(&s).read_frame() {
        Ok(Some(Frame {
            body:
                Body::HelloAck(HelloAck::Refuse {
                    reason: RefuseReason::Version,
                    detail,
                }),
            ..
        })) => assert!(
            detail.contains(&format!("protocol versions {OLDEST_VERSION} to {VERSION}")),
            "the version refusal says: {detail}"
        ),
        other => panic!(
            "a newer version's header got {other:?}\n{}",
            sb.run.stderr_now()
        ),
    }
    assert_closed_silently(&mut s, "a newer version's header");
    sb.line(&[
        "ignored a connection from",
        &peer,
        &format!(
            "protocol version {}; this mirrorvm speaks versions {OLDEST_VERSION} to {VERSION}",
            VERSION + 1
        ),
    ]);
    sb.assert_serving("a newer version's header");

    // A header of this version whose Hello claims another version.
    let mut h = Hello {
        protocol_version: 7,
        manifest: good.clone(),
        storage: WireStorage::Replicated,
        lineage: 1,
    };
    sb.refused(
        "a Hello of version 7",
        &frame(0, 0, &Body::Hello(h.clone())),
        RefuseReason::Version,
        &format!("a Hello of protocol version 7 in a version {VERSION} frame; this standby speaks versions {OLDEST_VERSION} to {VERSION}"),
    );
    // An older version's header (which this standby reads) whose Hello claims the
    // newer version: the two must agree.
    h.protocol_version = VERSION;
    let mut w = FrameWriter::new(Vec::new(), 0);
    w.set_version(OLDEST_VERSION);
    w.write(0, &Body::Hello(h.clone())).expect("encode a hello");
    sb.refused(
        "a version 4 Hello in a version 3 frame",
        &w.into_inner(),
        RefuseReason::Version,
        &format!("a Hello of protocol version {VERSION} in a version {OLDEST_VERSION} frame"),
    );

    h.storage = WireStorage::Shared;
    sb.refused(
        "shared storage",
        &frame(0, 0, &Body::Hello(h.clone())),
        RefuseReason::Storage,
        "replicated storage",
    );
    h.storage = WireStorage::Replicated;

    sb.refused(
        "no disk",
        &frame(0, 0, &hello(manifest(MEMORY, &[]))),
        RefuseReason::Machine,
        "the primary has 0 disk(s), this standby 1",
    );
    let other = sb.image.with_file_name("other.img");
    sb.refused(
        "two disks",
        &frame(
            0,
            0,
            &hello(manifest(
                MEMORY,
                &[(&sb.image, IMAGE_SIZE), (&other, IMAGE_SIZE)],
            )),
        ),
        RefuseReason::Machine,
        "the primary has 2 disk(s), this standby 1",
    );
    sb.refused(
        "a disk of another size",
        &frame(
            0,
            0,
            &hello(manifest(MEMORY, &[(&sb.image, 2 * IMAGE_SIZE)])),
        ),
        RefuseReason::Machine,
        &format!(
            "disk 0 is {} bytes on the primary and {IMAGE_SIZE} bytes here",
            2 * IMAGE_SIZE
        ),
    );
    sb.refused(
        "4 TiB of memory",
        &frame(0, 0, &hello(manifest(4 << 40, &[(&sb.image, IMAGE_SIZE)]))),
        RefuseReason::Machine,
        "cannot hold 4194304 MiB of guest memory",
    );
    sb.refused(
        "memory that is not whole pages",
        &frame(
            0,
            0,
            &hello(manifest(MEMORY + 1, &[(&sb.image, IMAGE_SIZE)])),
        ),
        RefuseReason::Machine,
        "cannot hold 64 MiB of guest memory",
    );
    let mut m = good.clone();
    m.cpu.features = vec![(7, 0, 'd', u32::MAX)];
    sb.refused(
        "a CPU this host is not",
        &frame(0, 0, &hello(m)),
        RefuseReason::Machine,
        "the guest uses CPU features this host lacks",
    );

    sb.assert_image_untouched();
}

#[test]
fn a_primary_that_breaks_the_protocol_mid_session_is_dropped_never_failed_over() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let mut sb = StandbyProc::start();
    let base = |p: &mut FakePrimary| p.send(5, &Body::Base(pages(&[0x1000])));
    let state = b"not a machine state".to_vec();

    let mut p = sb.session(0);
    base(&mut p);
    p.send(9, &Body::Pages(pages(&[0x2000])));
    p.expect_dropped(
        &mut sb,
        "a checkpoint out of order",
        "checkpoint 9 does not follow epoch 5; expected 6",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send(6, &Body::Pages(pages(&[0x2000])));
    p.send(7, &Body::State(state.clone()));
    p.expect_dropped(
        &mut sb,
        "a frame of another epoch inside a checkpoint",
        "a frame of epoch 7 inside checkpoint 6",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send(4, &Body::Base(pages(&[0x2000])));
    p.expect_dropped(
        &mut sb,
        "a base copy going back",
        "base copy of epoch 4 after epoch 5",
    );

    let mut p = sb.session(7);
    base(&mut p);
    let stale = frame(6, 3, &Body::Pages(pages(&[0x2000])));
    p.send_raw(&stale);
    p.expect_dropped(
        &mut sb,
        "an older fence generation",
        "frame of fence generation 3, older than generation 7",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send(
        6,
        &Body::Region(RegionChunk {
            disk: 3,
            storage: WireStorage::Replicated,
            meta: RegionMeta {
                epoch: 6,
                parent_epoch: 5,
                slot: 0,
                generation: 1,
                records: 1,
                used_bytes: 512,
                sectors: 1,
                acknowledged: false,
            },
            extents: vec![ExportExtent {
                sector: 0,
                data: vec![1; 512],
            }],
        }),
    );
    p.expect_dropped(
        &mut sb,
        "a region of a disk that does not exist",
        "region for disk 3; the machine has 1",
    );

    let mut p = sb.session(0);
    p.send(
        5,
        &Body::DiskBase(DiskChunk {
            disk: 0,
            offset: IMAGE_SIZE - 512,
            data: vec![1; 1024],
        }),
    );
    p.expect_dropped(
        &mut sb,
        "a disk chunk past the disk's end",
        &format!(
            "a chunk at byte {} of disk 0 runs past its end",
            IMAGE_SIZE - 512
        ),
    );

    let mut p = sb.session_unplanned(0);
    p.send(5, &Body::Base(pages(&[0x1000])));
    p.expect_dropped(
        &mut sb,
        "an initial copy without its plan",
        "an initial copy without its plan (CopyPlan) first",
    );

    let mut p = sb.session_unplanned(0);
    p.send(
        5,
        &Body::CopyPlan(CopyPlan {
            memory: Some(ReplicaId {
                lineage: 9,
                epoch: 4,
            }),
        }),
    );
    p.expect_dropped(
        &mut sb,
        "a copy built on a replica the standby does not hold",
        "the copy builds on a replica of checkpoint 4 of lineage 0000000000000009, which this standby does not hold",
    );

    let mut p = sb.session(0);
    p.send(5, &Body::Base(pages(&[1 << 40])));
    p.expect_dropped(
        &mut sb,
        "a base page outside memory",
        "a bad base page: page 0x10000000000 is outside guest memory",
    );

    // A whole first checkpoint, totals right, whose state does not decode.
    let mut p = sb.session(0);
    base(&mut p);
    p.send(6, &Body::State(state.clone()));
    p.send(6, &end(0, state.len(), true));
    p.expect_dropped(
        &mut sb,
        "a state that does not decode",
        "checkpoint 6: cannot decode the machine state",
    );

    // One that decodes, of a machine with no vCPU.
    let empty = encode_state(&MachineState {
        vcpus: Vec::new(),
        vm: Default::default(),
        devices: Vec::new(),
    })
    .expect("encode a state");
    let mut p = sb.session(0);
    base(&mut p);
    p.send(6, &Body::State(empty.clone()));
    p.send(6, &end(0, empty.len(), true));
    p.expect_dropped(
        &mut sb,
        "a state of another machine",
        "checkpoint 6 has 0 vCPU states for 1 vCPUs",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send(6, &Body::State(state.clone()));
    p.send(6, &end(3, state.len(), true));
    p.expect_dropped(
        &mut sb,
        "totals that lie",
        "checkpoint 6: pages announced 3, received 0",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send(6, &Body::Pages(pages(&[0x2000])));
    p.send(
        6,
        &Body::Shutdown(Shutdown::Finished {
            exit_status: 0,
            how: "a lie".into(),
        }),
    );
    p.expect_dropped(
        &mut sb,
        "a shutdown inside a checkpoint",
        "unexpected Shutdown frame inside checkpoint 6",
    );

    let mut p = sb.session(0);
    base(&mut p);
    let again = hello(sb.good_manifest());
    p.send(0, &again);
    p.expect_dropped(
        &mut sb,
        "a second Hello",
        "unexpected Hello frame between checkpoints",
    );

    let mut p = sb.session(0);
    base(&mut p);
    let mut bad = frame(6, 0, &Body::Pages(pages(&[0x2000])));
    let at = bad.len() - 100;
    bad[at] ^= 0x10;
    p.send_raw(&bad);
    p.expect_dropped(
        &mut sb,
        "a corrupt page frame",
        "a malformed frame: Pages payload checksum mismatch",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send_raw(&garbage(512, 7));
    p.expect_dropped(
        &mut sb,
        "garbage mid-session",
        "a malformed frame: not a mirrorvm replication frame",
    );

    let mut p = sb.session(0);
    base(&mut p);
    p.send_raw(&header(VERSION, FrameType::Pages.code(), 0, u32::MAX, 6, 0));
    p.expect_dropped(
        &mut sb,
        "a huge length mid-session",
        "Pages payload of 4294967295 bytes exceeds the bound",
    );

    // Every session began a copy into the disk and none completed it: the disk stays
    // marked, so nothing ever takes it for a replica.
    assert!(
        vmm::disk::incomplete_marker(&sb.image).exists(),
        "the standby's disk lost its incomplete-copy mark"
    );
}

// ---------------------------------------------------------------------------------
// A real primary, a fake standby

/// A listener standing in for a standby.
struct FakeStandby {
    listener: TcpListener,
    addr: String,
    /// The sizes of the disks of the last Hello, for the Holdings.
    disks: Mutex<Vec<u64>>,
}

impl FakeStandby {
    fn new() -> FakeStandby {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local address").to_string();
        FakeStandby {
            listener,
            addr,
            disks: Mutex::new(Vec::new()),
        }
    }

    /// The next connection, within `PATIENCE`.
    fn accept(&self, what: &str, primary: &Running) -> TcpStream {
        let end = Instant::now() + PATIENCE;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
                    s.set_nodelay(true).expect("nodelay");
                    return s;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < end,
                        "the primary opened no {what} connection:\n{}",
                        primary.stderr_now()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Accepts the primary's data connection and reads its Hello, which must
    /// describe the machine it runs.
    fn greet(&self, primary: &Running) -> TcpStream {
        let data = self.accept("data", primary);
        let h = match FrameReader::new(&data).read_frame() {
            Ok(Some(Frame {
                body: Body::Hello(h),
                ..
            })) => h,
            other => panic!("the primary began with {other:?}"),
        };
        assert_eq!(h.protocol_version, VERSION);
        assert_eq!(h.storage, WireStorage::Replicated);
        *self.disks.lock().unwrap_or_else(|e| e.into_inner()) =
            h.manifest.disks.iter().map(|d| d.size).collect();
        assert_eq!(h.manifest.memory, MEMORY);
        assert_eq!(h.manifest.cpus, 1);
        assert!(
            !h.manifest.cpu.features.is_empty(),
            "the Hello does not carry the guest's CPU"
        );
        data
    }

    /// Accepts the Hello (then sends `then` on the data connection) and heartbeats on
    /// the liveness connection the primary opens next.
    fn accept_session(&self, data: &mut TcpStream, then: &[u8], primary: &Running) -> Heartbeats {
        let mut out = frame(0, 0, &Body::HelloAck(HelloAck::Accept));
        // Holdings as a zeroed standby's: a digest of zero chunks for every disk.
        let disks = self
            .disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|&size| {
                let chunk = digest_chunk(size);
                let zero = vmm::replication::digest::hash(&vec![
                    0u8;
                    usize::try_from(chunk)
                        .expect("a chunk fits memory")
                ]);
                Digest {
                    chunk,
                    hashes: (0..size.div_ceil(chunk))
                        .map(|i| {
                            if (i + 1) * chunk <= size {
                                zero
                            } else {
                                vmm::replication::digest::hash(&vec![
                                    0u8;
                                    usize::try_from(
                                        size - i * chunk
                                    )
                                    .expect("fits")
                                ])
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        out.extend_from_slice(&frame(
            0,
            0,
            &Body::Holdings(Holdings {
                replica: None,
                disks,
                listen: None,
            }),
        ));
        out.extend_from_slice(then);
        data.write_all(&out).expect("send the HelloAck");
        Heartbeats::start(self.accept("liveness", primary), 0)
    }
}

/// What the fake standby saw on the data connection.
enum Seen {
    Frame(FrameType, u64),
    Closed,
}

/// Reads every frame the primary sends on `data`, from a thread.
fn watch_frames(data: &TcpStream) -> mpsc::Receiver<Seen> {
    let data = data.try_clone().expect("clone the data connection");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = FrameReader::new(BufReader::with_capacity(1 << 20, data));
        while let Ok(Some(f)) = r.read_frame() {
            if tx.send(Seen::Frame(f.body.frame_type(), f.epoch)).is_err() {
                return;
            }
        }
        let _ = tx.send(Seen::Closed);
    });
    rx
}

/// Waits for the end of a checkpoint on `seen`: its epoch. Everything seen before it
/// is returned too.
fn first_checkpoint(
    seen: &mpsc::Receiver<Seen>,
    primary: &Running,
) -> (u64, Vec<(FrameType, u64)>) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut before = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match seen.recv_timeout(left) {
            Ok(Seen::Frame(FrameType::EndOfCheckpoint, e)) => return (e, before),
            Ok(Seen::Frame(ty, e)) => before.push((ty, e)),
            Ok(Seen::Closed) | Err(_) => panic!(
                "no checkpoint arrived from the primary:\n{}",
                primary.stderr_now()
            ),
        }
    }
}

/// `mirrorvm run` of the counter guest mirroring to `peer`, with a long dead-after
/// (silence is not what these tests are about) and a lag deadline of `max_lag_ms`;
/// with `disk`, one disk of [`IMAGE_SIZE`] bytes.
fn start_primary(
    dir: &Path,
    peer: &str,
    max_lag_ms: u64,
    witness: Option<&Path>,
    disk: Option<u64>,
) -> (Running, PathBuf) {
    let serial = dir.join("primary-console.txt");
    let mut c = mirrorvm();
    c.args([
        "run",
        "--cmdline",
        COUNTER,
        "--memory",
        "64M",
        "--peer",
        peer,
        "--dead-ms",
        "5000",
        "--max-lag-ms",
        &max_lag_ms.to_string(),
        "--serial",
    ])
    .arg(format!("file={}", serial.display()));
    if let Some(w) = witness {
        c.arg("--witness").arg(w);
    }
    if let Some(size) = disk {
        let image = dir.join("primary.img");
        std::fs::write(&image, pattern(size)).expect("write the primary's image");
        c.arg("--disk")
            .arg(format!("path={},checkpoint=on", image.display()));
    }
    (Running::spawn(c), serial)
}

fn shown(serial: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    // Only whole lines: the VMM may be writing the last one right now ("counter 29"
    // of "counter 297" would read as a skip).
    let whole = text.rfind('\n').map_or("", |i| &text[..i]);
    counters(whole.lines())
}

/// Waits for the primary's one line saying it runs unprotected; returns it.
fn unprotected_line(primary: &Running, timeout: Duration) -> String {
    primary
        .wait_stderr(timeout, |l| l.contains("running unprotected"))
        .unwrap_or_else(|| {
            panic!(
                "the primary never said it runs unprotected:\n{}",
                primary.stderr_now()
            )
        })
}

/// The guest runs on after the loss: the console grows by at least ten more lines,
/// the count has no gap and no repeat from 1, and the primary is still running. Then
/// it stops in order on SIGTERM, and said only once that it runs unprotected.
fn assert_guest_runs_on(mut primary: Running, serial: &Path) -> String {
    let at_loss = shown(serial).len();
    let end = Instant::now() + PATIENCE;
    while shown(serial).len() < at_loss + 10 {
        assert!(
            Instant::now() < end,
            "the guest stopped counting after the standby was lost ({at_loss} lines):\n{}",
            primary.stderr_now()
        );
        assert!(
            primary.exited().is_none(),
            "the primary exited after losing its standby:\n{}",
            primary.stderr_now()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let count = shown(serial);
    let expected: Vec<u64> = (1..=count.len() as u64).collect();
    assert_eq!(count, expected, "the console skipped or repeated a line");
    primary.signal(libc::SIGTERM);
    assert!(
        primary.wait_exit(PATIENCE).is_some(),
        "the primary did not stop on SIGTERM:\n{}",
        primary.stderr_now()
    );
    let err = primary.stderr();
    assert!(!err.contains("panicked"), "the primary panicked:\n{err}");
    assert_eq!(
        err.matches("running unprotected").count(),
        1,
        "the primary should say once that it runs unprotected:\n{err}"
    );
    err
}

/// The witness record after the primary exited: "unprotected since" `since`.
fn assert_witness_records(witness: &Path, since: u64) {
    match Witness::new(witness).try_acquire() {
        Ok(Attempt::Acquired(f)) => assert_eq!(
            f.unprotected_since(),
            Some(since),
            "the witness does not record the primary unprotected since {since}"
        ),
        other => panic!("the witness cannot be taken after the primary exited: {other:?}"),
    }
}

#[test]
fn a_primary_refused_by_its_standby_runs_its_guest_unprotected() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let fake = FakeStandby::new();
    let (primary, serial) = start_primary(dir.path(), &fake.addr, 500, None, None);
    let mut data = fake.greet(&primary);
    let detail = "the hostile-peer test refuses every primary";
    data.write_all(&frame(
        0,
        0,
        &Body::HelloAck(HelloAck::Refuse {
            reason: RefuseReason::Machine,
            detail: detail.into(),
        }),
    ))
    .expect("send the refusal");
    drop(data);
    let line = unprotected_line(&primary, PATIENCE);
    assert!(
        line.contains("refused this primary (Machine)") && line.contains(detail),
        "the primary's line does not give the refusal: {line}"
    );
    assert!(
        line.ends_with("running unprotected since checkpoint none"),
        "{line}"
    );
    assert_guest_runs_on(primary, &serial);
}

#[test]
fn a_standby_sending_garbage_costs_protection_not_the_guest() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let witness = dir.path().join("witness");
    let fake = FakeStandby::new();
    let (primary, serial) = start_primary(dir.path(), &fake.addr, 10_000, Some(&witness), None);
    let mut data = fake.greet(&primary);
    let beats = fake.accept_session(&mut data, &garbage(300, 42), &primary);
    let seen = watch_frames(&data);
    let (first, _) = first_checkpoint(&seen, &primary);
    let line = unprotected_line(&primary, PATIENCE);
    assert!(
        line.contains("not a mirrorvm replication frame"),
        "the primary's line does not say what the standby sent: {line}"
    );
    assert!(
        matches!(Witness::new(&witness).try_acquire(), Ok(Attempt::Busy(_))),
        "the running primary does not hold the witness"
    );
    assert_guest_runs_on(primary, &serial);
    drop(beats);
    // Checkpoint `first` went out, unacknowledged: a replica must be newer than it.
    assert_witness_records(&witness, first + 1);
}

#[test]
fn a_standby_that_never_acknowledges_is_lost_at_the_lag_deadline_and_output_flows() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let witness = dir.path().join("witness");
    let fake = FakeStandby::new();
    let (primary, serial) = start_primary(dir.path(), &fake.addr, 500, Some(&witness), None);
    let mut data = fake.greet(&primary);
    let beats = fake.accept_session(&mut data, &[], &primary);
    let seen = watch_frames(&data);
    let (first, before) = first_checkpoint(&seen, &primary);
    assert!(
        before.iter().any(|(ty, _)| *ty == FrameType::Base),
        "the first checkpoint came without an initial copy"
    );
    // Output commit: nothing the guest printed is shown before an acknowledgement.
    // (Checked only while the primary has not yet given up: on a very slow machine
    // the deadline may already have passed.)
    let before_loss = shown(&serial);
    if !primary.stderr_now().contains("running unprotected") {
        assert!(
            before_loss.is_empty(),
            "the primary showed output no standby acknowledged: {before_loss:?}"
        );
    }
    // The fake acknowledges the checkpoint that completes the initial copy (its
    // deadline is the copy's, 10 s), then no other: the next is judged by the lag
    // deadline.
    data.write_all(&frame(first, 0, &Body::Ack))
        .expect("acknowledge the first checkpoint");
    let (unacked, _) = first_checkpoint(&seen, &primary);
    let line = unprotected_line(&primary, PATIENCE);
    let waited: u64 = line
        .split("no acknowledgement for ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("the primary's line does not give the lag: {line}"));
    assert!(
        waited >= 500 && line.contains("the lag deadline is 500 ms"),
        "the lag deadline was not what fired: {line}"
    );
    // The primary dropped the standby and sent nothing after the unacknowledged
    // checkpoint: one checkpoint in flight at most.
    let end = Instant::now() + PATIENCE;
    loop {
        match seen.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(Seen::Closed) => break,
            Ok(Seen::Frame(ty, e)) => assert!(
                e <= unacked,
                "the primary sent a {ty} frame of epoch {e} after checkpoint {unacked}, unacknowledged"
            ),
            Err(_) => panic!("the primary kept the data connection open after the loss"),
        }
    }
    // The held output is released: the console fills.
    let end = Instant::now() + PATIENCE;
    while shown(&serial).is_empty() {
        assert!(
            Instant::now() < end,
            "the held output was not released after the loss"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_guest_runs_on(primary, &serial);
    drop(beats);
    assert_witness_records(&witness, unacked + 1);
}

#[test]
fn a_standby_that_stops_reading_during_the_initial_copy_is_lost() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let fake = FakeStandby::new();
    // A 32 MiB disk of non-zero bytes: the copy skips zero pages and chunks, and the
    // idle guest's memory is mostly zeros.
    let (primary, serial) = start_primary(dir.path(), &fake.addr, 500, None, Some(32 << 20));
    let mut data = fake.greet(&primary);
    // Heartbeats flow, but nothing is read from the data connection: 32 MiB of disk
    // copy cannot fit the socket buffers, so the primary's sender blocks. The primary
    // gives up after 10 s (the copy's floor, above the 500 ms lag deadline).
    let beats = fake.accept_session(&mut data, &[], &primary);
    let line = unprotected_line(&primary, PATIENCE);
    assert!(
        line.contains("the standby took no data of the initial copy for")
            && line.contains("(the deadline is 10000 ms)"),
        "the primary's line does not say the standby stalled: {line}"
    );
    assert_guest_runs_on(primary, &serial);
    drop(beats);
    drop(data);
}

// ---------------------------------------------------------------------------------
// A real primary, a real standby, a corrupting link between them

/// Copies whole frames from `from` to `to`; counts Acks in `acks`; once `acks`
/// reaches `corrupt_after` (if given), flips one payload byte of the next frame that
/// has a payload, once. Closes both when either side ends.
fn relay_frames(
    mut from: TcpStream,
    mut to: TcpStream,
    acks: Arc<AtomicU64>,
    corrupt_after: Option<u64>,
    corrupted: Arc<AtomicBool>,
) {
    let mut head = [0u8; HEADER_LEN];
    loop {
        if from.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        let ty = u16::from_le_bytes([head[6], head[7]]);
        let mut payload = vec![0u8; usize::try_from(len).expect("usize")];
        if from.read_exact(&mut payload).is_err() {
            break;
        }
        if ty == FrameType::Ack.code() {
            acks.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(n) = corrupt_after {
            if !payload.is_empty()
                && acks.load(Ordering::SeqCst) >= n
                && !corrupted.swap(true, Ordering::SeqCst)
            {
                let mid = payload.len() / 2;
                payload[mid] ^= 0x01;
            }
        }
        if to.write_all(&head).is_err() || to.write_all(&payload).is_err() {
            break;
        }
    }
    let _ = from.shutdown(NetShutdown::Both);
    let _ = to.shutdown(NetShutdown::Both);
}

/// Copies bytes from `from` to `to` until either ends, then closes both.
fn relay_bytes(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = from.shutdown(NetShutdown::Both);
    let _ = to.shutdown(NetShutdown::Both);
}

#[test]
fn a_corrupted_frame_mid_session_drops_the_session_on_the_standby_and_protection_on_the_primary() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let mut sb = StandbyProc::start();
    let proxy = FakeStandby::new();
    // A lag deadline far away: this test is about the corruption alone.
    let (primary, serial) = start_primary(dir.path(), &proxy.addr, 10_000, None, Some(IMAGE_SIZE));

    // The data connection, through a relay that corrupts one frame after the
    // standby acknowledged three checkpoints.
    let p_data = proxy.accept("data", &primary);
    let s_data = sb.connect();
    s_data.set_read_timeout(None).expect("no read timeout");
    p_data.set_read_timeout(None).expect("no read timeout");
    let acks = Arc::new(AtomicU64::new(0));
    let corrupted = Arc::new(AtomicBool::new(false));
    {
        let (f, t) = (
            p_data.try_clone().expect("clone"),
            s_data.try_clone().expect("clone"),
        );
        let (a, c) = (acks.clone(), corrupted.clone());
        std::thread::spawn(move || relay_frames(f, t, a, Some(3), c));
        let (f, t) = (s_data, p_data);
        let (a, c) = (acks.clone(), corrupted.clone());
        std::thread::spawn(move || relay_frames(f, t, a, None, c));
    }
    // The liveness connection, untouched.
    let p_live = proxy.accept("liveness", &primary);
    let s_live = sb.connect();
    for s in [&p_live, &s_live] {
        s.set_read_timeout(None).expect("no read timeout");
    }
    {
        let (f, t) = (
            p_live.try_clone().expect("clone"),
            s_live.try_clone().expect("clone"),
        );
        std::thread::spawn(move || relay_bytes(f, t));
        std::thread::spawn(move || relay_bytes(s_live, p_live));
    }

    let line = sb
        .run
        .wait_stderr(PATIENCE, |l| {
            l.contains("dropped the primary at") && l.contains("payload checksum mismatch")
        })
        .unwrap_or_else(|| {
            panic!(
                "the standby did not drop the session:\n{}\n--- the primary ---\n{}",
                sb.run.stderr_now(),
                primary.stderr_now()
            )
        });
    assert!(
        corrupted.load(Ordering::SeqCst),
        "the standby dropped the session before the corruption: {line}"
    );
    assert!(
        acks.load(Ordering::SeqCst) >= 3,
        "the session did not get as far as three acknowledgements"
    );
    let err = sb.run.stderr_now();
    assert!(
        err.contains("initial copy complete at checkpoint"),
        "the standby never held a replica, so not taking over proves nothing:\n{err}"
    );
    sb.assert_serving("a corrupted frame mid-session");

    let line = unprotected_line(&primary, PATIENCE);
    assert!(
        line.contains("the standby at") && line.contains("is lost"),
        "the primary's line does not say it lost the standby: {line}"
    );
    assert_guest_runs_on(primary, &serial);
    // Still no takeover, now that the primary is gone too.
    sb.assert_serving("the primary stopped");
}

/// A standby whose host stalls (here: SIGSTOP) past the primary's lag deadline is
/// given up by the primary, which runs on unprotected. When the standby wakes, it must
/// not resume a second copy of the guest while the primary runs.
#[test]
fn a_standby_given_up_by_its_primary_does_not_take_over_when_it_wakes() {
    if skip_without_kvm!() {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempdir();
    let sb = StandbyProc::start();
    let (primary, serial) = start_primary(dir.path(), &sb.addr, 500, None, Some(IMAGE_SIZE));
    sb.line(&["initial copy complete at checkpoint"]);
    // Mirroring: acknowledged output is shown.
    let end = Instant::now() + PATIENCE;
    while shown(&serial).len() < 5 {
        assert!(
            Instant::now() < end,
            "the pair never mirrored:\n{}\n--- the primary ---\n{}",
            sb.run.stderr_now(),
            primary.stderr_now()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sb.run.signal(libc::SIGSTOP);
    let line = unprotected_line(&primary, PATIENCE);
    sb.run.signal(libc::SIGCONT);
    let took_over = sb.run.wait_stderr(Duration::from_secs(5), |l| {
        l.contains("taking over") || l.contains("failover")
    });
    assert!(
        took_over.is_none(),
        "the primary gave up on its standby ({line}) and runs on, yet the standby took over: {}",
        took_over.unwrap_or_default()
    );
    sb.assert_not_taken_over("the primary gave up on it");
    assert_guest_runs_on(primary, &serial);
}
