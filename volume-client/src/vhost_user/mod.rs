//! A vhost-user-blk device exporting a Basalt volume to QEMU, Cloud Hypervisor and other VMMs
//! that run block devices in a userspace back end.
//!
//! Implements the vhost-user protocol (QEMU docs/interop/vhost-user.rst) with the rust-vmm
//! crates (`vhost`, `vhost-user-backend`, `virtio-queue`, `vm-memory`) and the virtio-blk
//! device (virtio 1.2 §5.2): multiqueue, EVENT_IDX, indirect descriptors, the configuration
//! space (capacity, block size, topology, seg_max, discard and write-zeroes limits), FLUSH,
//! DISCARD, WRITE_ZEROES, GET_ID and read-only devices.
//!
//! - [`proto`][]: virtio-blk constants and the configuration space.
//! - [`request`][]: descriptor chain → request (pure; fuzzed).
//! - [`backend`][]: the device: queues, I/O on the tokio client, batched completions.
//! - [`inflight`][]: requests in flight, kept across a restart of this process.
//! - [`server`][]: the socket, and a fresh device for each front-end connection.

pub mod backend;
pub mod inflight;
pub mod proto;
pub mod request;
pub mod server;

pub use server::{MAX_QUEUES, VhostUserError, VhostUserOptions, VhostUserServer};
