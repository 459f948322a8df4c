//! The fault-injection proxy of tests/common/proxy.rs, on plain TCP over loopback (no
//! KVM): it forwards faithfully, and its delay, throttle, stall, resume and reset do
//! what they say. Bounds are generous: these must not be timing-fragile.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::proxy::{Direction, Proxy};

const ANY: &str = "127.0.0.1:0";

/// An echo server on loopback: every connection gets back what it sends.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind(ANY).expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// An echo server with a proxy in front of it, and a client connected to the proxy.
fn setup() -> (Proxy, TcpStream) {
    let proxy = Proxy::start(ANY.parse().expect("addr"), echo_server());
    let c = TcpStream::connect(proxy.addr()).expect("connect to the proxy");
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    c.set_nodelay(true).expect("nodelay");
    (proxy, c)
}

fn round_trip(c: &mut TcpStream, data: &[u8]) -> Duration {
    let t = Instant::now();
    c.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, data, "the echo differs");
    t.elapsed()
}

/// The proxy's count going `dir` once it reaches `n` (it counts a chunk after
/// writing it, so the peer may see the bytes a moment before the count does).
fn settled(proxy: &Proxy, dir: Direction, n: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(2);
    while proxy.forwarded(dir) < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
    proxy.forwarded(dir)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| u8::try_from(i % 251).expect("< 256"))
        .collect()
}

#[test]
fn forwards_both_ways_and_counts_bytes() {
    let (proxy, mut c) = setup();
    let data = pattern(300_000);
    // Writes and reads on two threads: 300 kB would fill the socket buffers.
    let mut w = c.try_clone().expect("clone");
    let d2 = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&d2).expect("write"));
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).expect("read");
    writer.join().expect("writer");
    assert!(back == data, "the echo differs");
    assert_eq!(settled(&proxy, Direction::ToUpstream, 300_000), 300_000);
    assert_eq!(settled(&proxy, Direction::ToClient, 300_000), 300_000);
    assert_eq!(proxy.accepted(), 1);
}

#[test]
fn delay_holds_each_chunk() {
    let (proxy, mut c) = setup();
    let fast = round_trip(&mut c, b"hello");
    proxy.set_delay(Duration::from_millis(150));
    let slow = round_trip(&mut c, b"hello");
    // 150 ms each way; the undelayed round trip is well under a millisecond.
    assert!(
        slow >= Duration::from_millis(290),
        "delayed round trip {slow:?}"
    );
    assert!(
        slow < Duration::from_millis(1500),
        "delayed round trip {slow:?}"
    );
    assert!(
        fast < Duration::from_millis(100),
        "plain round trip {fast:?}"
    );
    proxy.set_delay(Duration::ZERO);
    assert!(round_trip(&mut c, b"again") < Duration::from_millis(100));
}

#[test]
fn the_end_of_a_stream_is_delayed_like_its_data() {
    // An upstream that reads to the end and tells when the end came.
    let l = TcpListener::bind(ANY).expect("bind");
    let upstream = l.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let _ = tx.send((Instant::now(), all));
    });
    let proxy = Proxy::start(ANY.parse().expect("addr"), upstream);
    proxy.set_delay(Duration::from_millis(200));
    let c = TcpStream::connect(proxy.addr()).expect("connect");
    // A FIN with no data before it (a connection closed while idle) must not
    // overtake the data of another connection delayed as much.
    let t = Instant::now();
    c.shutdown(std::net::Shutdown::Write).expect("FIN");
    let (at, all) = rx.recv_timeout(Duration::from_secs(5)).expect("the end");
    assert!(all.is_empty());
    let took = at.duration_since(t);
    assert!(
        took >= Duration::from_millis(190),
        "the FIN came after {took:?}"
    );
}

#[test]
fn throttle_bounds_throughput() {
    let (proxy, mut c) = setup();
    // 40 kB at 100 kB/s each way: at least 0.4 s through the slower half, and the
    // two directions overlap, so well under the 0.8 s of both in series.
    proxy.set_throttle(Some(100_000));
    let t = round_trip(&mut c, &pattern(40_000));
    assert!(
        t >= Duration::from_millis(350),
        "40 kB at 100 kB/s took {t:?}"
    );
    assert!(
        t < Duration::from_millis(1500),
        "40 kB at 100 kB/s took {t:?}"
    );
    proxy.set_throttle(None);
    let t = round_trip(&mut c, &pattern(40_000));
    assert!(
        t < Duration::from_millis(200),
        "unthrottled 40 kB took {t:?}"
    );
}

#[test]
fn stall_stops_every_byte_and_resume_loses_none() {
    let (proxy, mut c) = setup();
    round_trip(&mut c, b"warm");
    let before = (
        settled(&proxy, Direction::ToUpstream, 4),
        settled(&proxy, Direction::ToClient, 4),
    );
    assert_eq!(before, (4, 4));
    proxy.stall();
    let data = pattern(50_000);
    c.write_all(&data).expect("write while stalled");
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut one = [0u8; 1];
    match c.read(&mut one) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a stalled proxy answered: {other:?}"),
    }
    assert_eq!(
        (
            proxy.forwarded(Direction::ToUpstream),
            proxy.forwarded(Direction::ToClient)
        ),
        before,
        "bytes crossed a stalled proxy"
    );
    proxy.resume();
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).expect("read after resume");
    assert!(back == data, "bytes lost or changed across the stall");
}

#[test]
fn reset_gives_the_client_a_connection_reset() {
    let (proxy, mut c) = setup();
    round_trip(&mut c, b"before");
    proxy.reset();
    let mut buf = [0u8; 16];
    let t = Instant::now();
    match c.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes (0 = an orderly end) instead of a reset"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    // The proxy still takes new connections.
    let mut c2 = TcpStream::connect(proxy.addr()).expect("connect again");
    c2.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    round_trip(&mut c2, b"after");
    assert_eq!(proxy.accepted(), 2);
}
