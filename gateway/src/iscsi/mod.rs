//! iSCSI front end (RFC 7143; SCSI per SPC-4/SBC-4).
//!
//! * [`pdu`]: PDU framing and digests.
//! * [`text`]: key=value text.
//! * [`login`]: login negotiation (security and operational).
//! * [`scsi`]: CDB decoding, sense data, and the pure parts of each
//!   command's answer.
//! * [`pr`]: persistent reservations and SPC-2 reservations.
//! * [`session`]: the full feature phase state machine of one connection.
//! * [`stream`]: PDUs on a socket: data segments read straight into
//!   their own vector, batches written with one gathered `writev`.
//! * [`target`]: the async glue: listeners, connections and command
//!   execution against a [`crate::volume::Volume`].
//! * [`access`]: ACLs, CHAP secrets and reservation state from the manager.
//! * [`fuzz`]: entry points of the cargo-fuzz targets and corpus replay.

pub mod access;
pub mod exec;
pub mod fuzz;
pub mod login;
pub mod pdu;
pub mod pr;
pub mod scsi;
pub mod session;
pub mod stream;
pub mod target;
pub mod text;
