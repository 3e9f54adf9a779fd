//! Tessera gateway: serves Tessera volumes over NBD, turning each request
//! into chunk I/O against the storage daemons named by the cluster map.
//!
//! * [`nbd`]: the NBD protocol (codec, handshake, session).
//! * [`volume`]: the `Volume` and `Catalog` traits between protocols and
//!   storage.
//! * [`server`]: the one socket loop.
//! * [`metrics`]: Prometheus metrics and their HTTP endpoint.
//!
//! The gateway holds no data.
#![deny(unsafe_code)]

pub mod busy_poll;
pub mod client;
pub mod embedded;
pub mod frameio;
pub mod iscsi;
pub mod map;
pub mod metrics;
pub mod nbd;
pub mod routing;
pub mod server;
pub mod unix_link;
pub mod volume;
