//! The HTTP API on a Unix socket (`--api-socket PATH`), in the style of
//! cloud-hypervisor's: `GET /api/v1/vm.info`, `PUT /api/v1/vm.pause`, … with JSON
//! bodies. `docs/api.md` specifies every endpoint.
//!
//! - `server.rs`: the socket and the HTTP side (tiny_http, a thread per request):
//!   routing, bounded bodies, JSON, error statuses. Each request becomes a
//!   [`Command`] handed to the current [`Backend`].
//! - `link.rs`: the backend of a running machine. The API thread sends the command
//!   to the device event loop (a channel plus an eventfd) and waits for the reply with
//!   a timeout, so the loop never waits on the API.
//! - `client.rs`: the client `mirrorvm ctl` and the tests use.
//!
//! The [`Endpoint`] holds the backend of whatever this process currently is: a
//! standby answers from its own status, and after a takeover the machine it resumes
//! answers instead.

mod client;
mod link;
mod server;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{ctl, request, ClientError, Response};
pub use link::{link, Inbox, LinkBackend, Pending};
pub use server::{ApiServer, ApiServerError, MAX_BODY};

/// How long a request waits for the device loop to answer, checkpoints aside.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `vm.checkpoint` waits for its checkpoint to be complete at the sink.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a request asks of the VMM, once parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Is the VMM alive (`GET vmm.ping`): answered by the API thread itself.
    Ping,
    /// The status (`GET vm.info`).
    Info,
    /// Park every vCPU until [`Command::Resume`] (`PUT vm.pause`).
    Pause,
    /// Let a paused guest run again (`PUT vm.resume`).
    Resume,
    /// Cut a checkpoint now (`PUT vm.checkpoint`); `wait`: answer once it is
    /// complete at the sink rather than once it is cut or scheduled.
    Checkpoint {
        /// Wait for completion.
        wait: bool,
    },
    /// End the run as a user stop does: a final checkpoint, then exit 0
    /// (`PUT vm.shutdown`).
    Shutdown,
    /// Hand the guest to the standby (`PUT vm.switchover`): a final checkpoint, the
    /// standby resumes it, this host becomes its standby.
    Switchover,
}

impl Command {
    /// Every command (`Checkpoint` with its default, waiting).
    pub const ALL: [Command; 7] = [
        Command::Ping,
        Command::Info,
        Command::Pause,
        Command::Resume,
        Command::Checkpoint { wait: true },
        Command::Shutdown,
        Command::Switchover,
    ];

    /// Its HTTP method and path: the one table the server routes by and the
    /// client sends by.
    pub fn endpoint(&self) -> (&'static str, &'static str) {
        match self {
            Command::Ping => ("GET", "/api/v1/vmm.ping"),
            Command::Info => ("GET", "/api/v1/vm.info"),
            Command::Pause => ("PUT", "/api/v1/vm.pause"),
            Command::Resume => ("PUT", "/api/v1/vm.resume"),
            Command::Checkpoint { .. } => ("PUT", "/api/v1/vm.checkpoint"),
            Command::Shutdown => ("PUT", "/api/v1/vm.shutdown"),
            Command::Switchover => ("PUT", "/api/v1/vm.switchover"),
        }
    }
}

/// The answer to `vmm.ping`: this process.
pub fn ping() -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(Ping {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
    })
    .map_err(|e| ApiError::internal(e.to_string()))
}

/// What this host is to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Runs the guest with no checkpoints.
    Standalone,
    /// Runs the guest, checkpointing into a directory.
    Checkpointing,
    /// Runs the guest, mirroring it to a standby.
    Primary,
    /// Runs the guest with no standby any more (the standby was lost, or this host
    /// took over from its primary).
    Unprotected,
    /// Another host took the fence: this one holds its output and writes.
    Fenced,
    /// Checkpointing failed; the run is ending.
    Failed,
    /// Holds a replica and takes over when the primary dies.
    Standby,
}

