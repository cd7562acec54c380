//! The state-machine contract Basalt's groups implement, and its adapter to openraft.
//!
//! A state machine sees committed commands in order ([`StateMachine::apply`]) and decides how
//! to make them durable: a placement group writes blocks without syncing and makes them durable
//! at checkpoints (the Raft log covers the gap and is replayed after a crash); the meta group
//! keeps its state in memory and serialises it at checkpoints. Either way a checkpoint stores a
//! [`CheckpointRecord`] with the state, and only entries up to a checkpoint are ever purged
//! from the log.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::type_config::alias::SnapshotOf;
use openraft::{EntryPayload, OptionalSend};

use crate::types::{ApplyItem, CheckpointRecord, LogId, Reply, SnapshotMeta, StoredMembership, TypeConfig};

/// Most entries handed to one `apply` call.
const MAX_APPLY_BATCH: usize = 256;

/// A replicated state machine driven by one Raft group.
pub trait StateMachine: Send + Sync + 'static {
    /// A readable copy of the state: streamed to a peer, or received from one.
    type Snapshot: SnapshotStream;
    /// The work of one checkpoint, captured on the apply path and run beside it.
    type Checkpoint: Checkpoint<Snapshot = Self::Snapshot>;
    /// Starts receiving a snapshot from the leader into a staging area.
    type Receiver: SnapshotReceiver<Snapshot = Self::Snapshot>;

    /// At startup: the record stored by the last checkpoint or snapshot install, if any. The
    /// state must already reflect at least that record.
    fn recover(&mut self) -> impl Future<Output = io::Result<Option<CheckpointRecord>>> + Send;

    /// Applies committed entries in order; returns one reply per item (items without a
    /// command get an ignored reply). Need not be durable until the next checkpoint.
    fn apply(&mut self, items: Vec<ApplyItem>) -> impl Future<Output = io::Result<Vec<Bytes>>> + Send;

    /// Whether an optional (policy-driven) checkpoint should wait, e.g. while a snapshot is being
    /// streamed to a peer and the log it needs must stay.
    fn defer_checkpoint(&self) -> bool {
        false
    }

    /// Captures a checkpoint of the state as applied so far, to be recorded with `record`.
    fn checkpoint(&mut self, record: CheckpointRecord) -> Self::Checkpoint;

    /// A fresh readable handle to the state of the last checkpoint (a placement group may hand
    /// out its live state: block writes are idempotent overwrites, so a copy taken while writes
    /// continue is valid when followed by the log from the checkpoint on).
    fn open_snapshot(&mut self, record: &CheckpointRecord) -> impl Future<Output = io::Result<Self::Snapshot>> + Send;

    /// Replaces the whole state with `snapshot` and records `record`.
    fn install(&mut self, record: CheckpointRecord, snapshot: Self::Snapshot) -> impl Future<Output = io::Result<()>> + Send;

    /// A handle that can stage incoming snapshots while this state machine keeps applying.
    fn receiver(&self) -> Self::Receiver;
}

/// One checkpoint's work.
pub trait Checkpoint: Send + Sync + 'static {
    /// What a finished checkpoint yields.
    type Snapshot;
    /// Makes the captured state durable and returns a handle to it.
    fn run(self) -> impl Future<Output = io::Result<Self::Snapshot>> + Send;
}

/// A snapshot that can be streamed out.
pub trait SnapshotStream: Send + Sync + 'static {
    /// The next piece to send, `None` at the end.
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// Creates staging areas for incoming snapshots.
pub trait SnapshotReceiver: Clone + Send + Sync + 'static {
    /// The snapshot a finished transfer becomes.
    type Snapshot;
    /// The staging area.
    type Sink: SnapshotSink<Snapshot = Self::Snapshot>;
    /// Prepares to receive the snapshot described by `record`.
    fn begin(&self, record: &CheckpointRecord) -> impl Future<Output = io::Result<Self::Sink>> + Send;
}

/// Receives one snapshot's pieces.
pub trait SnapshotSink: Send + 'static {
    /// The snapshot a finished transfer becomes.
    type Snapshot;
    /// Stores the next piece.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Completes the transfer.
    fn finish(self) -> impl Future<Output = io::Result<Self::Snapshot>> + Send;
}

/// Adapts a [`StateMachine`] to openraft's `RaftStateMachine`, tracking the applied position
/// and membership that openraft asks about.
pub(crate) struct SmAdapter<S: StateMachine> {
    sm: S,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<SnapshotMeta>>>,
}

impl<S: StateMachine> SmAdapter<S> {
    pub(crate) async fn new(mut sm: S) -> io::Result<Self> {
        let record = sm.recover().await?;
        let (last_applied, membership, current) = match record {
            Some(r) => (r.meta.last_log_id, r.meta.last_membership.clone(), Some(r.meta)),
            None => (None, StoredMembership::default(), None),
        };
        Ok(Self { sm, last_applied, membership, current: Arc::new(Mutex::new(current)) })
    }

    fn builder(&mut self) -> CheckpointBuilder<S> {
        let record = CheckpointRecord::new(self.last_applied, self.membership.clone());
        CheckpointBuilder { checkpoint: Some(self.sm.checkpoint(record.clone())), record, current: self.current.clone() }
    }
}

/// Runs one checkpoint for openraft's snapshot machinery.
pub(crate) struct CheckpointBuilder<S: StateMachine> {
    checkpoint: Option<S::Checkpoint>,
    record: CheckpointRecord,
    current: Arc<Mutex<Option<SnapshotMeta>>>,
}

