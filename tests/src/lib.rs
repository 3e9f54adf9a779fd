//! Helpers shared by the real-client tests: see `cluster.rs`.
