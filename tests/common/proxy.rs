//! A user-space TCP proxy for fault injection between a primary and its standby
//! (this kernel has no netem): [`Proxy::start`] forwards every connection accepted on
//! one address to an upstream address, both ways, and its [`ProxyHandle`] can at any
//! time delay each chunk, throttle each direction, stall (stop forwarding but keep the
//! connections open: the peers see silence, not an error), resume, reset every
//! connection (RST), and count the bytes forwarded each way.
//!
//! Each connection runs four threads: a reader and a writer per direction, joined by
//! a bounded queue of chunks stamped with the time they were read, so a delay does not
//! also throttle. While stalled, nothing is written and, once the queue is full,
//! nothing more is read either, so the sender feels TCP back-pressure. The end of a
//! stream (FIN) travels the same queue: it is delayed and stalled like data and never
//! overtakes it, as on a real link.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks queued between a reader and its writer.
const QUEUE: usize = 64;
/// How often waiting writers look at the connection's state again.
const POLL: Duration = Duration::from_millis(20);

/// A direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting client to the upstream server.
    ToUpstream,
    /// From the upstream server back to the client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }
}

/// A running proxy; dropping it stops accepting and resets every connection.
pub struct Proxy {
    addr: SocketAddr,
    handle: ProxyHandle,
    accept: Option<JoinHandle<()>>,
}

/// Controls a running [`Proxy`] from any thread (cheap to clone).
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
    forwarded: [AtomicU64; 2],
    accepted: AtomicU64,
    conns: Mutex<Vec<Weak<Conn>>>,
    closing: AtomicBool,
}

#[derive(Default)]
struct State {
    delay: [Duration; 2],
    rate: [Option<u64>; 2],
    stalled: bool,
    /// When each direction may next write, under a throttle.
    next_free: [Option<Instant>; 2],
}

/// One proxied connection. The sockets close when the last of its threads lets go.
struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    dead: AtomicBool,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks a free one; see [`Proxy::addr`]) and forwards
    /// every connection to `upstream`. Panics if it cannot listen: it is test code.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(listen)
            .unwrap_or_else(|e| panic!("proxy: cannot listen on {listen}: {e}"));
        let addr = listener.local_addr().expect("proxy: local address");
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            closing: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(&listener, &s))
            .expect("proxy: spawn");
        Proxy {
            addr,
            handle: ProxyHandle { shared },
            accept: Some(accept),
        }
    }

    /// The address it listens on: connect here instead of upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle for another thread.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }
}

impl Deref for Proxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.handle.reset();
    }
}

