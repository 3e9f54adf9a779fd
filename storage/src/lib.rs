//! Tessera storage daemon: owns disks, does all data I/O through io_uring,
//! and serves the internal protocol (`tessera_wire`) to gateways.
//!
//! * [`io`]: the disk engines (io_uring, blocking, simulated) behind one
//!   completion-based trait, and aligned buffers.
//! * [`engine`]: the on-disk format and the per-disk state machine
//!   (allocation, redirect-on-write, journal, checkpoints, CRC32C).
//! * [`replication`]: the placement-group replication state machine.
//! * [`daemon`]: disks on their engine threads, the network server, the
//!   manager client (registration, heartbeats, map), metrics.
#![deny(unsafe_code)]

pub mod daemon;
pub mod engine;
pub mod io;
pub mod replication;
