//! Replication: keeping a standby host ready to take over.
//!
//! - [`transport`]: the one seam between hosts (plain TCP now, TLS later).
//! - [`protocol`]: the frames, their bounded decoder, and the standby's staging of a
//!   checkpoint (specified in `docs/protocol.md`).
//! - [`liveness`]: heartbeats both ways on a connection of their own, and deadlines.
//! - [`peer`]: the primary's side, [`peer::PeerSink`], one more checkpoint sink.
//! - [`standby`]: the standby's side: the initial copy, applying checkpoints to its
//!   replica, and failover.
//! - [`fence`]: the witness-file fence against two running guests (`docs/fencing.md`).
//! - [`digest`]: the strong hashes of disk chunks that let a returning host receive
//!   only what differs (failback without a full copy).
//! - [`join`]: a primary's listening side, where standbys that dial it (`--join`)
//!   are paired into sessions.

pub mod digest;
pub mod fence;
pub mod join;
pub mod liveness;
pub mod peer;
pub mod protocol;
pub mod standby;
pub mod transport;
