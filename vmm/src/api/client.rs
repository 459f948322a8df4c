//! A small HTTP/1.1 client for the API socket: what `mirrorvm ctl` and the tests
//! use, for people without curl. One request per connection (`Connection: close`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The largest answer read, bytes.
const MAX_RESPONSE: u64 = 1 << 20;

/// An answer from the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON).
    pub body: String,
}

impl Response {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Failures to talk to the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket, or it cannot be reached.
    #[error("cannot connect to the API socket {path}")]
    Connect {
        /// The socket.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Reading or writing failed (or timed out).
    #[error("API socket {path}: the request failed")]
    Io {
        /// The socket.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer is not an HTTP response.
    #[error("API socket {path}: the answer is not an HTTP response: {why}")]
    BadResponse {
        /// The socket.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Sends one request (`method` `path`, with `body` as JSON if given) and reads the
/// answer, for at most `timeout` of silence.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let shown = socket.display().to_string();
    let io = |source| ClientError::Io {
        path: shown.clone(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: shown.clone(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body.unwrap_or_default());
    // A server that refuses early (413) may close before reading everything: its
    // answer is still there to read.
    let sent = s.write_all(&req).and_then(|()| s.flush());
    let mut raw = Vec::new();
    let read = s.take(MAX_RESPONSE).read_to_end(&mut raw);
    if raw.is_empty() {
        sent.map_err(io)?;
        read.map_err(io)?;
    }
    parse(&raw).map_err(|why| ClientError::BadResponse { path: shown, why })
}

/// Sends `cmd` to the API at `socket` (what `mirrorvm ctl` does); the answer's
/// status says whether it was carried out.
pub fn ctl(socket: &Path, cmd: super::Command) -> Result<Response, ClientError> {
    let (method, path) = cmd.endpoint();
    let body = match cmd {
        super::Command::Checkpoint { wait } => {
            Some(serde_json::json!({ "wait": wait }).to_string())
        }
        _ => None,
    };
    request(
        socket,
        method,
        path,
        body.as_deref().map(str::as_bytes),
        super::CHECKPOINT_TIMEOUT + Duration::from_secs(5),
    )
}

fn parse(raw: &[u8]) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("it ends inside its head".into()),
        Err(e) => return Err(e.to_string()),
    };
    let status = r.code.ok_or("it has no status")?;
    let mut body = raw.get(head..).unwrap_or_default();
    let length = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    if let Some(n) = length {
        body = body
            .get(..n)
            .ok_or("its body is shorter than its Content-Length")?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_and_refuses_junk() {
        let r =
            parse(b"HTTP/1.1 409 Conflict\r\nContent-Length: 13\r\n\r\n{\"error\":\"x\"}trailing")
                .unwrap();
        assert_eq!(r.status, 409);
        assert_eq!(r.json()["error"], "x");
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}").is_err());
        assert!(parse(b"garbage").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