impl<S: StateMachine> RaftSnapshotBuilder<TypeConfig> for CheckpointBuilder<S> {
    type SnapshotData = S::Snapshot;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, S::Snapshot>, io::Error> {
        let checkpoint = self.checkpoint.take().ok_or_else(|| io::Error::other("checkpoint already built"))?;
        let snapshot = checkpoint.run().await?;
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let newer = current.as_ref().map(|c| c.last_log_id < self.record.meta.last_log_id).unwrap_or(true);
        if newer {
            *current = Some(self.record.meta.clone());
        }
        Ok(Snapshot { meta: self.record.meta.clone(), snapshot })
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig> for SmAdapter<S> {
    type SnapshotData = S::Snapshot;
    type SnapshotBuilder = CheckpointBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(first) = entries.next().await {
            // Take whatever else is already committed, so the state machine can batch its I/O.
            let mut batch = vec![first?];
            while batch.len() < MAX_APPLY_BATCH {
                match entries.next().now_or_never() {
                    Some(Some(item)) => batch.push(item?),
                    _ => break,
                }
            }
            let items = batch
                .iter()
                .map(|(entry, _)| ApplyItem {
                    index: entry.log_id.index,
                    command: match &entry.payload {
                        EntryPayload::Normal(c) => Some(c.0.clone()),
                        _ => None,
                    },
                })
                .collect();
            let replies = self.sm.apply(items).await?;
            if replies.len() != batch.len() {
                return Err(io::Error::other(format!("state machine returned {} replies for {} entries", replies.len(), batch.len())));
            }
            for ((entry, responder), reply) in batch.into_iter().zip(replies) {
                if let EntryPayload::Membership(m) = &entry.payload {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                }
                self.last_applied = Some(entry.log_id);
                if let Some(r) = responder {
                    r.send(Reply(reply));
                }
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, force: bool) -> Option<Self::SnapshotBuilder> {
        if !force && self.sm.defer_checkpoint() {
            return None;
        }
        Some(self.builder())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: S::Snapshot) -> Result<(), io::Error> {
        self.sm.install(CheckpointRecord { meta: meta.clone() }, snapshot).await?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, S::Snapshot>>, io::Error> {
        let meta = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(meta) = meta else { return Ok(None) };
        let snapshot = self.sm.open_snapshot(&CheckpointRecord { meta: meta.clone() }).await?;
        Ok(Some(Snapshot { meta, snapshot }))
    }
}

/// A small in-memory state machine for this crate's tests: it counts applied commands and its
/// snapshot is that count.
#[cfg(test)]
pub(crate) mod test_sm {
    use super::*;

    #[derive(Clone, Default)]
    pub(crate) struct Counter {
        pub(crate) applied: Arc<Mutex<(u64, Option<CheckpointRecord>)>>,
    }

    pub(crate) struct Bytes8(pub(crate) Option<Bytes>);

    impl SnapshotStream for Bytes8 {
        async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
            Ok(self.0.take())
        }
    }

    pub(crate) struct CounterCheckpoint(u64);

    impl Checkpoint for CounterCheckpoint {
        type Snapshot = Bytes8;
        async fn run(self) -> io::Result<Bytes8> {
            Ok(Bytes8(Some(Bytes::copy_from_slice(&self.0.to_le_bytes()))))
        }
    }

    #[derive(Clone)]
    pub(crate) struct CounterReceiver;

    pub(crate) struct CounterSink(Vec<u8>);

    impl SnapshotReceiver for CounterReceiver {
        type Snapshot = Bytes8;
        type Sink = CounterSink;
        async fn begin(&self, _record: &CheckpointRecord) -> io::Result<CounterSink> {
            Ok(CounterSink(Vec::new()))
        }
    }

    impl SnapshotSink for CounterSink {
        type Snapshot = Bytes8;
        async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
            self.0.extend_from_slice(&chunk);
            Ok(())
        }
        async fn finish(self) -> io::Result<Bytes8> {
            Ok(Bytes8(Some(Bytes::from(self.0))))
        }
    }

    impl StateMachine for Counter {
        type Snapshot = Bytes8;
        type Checkpoint = CounterCheckpoint;
        type Receiver = CounterReceiver;

        async fn recover(&mut self) -> io::Result<Option<CheckpointRecord>> {
            Ok(self.applied.lock().unwrap().1.clone())
        }

        async fn apply(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
            let mut st = self.applied.lock().unwrap();
            Ok(items
                .iter()
                .map(|i| {
                    if i.command.is_some() {
                        st.0 += 1;
                    }
                    Bytes::copy_from_slice(&st.0.to_le_bytes())
                })
                .collect())
        }

        fn checkpoint(&mut self, record: CheckpointRecord) -> CounterCheckpoint {
            let mut st = self.applied.lock().unwrap();
            st.1 = Some(record);
            CounterCheckpoint(st.0)
        }

        async fn open_snapshot(&mut self, _record: &CheckpointRecord) -> io::Result<Bytes8> {
            let st = self.applied.lock().unwrap();
            Ok(Bytes8(Some(Bytes::copy_from_slice(&st.0.to_le_bytes()))))
        }

        async fn install(&mut self, record: CheckpointRecord, mut snapshot: Bytes8) -> io::Result<()> {
            let data = snapshot.next_chunk().await?.unwrap_or_default();
            let n = u64::from_le_bytes(data.as_ref().try_into().map_err(|_| io::Error::other("bad counter snapshot"))?);
            *self.applied.lock().unwrap() = (n, Some(record));
            Ok(())
        }

        fn receiver(&self) -> CounterReceiver {
            CounterReceiver
        }
    }
}
