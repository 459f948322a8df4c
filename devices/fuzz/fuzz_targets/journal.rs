//! Fuzzes the region journal parser, verifier and recovery: any byte string, taken as
//! a journal, must be refused with an error or opened, never panic or over-allocate.
//! See `devices::store::fuzz_journal` for how the first byte selects options.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::store::fuzz_journal(data);
});
