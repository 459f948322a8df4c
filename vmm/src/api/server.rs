//! The API's HTTP side: a Unix socket served by tiny_http (a thread per connection
//! reads requests, a thread per request answers it, so a slow client or a
//! `vm.checkpoint` that waits holds up no other request), routing, bounded bodies
//! and JSON errors. What a command does is the [`Backend`]'s business.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use tiny_http::{Header, Request, Response};

use super::{ping, ApiError, Command, Endpoint};

/// The largest request body accepted, bytes (413 beyond it).
pub const MAX_BODY: usize = 4096;

/// Requests answered at once; more are answered 503 until one is done.
const MAX_IN_FLIGHT: usize = 16;

/// Failures to start the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process listens on the socket path.
    #[error(
        "API socket {0} is in use: another process listens on it (stop it, or choose another path)"
    )]
    InUse(String),
    /// The path exists and is not a socket.
    #[error("API socket path {0} exists and is not a socket: refusing to replace it")]
    NotASocket(String),
    /// The path could not be examined.
    #[error("cannot examine the API socket path {path}")]
    Examine {
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A stale socket (nothing listens on it) could not be removed.
    #[error("cannot remove the stale API socket {path}")]
    RemoveStale {
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot listen on the API socket {path}")]
    Bind {
        /// The path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// tiny_http refused the listener.
    #[error("cannot serve HTTP on the API socket {path}: {message}")]
    Serve {
        /// The path.
        path: String,
        /// tiny_http's message.
        message: String,
    },
    /// The dispatcher thread could not be started.
    #[error("cannot start an API thread")]
    Thread(#[source] std::io::Error),
}

/// The API server: listening from [`ApiServer::start`] until dropped, which
/// removes the socket file.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    endpoint: Endpoint,
    stop: Arc<AtomicBool>,
    dispatcher: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    /// Listens on `path` (mode 0600: the API can stop the guest). A socket file
    /// left by a process that died is replaced; one another process listens on is
    /// refused, as is a path that is not a socket.
    pub fn start(path: &Path) -> Result<ApiServer, ApiServerError> {
        crate::run_end::without_stop_signals(|| Self::start_here(path))
    }

    fn start_here(path: &Path) -> Result<ApiServer, ApiServerError> {
        let shown = path.display().to_string();
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApiServerError::Examine {
                    path: shown,
                    source,
                })
            }
            Ok(md) if !md.file_type().is_socket() => return Err(ApiServerError::NotASocket(shown)),
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ApiServerError::InUse(shown)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(|source| ApiServerError::RemoveStale {
                        path: shown.clone(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(ApiServerError::Examine {
                        path: shown,
                        source,
                    })
                }
            },
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiServerError::Bind {
            path: shown.clone(),
            source,
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ApiServerError::Bind {
                path: shown.clone(),
                source,
            },
        )?;
        let server = tiny_http::Server::from_listener(listener, None).map_err(|e| {
            ApiServerError::Serve {
                path: shown,
                message: e.to_string(),
            }
        })?;
        let mut api = ApiServer {
            server: Arc::new(server),
            endpoint: Endpoint::default(),
            stop: Arc::new(AtomicBool::new(false)),
            dispatcher: None,
            path: path.to_path_buf(),
        };
        let (server, endpoint, stop) = (api.server.clone(), api.endpoint.clone(), api.stop.clone());
        let h = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&server, &endpoint, &stop))
            .map_err(ApiServerError::Thread)?;
        api.dispatcher = Some(h);
        Ok(api)
    }

    /// Where the answers come from: set it to the machine or standby that runs.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.server.unblock();
        if let Some(h) = self.dispatcher.take() {
            let _ = h.join();
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve(server: &tiny_http::Server, endpoint: &Endpoint, stop: &AtomicBool) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match server.recv() {
            Ok(rq) => {
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    let busy = ApiError::unavailable(format!(
                        "{MAX_IN_FLIGHT} requests are being answered: try again"
                    ));
                    respond(rq, Err((busy, None)));
                    continue;
                }
                let counted = InFlight(in_flight.clone());
                let endpoint = endpoint.clone();
                // A request whose thread cannot start is dropped, which tiny_http
                // answers with 500.
                if let Err(e) = std::thread::Builder::new()
                    .name("api-request".into())
                    .spawn(move || {
                        answer(rq, &endpoint);
                        drop(counted);
                    })
                {
                    tracing::warn!("API socket: cannot start a thread for a request: {e}");
                }
            }
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                tracing::warn!("API socket: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

fn answer(mut rq: Request, endpoint: &Endpoint) {
    let r = route(&mut rq, endpoint);
    respond(rq, r);
}

fn respond(rq: Request, r: Result<(u16, serde_json::Value), Refusal>) {
    let (status, body, allow) = match r {
        Ok((status, v)) => (status, v, None),
        Err((e, allow)) => (e.status, serde_json::json!({ "error": e.message }), allow),
    };
    let mut resp = Response::from_string(body.to_string()).with_status_code(status);
    // Both headers are fixed ASCII, which tiny_http always accepts.
    if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
        resp.add_header(h);
    }
    if let Some(h) = allow.and_then(|m| Header::from_bytes(&b"Allow"[..], m.as_bytes()).ok()) {
        resp.add_header(h);
    }
    if let Err(e) = rq.respond(resp) {
        tracing::debug!("API socket: cannot answer: {e}");
    }
}

/// Parameters of `vm.checkpoint`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointParams {
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// Commands without parameters accept an empty body or `{}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

type Refusal = (ApiError, Option<&'static str>);

fn route(rq: &mut Request, endpoint: &Endpoint) -> Result<(u16, serde_json::Value), Refusal> {
    let path = rq.url().split('?').next().unwrap_or("").to_string();
    let Some(cmd) = Command::ALL.into_iter().find(|c| c.endpoint().1 == path) else {
        return Err((
            ApiError {
                status: 404,
                message: format!("no such endpoint: {path} (see docs/api.md)"),
            },
            None,
        ));
    };
    let (allowed, _) = cmd.endpoint();
    if rq.method().as_str() != allowed {
        return Err((
            ApiError {
                status: 405,
                message: format!("{path} takes {allowed}, not {}", rq.method()),
            },
            Some(allowed),
        ));
    }
    let body = read_body(rq).map_err(|e| (e, None))?;
    let cmd = match cmd {
        Command::Ping => return ping().map(|v| (200, v)).map_err(|e| (e, None)),
        Command::Checkpoint { .. } => {
            let p: CheckpointParams = params(&body).map_err(|e| (e, None))?;
            Command::Checkpoint { wait: p.wait }
        }
        Command::Info => cmd,
        Command::Pause | Command::Resume | Command::Shutdown | Command::Switchover => {
            let NoParams {} = params(&body).map_err(|e| (e, None))?;
            cmd
        }
    };
    let status = if matches!(cmd, Command::Shutdown | Command::Switchover) {
        202
    } else {
        200
    };
    endpoint
        .current()
        .handle(cmd)
        .map(|v| (status, v))
        .map_err(|e| (e, None))
}

/// The body, bounded by [`MAX_BODY`] before anything is read.
fn read_body(rq: &mut Request) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError {
        status: 413,
        message: format!("the request body is larger than {MAX_BODY} bytes"),
    };
    if rq.body_length().is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

/// A JSON object of parameters; an empty body means none.
fn params<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON for this endpoint: {e}"
        ))
    })
}
