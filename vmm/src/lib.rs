//! mirrorvm's virtual machine: KVM VM and memory, vCPUs, boot, devices wiring, the
//! epoch engine and checkpoints.
//!
//! Where to look:
//! - configuration becomes a machine: `machine/build.rs`;
//! - how a cut works: `epoch/cut.rs` (the engine's state machine: `epoch/mod.rs`);
//! - where checkpoints go: `checkpoint/sink.rs` (the directory: `checkpoint/directory.rs`);
//! - where they come from on restore: `checkpoint/source.rs`;
//! - how a run ends: `epoch/ending.rs`, carried out by `machine/run.rs`.

pub mod api;
pub mod arch;
pub mod boot;
pub mod checkpoint;
pub mod config;
pub mod cpuid;
pub mod demo;
pub mod dirty;
pub mod disk;
pub mod epoch;
pub mod fault_probe;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod netlab;
pub mod output;
pub mod progress;
pub mod replication;
pub mod report;
pub mod run_end;
pub mod telemetry;
pub mod terminal;
pub mod testguest;
pub mod threads;
pub mod vcpu;
pub mod vm_state;

pub use config::VmConfig;
pub use machine::{HandedOver, Machine, VmmError};
pub use run_end::RunEnd;
