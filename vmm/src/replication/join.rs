//! Where a primary accepts standbys that dial it (`mirrorvm run --listen`, and a
//! standby that took over, on its own `--listen` address): `mirrorvm standby --join`.
//!
//! ```text
//!  standby                                   primary (JoinListener)
//!  connect ── Join { Data, token } ────────▶ accepted, waits for its pair (10 s)
//!  connect ── Join { Liveness, token } ────▶ paired by token ─▶ Joined
//!                                            the epoch engine attaches a PeerSink
//!                                            over both (or drops them: busy)
//!  ◀── Hello … as in any session (docs/protocol.md)
//! ```
//!
//! The standby opens both connections, so that a primary behind a firewall that
//! only lets it be reached needs nothing else; the session that follows is the
//! same as when the primary dials (`--peer`). A connection whose first frame is not
//! a Join within [`JOIN_DEADLINE`] is closed with one line on stderr.

use std::time::{Duration, Instant};

use super::protocol::{
    Body, FrameReader, Join, JoinRole, MAX_CONTROL_PAYLOAD, OLDEST_VERSION, VERSION,
};
use super::transport::{Connection, Listener, Transport, TransportError};

/// How long a dialing standby may take to send its Join frame.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(2);
/// How long a data connection waits for its liveness connection.
pub const PAIR_DEADLINE: Duration = Duration::from_secs(10);
/// The most data connections waiting for their pair; the oldest goes first.
pub const MAX_WAITING: usize = 8;

/// A standby that dialed in: both connections of its session.
#[derive(Debug)]
pub struct Joined {
    /// Its address, for messages.
    pub peer: String,
    /// The data connection.
    pub data: Connection,
    /// The liveness connection.
    pub live: Connection,
    /// The protocol version its Join was written in: the newest it speaks.
    pub version: u16,
}

/// A primary's listening endpoint for standbys.
#[derive(Debug)]
pub struct JoinListener {
    listener: Listener,
    waiting: Vec<(u64, Connection, Instant, u16)>,
    /// The newest protocol version accepted.
    max_version: u16,
}

impl JoinListener {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks one).
    pub fn listen(transport: &Transport, addr: &str) -> Result<Self, TransportError> {
        Ok(JoinListener {
            listener: transport.listen(addr)?,
            waiting: Vec::new(),
            max_version: VERSION,
        })
    }

    /// Wraps a listener that is already open (a standby's, once it took over).
    pub fn from_listener(listener: Listener) -> Self {
        JoinListener {
            listener,
            waiting: Vec::new(),
            max_version: VERSION,
        }
    }

    /// Accepts Joins of protocol versions up to `version` only (a host kept on an
    /// older version ignores a newer one's Join, as that version's code did).
    pub fn set_max_version(&mut self, version: u16) {
        self.max_version = version;
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> String {
        self.listener.local_addr()
    }

    /// Waits for the next standby whose two connections have both arrived; gives up
    /// (`Ok(None)`) soon after `stop` is set, so the address is free again for
    /// whoever listens next.
    pub fn accept_unless(
        &mut self,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<Joined>, TransportError> {
        loop {
            let conn = loop {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return Ok(None);
                }
                if let Some(c) = self.listener.accept_within(Duration::from_millis(100))? {
                    break c;
                }
            };
            self.waiting
                .retain(|(_, _, t, _)| t.elapsed() < PAIR_DEADLINE);
            let peer = conn.peer().to_string();
            let (join, version) = match read_join(&conn, self.max_version) {
                Ok(j) => j,
                Err(why) => {
                    eprintln!("mirrorvm: ignored a connection from {peer}: {why}");
                    continue;
                }
            };
            match join.role {
                JoinRole::Data => {
                    if self.waiting.len() >= MAX_WAITING {
                        self.waiting.remove(0);
                    }
                    self.waiting
                        .push((join.token, conn, Instant::now(), version));
                }
                JoinRole::Liveness => {
                    let Some(i) = self.waiting.iter().position(|(t, ..)| *t == join.token) else {
                        eprintln!(
                            "mirrorvm: ignored a connection from {peer}: a liveness connection for no waiting session"
                        );
                        continue;
                    };
                    let (_, data, _, data_version) = self.waiting.remove(i);
                    return Ok(Some(Joined {
                        peer: data.peer().to_string(),
                        data,
                        live: conn,
                        version: data_version.min(version),
                    }));
                }
            }
        }
    }
}

