//! The transport between a primary and its standby: the one seam a secure channel
//! plugs into. Everything above it reads and writes frames on a [`Connection`]'s
//! halves and never sees a socket.
//!
//! This transport is plaintext TCP ([`Transport::PlainTcp`]), with
//! `TCP_NODELAY` (acknowledgements and heartbeats are small and must not wait for
//! Nagle). Mutual TLS will be one more variant here, and the default.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Failures of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address does not resolve.
    #[error("cannot resolve {addr}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The address resolves to nothing.
    #[error("{0} resolves to no address")]
    NoAddress(String),
    /// Connecting failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Listening failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Accepting a connection failed.
    #[error("cannot accept a connection on {addr}")]
    Accept {
        /// The listening address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up an established connection failed.
    #[error("cannot set up the connection with {peer}")]
    Setup {
        /// The peer.
        peer: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// How hosts talk to each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP: no authentication, no encryption. For a trusted, private link.
    #[default]
    PlainTcp,
}

/// One established connection.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    peer: String,
}

/// The reading half of a connection.
pub type ReadHalf = Box<dyn Read + Send>;
/// The writing half of a connection.
pub type WriteHalf = Box<dyn Write + Send>;

/// Closes a connection from any thread: both halves' blocked calls return.
#[derive(Debug)]
pub struct Closer(TcpStream);

impl Closer {
    /// Shuts the connection down both ways.
    pub fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }

    /// Bounds each blocking read on the connection (`None`: no bound).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_read_timeout(t)
    }

    /// Whether bytes from the peer wait in this host's receive queue, not yet read:
    /// the peer spoke, even if the reader has not caught up (its thread was not
    /// scheduled). Without blocking, and without touching what the reader will read.
    pub fn has_unread(&self) -> bool {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket we own (the descriptor lives as long as
        // `self.0`) writes one c_int, the number of bytes queued for reading, into
        // `n`, which lives across the call; it changes nothing on the socket.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                libc::FIONREAD,
                std::ptr::addr_of_mut!(n),
            )
        };
        r == 0 && n > 0
    }
}

impl Connection {
    fn new(stream: TcpStream) -> Result<Connection, TransportError> {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "an unknown peer".to_string(), |a| a.to_string());
        stream
            .set_nodelay(true)
            .map_err(|source| TransportError::Setup {
                peer: peer.clone(),
                source,
            })?;
        Ok(Connection { stream, peer })
    }

    /// The peer's address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bounds each blocking read (`None`: no bound); a read that times out fails with
    /// `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), TransportError> {
        self.stream
            .set_read_timeout(t)
            .map_err(|source| TransportError::Setup {
                peer: self.peer.clone(),
                source,
            })
    }

    /// Bounds each blocking write (`None`: no bound); a write that times out fails.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> Result<(), TransportError> {
        self.stream
            .set_write_timeout(t)
            .map_err(|source| TransportError::Setup {
                peer: self.peer.clone(),
                source,
            })
    }

    /// Reads straight from the connection, unbuffered: a first frame read this way
    /// takes nothing that follows it.
    pub fn unbuffered(&self) -> impl Read + '_ {
        &self.stream
    }

    /// Writes straight to the connection, unbuffered.
    pub fn unbuffered_writer(&self) -> impl Write + '_ {
        &self.stream
    }

    /// The two halves, for a reader thread and a writer, and a handle that closes both.
    pub fn split(self) -> Result<(ReadHalf, WriteHalf, Closer), TransportError> {
        let setup = |source| TransportError::Setup {
            peer: self.peer.clone(),
            source,
        };
        let w = self.stream.try_clone().map_err(setup)?;
        let c = self.stream.try_clone().map_err(setup)?;
        Ok((Box::new(self.stream), Box::new(w), Closer(c)))
    }
}

/// A listening endpoint.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    addr: String,
}

impl Listener {
    /// The address it listens on (with the port the system chose for port 0).
    pub fn local_addr(&self) -> String {
        self.inner
            .local_addr()
            .map_or_else(|_| self.addr.clone(), |a| a.to_string())
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let (s, _) = self
            .inner
            .accept()
            .map_err(|source| TransportError::Accept {
                addr: self.addr.clone(),
                source,
            })?;
        Connection::new(s)
    }

