//! The project's own test guest (resources/testguest), built by `vmm/build.rs` and
//! embedded here so that `mirrorvm run` needs no files.

/// The test guest's ELF image.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));
