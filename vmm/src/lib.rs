//! mirrorvm's virtual machine: KVM VM and memory, vCPUs, boot, devices wiring and
//! the run loop.

pub mod boot;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod dirty;
pub mod disk;
pub mod epoch;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod testguest;
pub mod vcpu;
pub mod vm_state;

pub use config::VmConfig;
pub use machine::{Machine, RunEnd, VmmError};
