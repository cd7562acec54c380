//! An NBD server exporting Basalt volumes to QEMU, the Linux kernel and libnbd tools.
//!
//! Implements the NBD protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>):
//! fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`, `LIST`, `ABORT` and
//! `STRUCTURED_REPLY`, and `STARTTLS` (FORCEDTLS mode, client certificates required); commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with `NO_HOLE`) and DISC,
//! with FUA; several connections per export; pipelined requests answered out of order.
//!
//! - [`proto`][]: constants.
//! - [`handshake`][]: option negotiation.
//! - [`request`][]: request parsing and validation (pure; fuzzed).
//! - [`server`][]: listeners, connections, transmission.
//! - [`refusals`][]: refused connections, reported to the cluster's audit log.

pub mod handshake;
pub mod proto;
pub mod refusals;
pub mod request;
pub mod server;

pub use server::{Export, MAX_REQUEST, NbdOptions, NbdServer};
