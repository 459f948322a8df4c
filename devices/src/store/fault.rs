//! Fault-injecting files.
