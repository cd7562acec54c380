//! The meta group's state machine: [`ClusterState`] in memory, serialised whole at each
//! checkpoint into the log database's state-machine records.
//!
//! A snapshot is [`SNAPSHOT_MAGIC`], a format version (u32, little endian) and the bincode of
//! the checkpoint record and the state. bincode is not self-describing: a field added to
//! [`ClusterState`] changes the format, so such a change raises [`SNAPSHOT_VERSION`] and keeps a
//! decoder for the versions before it (`decode_snapshot`). Snapshots written before the
//! header existed (no magic) are read as version 1.

use std::io;
use std::sync::{Arc, RwLock};

use basalt_raft::{ApplyItem, CheckpointRecord, SmStore, SnapshotReceiver, SnapshotSink, SnapshotStream, StateMachine};
use bytes::Bytes;
use tokio::sync::watch;

use super::state::{ClusterState, MetaCommand, MetaError, MetaReply};

const SNAPSHOT_KEY: &str = "snapshot";

/// Shared, read-mostly view of the replicated cluster state on this node.
#[derive(Clone)]
pub struct MetaShared {
    state: Arc<RwLock<ClusterState>>,
    version: watch::Sender<u64>,
}

impl Default for MetaShared {
    fn default() -> Self {
        Self { state: Arc::new(RwLock::new(ClusterState::default())), version: watch::channel(0).0 }
    }
}

