//! Replication: keeping a standby host ready to take over (the mirroring issue).
//!
//! Groundwork so far, each piece tested on its own: the wire protocol's frames and the
//! standby's staging of a checkpoint (`protocol`), and the witness-file fence
//! (`fence`). The peer sink, the standby's receiver and failover come next; a peer
//! plugs into the engine as one more `CheckpointSink` (docs/architecture.md).

pub mod fence;
pub mod protocol;
