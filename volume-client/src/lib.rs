//! The cluster-aware volume client.
//!
//! [`Cluster`] holds the cluster map and connections; [`Volume`] does I/O: it splits requests at
//! extent boundaries, sends each piece to its placement group's leader, follows leader changes
//! with backoff, and checks a crc32c per 4 KiB block end to end (computed here before writing,
//! verified by the nodes on write, and verified here again on read).
//!
//! ```no_run
//! # async fn demo() -> Result<(), basalt_volume_client::ClientError> {
//! use basalt_volume_client::Cluster;
//! // A cluster with security on needs `ClientOptions::security` (CA and token): see `connect_with`.
//! let cluster = Cluster::connect(&["127.0.0.1:7001".to_string()]).await?;
//! let vol = cluster.open_volume("demo").await?;
//! vol.write(4096, bytes::Bytes::from_static(b"hello"), false).await?;
//! assert_eq!(&vol.read(4096, 5).await?[..], b"hello");
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod crypt;
mod data_conn;
pub mod error;
pub mod metrics;
pub mod nbd;
pub mod reencrypt;
pub mod snapshot_cut;
pub mod vhost_user;
pub mod volume;

pub use cluster::{ClientOptions, ClientSecurity, Cluster};
pub use error::ClientError;
pub use volume::Volume;