/// The answer to `GET /api/v1/vm.info`. Fields that do not apply are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// What this host is to the guest.
    pub role: Role,
    /// `running`, `paused` (by `vm.pause`), or on a standby `listening`,
    /// `copying` (initial copy under way) or `mirroring`.
    pub state: String,
    /// The epoch engine's phase (`precopy`, `idle`, `exporting`, `cut_postponed`,
    /// `closing`, `unprotected`, `fenced`, `failed`); `null` without checkpoints.
    pub phase: Option<String>,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Where checkpoints go: `none`, `directory` or `peer`.
    pub sink: String,
    /// The standby's address (primary), or the primary's (standby).
    pub peer: Option<String>,
    /// Whether a standby holds a complete checkpoint and would take over.
    pub protected: bool,
    /// The last checkpoint cut (primary) or applied (standby).
    pub epoch: Option<u64>,
    /// The last checkpoint complete at the sink.
    pub last_complete: Option<u64>,
    /// Checkpoints cut but not yet complete at the sink.
    pub lag_epochs: u64,
    /// Bytes cut but not yet complete at the sink (the pages and disk regions of
    /// the checkpoint in flight; all of memory during the initial copy).
    pub lag_bytes: u64,
    /// The last cut's pause (kick to resume), µs.
    pub last_pause_us: Option<u64>,
    /// Console bytes held until their checkpoint completes (output commit).
    pub held_output_bytes: u64,
}

/// The answer to `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// mirrorvm's version.
    pub version: String,
    /// The process id.
    pub pid: u32,
}

/// A request the VMM refuses or cannot answer: an HTTP status and a one-line
/// message, sent as `{"error": "…"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }

    /// 409: the command makes no sense in the current role or state.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: 409,
            message: message.into(),
        }
    }

    /// 500: the VMM tried and failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: message.into(),
        }
    }

    /// 503: the VMM cannot answer now (the run is ending, or the loop is busy).
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: 503,
            message: message.into(),
        }
    }
}

/// What answers commands: a running machine, a standby, or a run that has ended.
pub trait Backend: Send + Sync {
    /// Carries out `cmd` and returns the JSON body of the answer, or the refusal.
    fn handle(&self, cmd: Command) -> Result<serde_json::Value, ApiError>;
}

/// Answers every command with 503: nothing is running (before the guest starts,
/// or once its run is ending).
pub struct Unavailable(pub &'static str);

impl Backend for Unavailable {
    fn handle(&self, _cmd: Command) -> Result<serde_json::Value, ApiError> {
        Err(ApiError::unavailable(self.0))
    }
}

/// The backend currently answering, swappable while the server runs (a standby
/// that takes over hands it to the machine it resumes).
#[derive(Clone)]
pub struct Endpoint(Arc<RwLock<Arc<dyn Backend>>>);

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint(Arc::new(RwLock::new(Arc::new(Unavailable(
            "the guest is not running yet",
        )))))
    }
}

impl Endpoint {
    /// From now on `backend` answers.
    pub fn set(&self, backend: Arc<dyn Backend>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = backend;
    }

    /// The backend answering now.
    pub fn current(&self) -> Arc<dyn Backend> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The status of a standby, kept by its session and read by the API.
pub struct StandbyBackend {
    /// The status as the standby last set it.
    pub info: Arc<std::sync::Mutex<VmInfo>>,
}

impl StandbyBackend {
    /// A standby's status before any primary came.
    pub fn initial_info() -> VmInfo {
        VmInfo {
            role: Role::Standby,
            state: "listening".into(),
            phase: None,
            cpus: 0,
            memory_bytes: 0,
            sink: "none".into(),
            peer: None,
            protected: false,
            epoch: None,
            last_complete: None,
            lag_epochs: 0,
            lag_bytes: 0,
            last_pause_us: None,
            held_output_bytes: 0,
        }
    }
}

impl Backend for StandbyBackend {
    fn handle(&self, cmd: Command) -> Result<serde_json::Value, ApiError> {
        match cmd {
            Command::Ping => ping(),
            Command::Info => {
                let info = devices::bus::lock_recover(&self.info).clone();
                serde_json::to_value(info).map_err(|e| ApiError::internal(e.to_string()))
            }
            Command::Pause | Command::Resume | Command::Checkpoint { .. } => Err(
                ApiError::conflict("this host is a standby: it runs no guest until it takes over"),
            ),
            Command::Shutdown => Err(ApiError::conflict(
                "this host is a standby: stop it with SIGTERM, or stop the primary's run, which ends the standby too",
            )),
            Command::Switchover => Err(ApiError::conflict(
                "this host is a standby: ask the primary (its API socket) to switch over to it",
            )),
        }
    }
}
