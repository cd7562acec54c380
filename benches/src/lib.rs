//! Basalt's benchmarks.
//!
//! - `benches/chunk_store.rs`, `benches/log_store.rs`: criterion micro-benchmarks
//!   (`cargo bench -p basalt-benches`).
//! - `basalt-load` (this crate's binary): drives a running cluster through the volume client and
//!   reports IOPS, bandwidth and latency percentiles, for end-to-end numbers.