impl MetaShared {
    /// A copy of the current state.
    pub fn snapshot(&self) -> ClusterState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` on the current state.
    pub fn with<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Notified whenever the applied state changes version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn replace(&self, state: ClusterState) {
        let version = state.version;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.version.send_replace(version);
    }
}

/// Opens every meta snapshot this format knows.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BSLTMETA";

/// The format this binary writes (and the newest it reads).
pub const SNAPSHOT_VERSION: u32 = 1;

fn encode_snapshot(record: &CheckpointRecord, state: &ClusterState) -> Vec<u8> {
    let mut out = SNAPSHOT_MAGIC.to_vec();
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    // Serialising plain structs and maps into a Vec cannot fail.
    bincode::serialize_into(&mut out, &(record.encode(), state)).expect("cluster state serialises");
    out
}

fn decode_snapshot(bytes: &[u8]) -> io::Result<(CheckpointRecord, ClusterState)> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let (version, body) = match bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) {
        Some(rest) => {
            let (v, body) = rest.split_at_checked(4).ok_or_else(|| invalid("meta snapshot truncated in its header".into()))?;
            let v: [u8; 4] = v.try_into().map_err(|_| invalid("meta snapshot header".into()))?;
            (u32::from_le_bytes(v), body)
        }
        None => (1, bytes),
    };
    let (record, state): (Vec<u8>, ClusterState) = match version {
        1 => bincode::deserialize(body).map_err(|e| invalid(format!("corrupt meta snapshot (format 1): {e}")))?,
        v => {
            return Err(invalid(format!(
                "meta snapshot format {v} is newer than this binary reads (up to {SNAPSHOT_VERSION}): run the newer basalt-node"
            )));
        }
    };
    let record = CheckpointRecord::decode(&record).map_err(|e| invalid(e.to_string()))?;
    Ok((record, state))
}

/// The meta state machine.
pub struct MetaStateMachine {
    shared: MetaShared,
    store: SmStore,
}

impl MetaStateMachine {
    /// A state machine publishing into `shared` and checkpointing into `store`.
    pub fn new(shared: MetaShared, store: SmStore) -> Self {
        Self { shared, store }
    }
}

/// A serialised meta snapshot.
pub struct MetaSnapshot(Option<Bytes>);

impl SnapshotStream for MetaSnapshot {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

/// Persists one checkpoint.
pub struct MetaCheckpoint {
    bytes: Vec<u8>,
    store: SmStore,
}

impl basalt_raft::Checkpoint for MetaCheckpoint {
    type Snapshot = MetaSnapshot;
    async fn run(self) -> io::Result<MetaSnapshot> {
        self.store.put(SNAPSHOT_KEY, self.bytes.clone()).await?;
        Ok(MetaSnapshot(Some(Bytes::from(self.bytes))))
    }
}

/// Receives a meta snapshot (small: kept in memory).
#[derive(Clone)]
pub struct MetaReceiver;

/// Accumulates a meta snapshot.
pub struct MetaSink(Vec<u8>);

impl SnapshotReceiver for MetaReceiver {
    type Snapshot = MetaSnapshot;
    type Sink = MetaSink;
    async fn begin(&self, _record: &CheckpointRecord) -> io::Result<MetaSink> {
        Ok(MetaSink(Vec::new()))
    }
}

impl SnapshotSink for MetaSink {
    type Snapshot = MetaSnapshot;
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if self.0.len() + chunk.len() > 256 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "meta snapshot larger than 256 MiB"));
        }
        self.0.extend_from_slice(&chunk);
        Ok(())
    }
    async fn finish(self) -> io::Result<MetaSnapshot> {
        Ok(MetaSnapshot(Some(Bytes::from(self.0))))
    }
}

impl StateMachine for MetaStateMachine {
    type Snapshot = MetaSnapshot;
    type Checkpoint = MetaCheckpoint;
    type Receiver = MetaReceiver;

    async fn recover(&mut self) -> io::Result<Option<CheckpointRecord>> {
        let store = self.store.clone();
        let bytes = tokio::task::spawn_blocking(move || store.get_blocking(SNAPSHOT_KEY)).await.map_err(io::Error::other)??;
        let Some(bytes) = bytes else { return Ok(None) };
        let (record, state) = decode_snapshot(&bytes)?;
        self.shared.replace(state);
        Ok(Some(record))
    }

    async fn apply(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
        let mut replies = Vec::with_capacity(items.len());
        let mut state = self.shared.snapshot();
        for item in items {
            let reply = match item.command {
                None => MetaReply::Done,
                Some(bytes) => match bincode::deserialize::<MetaCommand>(&bytes) {
                    Ok(cmd) => state.apply(item.index, cmd),
                    Err(e) => MetaReply::Error(MetaError::InvalidSettings(format!("undecodable meta command: {e}"))),
                },
            };
            replies.push(Bytes::from(bincode::serialize(&reply).expect("meta reply serialises")));
        }
        self.shared.replace(state);
        Ok(replies)
    }

    fn checkpoint(&mut self, record: CheckpointRecord) -> MetaCheckpoint {
        let bytes = self.shared.with(|s| encode_snapshot(&record, s));
        MetaCheckpoint { bytes, store: self.store.clone() }
    }

    async fn open_snapshot(&mut self, _record: &CheckpointRecord) -> io::Result<MetaSnapshot> {
        let store = self.store.clone();
        let bytes = tokio::task::spawn_blocking(move || store.get_blocking(SNAPSHOT_KEY)).await.map_err(io::Error::other)??;
        Ok(MetaSnapshot(bytes.map(Bytes::from)))
    }

    async fn install(&mut self, record: CheckpointRecord, mut snapshot: MetaSnapshot) -> io::Result<()> {
        let bytes = snapshot.next_chunk().await?.ok_or_else(|| io::Error::other("empty meta snapshot"))?;
        let (_, state) = decode_snapshot(&bytes)?;
        self.store.put(SNAPSHOT_KEY, encode_snapshot(&record, &state)).await?;
        self.shared.replace(state);
        Ok(())
    }

    fn receiver(&self) -> MetaReceiver {
        MetaReceiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::MetaCommand;

    fn sample() -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(1, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 20, now_unix_ms: 7 });
        state.next_volume_id = 42;
        state.version = 9;
        state
    }

    #[test]
    fn snapshots_round_trip_and_older_or_unknown_formats_are_handled() {
        let state = sample();
        let record = CheckpointRecord::default();
        let bytes = encode_snapshot(&record, &state);
        assert!(bytes.starts_with(SNAPSHOT_MAGIC));
        assert_eq!(decode_snapshot(&bytes).unwrap(), (record.clone(), state.clone()));

        // Written before the header existed: bare bincode, read as format 1.
        let legacy = bincode::serialize(&(record.encode(), &state)).unwrap();
        assert_eq!(decode_snapshot(&legacy).unwrap().1, state);

        // A newer format is refused by name, not misread.
        let mut newer = SNAPSHOT_MAGIC.to_vec();
        newer.extend_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
        newer.extend_from_slice(&bytes[12..]);
        let e = decode_snapshot(&newer).unwrap_err();
        assert!(e.to_string().contains("newer than this binary"), "{e}");

        // Truncated: an error, never a panic. (There is no checksum: a flipped bit inside
        // the body may decode; the log database's own checksums guard the stored copy.)
        for cut in [3, 8, 10, 12, bytes.len() / 2] {
            assert!(decode_snapshot(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
