//! Basalt's security: who may connect, who may do what, and the record of what they did.
//!
//! - [`identity`][]: the identities Basalt certificates name (`node-<id>`, `client:<name>`).
//! - [`certs`][]: the cluster CA and the certificates it issues (`basalt cert init|issue`).
//! - [`tls`][]: TLS 1.3 configurations (rustls, *ring*), the accepting side that reads the
//!   ClientHello before deciding, the connecting side that verifies nodes, reloading.
//! - [`nbd_tls`][]: the certificate directory for NBD STARTTLS (QEMU's x509 layout) and its
//!   server configuration.
//! - [`stream`][]: plaintext-or-TLS streams and the dialer every client of a node uses.
//! - [`grpc`][]: tonic channels over the dialer; bearer tokens in metadata.
//! - [`token`][]: bearer tokens (format, generation, hashing).
//! - [`policy`][]: roles, actions, token records, principals, the authorization decision.
//! - [`cidr`][]: IP allow-lists.
//! - [`audit`][]: audit records and their hash chain.

pub mod audit;
pub mod certs;
pub mod cidr;
pub mod error;
pub mod grpc;
pub mod identity;
pub mod nbd_tls;
pub mod policy;
pub mod stream;
pub mod tls;
pub mod token;

pub use error::SecurityError;
pub use identity::Identity;
pub use policy::{Action, Denied, Principal, Role, TokenRecord, TokenTable, authorize};
pub use stream::{ClientStream, Dialer, PeerInfo, ServerStream};
pub use tls::{Expect, Protocol, TlsContext, TlsFiles};
pub use token::{Token, TokenId};
