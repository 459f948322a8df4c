//! Fuzzes the replication frame decoder and the standby's checkpoint staging: any byte
//! string, read as frames from a primary, must end in an error or a clean end of
//! stream, never a panic or an allocation beyond the reader's bound (see
//! `vmm::replication::protocol::fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::replication::protocol::fuzz(data);
});
