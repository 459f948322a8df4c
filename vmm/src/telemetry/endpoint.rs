//! The HTTP endpoint Prometheus scrapes: `GET /metrics` on `--metrics-addr`, served
//! by `tiny_http` on a thread of its own, so a scrape never touches the device loop
//! or the exporter (the figures are atomics the engine updates).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::Telemetry;

/// The media type of the OpenMetrics text format, which `prometheus-client` writes
/// and Prometheus asks for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Failures of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address cannot be listened on (malformed, in use, not this host's).
    #[error("cannot serve metrics on {addr}")]
    Bind {
        /// The address given.
        addr: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The thread cannot be started.
    #[error("cannot start the metrics endpoint's thread")]
    Thread(#[source] std::io::Error),
}

/// A running endpoint; dropping it stops it.
pub struct MetricsEndpoint {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsEndpoint {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one) and serves
    /// `telemetry` at `/metrics` until dropped.
    pub fn serve(addr: &str, telemetry: Telemetry) -> Result<MetricsEndpoint, EndpointError> {
        let bind_err = |source| EndpointError::Bind {
            addr: addr.to_string(),
            source,
        };
        let server = tiny_http::Server::http(addr).map_err(bind_err)?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| bind_err("not an IP address".into()))?;
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                for request in s.incoming_requests() {
                    answer(request, &telemetry);
                }
            })
            .map_err(EndpointError::Thread)?;
        Ok(MetricsEndpoint {
            server,
            addr: bound,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

/// Answers one request: `GET` or `HEAD /metrics` gets the registry; any other path
/// 404, any other method 405. A client that went away is no concern of the VMM's.
fn answer(request: tiny_http::Request, telemetry: &Telemetry) {
    use tiny_http::{Method, Response};
    let text = |code: u16, body: &str| {
        let mut r = Response::from_string(body).with_status_code(code);
        if let Some(h) = header("Content-Type", "text/plain; charset=utf-8") {
            r.add_header(h);
        }
        r
    };
    let path = request.url().split('?').next().unwrap_or_default();
    let method_ok = matches!(request.method(), Method::Get | Method::Head);
    let response = match (path, method_ok) {
        ("/metrics", true) => match telemetry.encode() {
            Ok(body) => {
                let mut r = Response::from_string(body);
                if let Some(h) = header("Content-Type", CONTENT_TYPE) {
                    r.add_header(h);
                }
                r
            }
            Err(_) => text(500, "cannot encode the metrics\n"),
        },
        ("/metrics", false) => {
            let mut r = text(405, "only GET and HEAD are served here\n");
            if let Some(h) = header("Allow", "GET, HEAD") {
                r.add_header(h);
            }
            r
        }
        _ => text(404, "not found: mirrorvm serves its metrics at /metrics\n"),
    };
    let _ = request.respond(response);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Role;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let t = Telemetry::new(Role::Primary);
        let e = MetricsEndpoint::serve("127.0.0.1:0", t).unwrap();
        let a = e.local_addr();
        let ok = get(
            a,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("mirrorvm_checkpoints_total 0"), "{ok}");
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");
        let nf = get(
            a,
            "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = get(
            a,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        drop(e);
        // tiny_http closes its listener on its own accept thread, shortly after the
        // server is dropped: wait for it, boundedly.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(a).is_ok() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::net::TcpStream::connect(a).is_err(), "still listening");
    }

    #[test]
    fn a_bad_address_is_one_error() {
        let t = Telemetry::new(Role::Primary);
        let e = MetricsEndpoint::serve("no-such-host.invalid:x", t)
            .err()
            .unwrap();
        assert!(e.to_string().contains("no-such-host.invalid:x"), "{e}");
    }
}
