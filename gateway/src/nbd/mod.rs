//! NBD front end: the wire codec, the handshake state machine and the
//! transmission session (proto.md in NetworkBlockDevice/nbd).

pub mod codec;
pub mod fuzz;
pub mod handshake;
pub mod session;
