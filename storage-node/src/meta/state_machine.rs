//! The meta group's state machine: [`ClusterState`] in memory, serialised whole at each
//! checkpoint into the log database's state-machine records.

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

fn encode_snapshot(record: &CheckpointRecord, state: &ClusterState) -> Vec<u8> {
    bincode::serialize(&(record.encode(), state)).expect("cluster state serialises")
}

fn decode_snapshot(bytes: &[u8]) -> io::Result<(CheckpointRecord, ClusterState)> {
    let (record, state): (Vec<u8>, ClusterState) =
        bincode::deserialize(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("corrupt meta snapshot: {e}")))?;
    let record = CheckpointRecord::decode(&record).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
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
