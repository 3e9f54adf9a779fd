//! Tessera's internal protocol, shared by every service.
//!
//! * [`header`]: the fixed 64-byte binary header of every message between a
//!   gateway and a storage daemon (and, later, between storage daemons).
//! * [`map`]: the epoch-numbered cluster map the manager publishes, and the
//!   placement hash that turns (volume, chunk) into a placement group. The
//!   gateway and the manager must agree on it bit for bit, so it lives here.
//! * [`api`]: the JSON bodies of the manager's REST API.
//! * [`iscsi`]: iSCSI access control (ACLs, CHAP) and reservation state as
//!   the manager keeps them.
//!
//! This crate does no I/O: bytes in, values out, values in, bytes out.
#![deny(unsafe_code)]

pub mod api;
pub mod header;
pub mod iscsi;
pub mod map;

pub use header::{Flags, Header, HeaderError, Op, Status};

/// CRC32C (Castagnoli), hardware accelerated where the CPU has it.
/// Used for wire payloads, wire headers and on-disk blocks alike.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continue a CRC32C over more bytes.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}
