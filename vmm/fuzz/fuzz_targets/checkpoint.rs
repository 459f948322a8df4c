//! Fuzzes the checkpoint file decoder: any byte string, taken as a checkpoint file,
//! must be refused with an error or decoded, never panic or over-allocate. The first
//! byte bounds the page count (see `vmm::checkpoint::format::fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::checkpoint::format::fuzz(data);
});