/// Reads the Join frame a dialing standby sends first, within [`JOIN_DEADLINE`],
/// taking nothing after it; with the version it was written in (of those up to
/// `max_version`).
fn read_join(conn: &Connection, max_version: u16) -> Result<(Join, u16), String> {
    conn.set_read_timeout(Some(JOIN_DEADLINE))
        .map_err(|e| e.to_string())?;
    let mut fr = FrameReader::with_max_payload(conn.unbuffered(), MAX_CONTROL_PAYLOAD);
    fr.accept_versions(OLDEST_VERSION, max_version);
    let r = match fr.read_frame() {
        Ok(Some(f)) => match f.body {
            Body::Join(j) => Ok((j, fr.version())),
            other => Err(format!(
                "it began with a {} frame, not a Join (a primary listens for standbys that dial it with --join)",
                other.frame_type()
            )),
        },
        Ok(None) => Err("it closed before its first frame".into()),
        Err(e) => Err(format!("{}", devices::ErrorChain(&e))),
    };
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    r
}

/// Dials the primary at `addr` for one of a session's connections and sends the
/// Join frame that names it, in protocol `version` (the newest the standby speaks,
/// unless an older primary ignored it).
pub fn dial(
    transport: &Transport,
    addr: &str,
    role: JoinRole,
    token: u64,
    version: u16,
    timeout: Duration,
) -> Result<Connection, DialError> {
    let conn = transport
        .connect(addr, timeout)
        .map_err(DialError::Connect)?;
    let mut w = super::protocol::FrameWriter::new(conn.unbuffered_writer(), 0);
    w.set_version(version);
    w.write(0, &Body::Join(Join { role, token }))
        .and_then(|()| w.flush())
        .map_err(DialError::Send)?;
    drop(w);
    Ok(conn)
}

/// Why a standby could not dial its primary.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The primary cannot be reached.
    #[error("cannot reach the primary")]
    Connect(#[source] TransportError),
    /// The Join frame could not be sent.
    #[error("cannot send the Join frame")]
    Send(#[source] super::protocol::FrameError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_connections_of_one_token_pair_and_strangers_are_ignored() {
        let t = Transport::PlainTcp;
        let mut l = JoinListener::listen(&t, "127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        let d = Duration::from_secs(5);
        let dialer = std::thread::spawn(move || {
            // A stranger that sends garbage, a data connection of another session
            // that never pairs, then one whole session.
            let junk = t.connect(&addr, d).unwrap();
            std::io::Write::write_all(&mut junk.unbuffered_writer(), b"GET / HTTP/1.0\r\n\r\n")
                .unwrap();
            let _lonely = dial(&t, &addr, JoinRole::Data, 7, VERSION, d).unwrap();
            let a = dial(&t, &addr, JoinRole::Data, 42, VERSION, d).unwrap();
            let b = dial(&t, &addr, JoinRole::Liveness, 42, OLDEST_VERSION, d).unwrap();
            // Keep them open until the listener paired them.
            std::thread::sleep(Duration::from_millis(300));
            drop((a, b, junk));
        });
        let never = std::sync::atomic::AtomicBool::new(false);
        let j = l.accept_unless(&never).unwrap().unwrap();
        assert!(j.peer.starts_with("127.0.0.1:"));
        assert_eq!(
            j.version, OLDEST_VERSION,
            "the older of its two Joins' versions"
        );
        assert_eq!(
            l.waiting.len(),
            1,
            "the unpaired data connection still waits"
        );
        assert_eq!(l.waiting[0].0, 7);
        dialer.join().unwrap();
    }
}