    /// Waits for the next connection for at most `timeout` (`Ok(None)` when none came).
    pub fn accept_within(&self, timeout: Duration) -> Result<Option<Connection>, TransportError> {
        let err = |source| TransportError::Accept {
            addr: self.addr.clone(),
            source,
        };
        self.inner.set_nonblocking(true).map_err(err)?;
        let end = std::time::Instant::now() + timeout;
        let r = loop {
            match self.inner.accept() {
                Ok((s, _)) => break Ok(Some(s)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= end {
                        break Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => break Err(err(e)),
            }
        };
        self.inner.set_nonblocking(false).map_err(err)?;
        match r? {
            Some(s) => {
                s.set_nonblocking(false).map_err(err)?;
                Ok(Some(Connection::new(s)?))
            }
            None => Ok(None),
        }
    }
}

fn resolve(addr: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::NoAddress(addr.to_string()));
    }
    Ok(addrs)
}

impl Transport {
    /// Connects to `addr` (`HOST:PORT`), giving up after `timeout`.
    pub fn connect(&self, addr: &str, timeout: Duration) -> Result<Connection, TransportError> {
        let mut last = None;
        for a in resolve(addr)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => return Connection::new(s),
                Err(e) => last = Some(e),
            }
        }
        Err(TransportError::Connect {
            addr: addr.to_string(),
            source: last.unwrap_or_else(|| std::io::Error::other("no address to try")),
        })
    }

    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one).
    pub fn listen(&self, addr: &str) -> Result<Listener, TransportError> {
        let addrs = resolve(addr)?;
        let inner = TcpListener::bind(&addrs[..]).map_err(|source| TransportError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Listener {
            inner,
            addr: addr.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_carries_bytes_both_ways_and_closes_from_another_thread() {
        let t = Transport::PlainTcp;
        let l = t.listen("127.0.0.1:0").unwrap();
        let addr = l.local_addr();
        let client = std::thread::spawn(move || {
            let c = t.connect(&addr, Duration::from_secs(5)).unwrap();
            let (mut r, mut w, _close) = c.split().unwrap();
            w.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            r.read_exact(&mut b).unwrap();
            b
        });
        let s = l.accept_within(Duration::from_secs(5)).unwrap().unwrap();
        let (mut r, mut w, close) = s.split().unwrap();
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        w.write_all(b"pong").unwrap();
        assert_eq!(&client.join().unwrap(), b"pong");
        close.close();
        assert_eq!(r.read(&mut b).unwrap_or(0), 0);
    }

    #[test]
    fn nobody_listening_is_an_error_and_no_connection_is_none() {
        let t = Transport::PlainTcp;
        let l = t.listen("127.0.0.1:0").unwrap();
        assert!(l
            .accept_within(Duration::from_millis(20))
            .unwrap()
            .is_none());
        let addr = l.local_addr();
        drop(l);
        assert!(matches!(
            t.connect(&addr, Duration::from_secs(1)),
            Err(TransportError::Connect { .. })
        ));
        assert!(matches!(
            t.connect("no-such-host.invalid:1", Duration::from_secs(1)),
            Err(TransportError::Resolve { .. } | TransportError::NoAddress(_))
        ));
    }

    #[test]
    fn unread_bytes_are_seen_without_being_taken() {
        let t = Transport::PlainTcp;
        let l = t.listen("127.0.0.1:0").unwrap();
        let c = t.connect(&l.local_addr(), Duration::from_secs(5)).unwrap();
        let s = l.accept_within(Duration::from_secs(5)).unwrap().unwrap();
        let (_cr, mut cw, _cc) = c.split().unwrap();
        let (mut r, _w, close) = s.split().unwrap();
        assert!(!close.has_unread(), "nothing was sent yet");
        cw.write_all(b"beat").unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !close.has_unread() && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(close.has_unread(), "the sent bytes never showed as unread");
        // Seeing them took nothing: the reader still reads all four.
        let mut b = [0u8; 4];
        r.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"beat");
        assert!(!close.has_unread(), "read bytes still count as unread");
    }
}