impl ProxyHandle {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state());
        self.shared.changed.notify_all();
    }

    /// Holds every chunk for `delay` after it was read, in both directions.
    pub fn set_delay(&self, delay: Duration) {
        self.update(|s| s.delay = [delay; 2]);
    }

    /// Holds every chunk going `dir` for `delay` after it was read.
    pub fn set_delay_in(&self, dir: Direction, delay: Duration) {
        self.update(|s| s.delay[dir.index()] = delay);
    }

    /// Limits each direction (all connections together) to `bytes_per_s`; `None`
    /// lifts the limit.
    pub fn set_throttle(&self, bytes_per_s: Option<u64>) {
        self.update(|s| {
            s.rate = [bytes_per_s.filter(|r| *r > 0); 2];
            s.next_free = [None; 2];
        });
    }

    /// Stops forwarding in both directions, keeping every connection open: the
    /// peers see silence. New connections are still accepted, and stall too.
    pub fn stall(&self) {
        self.update(|s| s.stalled = true);
    }

    /// Forwards again after [`ProxyHandle::stall`]; nothing held is lost.
    pub fn resume(&self) {
        self.update(|s| s.stalled = false);
    }

    /// Closes every open connection abruptly, on both sides (SO_LINGER 0: the
    /// peers get a RST, not an orderly end). The proxy keeps accepting.
    pub fn reset(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns)
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        for c in &conns {
            c.dead.store(true, Ordering::SeqCst);
            for s in [&c.client, &c.upstream] {
                abortive(s);
                // Wakes the blocked readers (no FIN goes out for a read shutdown);
                // the close of the last reference then sends the RST.
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        self.shared.changed.notify_all();
    }

    /// Bytes forwarded so far going `dir`, over all connections.
    pub fn forwarded(&self, dir: Direction) -> u64 {
        self.shared.forwarded[dir.index()].load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// SO_LINGER with a zero timeout: closing the socket then sends a RST.
fn abortive(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::Linger, &linger);
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let upstream = match TcpStream::connect(shared.upstream) {
            Ok(u) => u,
            Err(_) => {
                // No upstream: the client sees its connection reset.
                abortive(&client);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let conn = Arc::new(Conn {
            client,
            upstream,
            dead: AtomicBool::new(false),
        });
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        {
            let mut conns = lock(&shared.conns);
            conns.retain(|w| w.strong_count() > 0);
            conns.push(Arc::downgrade(&conn));
        }
        for dir in [Direction::ToUpstream, Direction::ToClient] {
            let (tx, rx) = sync_channel(QUEUE);
            let (c, s) = (Arc::clone(&conn), Arc::clone(shared));
            std::thread::spawn(move || read_side(&c, dir, &tx));
            let c = Arc::clone(&conn);
            std::thread::spawn(move || write_side(&c, &s, dir, &rx));
        }
    }
}

impl Conn {
    fn ends(&self, dir: Direction) -> (&TcpStream, &TcpStream) {
        match dir {
            Direction::ToUpstream => (&self.client, &self.upstream),
            Direction::ToClient => (&self.upstream, &self.client),
        }
    }

    fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

/// A chunk read from one side and when it was read; an empty one is the end of the
/// stream (the FIN), which is delayed and stalled like data, so that it never
/// overtakes what was sent before it.
type Chunk = (Instant, Vec<u8>);

fn read_side(conn: &Conn, dir: Direction, tx: &SyncSender<Chunk>) {
    let (mut src, _) = conn.ends(dir);
    let mut buf = vec![0u8; CHUNK];
    loop {
        match src.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send((Instant::now(), Vec::new()));
                return;
            }
            Ok(n) => {
                if conn.dead() || tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits until `want` bytes read at `read_at` may go out going `i`: past the delay,
/// not stalled, within the throttle. Returns how many may go now (at least 1 when
/// `want` > 0; 0 for the end of the stream), or `None` once the connection is reset.
fn wait_turn(
    conn: &Conn,
    shared: &Shared,
    i: usize,
    read_at: Instant,
    want: usize,
) -> Option<usize> {
    let mut st = lock(&shared.state);
    loop {
        if conn.dead() {
            return None;
        }
        let now = Instant::now();
        let due = read_at + st.delay[i];
        let wait = if st.stalled {
            POLL
        } else if due > now {
            due - now
        } else if want == 0 {
            return Some(0);
        } else if let Some(at) = st.next_free[i].filter(|at| *at > now) {
            at - now
        } else {
            let Some(rate) = st.rate[i] else {
                return Some(want);
            };
            // Small pieces so that the limit holds over short spans too.
            let piece = want.min(usize::try_from(rate / 50).unwrap_or(CHUNK).clamp(1, CHUNK));
            let secs = u64::try_from(piece).unwrap_or(u64::MAX) as f64 / rate as f64;
            st.next_free[i] = Some(now + Duration::from_secs_f64(secs));
            return Some(piece);
        };
        // Re-read the settings when woken: any of them may change meanwhile.
        st = shared
            .changed
            .wait_timeout(st, wait.min(POLL))
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

fn write_side(conn: &Conn, shared: &Shared, dir: Direction, rx: &Receiver<Chunk>) {
    let (_, mut dst) = conn.ends(dir);
    let i = dir.index();
    while let Ok((read_at, chunk)) = rx.recv() {
        if chunk.is_empty() {
            // The source ended (or failed): pass the end on, in its turn. A reset
            // connection is left to its RST instead.
            if wait_turn(conn, shared, i, read_at, 0).is_some() {
                let _ = dst.shutdown(Shutdown::Write);
            }
            return;
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let Some(piece) = wait_turn(conn, shared, i, read_at, rest.len()) else {
                return;
            };
            if dst.write_all(&rest[..piece]).is_err() {
                return;
            }
            shared.forwarded[i]
                .fetch_add(u64::try_from(piece).unwrap_or(u64::MAX), Ordering::SeqCst);
            rest = &rest[piece..];
        }
    }
}
